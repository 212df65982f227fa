"""Where adapter weights come from: a Hub repo id, a local folder or file, fetched with the project's
hub layer (only the files needed, cached), and the image encoder an IP-Adapter repo ships."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .. import hub
from ..errors import CheckpointNotFoundError
from ..io import components as loading
from ..io.files import check_plain_name, check_relative_path

# Keyword arguments the reference's loaders take that change nothing here.
_NO_OPS = ("force_download", "resume_download", "proxies", "low_cpu_mem_usage", "hotswap")


def check_kwargs(kwargs: dict, what: str) -> None:
    for name in _NO_OPS:
        kwargs.pop(name, None)
    if kwargs:
        raise TypeError(f"{what} got unexpected keyword argument(s) {sorted(kwargs)}")


def fetch_files(
    source,
    subfolder: str | None,
    weight_name: str,
    encoder_folder: str | None,
    *,
    cache_dir,
    local_files_only,
    token,
    revision,
) -> tuple[Path, Path, str]:
    """(root folder, path of ``subfolder/weight_name``, label) with the weight file and, if
    ``encoder_folder`` is given, that image encoder's config and weights on disk."""
    check_plain_name(weight_name, "weight_name")
    rel = hub.join_relative(subfolder, weight_name)
    where = f"{os.fspath(source)}/{rel}"
    if encoder_folder is not None:
        encoder_folder = check_relative_path(encoder_folder, "image_encoder_folder")

    def select(files, read):
        if rel not in files:
            near = sorted(f for f in files if f.endswith((".bin", ".safetensors")))[:8]
            raise CheckpointNotFoundError(f"{where}: no such file; weight files there: {near or 'none'}")
        wanted = [rel]
        if encoder_folder is not None:
            spec = _encoder_spec(encoder_folder, where)
            in_folder = loading.files_in(files, encoder_folder)
            if "config.json" not in in_folder:
                raise CheckpointNotFoundError(
                    f"{where}: no image encoder at {encoder_folder}/ (expected config.json and weights); pass "
                    "image_encoder_folder= naming it, or image_encoder_folder=None to load none"
                )
            choice, _ = loading.component_file_choice(spec, in_folder, variant=None, use_safetensors=None, where=where)
            wanted += [f"{encoder_folder}/{f}" for f in [*loading.non_weight_files(in_folder), *choice.all_files]]
        return wanted

    root = hub.fetch(
        source,
        select,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what=where,
    )
    return root, root / rel, where


def _encoder_spec(folder: str, where: str):
    return loading.resolve(
        "transformers", "CLIPVisionModelWithProjection", component=folder.rsplit("/", 1)[-1], where=where
    )


def load_image_encoder(root: Path, folder: str, *, dtype, device, where: str):
    """The ``CLIPVisionModelWithProjection`` in ``root/folder``, with the pipeline loader's checks."""
    spec = _encoder_spec(folder, where)
    parent = root / folder.rsplit("/", 1)[0] if "/" in folder else root
    encoder = loading.load_component(spec, parent, variant=None, dtype=dtype, use_safetensors=None, where=where)
    return encoder.to(device)


LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_NOT_LORA = ("scheduler", "optimizer", "checkpoint")


def lora_file(
    source,
    *,
    weight_name: str | None,
    subfolder: str | None,
    use_safetensors: bool | None,
    cache_dir,
    local_files_only,
    token,
    revision,
) -> tuple[Path, str]:
    """(path, label) of the LoRA weight file of a repo, folder or file path.

    Without ``weight_name`` the folder (or ``subfolder``) must hold one candidate: a
    ``pytorch_lora_weights`` file, else a single ``.safetensors`` (else ``.bin``) file.
    """
    path = Path(os.fspath(source)).expanduser()
    if path.is_file():
        return path, os.fspath(source)
    prefix = check_relative_path(subfolder, "subfolder") + "/" if subfolder not in (None, "", ".") else ""
    if weight_name is not None:
        check_plain_name(weight_name, "weight_name")
    label = f"{os.fspath(source)}" + (f"/{subfolder}" if subfolder else "")
    chosen: list[str] = []

    def select(files, read):
        here = sorted(f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :])
        if weight_name is not None:
            if weight_name not in here:
                raise CheckpointNotFoundError(f"{label}: no file {weight_name!r}; files there: {here[:10]}")
            name = weight_name
        else:
            name = _guess(here, use_safetensors, label)
        chosen.append(prefix + name)
        return [prefix + name]

    root = hub.fetch(
        source,
        select,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what=f"LoRA {label}",
    )
    return root / chosen[-1], f"{label}/{chosen[-1].rsplit('/', 1)[-1]}"


def _guess(names: list[str], use_safetensors: bool | None, label: str) -> str:
    suffixes = {True: (".safetensors",), False: (".bin",)}.get(use_safetensors, (".safetensors", ".bin"))
    for suffix in suffixes:
        found = [n for n in names if n.endswith(suffix) and not any(s in n for s in _NOT_LORA)]
        preferred = [n for n in found if n in LORA_FILE_NAMES]
        found = preferred or found
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ValueError(f"{label} holds several weight files {found}; pick one with weight_name=")
    raise CheckpointNotFoundError(f"{label}: no LoRA weight file ({' or '.join(suffixes)}) found; files: {names[:10]}")


def tensors_of(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, safetensors metadata or {}) of a weight file; pickles only with ``weights_only``."""
    from ..io.state_dict import load_pickle, load_safetensors, read_safetensors_header

    if path.name.endswith(".safetensors"):
        _, metadata, _ = read_safetensors_header(path)
        return dict(load_safetensors(path)), dict(metadata or {})
    return dict(load_pickle(path)), {}
