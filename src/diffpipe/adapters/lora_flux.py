"""Flux LoRAs in the layouts people publish, as the diffusers / peft layout the loader reads.

- diffusers / peft (``transformer.<path>.lora_A.weight``): read as they are;
- kohya (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  CLIP parts as ``lora_te1_...``) and the BFL original names (``diffusion_model.double_blocks.0.img_attn.
  qkv.lora_A.weight``): the BFL module names go through the Flux key table (single_file/flux_keys.py);
  a LoRA on a fused layer (``qkv``, a single block's ``linear1``) becomes one LoRA per part with the
  shared down projection and the up projection cut as the weight is; ``alpha / rank`` is folded into
  the up projection.

Keys of neither kind are handed on unchanged, so the loader names them as unmapped.
"""

from __future__ import annotations

import re

import torch

from ..single_file import flux_keys

_KOHYA = re.compile(r"^lora_unet_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_ORIGINAL = re.compile(
    r"^(?:diffusion_model\.|transformer\.)?((?:double_blocks|single_blocks)\..+|[a-z_]+_in\..+|final_layer\..+|img_in|txt_in)\.(lora_A\.weight|lora_B\.weight|alpha)$"
)  # noqa: E501
_HALF = {
    "lora_down.weight": "down",
    "lora_A.weight": "down",
    "lora_up.weight": "up",
    "lora_B.weight": "up",
    "alpha": "alpha",
}


def bfl_module_names(num_layers: int, num_single_layers: int) -> dict[str, str]:
    """kohya's underscored spelling -> the BFL module name, for every module of a Flux transformer."""
    names = list(flux_keys._TOP)
    names += [f"double_blocks.{i}.{rest}" for i in range(num_layers) for rest in flux_keys._DOUBLE]
    names += [f"single_blocks.{i}.{rest}" for i in range(num_single_layers) for rest in flux_keys._SINGLE]
    return {name.replace(".", "_"): name for name in names}


def is_flux_original(keys) -> bool:
    return any(_KOHYA.match(k) for k in keys) or any(_ORIGINAL.match(k) for k in keys)


def to_peft(tensors: dict[str, torch.Tensor], transformer) -> dict[str, torch.Tensor]:
    """kohya / BFL-original Flux LoRA keys -> ``transformer.<path>.lora_A/lora_B.weight``; other keys
    unchanged (a ``lora_te1_`` CLIP part is read by the kohya reader)."""
    config = transformer.config
    underscored = bfl_module_names(config.num_layers, config.num_single_layers)
    inner = config.num_attention_heads * config.attention_head_dim
    modules: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    for key, tensor in tensors.items():
        kohya, original = _KOHYA.match(key), _ORIGINAL.match(key)
        module = None
        if kohya and kohya.group(1) in underscored:
            module, half = underscored[kohya.group(1)], _HALF[kohya.group(2)]
        elif original and flux_keys.targets(original.group(1)) is not None:
            module, half = original.group(1), _HALF[original.group(2)]
        if module is None:
            out[key] = tensor
            continue
        modules.setdefault(module, {})[half] = tensor
    for module, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            for half, tensor in parts.items():  # incomplete: handed on so the loader reports it
                out[f"{module}.{half}"] = tensor
            continue
        down, up = parts["down"], parts["up"]
        rank = down.shape[0]
        if "alpha" in parts:
            up = up * (float(parts["alpha"]) / rank)
        names = flux_keys.targets(module)
        ups = torch.split(up, flux_keys.split_sizes(module, up.shape[0], inner), dim=0)
        for name, piece in zip(names, ups):
            if name in flux_keys.SWAPPED:  # the final modulation's (shift, scale) rows are (scale, shift) here
                shift, scale = piece.chunk(2, dim=0)
                piece = torch.cat([scale, shift], dim=0)
            out[f"transformer.{name}.lora_A.weight"] = down
            out[f"transformer.{name}.lora_B.weight"] = piece
    return out
