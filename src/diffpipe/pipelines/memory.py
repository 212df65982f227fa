"""The pipeline-level memory switches, under the reference's names: each passes on to the models that
have the switch (see ``nn/memory.py``; the VAE's slicing and tiling are the VAE's own)."""

from __future__ import annotations

import torch


class MemorySwitchesMixin:
    """Mixed into :class:`~diffpipe.pipelines.pipeline.DiffusionPipeline`."""

    def _models_with(self, method: str) -> list[torch.nn.Module]:
        return [m for _, m in self._modules_in_order() if callable(getattr(m, method, None))]

    def set_attention_slice(self, slice_size) -> None:
        for model in self._models_with("set_attention_slice"):
            model.set_attention_slice(slice_size)

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Attention in slices of ``slice_size`` (batch x head) rows: ``"auto"`` (half the heads),
        ``"max"`` (one at a time) or a number; less memory, a little slower, the same images."""
        self.set_attention_slice(slice_size)

    def disable_attention_slicing(self) -> None:
        self.set_attention_slice(None)

    def _vae(self, what: str):
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ValueError(f"{what}: {type(self).__name__} has no vae")
        return vae

    def enable_vae_slicing(self) -> None:
        """Decode (and encode) a batch one image at a time."""
        self._vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self) -> None:
        self._vae("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) large images in overlapping tiles, blended at the seams."""
        self._vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self) -> None:
        self._vae("disable_vae_tiling").disable_tiling()

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        for model in self._models_with("enable_forward_chunking"):
            model.enable_forward_chunking(chunk_size, dim)

    def disable_forward_chunking(self) -> None:
        for model in self._models_with("disable_forward_chunking"):
            model.disable_forward_chunking()

    def _qkv_models(self, unet: bool, vae: bool) -> list[torch.nn.Module]:
        wanted = [name for name, on in (("unet", unet), ("vae", vae)) if on]
        return [m for name in wanted if (m := getattr(self, name, None)) is not None]

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        for model in self._qkv_models(unet, vae):
            model.fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        for model in self._qkv_models(unet, vae):
            model.unfuse_qkv_projections()

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        for model in self._models_with("enable_xformers_memory_efficient_attention"):
            model.enable_xformers_memory_efficient_attention(attention_op)

    def disable_xformers_memory_efficient_attention(self) -> None:
        for model in self._models_with("disable_xformers_memory_efficient_attention"):
            model.disable_xformers_memory_efficient_attention()

    @property
    def hf_device_map(self) -> None:
        """diffpipe places whole components (``.to``, offload), never a device map: always None."""
        return None

    def reset_device_map(self) -> None:
        """Nothing to reset (see ``hf_device_map``)."""

    @property
    def name_or_path(self) -> str | None:
        """The repo id or folder the pipeline was loaded from."""
        return self.config.get("_name_or_path")
