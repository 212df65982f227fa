"""Adapters a pipeline loads on top of its components: IP-Adapter image prompts and LoRAs.

Pipelines get the methods through :class:`IPAdapterMixin` (``load_ip_adapter``,
``set_ip_adapter_scale``, ``unload_ip_adapter``, ``prepare_ip_adapter_image_embeds``) and
:class:`LoraLoaderMixin` (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...).
"""

from .ip_adapter import IPAdapterMixin
from .lora import LoraLoaderMixin

__all__ = ["IPAdapterMixin", "LoraLoaderMixin"]
