"""Config + weight files -> a module with every parameter assigned, or one error that says why not.

The module is built on the meta device (no memory, no random init), the checkpoint's tensors are
read as memory-mapped views, checked against the module's keys and shapes, cast once when a dtype
is asked for, and assigned in place of the meta parameters. Nothing is left on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, StateDictMismatchError, summarize
from .files import WeightChoice, check_plain_name
from .state_dict import load_tensors

logger = logging.getLogger(__name__)


def read_index(folder: Path, choice: WeightChoice) -> dict[str, str]:
    """The ``weight_map`` of a shard index, with every shard name checked to be a plain file name."""
    path = folder / choice.index
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not UTF-8, bad JSON, too deep
        raise CorruptCheckpointError(f"{path}: cannot read the shard index ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{path}: the shard index has no 'weight_map' object")
    ext = "." + choice.format
    for key, shard in weight_map.items():
        check_plain_name(shard, f"shard file name in {path}")
        if not shard.endswith(ext):
            raise CorruptCheckpointError(f"{path}: shard {shard!r} for {key!r} is not a {ext} file")
    return weight_map


def read_weights(
    folder: Path, choice: WeightChoice, *, cast_to: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, key -> file it came from) for the chosen files in ``folder``; ``cast_to`` converts
    floating tensors while reading (see :func:`load_safetensors`)."""
    if choice.index is None:
        path = folder / choice.files[0]
        tensors = load_tensors(path, cast_to=cast_to)
        return tensors, dict.fromkeys(tensors, path.name)
    weight_map = read_index(folder, choice)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{folder / choice.index} names shard(s) that are not in {folder}: {summarize(missing)}; "
            "the download is incomplete or the index is wrong"
        )
    state: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for shard in shards:
        tensors = load_tensors(folder / shard, cast_to=cast_to)
        expected = {k for k, s in weight_map.items() if s == shard}
        absent = sorted(expected - tensors.keys())
        if absent:
            raise CorruptCheckpointError(
                f"{folder / shard}: the index {choice.index} places {summarize(absent)} in this shard but "
                "the shard does not hold them"
            )
        twice = sorted(k for k in tensors if k in state)
        if twice:  # which copy is meant is anyone's guess: refuse rather than let the last shard win
            raise CorruptCheckpointError(
                f"{folder / shard}: holds {summarize(twice)}, already read from "
                f"{source[twice[0]]}; a tensor must be in one shard only"
            )
        for k, t in tensors.items():
            state[k] = t
            source[k] = shard
    return state, source


def check_hashes(paths: dict[str, Path], expected: dict[str, str], *, where: str) -> None:
    """``verify=True``: each file whose repo path has a sha256 in ``expected`` (the Hub's LFS metadata)
    must hash to it."""
    for rel, path in paths.items():
        want = expected.get(rel)
        if want is None:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != want.lower():
            raise CorruptCheckpointError(
                f"{where}: {path} has sha256 {digest.hexdigest()} but the Hub lists {want} for {rel}; the "
                "file was damaged or changed after download. Delete it from the cache and load again."
            )


def check_finite(state: dict[str, torch.Tensor], source: dict[str, str], *, where: str) -> None:
    """``verify=True``: refuse weights holding NaN or Inf (one reduction per tensor)."""
    bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        files = sorted({source.get(k, "?") for k in bad})
        raise CorruptCheckpointError(
            f"{where}: {len(bad)} tensor(s) in {', '.join(files)} hold NaN or Inf values: {summarize(bad)}. "
            "The file is damaged or the weights diverged; do not use it."
        )


def resolve_dtype(torch_dtype, dtype, *, what: str) -> torch.dtype | str | None:
    """One dtype from ``torch_dtype=`` / ``dtype=`` (the reference renamed the former to the latter)."""
    if torch_dtype is not None and dtype is not None:
        raise TypeError(f"{what}: pass either torch_dtype= or dtype= (they mean the same), not both")
    value = dtype if dtype is not None else torch_dtype
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        candidate = getattr(torch, name, None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise TypeError(f"{what}: torch_dtype must be a torch.dtype such as torch.float16 or 'auto', got {value!r}")


def describe_mismatch(missing, wrong, unexpected) -> str:
    """The body of a :class:`StateDictMismatchError`: missing keys, ``(key, checkpoint shape, model
    shape)`` mismatches and unexpected keys, then what to do."""
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {summarize(missing)}")
    if wrong:
        shown = "; ".join(f"{k!r} checkpoint {list(a)} vs model {list(b)}" for k, a, b in wrong[:5])
        more = f" (+{len(wrong) - 5} more)" if len(wrong) > 5 else ""
        parts.append(f"{len(wrong)} shape mismatch(es): {shown}{more}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {summarize(unexpected)}")
    hint = (
        "Check that the config matches the weights (a different model size or variant?)"
        if wrong
        else "Pass allow_missing_keys=True to load anyway with those parameters randomly initialised"
    )
    return "; ".join(parts) + f". {hint}."


def assign_weights(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: dict[str, str],
    where: str,
    dtype: torch.dtype | str | None,
    allow_missing: bool = False,
) -> torch.nn.Module:
    """Assign ``state`` to ``model`` (built on the meta device) after checking keys and shapes."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    files = sorted(set(source.values()))
    if wrong or (missing and not allow_missing):
        raise StateDictMismatchError(
            f"{where}: the weights in {', '.join(files)} do not fit {type(model).__name__}: "
            + describe_mismatch(missing, wrong, unexpected)
        )
    # integers or bools where the model has floats (or the reverse) would be assigned as they are
    kinds = [
        (k, state[k].dtype, expected[k].dtype)
        for k in expected
        if k in state and state[k].is_floating_point() != expected[k].is_floating_point()
    ]
    if kinds:
        shown = "; ".join(f"{k!r} checkpoint {a} vs model {b}" for k, a, b in kinds[:5])
        raise StateDictMismatchError(
            f"{where}: the weights in {', '.join(files)} do not fit {type(model).__name__}: {len(kinds)} "
            f"tensor(s) of another kind of dtype: {shown}{' (+%d more)' % (len(kinds) - 5) if len(kinds) > 5 else ''}. "
            "The file is damaged or was written for another model."
        )
    if unexpected:
        logger.warning(
            "%s: ignoring %d key(s) in %s that %s does not have: %s",
            where,
            len(unexpected),
            ", ".join(files),
            type(model).__name__,
            summarize(unexpected),
        )
    target = None if dtype == "auto" else (dtype or torch.get_default_dtype())
    ready = {}
    for k in expected:
        if k not in state:
            continue
        t = state[k]
        if target is not None and t.is_floating_point() and t.dtype != target:
            t = t.to(target)
        ready[k] = t
    if missing:  # opted in: give the missing parameters real storage and their default init
        _materialize(model, set(missing))
        logger.warning(
            "%s: %d key(s) were not in the checkpoint and are randomly initialised: %s",
            where,
            len(missing),
            summarize(missing),
        )
    if not _assign_in_place(model, ready):
        model.load_state_dict(ready, strict=not missing, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise StateDictMismatchError(f"{where}: parameters left without values after loading: {summarize(left)}")
    return model


def _assign_in_place(model: torch.nn.Module, ready: dict[str, torch.Tensor]) -> bool:
    """Put each tensor in place of the parameter or buffer its key names, as
    ``load_state_dict(assign=True)`` does but without its per-module hook machinery (a fifth of a
    full-size UNet's load time). False, with nothing changed, when a key is not a plain parameter or
    buffer (a module with its own state-dict hooks): the caller then uses ``load_state_dict``."""
    modules = dict(model.named_modules())
    places = []
    for key, tensor in ready.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if module is None or _custom_loading(module):
            return False
        if leaf in module._parameters and module._parameters[leaf] is not None:
            places.append((module._parameters, leaf, tensor, module._parameters[leaf].requires_grad))
        elif leaf in module._buffers and leaf not in module._non_persistent_buffers_set:
            places.append((module._buffers, leaf, tensor, None))
        else:
            return False
    for table, leaf, tensor, grad in places:
        table[leaf] = tensor if grad is None else torch.nn.Parameter(tensor, requires_grad=grad)
    return True


def _custom_loading(module: torch.nn.Module) -> bool:
    """Whether loading ``module`` runs code of its own (hooks, or an overridden ``_load_from_state_dict``)."""
    return bool(
        module._state_dict_hooks
        or module._load_state_dict_pre_hooks
        or module._load_state_dict_post_hooks
        or type(module)._load_from_state_dict is not torch.nn.Module._load_from_state_dict
    )


def _materialize(model: torch.nn.Module, keys: set[str]) -> None:
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)
        ]
        if any((f"{name}.{n}" if name else n) in keys for n in own):
            module.to_empty(device="cpu", recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
