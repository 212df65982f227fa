"""LoRA without peft: low-rank updates added to a model's ``nn.Linear`` / ``nn.Conv2d`` layers.

Why not peft: peft replaces each target layer by a wrapper (``to_q`` -> ``to_q.base_layer``), which
renames the base model's state-dict keys (a save of the base model is no longer the base model); the
text-encoder side goes through transformers' adapter API, whose peft requirements move with each
transformers release; and layers shared between pipelines (``from_pipe``, a motion UNet around an
image UNet) need one place that knows every model's adapters. About 300 lines here avoid a runtime
dependency (peft is only the reference's backend in the tests). This module keeps the model as it is:

- each adapter's weights live in :class:`LoraLayer` modules inside one ``nn.ModuleDict`` registered on
  the model under ``diffpipe_lora`` (so ``.to()``, ``parameters()`` and memory figures see them), and
  that bank hides itself from ``state_dict()`` / ``load_state_dict()``: the model saves and loads
  exactly its base weights while adapters are attached;
- a forward hook on each target layer adds ``scale * up(down(x))`` for the active adapters, in the
  order they were activated, with ``scale = weight * alpha / rank``;
- ``fuse`` adds ``scale * up @ down`` into the target weights (the hooks then skip it) and
  ``unfuse`` subtracts the same amount again.

Target layers shared between models (a motion UNet runs its image UNet's layers) carry one hook that
serves every model's adapters, so a LoRA loaded through one pipeline acts in the others that share
the layer, as any state of a shared component does.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..runtime.hooks import ModuleHook, add_hook, get_hook, remove_hook
from . import lora_formats, lora_lycoris
from .ip_adapter import layer_scales, scale_for

logger = logging.getLogger(__name__)

BANK = "diffpipe_lora"
_ADAPTERS = "lora_adapters"  # the hook on a model that holds its adapters
_LAYER = "lora"  # the hook on a target layer that adds the active adapters' updates


class LoraLayer(nn.Module):
    """``up(down(x))`` for one target: Linear pairs for a Linear; for a Conv2d a conv with its kernel,
    stride and padding to ``rank`` channels, then a 1x1 conv back."""

    def __init__(self, target: nn.Module, rank: int, alpha: float | None, up_bias: bool = False):
        super().__init__()
        if isinstance(target, nn.Linear):
            self.down = nn.Linear(target.in_features, rank, bias=False)
            self.up = nn.Linear(rank, target.out_features, bias=up_bias)
        elif isinstance(target, nn.Conv2d):
            self.down = nn.Conv2d(
                target.in_channels, rank, target.kernel_size, target.stride, target.padding, bias=False
            )
            self.up = nn.Conv2d(rank, target.out_channels, 1, bias=up_bias)
        else:
            raise TypeError(f"LoRA targets nn.Linear and nn.Conv2d layers, not {type(target).__name__}")
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))

    def delta_weight(self) -> torch.Tensor:
        """``up @ down`` in the target weight's shape, in float32."""
        up = self.up.weight.float().flatten(1)
        down = self.down.weight.float()
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])

    # what the hooks call on every kind of layer (LoHa, LoKr and DoRA ones in lora_lycoris.py)
    @property
    def lora_bias(self) -> torch.Tensor | None:
        return self.up.bias

    def output_delta(self, target: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.down.weight.device != x.device:  # the layer moved with another model sharing it
            self.to(x.device)
        return self(x) * scale

    def merge_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * self.delta_weight().to(weight.device)

    def unmerge_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return -self.merge_delta(weight, scale)


# ------------------------------------------------------------------------------------- per-layer hooks
class _Slot(ModuleHook):
    """The adapters on one target layer (from any model sharing it) and what its forward adds now."""

    def __init__(self):
        self.entries: dict = {}  # adapter name -> (owning ModelLora, module path, LoraLayer)
        self.active: list = []  # [(LoraLayer, scale)] added to the output, in order

    def refresh(self) -> None:
        self.active = []
        for state, path in {id(s): (s, p) for s, p, _ in self.entries.values()}.values():
            if not state.enabled:
                continue
            for name in state.active_at.get(path, ()):
                entry = self.entries.get(name)
                if entry is not None and entry[0] is state and path not in state.fused.get(name, {}):
                    self.active.append((entry[2], state.scale(name, path)))

    def post_forward(self, module: nn.Module, args, kwargs, output):
        if not self.active:
            return output
        x = args[0] if args else kwargs["input"]
        for layer, scale in self.active:
            output = output + layer.output_delta(module, x, scale).to(output.dtype)
        return output


def _hide_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _ignore_missing(module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if f"{BANK}." not in k]


# ------------------------------------------------------------------------------------- a model's LoRA
class ModelLora(ModuleHook):
    """The LoRA adapters of one model: a hook on the model holding their state; their weights live in
    the bank module ``diffpipe_lora``, which removing the hook (the last adapter going) takes away."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.bank = nn.ModuleDict()
        self.bank.register_state_dict_post_hook(_hide_from_state_dict)
        self.bank.register_load_state_dict_post_hook(_ignore_missing)
        model.add_module(BANK, self.bank)
        self.paths: dict[str, dict[str, LoraLayer]] = {}  # adapter -> {module path: layer}
        self.weights: dict[str, float | dict[str, float]] = {}
        # the active adapters per target layer, in the order they add up. Loading an adapter, and
        # set_adapters, set every layer of the model; deleting one lets each layer fall back to the
        # adapters it still has (peft's rules, which the reference follows)
        self.active_at: dict[str, list[str]] = {}
        self.enabled = True
        self.multiplier = 1.0  # a call's cross_attention_kwargs["scale"], on every adapter
        self.fused: dict[str, dict[str, float]] = {}  # adapter -> {path: scale folded into the weights}

    @classmethod
    def of(cls, model: nn.Module, create: bool = False) -> "ModelLora | None":
        state = get_hook(model, _ADAPTERS)
        if state is None and create:
            state = add_hook(model, _ADAPTERS, cls(model))
        return state

    def on_remove(self, module: nn.Module) -> None:
        del module._modules[BANK]

    def scale(self, name: str, path: str) -> float:
        layer = self.paths[name][path]
        return self.multiplier * scale_for(path, self.weights.get(name, 1.0), 1.0) * layer.alpha / layer.rank

    def add(self, name: str, layers: dict[str, lora_formats.LoraWeights]) -> None:
        """Attach adapter ``name`` (already checked by :func:`check_fits`) and make it the active one."""
        built: dict[str, LoraLayer] = {}
        for path, w in layers.items():
            target = self.model.get_submodule(path)
            layer = None
            if w.kind == "lora":
                layer = LoraLayer(target, w.rank, w.alpha, up_bias=w.up_bias is not None)
                state = {"down.weight": w.down, "up.weight": w.up}
                if w.up_bias is not None:
                    state["up.bias"] = w.up_bias
                layer.load_state_dict({k: v.to(dtype=target.weight.dtype) for k, v in state.items()})
            built[path] = lora_lycoris.build_layer(target, w, layer)
        sub = nn.ModuleDict({path.replace(".", "/"): layer for path, layer in built.items()})
        self.bank[name] = sub
        self.paths[name] = built
        self.weights[name] = 1.0
        for path in built:
            target = self.model.get_submodule(path)
            slot = get_hook(target, _LAYER) or add_hook(target, _LAYER, _Slot())
            slot.entries[name] = (self, path, built[path])
        self.set_active([name])

    @property
    def active(self) -> list[str]:
        """The active adapters of the first adapted layer in module order (what the reference reports)."""
        for path, _ in self.model.named_modules():
            if path in self.active_at:
                return list(self.active_at[path])
        return []

    def set_active(self, names: list[str]) -> None:
        self.active_at = {path: list(names) for adapter in self.paths for path in self.paths[adapter]}
        self.refresh()

    def remove(self, name: str) -> None:
        if name in self.fused:
            self.unfuse([name])
        for path in self.paths.pop(name):
            target = self.model.get_submodule(path)
            slot: _Slot = get_hook(target, _LAYER)
            slot.entries.pop(name, None)
            if not slot.entries:
                remove_hook(target, _LAYER)
            else:
                slot.refresh()
        del self.bank[name]
        self.weights.pop(name, None)
        for path in list(self.active_at):
            remaining = [a for a in self.active_at[path] if a != name]
            if not remaining:  # the first adapter still on the layer takes over, as in peft
                remaining = [a for a in self.paths if path in self.paths[a]][:1]
            if remaining:
                self.active_at[path] = remaining
            else:
                del self.active_at[path]
        self.refresh()
        if not self.paths:
            remove_hook(self.model, _ADAPTERS)

    def refresh(self) -> None:
        for name in self.paths:
            for path in self.paths[name]:
                get_hook(self.model.get_submodule(path), _LAYER).refresh()

    def fuse(self, lora_scale: float, names: list[str] | None) -> None:
        todo = [
            (name, path)
            for path, active in self.active_at.items()
            for name in (names if names is not None else active)
            if path in self.paths.get(name, {}) and path not in self.fused.get(name, {})
        ]
        biased = [
            f"{name}: {path}"
            for name, path in todo
            if self.paths[name][path].lora_bias is not None and self.model.get_submodule(path).bias is None
        ]
        if biased:
            raise ValueError(
                f"fuse_lora: LoRA biases cannot be fused into layers without a bias ({biased[:3]}); run them unfused"
            )
        for name, path in todo:
            scale = self.scale(name, path) * lora_scale
            _add_delta(self.model.get_submodule(path), self.paths[name][path], scale)
            self.fused.setdefault(name, {})[path] = scale
        self.refresh()

    def unfuse(self, names: list[str] | None = None) -> None:
        for name in list(self.fused if names is None else names):
            for path, scale in self.fused.pop(name, {}).items():
                _add_delta(self.model.get_submodule(path), self.paths[name][path], scale, undo=True)
        self.refresh()


@torch.no_grad()
def _add_delta(target: nn.Module, layer: nn.Module, scale: float, undo: bool = False) -> None:
    """Fuse ``layer`` at ``scale`` into ``target`` (``undo``: take the same amount out again)."""
    weight = target.weight
    delta = layer.unmerge_delta(weight.float(), scale) if undo else layer.merge_delta(weight.float(), scale)
    weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    if layer.lora_bias is not None:
        bias = (-scale if undo else scale) * layer.lora_bias.float()
        target.bias.copy_((target.bias.float() + bias).to(target.bias.dtype))


# ------------------------------------------------------------------------------------- pipeline methods
class LoraLoaderMixin:
    """``load_lora_weights`` and the adapter controls for pipelines with ``unet`` / ``text_encoder``
    (``text_encoder_2``) components."""

    _lora_components = ("unet", "text_encoder", "text_encoder_2")

    @contextmanager
    def lora_scale_for_call(self, scale: float | None):
        """Every LoRA of the pipeline times ``scale`` inside the block: a call's ``cross_attention_kwargs
        ["scale"]``, which the reference applies to the UNet's and the text encoders' LoRAs. ``None``
        (the call gave no scale) changes nothing."""
        states = list(self._lora_states().values()) if scale is not None else []
        before = [state.multiplier for state in states]
        try:
            for state in states:
                state.multiplier = float(scale)
                state.refresh()
            yield
        finally:
            for state, value in zip(states, before):
                state.multiplier = value
                state.refresh()

    def _lora_models(self) -> dict[str, nn.Module]:
        return {name: m for name in self._lora_components if isinstance(m := getattr(self, name, None), nn.Module)}

    def _lora_states(self) -> dict[str, ModelLora]:
        return {name: s for name, m in self._lora_models().items() if (s := ModelLora.of(m)) is not None}

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict,
        adapter_name: str | None = None,
        *,
        weight_name: str | None = None,
        subfolder: str | None = None,
        use_safetensors: bool | None = None,
        cache_dir=None,
        local_files_only: bool | None = None,
        token=None,
        revision: str | None = None,
        hotswap: bool = False,
        strict: bool = False,
        **kwargs,
    ) -> None:
        """Load a LoRA (a repo id, folder, file or state dict; diffusers/peft incl. DoRA, older
        diffusers, kohya/A1111 and LyCORIS LoHa/LoKr/DoRA layouts) into the UNet and text encoder(s) as
        adapter ``adapter_name`` (``default_<n>`` if not given), which becomes the active adapter of
        the models it touches. Everything is checked against the models before any of them changes.

        Keys that map to no layer are listed in a warning, or refused with ``strict=True``; a LoRA
        that maps nothing is always an error. ``hotswap=True`` replaces the weights of the loaded
        adapter ``adapter_name`` in place (see ``lora_attach.hotswap``)."""
        from .lora_attach import attach_adapter
        from .source import check_kwargs

        check_kwargs(kwargs, "load_lora_weights")
        tensors, metadata = read_lora_source(
            pretrained_model_name_or_path_or_dict,
            "load_lora_weights",
            weight_name=weight_name,
            subfolder=subfolder,
            use_safetensors=use_safetensors,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            revision=revision,
        )
        attach_adapter(
            self._lora_models(),
            tensors,
            metadata,
            adapter_name,
            "load_lora_weights",
            owner=type(self).__name__,
            strict=strict,
            hotswap=hotswap,
            pad_rank=getattr(self, "_lora_hotswap_rank", None),
        )

    def enable_lora_hotswap(self, target_rank: int = 128, check_compiled: str = "error") -> None:
        """Pad every LoRA loaded from now on to rank ``target_rank`` (zeros, same output), so that a
        later ``hotswap=True`` load may bring any rank up to it. Call before loading the first LoRA."""
        if self._lora_states():
            raise RuntimeError("enable_lora_hotswap must be called before loading the first LoRA adapter")
        if check_compiled not in ("error", "warn", "ignore"):
            raise ValueError(f"check_compiled must be 'error', 'warn' or 'ignore', got {check_compiled!r}")
        self._lora_hotswap_rank = int(target_rank)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory,
        unet_lora_layers=None,
        text_encoder_lora_layers=None,
        text_encoder_2_lora_layers=None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        unet_lora_adapter_metadata=None,
        text_encoder_lora_adapter_metadata=None,
        text_encoder_2_lora_adapter_metadata=None,
    ) -> None:
        """Write LoRA layers (``diffpipe.adapters.lora_state_dict(pipe.unet)``, or any peft-layout
        dict) as ``unet.<path>.lora_A.weight`` ... in one file, with their configs as the
        ``lora_adapter_metadata`` the reference writes and reads (see ``lora_save.py``)."""
        from .lora_save import save_lora_weights

        save_lora_weights(
            save_directory,
            {
                "unet": unet_lora_layers,
                "text_encoder": text_encoder_lora_layers,
                "text_encoder_2": text_encoder_2_lora_layers,
            },
            {
                "unet": unet_lora_adapter_metadata,
                "text_encoder": text_encoder_lora_adapter_metadata,
                "text_encoder_2": text_encoder_2_lora_adapter_metadata,
            },
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    # ------------------------------------------------------------------ adapter controls
    def get_list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` for the components holding LoRAs."""
        return {c: list(s.paths) for c, s in self._lora_states().items()}

    def get_active_adapters(self) -> list[str]:
        """The active adapters (of the UNet, or else the first text encoder holding LoRAs)."""
        for state in self._lora_states().values():
            return list(state.active)
        return []

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """Activate exactly ``adapter_names`` with their weights: one number for all, one per name, a
        dict per component (``{"unet": 0.5, "text_encoder": 1.0}``), and for the UNet a dict per block
        (``{"down": ..., "mid": ..., "up": ...}``, blocks left out keep weight 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = list(adapter_weights) if isinstance(adapter_weights, list) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
        states = self._lora_states()
        known = {n for s in states.values() for n in s.paths}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"set_adapters: unknown adapter name(s) {unknown}; loaded adapters: {sorted(known)}")
        for component, state in states.items():
            chosen = {}
            for name, weight in zip(names, weights):
                if name not in state.paths:
                    continue
                if isinstance(weight, dict) and not set(weight) <= {"down", "mid", "up"}:
                    weight = weight.get(component, 1.0)
                    if isinstance(weight, dict) and component != "unet":
                        raise TypeError(f"set_adapters: per-block weights are for the unet, not {component}")
                weight = 1.0 if weight is None else weight
                if isinstance(weight, dict):
                    weight = layer_scales(state.model, weight, default=1.0, what="set_adapters")
                elif isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise TypeError(f"set_adapters: a weight is a number or a dict, got {weight!r}")
                chosen[name] = float(weight) if not isinstance(weight, dict) else weight
            state.weights.update(chosen)
            state.set_active(list(chosen))

    def disable_lora(self) -> None:
        """Run without any LoRA (fused LoRAs are unfused first) until :meth:`enable_lora`."""
        for state in self._lora_states().values():
            if state.fused:
                logger.warning("disable_lora: unfusing the fused LoRA(s) %s first", sorted(state.fused))
                state.unfuse()
            state.enabled = False
            state.refresh()

    def enable_lora(self) -> None:
        for state in self._lora_states().values():
            state.enabled = True
            state.refresh()

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        """Remove adapters (unfusing them first if fused)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        states = self._lora_states()
        unknown = [n for n in names if not any(n in s.paths for s in states.values())]
        if unknown:
            known = sorted({n for s in states.values() for n in s.paths})
            raise ValueError(f"delete_adapters: unknown adapter name(s) {unknown}; loaded adapters: {known}")
        for state in states.values():
            for name in names:
                if name in state.paths:
                    state.remove(name)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA. Fused LoRAs stay in the weights (fuse, then unload, to bake a LoRA in)."""
        for state in self._lora_states().values():
            state.fused.clear()
            for name in list(state.paths):
                state.remove(name)

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **unused,
    ) -> None:
        """Add the active (or the named) adapters, times their weights and ``lora_scale``, into the
        weights of ``components`` (default: all holding LoRAs). ``safe_fusing`` refuses NaN results."""
        states = self._lora_states()
        chosen = components or list(states)
        bad = [c for c in chosen if c not in self._lora_components]
        if bad:
            raise ValueError(f"fuse_lora: {bad} cannot hold LoRAs; components: {list(self._lora_components)}")
        for component in chosen:
            state = states.get(component)
            if state is not None:
                state.fuse(lora_scale, adapter_names)
                if safe_fusing and any(
                    not torch.isfinite(state.model.get_submodule(p).weight).all()
                    for n in state.fused
                    for p in state.fused[n]
                ):
                    state.unfuse()
                    raise ValueError(f"fuse_lora: fusing into the {component} gives NaN/Inf weights; not fused")

    def unfuse_lora(self, components: list[str] | None = None, **unused) -> None:
        """Take fused LoRAs out of the weights again (they run unfused from then on)."""
        for component, state in self._lora_states().items():
            if components is None or component in components:
                state.unfuse()


def read_lora_source(source, what: str, **fetch) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, safetensors metadata) of a LoRA given as a state dict, a file, a folder or a repo id."""
    from .source import lora_file, tensors_of

    if isinstance(source, dict):
        tensors = dict(source)
        bad = [k for k, v in tensors.items() if not torch.is_tensor(v)]
        if bad:
            raise TypeError(f"{what}: a LoRA state dict maps names to tensors; not tensors: {bad[:5]}")
        return tensors, {}
    path, _ = lora_file(source, **fetch)
    return tensors_of(path)
