"""How much memory a pipeline needs, read from its safetensors headers before any weight is fetched.

For a Hub repo only ``model_index.json`` is downloaded; each weight file's header is read with HTTP
range requests (``huggingface_hub``'s safetensors metadata call). For a local folder the headers
are read from disk. The figures count parameters and bytes per component and dtype, as stored and
as they would be after loading with ``torch_dtype``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import hub
from .io.state_dict import SAFETENSORS_DTYPES, read_safetensors_header

_FLOATING = ("float32", "float16", "bfloat16")


def _dtype_name(code: str) -> str:
    return str(SAFETENSORS_DTYPES[code]).removeprefix("torch.")


def _itemsize(name: str) -> int:
    return torch.empty((), dtype=getattr(torch, name)).element_size()


def _local_tensors(path: Path) -> dict[str, tuple[str, tuple]]:
    tensors, _, _ = read_safetensors_header(path)
    return {k: (str(dtype).removeprefix("torch."), shape) for k, (dtype, shape, _, _) in tensors.items()}


def _remote_tensors(repo_id: str, filename: str, revision: str | None) -> dict[str, tuple[str, tuple]]:
    from huggingface_hub import HfApi

    meta = HfApi().parse_safetensors_file_metadata(repo_id, filename, revision=revision)
    return {k: (_dtype_name(info.dtype), tuple(info.shape)) for k, info in meta.tensors.items()}


def estimate(model: str | os.PathLike, *, variant: str | None = None, revision: str | None = None) -> dict:
    """Parameters and bytes per component, per dtype as stored, and the total if loaded as each dtype."""
    from .io.components import component_file_choice, files_in, parse_model_index_bytes
    from .pipelines.pipeline import DiffusionPipeline

    where = f"estimate {model}"
    captured: dict = {}

    def select(files, read):
        index = parse_model_index_bytes(read("model_index.json"), where=where)
        plan = DiffusionPipeline._plan(index, files, {}, variant=variant, use_safetensors=None, where=where)
        captured.update(plan=plan, index=index)
        return ["model_index.json"]

    root = hub.fetch(model, select, revision=revision, what=where)
    local = Path(model).expanduser().is_dir()
    plan = captured["plan"]
    # a local folder lists everything; for a repo the plan's files hold each component's chosen ones
    all_files = hub.list_local_files(root) if local else set(plan["files"])
    components: dict[str, dict] = {}
    for name, (spec, fell_back) in plan["specs"].items():
        prefixes = spec.weight_prefixes
        if prefixes is None:
            continue
        choice, _ = component_file_choice(
            spec, files_in(all_files, name), variant=variant, use_safetensors=None, where=where
        )
        entry = {
            "parameters": 0,
            "bytes": 0,
            "dtypes": {},
            "file": ", ".join(f"{name}/{f}" for f in choice.files),
            "floating_parameters": 0,
        }
        if choice.format != "safetensors":
            entry["unknown"] = "pickle (.bin) files have no header to read; size unknown before download"
            components[name] = entry
            continue
        for f in choice.files:
            rel = f"{name}/{f}"
            tensors = _local_tensors(root / rel) if local else _remote_tensors(os.fspath(model), rel, revision)
            for dtype, shape in tensors.values():
                n = math.prod(shape)
                size = n * _itemsize(dtype)
                entry["parameters"] += n
                entry["bytes"] += size
                entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + size
                if dtype in _FLOATING or dtype == "float64":
                    entry["floating_parameters"] += n
        components[name] = entry
    total = sum(c["bytes"] for c in components.values())
    as_dtype = {}
    for dtype in _FLOATING:
        as_dtype[dtype] = sum(
            c["floating_parameters"] * _itemsize(dtype) + (c["bytes"] - _floating_bytes(c)) for c in components.values()
        )
    return {"class_name": plan["class"].__name__, "components": components, "total": total, "as_dtype": as_dtype}


def _floating_bytes(entry: dict) -> int:
    return sum(v for k, v in entry["dtypes"].items() if k in _FLOATING or k == "float64")
