"""LoRA on a model itself (a UNet): ``load_lora_adapter``, ``save_lora_adapter`` (the peft layout the
reference writes) and the older ``load_attn_procs``, on the same layers, checks and hooks as a
pipeline's ``load_lora_weights`` (``adapters/lora.py``)."""

from __future__ import annotations

import json
from collections import Counter

from ..errors import StateDictMismatchError
from . import lora_formats
from .lora import LoraLayer, ModelLora, read_lora_source
from .lora_attach import attach_adapter


class LoraModelMixin:
    """``load_lora_adapter`` / ``save_lora_adapter`` / ``load_attn_procs`` on a model itself (a UNet),
    with the same layers, checks and hooks as the pipeline's ``load_lora_weights``."""

    _lora_component = "unet"  # the component name a LoRA file's keys use for this kind of model

    def load_lora_adapter(
        self,
        pretrained_model_name_or_path_or_dict,
        prefix: str | None = "transformer",
        hotswap: bool = False,
        *,
        adapter_name: str | None = None,
        weight_name: str | None = None,
        subfolder: str | None = None,
        use_safetensors: bool | None = None,
        cache_dir=None,
        local_files_only: bool | None = None,
        token=None,
        revision: str | None = None,
        **kwargs,
    ) -> None:
        """Load a LoRA into this model as ``adapter_name``. With ``prefix`` (``"unet"`` for a file made
        for a whole pipeline), only the keys under it are read; ``prefix=None`` reads keys of this
        model's own module paths. Keys of no layer are reported in a warning; a LoRA that maps nothing is an error."""
        from .source import check_kwargs

        check_kwargs(kwargs, "load_lora_adapter")
        tensors, metadata = read_lora_source(
            pretrained_model_name_or_path_or_dict,
            "load_lora_adapter",
            weight_name=weight_name,
            subfolder=subfolder,
            use_safetensors=use_safetensors,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            revision=revision,
        )
        tensors = self._own_lora_keys(tensors, prefix)
        component = self._lora_component
        attach_adapter(
            {component: self},
            tensors,
            _metadata_for(metadata, component),
            adapter_name,
            "load_lora_adapter",
            owner=type(self).__name__,
            hotswap=hotswap,
        )

    def _own_lora_keys(self, tensors: dict, prefix: str | None) -> dict:
        """The LoRA keys as ``<component>.<module path>...`` (kohya keys are left as they are)."""
        kohya = {k: v for k, v in tensors.items() if k.startswith(tuple(lora_formats.KOHYA_PREFIXES))}
        rest = {k: v for k, v in tensors.items() if k not in kohya}
        if prefix is not None:
            under = {k[len(prefix) + 1 :]: v for k, v in rest.items() if k.startswith(prefix + ".")}
            if rest and not under and not kohya:
                found = sorted({k.split(".", 1)[0] for k in rest})
                raise StateDictMismatchError(
                    f"load_lora_adapter: no LoRA key starts with prefix={prefix!r}; the keys start with {found}. "
                    f"Pass prefix={found[0]!r}, or prefix=None for keys that are this model's own module paths"
                )
            rest = under
        return {**kohya, **{f"{self._lora_component}.{k}": v for k, v in rest.items()}}

    def load_attn_procs(self, pretrained_model_name_or_path_or_dict, **kwargs) -> None:
        """The older loader of attention-processor LoRAs (``...processor.to_q_lora.down.weight``); every
        layout ``load_lora_adapter`` reads works here too, keys with or without the ``unet.`` prefix."""
        adapter_name = kwargs.pop("adapter_name", None)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict) and any("custom_diffusion" in k for k in source):
            raise NotImplementedError("Custom Diffusion attention processors are not implemented in diffpipe")
        keys = source.keys() if isinstance(source, dict) else ()
        prefix = self._lora_component if any(k.startswith(self._lora_component + ".") for k in keys) else None
        self.load_lora_adapter(source, prefix=prefix, adapter_name=adapter_name, **kwargs)

    def save_lora_adapter(
        self,
        save_directory,
        adapter_name: str = "default",
        upcast_before_saving: bool = False,
        safe_serialization: bool = True,
        weight_name: str | None = None,
    ) -> None:
        """Write adapter ``adapter_name`` as ``pytorch_lora_weights.safetensors`` in the peft layout the
        reference writes (``<module path>.lora_A.weight`` / ``lora_B.weight``, the LoRA config as
        ``lora_adapter_metadata``), atomically."""
        from ..io.atomic import StagedFolder
        from ..io.state_dict import save_pickle, save_safetensors

        state = ModelLora.of(self)
        if state is None or adapter_name not in state.paths:
            have = sorted(state.paths) if state is not None else []
            raise ValueError(f"save_lora_adapter: no adapter {adapter_name!r} on this model; it has {have}")
        tensors, config = _peft_layout(state.paths[adapter_name], upcast=upcast_before_saving)
        name = weight_name or ("pytorch_lora_weights.safetensors" if safe_serialization else "pytorch_lora_weights.bin")
        with StagedFolder(save_directory) as stage:
            if safe_serialization:
                metadata = {"format": "pt", lora_formats.METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
                save_safetensors(tensors, stage.path(name), metadata=metadata)
            else:
                save_pickle(tensors, stage.path(name))


def _metadata_for(metadata: dict, component: str) -> dict:
    """A model-level file's LoRA config (peft's, unprefixed) as the per-component one the parser reads."""
    raw = (metadata or {}).get(lora_formats.METADATA_KEY)
    if not raw:
        return metadata
    try:
        config = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        return metadata  # the parser reports it
    if not isinstance(config, dict) or "lora_alpha" not in config:
        return metadata
    return {**metadata, lora_formats.METADATA_KEY: json.dumps({f"{component}.{k}": v for k, v in config.items()})}


def _peft_layout(layers: dict[str, LoraLayer], *, upcast: bool) -> tuple[dict, dict]:
    """(tensors, LoRA config) of one adapter in the peft layout: the most common rank and alpha as
    ``r`` / ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern``."""
    tensors = {}
    for path, layer in layers.items():
        for ours, theirs in (
            ("down.weight", "lora_A.weight"),
            ("up.weight", "lora_B.weight"),
            ("up.bias", "lora_B.bias"),
        ):
            value = layer.state_dict().get(ours)
            if value is not None:
                tensors[f"{path}.{theirs}"] = (value.float() if upcast else value).detach().contiguous().cpu()
    ranks = Counter(layer.rank for layer in layers.values())
    alphas = Counter(layer.alpha for layer in layers.values())
    rank, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "rank_pattern": {p: layer.rank for p, layer in layers.items() if layer.rank != rank},
        "alpha_pattern": {p: layer.alpha for p, layer in layers.items() if layer.alpha != alpha},
        "target_modules": sorted(layers),
        "lora_bias": any(layer.up.bias is not None for layer in layers.values()),
        "use_dora": False,
        "bias": "none",
    }
    return tensors, config
