"""Writing a pipeline (or a lone UNet / VAE) as one file in the original layout, which web UIs and
the original training code load: the reverse of ``keymap``'s tables, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.atomic import atomic_path
from ..io.state_dict import save_safetensors
from . import keymap


def text_family(pipe) -> str:
    """The layout of the pipeline's text encoders: SDXL (two, or the refiner's one), SD 2.x (an OpenCLIP
    tower, whose activation is gelu), or SD 1.x (CLIP ViT-L, quick_gelu)."""
    components = pipe.components
    if components.get("text_encoder_2") is not None:
        return "sdxl" if components.get("text_encoder") is not None else "sdxl-refiner"
    encoder = components.get("text_encoder")
    if encoder is None:
        raise ConfigError(f"{type(pipe).__name__} has no text encoder: save its UNet and VAE one by one")
    return "sd2" if getattr(encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """Every component's weights under the original layout's names."""
    family = text_family(pipe)
    components = pipe.components
    out: dict[str, torch.Tensor] = {}
    out.update(keymap.unet_to_original(components["unet"].state_dict(), components["unet"].config))
    out.update(keymap.vae_to_original(components["vae"].state_dict(), components["vae"].config))
    for name, prefix in keymap.TEXT_PREFIXES[family].items():
        state = components[name].state_dict()
        if prefix.endswith(".model."):
            out.update(keymap.openclip_to_original(state, prefix))
        else:
            out.update(keymap.clip_to_original(state, prefix))
    return out


def save_single_file(
    pipe_or_model, path: str | os.PathLike, *, dtype: torch.dtype | None = None, metadata=None
) -> Path:
    """Write ``pipe_or_model`` to ``path`` (``.safetensors``) in the original layout, atomically;
    ``dtype`` converts floating weights (e.g. ``torch.float16``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: single files are written as .safetensors (pickles are not written)")
    name = type(pipe_or_model).__name__
    if name == "UNet2DConditionModel":
        state = dict(keymap.unet_to_original(pipe_or_model.state_dict(), pipe_or_model.config))
    elif name == "AutoencoderKL":
        state = dict(keymap.vae_to_original(pipe_or_model.state_dict(), pipe_or_model.config, prefix=""))
    elif hasattr(pipe_or_model, "components"):
        state = original_state_dict(pipe_or_model)
    else:
        raise ConfigError(f"save_single_file writes pipelines, UNet2DConditionModel and AutoencoderKL, not {name}")
    tensors = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    info = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_safetensors(tensors, tmp, metadata=info)
    return path
