"""Adapters a pipeline loads on top of its components: IP-Adapter image prompts and LoRAs.

Pipelines get the methods through :class:`IPAdapterMixin` (``load_ip_adapter``,
``set_ip_adapter_scale``, ``unload_ip_adapter``, ``prepare_ip_adapter_image_embeds``) and
:class:`LoraLoaderMixin` (``load_lora_weights``, ``set_adapters``, ``fuse_lora``,
``save_lora_weights``, ...); :func:`lora_state_dict` gives a model's LoRA layers to save.
:class:`TextualInversionLoaderMixin` gives
``load_textual_inversion`` / ``unload_textual_inversion``.
"""

from .ip_adapter import IPAdapterMixin
from .lora import LoraLoaderMixin
from .lora_save import lora_state_dict
from .textual_inversion import TextualInversionLoaderMixin

__all__ = ["IPAdapterMixin", "LoraLoaderMixin", "lora_state_dict", "TextualInversionLoaderMixin"]
