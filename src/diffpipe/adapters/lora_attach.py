"""Attaching a parsed LoRA to models: the unmapped-key report, the shape checks, and hot-swapping.

The unmapped-key report: every key a load cannot use (no LoRA key, a layer the model does not have,
a component the pipeline does not have) is listed with its reason in one logger warning; with
``strict=True`` the load raises :class:`~diffpipe.errors.StateDictMismatchError` instead, and a LoRA
that maps nothing at all is always that error (a load is never a silent no-op).

Hot-swapping (``hotswap=True``) copies a new LoRA into the tensors of a loaded adapter, keeping its
layers and hooks, so a running (or compiled) pipeline keeps working. As in the reference, the new
LoRA may target the adapter's layers or a subset of them (the others get zeros), and a layer it
targets that the adapter does not have is refused. Ranks may differ when the new rank fits the
loaded tensors (zero padding leaves ``up @ down`` as it is; ``enable_lora_hotswap(target_rank=...)``
pads every load to a rank); alphas may differ (the scale is kept per layer). The reference accepts a
larger rank without that preparation but its outputs then differ from a fresh load; here it is refused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import StateDictMismatchError, summarize
from . import lora_formats
from .lora import _LAYER, BANK, LoraLayer, ModelLora
from .lora_lycoris import lycoris_problems
from ..runtime.hooks import get_hook

logger = logging.getLogger(__name__)


class HotswapError(StateDictMismatchError, RuntimeError):
    """A hot-swap that cannot happen in place (the reference raises RuntimeError there)."""


def attach_adapter(
    models: dict[str, nn.Module],
    tensors: dict,
    metadata: dict,
    adapter_name,
    what: str,
    owner: str,
    *,
    strict: bool = False,
    hotswap: bool = False,
    pad_rank: int | None = None,
) -> str:
    """Parse a LoRA for ``models`` (``{component: model}``), report what it does not map, check every
    layer it names, then attach it to each model as ``adapter_name`` (``default_<n>`` if None) and make
    it active there (or, with ``hotswap``, copy it into the loaded adapter of that name)."""
    unmapped: list[tuple[str, str]] = []
    parsed = lora_formats.parse(tensors, metadata, models, unmapped)
    for component in list(parsed):
        layers = parsed[component]
        if component not in models:
            reason = (
                f"the LoRA has weights for {[component]}, which {owner} does not have (its LoRA-capable "
                f"components: {sorted(models)})"
            )
            unmapped.extend((k, reason) for w in layers.values() for k in w.keys)
            del parsed[component]
            continue
        model = models[component]
        for path in [p for p in layers if not _has_layer(model, p)]:
            reason = (
                f"LoRA keys that match no layer of the {component} ({type(model).__name__}); the LoRA was "
                "made for another model"
            )
            unmapped.extend((k, reason) for k in layers.pop(path).keys)
        if not layers:
            del parsed[component]
    report_unmapped(unmapped, mapped=bool(parsed), strict=strict, what=what)
    for component, layers in parsed.items():
        check_fits(component, models[component], layers)
    if hotswap:
        if adapter_name is None:
            raise ValueError(f"{what}(hotswap=True) needs the adapter_name of the loaded adapter to replace")
        hotswap_adapter(models, parsed, adapter_name)
        return adapter_name
    states = {c: s for c, m in models.items() if (s := ModelLora.of(m)) is not None}
    if adapter_name is None:
        adapter_name = f"default_{len({n for s in states.values() for n in s.paths})}"
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
    in_use = [c for c, s in states.items() if adapter_name in s.paths]
    shared = [p for c, layers in parsed.items() for p in layers if _slot_has(models[c], p, adapter_name)]
    if in_use or shared:
        raise ValueError(
            f"adapter name {adapter_name!r} is already in use (in {in_use or 'a shared layer'}); pick "
            "another adapter_name, delete_adapters() it first, or pass hotswap=True to replace its weights"
        )
    if pad_rank is not None:
        _pad_ranks(parsed, pad_rank)
    for component, layers in parsed.items():
        ModelLora.of(models[component], create=True).add(adapter_name, layers)
    return adapter_name


def report_unmapped(unmapped: list[tuple[str, str]], *, mapped: bool, strict: bool, what: str) -> None:
    """Warn about the keys a load could not use; raise when ``strict`` or when nothing was mapped."""
    if not unmapped:
        return
    by_reason: dict[str, list[str]] = {}
    for key, reason in unmapped:
        by_reason.setdefault(reason, []).append(key)
    detail = "; ".join(f"{reason}: {summarize(sorted(keys), limit=8)}" for reason, keys in by_reason.items())
    if not mapped:
        raise StateDictMismatchError(f"{what}: the LoRA maps to no layer, nothing was loaded. {detail}")
    if strict:
        raise StateDictMismatchError(
            f"{what}(strict=True): {len(unmapped)} LoRA key(s) map to no layer, nothing was loaded. {detail}"
        )
    logger.warning("%s: ignored %d LoRA key(s) that map to no layer. %s", what, len(unmapped), detail)


def _has_layer(model: nn.Module, path: str) -> bool:
    if path.startswith("?") or f"{BANK}." in path:
        return False
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _slot_has(model: nn.Module, path: str, name: str) -> bool:
    slot = get_hook(model.get_submodule(path), _LAYER)
    return slot is not None and name in slot.entries


def _pad_ranks(parsed: lora_formats.Parsed, rank: int) -> None:
    """Zero-pad LoRA pairs to ``rank`` (alpha scaled to keep ``alpha / rank``), for later hot-swaps."""
    for component, layers in parsed.items():
        for path, w in layers.items():
            if w.kind != "lora" or w.magnitude is not None or w.rank == rank:
                continue
            if w.rank > rank:
                raise ValueError(
                    f"LoRA layer {component}.{path} has rank {w.rank}, more than enable_lora_hotswap's "
                    f"target_rank={rank}"
                )
            r = w.rank
            w.alpha = (r if w.alpha is None else w.alpha) * rank / r
            w.down = torch.cat([w.down, w.down.new_zeros(rank - r, *w.down.shape[1:])])
            w.up = torch.cat([w.up, w.up.new_zeros(w.up.shape[0], rank - r, *w.up.shape[2:])], dim=1)


def hotswap_adapter(models: dict[str, nn.Module], parsed: lora_formats.Parsed, name: str) -> None:
    """Copy ``parsed`` into the loaded adapter ``name`` in place (module docstring)."""
    have = {c: s for c, m in models.items() if (s := ModelLora.of(m)) is not None and name in s.paths}
    if not have:
        raise ValueError(
            f"Trying to hotswap LoRA adapter {name!r} but there is no existing adapter by that name. Please "
            "choose an existing adapter name or set `hotswap=False` to prevent hotswapping."
        )
    problems = []
    for component, layers in parsed.items():
        state = have.get(component)
        if state is None:
            problems.append(f"the adapter has no layers in the {component}, the new LoRA has {len(layers)}")
            continue
        extra = sorted(set(layers) - set(state.paths[name]))
        if extra:
            problems.append(f"layers of the {component} the adapter does not target: {summarize(extra)}")
        for path in set(layers) - set(extra):
            w, layer = layers[path], state.paths[name][path]
            loaded = layer.down.weight.shape[0] if isinstance(layer, LoraLayer) else None
            if loaded is None or w.kind != "lora" or w.magnitude is not None:
                problems.append(f"{component}.{path}: hotswap replaces plain LoRA (lora_A/lora_B) weights only")
            elif w.rank > loaded:
                problems.append(
                    f"{component}.{path}: rank {w.rank} does not fit the loaded rank {loaded} (load the first "
                    "adapter after pipe.enable_lora_hotswap(target_rank=...))"
                )
            elif w.up_bias is not None and layer.up.bias is None:
                problems.append(f"{component}.{path}: the new LoRA has a lora_B.bias, the loaded one none")
    fused = [c for c, s in have.items() if name in s.fused]
    if fused:
        problems.append(f"the adapter is fused in {fused}; unfuse_lora() first")
    if problems:
        raise HotswapError(
            f"cannot hotswap adapter {name!r} in place: "
            + "; ".join(problems[:6])
            + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    with torch.no_grad():
        for component, state in have.items():
            new = parsed.get(component, {})
            for path, layer in state.paths[name].items():
                _copy_into(layer, new.get(path))
            state.refresh()


def _copy_into(layer: LoraLayer, w: lora_formats.LoraWeights | None) -> None:
    """``w`` into ``layer``'s tensors, zero-padded to their rank (None: zeros, the layer adds nothing)."""
    down, up = layer.down.weight, layer.up.weight
    down.zero_()
    up.zero_()
    if layer.up.bias is not None:
        layer.up.bias.zero_()
    if w is None:
        return
    r, loaded = w.rank, down.shape[0]
    down[:r].copy_(w.down.to(device=down.device, dtype=down.dtype))
    up[:, :r].copy_(w.up.to(device=up.device, dtype=up.dtype))
    if w.up_bias is not None:
        layer.up.bias.copy_(w.up_bias.to(device=up.device, dtype=up.dtype))
    layer.alpha = float(r if w.alpha is None else w.alpha) * loaded / r  # alpha / rank stays the file's


def check_fits(component: str, model: nn.Module, layers: dict[str, lora_formats.LoraWeights]) -> None:
    """Every layer must be a Linear/Conv2d of ``model`` and every shape must fit it."""
    problems = []
    for path, w in layers.items():
        target = model.get_submodule(path)
        if not isinstance(target, (nn.Linear, nn.Conv2d)):
            problems.append(
                f"{component}.{path} is a {type(target).__name__}; LoRA targets Linear and Conv2d layers ({w.keys[0]})"
            )
            continue
        if w.kind == "lora":
            problems.extend(_shape_problems(component, path, target, w))
        if w.kind != "lora" or w.magnitude is not None:
            problems.extend(lycoris_problems(f"{component}.{path} ({', '.join(w.keys[:2])})", target, w))
    if problems:
        raise StateDictMismatchError(
            "the LoRA does not fit: "
            + "; ".join(problems[:6])
            + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )


def _shape_problems(component: str, path: str, target: nn.Module, w: lora_formats.LoraWeights) -> list[str]:
    where = f"{component}.{path} ({', '.join(w.keys[:2])})"
    down, up = w.down, w.up
    conv = isinstance(target, nn.Conv2d)
    want_dims = 4 if conv else 2
    if down.ndim != want_dims or up.ndim != want_dims:
        return [
            f"{where}: a {type(target).__name__} takes {want_dims}-d LoRA weights, got down "
            f"{tuple(down.shape)} and up {tuple(up.shape)}"
        ]
    if up.shape[1] != down.shape[0]:
        return [
            f"{where}: rank mismatch, down has rank {down.shape[0]} {tuple(down.shape)} but up has "
            f"{up.shape[1]} {tuple(up.shape)}"
        ]
    in_width = target.in_channels if conv else target.in_features
    out_width = target.out_channels if conv else target.out_features
    out = []
    if down.shape[1] != in_width:
        out.append(f"{where}: down {tuple(down.shape)} takes width {down.shape[1]}, the layer takes {in_width}")
    if up.shape[0] != out_width:
        out.append(f"{where}: up {tuple(up.shape)} gives width {up.shape[0]}, the layer gives {out_width}")
    if conv and (tuple(down.shape[2:]) != tuple(target.kernel_size) or tuple(up.shape[2:]) != (1, 1)):
        out.append(
            f"{where}: conv LoRA kernels down {tuple(down.shape[2:])} / up {tuple(up.shape[2:])} do not fit "
            f"the layer's {tuple(target.kernel_size)} (expected that and (1, 1))"
        )
    if w.up_bias is not None and tuple(w.up_bias.shape) != (out_width,):
        out.append(f"{where}: lora_B.bias {tuple(w.up_bias.shape)}, expected ({out_width},)")
    return out
