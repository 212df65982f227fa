"""Saving LoRAs in the diffusers/peft layout: ``lora_state_dict`` and ``save_lora_weights``.

``lora_state_dict(pipe.unet)`` gives what the reference's users get from peft's
``get_peft_model_state_dict(unet)``: ``<module path>.lora_A.weight`` / ``lora_B.weight`` (and
``lora_B.bias``); the dict also carries the adapter's LoRA config (``r``, ``lora_alpha``,
``rank_pattern``, ``alpha_pattern``, ``target_modules``, ...) as ``.metadata``.
``save_lora_weights`` writes the layers of each component under ``unet.`` / ``text_encoder.`` /
``text_encoder_2.`` in one file, and the configs as the ``lora_adapter_metadata`` the reference
writes: one JSON object with keys ``<component>.<config field>``. A config comes from the
``*_lora_adapter_metadata`` argument or, when that is None, from a ``lora_state_dict`` result; without
either the file has no config (as the reference writes it), so the loader takes alpha = rank.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from . import lora_formats
from .lora import LoraLayer, ModelLora


class LoraStateDict(dict):
    """``{key: tensor}`` in the peft layout, with the adapter's LoRA config as ``.metadata``."""

    metadata: dict | None = None


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> LoraStateDict:
    """The LoRA ``adapter_name`` of ``model`` (default: its active adapter, or its only one) in the
    peft layout, for ``save_lora_weights``. LoHa / LoKr / DoRA adapters have no such layout: refused."""
    from .lora_model import _peft_layout

    state = ModelLora.of(model)
    if state is None:
        raise ValueError(f"lora_state_dict: the {type(model).__name__} has no LoRA adapters")
    if adapter_name is None:
        active = state.active
        if len(active) != 1 and len(state.paths) != 1:
            raise ValueError(
                f"lora_state_dict: the {type(model).__name__} has adapters {sorted(state.paths)} "
                f"(active: {active}); pass adapter_name="
            )
        adapter_name = active[0] if len(active) == 1 else next(iter(state.paths))
    if adapter_name not in state.paths:
        raise ValueError(f"lora_state_dict: no adapter {adapter_name!r}; the model has {sorted(state.paths)}")
    layers = state.paths[adapter_name]
    other = sorted(p for p, layer in layers.items() if not isinstance(layer, LoraLayer))
    if other:
        raise ValueError(
            f"lora_state_dict: adapter {adapter_name!r} has LoHa/LoKr/DoRA layers ({other[:3]}), which the "
            "lora_A/lora_B layout cannot hold"
        )
    tensors, config = _peft_layout(layers, upcast=False)
    out = LoraStateDict(tensors)
    out.metadata = config
    return out


def _tensors_of(layers) -> dict[str, torch.Tensor]:
    if isinstance(layers, nn.Module):
        layers = layers.state_dict()
    bad = [k for k, v in layers.items() if not torch.is_tensor(v)]
    if bad:
        raise TypeError(f"save_lora_weights: LoRA layers map names to tensors; not tensors: {bad[:5]}")
    return {k: v.detach().contiguous().cpu() for k, v in layers.items()}


def save_lora_weights(
    save_directory,
    layers: dict,
    metadata: dict,
    *,
    is_main_process: bool = True,
    weight_name: str | None = None,
    save_function=None,
    safe_serialization: bool = True,
) -> None:
    """``layers`` / ``metadata``: ``{component: state dict, nn.Module or None}`` / ``{component: config}``."""
    from ..io.atomic import StagedFolder
    from ..io.state_dict import save_pickle, save_safetensors

    given = {c: v for c, v in layers.items() if v is not None}
    if not given:
        raise ValueError(
            "save_lora_weights: pass at least one of unet_lora_layers, text_encoder_lora_layers, "
            "text_encoder_2_lora_layers"
        )
    if not is_main_process:
        return
    tensors, config = {}, {}
    for component, value in given.items():
        tensors.update({f"{component}.{k}": v for k, v in _tensors_of(value).items()})
        own = metadata.get(component)
        if own is None:
            own = getattr(value, "metadata", None)
        if own:
            config.update({f"{component}.{k}": v for k, v in dict(own).items()})
    name = weight_name or ("pytorch_lora_weights.safetensors" if safe_serialization else "pytorch_lora_weights.bin")
    with StagedFolder(save_directory) as stage:
        if save_function is not None:
            save_function(tensors, stage.path(name))
        elif safe_serialization:
            header = {"format": "pt"}
            if config:
                header[lora_formats.METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True, default=_jsonable)
            save_safetensors(tensors, stage.path(name), metadata=header)
        else:
            save_pickle(tensors, stage.path(name))


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"save_lora_weights: {type(value).__name__} in a LoRA config cannot be written as JSON")
