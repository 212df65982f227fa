"""Which weight files a load uses: variants, safetensors versus pickle, shards and their index.

The names follow the reference's format (the spec's variant table):

================  =============================================  ==========================================
checkpoint        single file                                    sharded (index, and shards it names)
================  =============================================  ==========================================
original          ``diffusion_pytorch_model.safetensors``        ``diffusion_pytorch_model.safetensors.index.json``
variant ``fp16``  ``diffusion_pytorch_model.fp16.safetensors``   ``diffusion_pytorch_model.safetensors.index.fp16.json``
================  =============================================  ==========================================

and the same with ``.bin`` for pickle files. Shards are named ``PREFIX-00001-of-00002.EXT`` or, for a
variant, ``PREFIX.VARIANT-00001-of-00002.EXT``. transformers components use the prefixes ``model``
(safetensors) and ``pytorch_model`` (pickle) with the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import CheckpointNotFoundError, UnsafePathError

SAFETENSORS = "safetensors"
PICKLE = "bin"
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_plain_name(value: str, what: str) -> str:
    """Refuse anything but a plain file or folder name (no separators, no ``..``, not absolute)."""
    if not isinstance(value, str) or not _NAME_PART.match(value) or ".." in value:
        raise UnsafePathError(
            f"{what} must be a plain name (letters, digits, '_', '-', '.'; no path separators or '..'), got {value!r}"
        )
    return value


def check_relative_path(value: str, what: str) -> str:
    """A relative path made of plain names (``models/image_encoder``); returns it in POSIX form."""
    if (
        not isinstance(value, str)
        or not value
        or value.startswith(("/", "\\"))
        or "\\" in value
        or not all(_NAME_PART.match(p) and ".." not in p for p in value.strip("/").split("/"))
    ):
        raise UnsafePathError(
            f"{what} must be a relative path of plain names (letters, digits, '_', '-', '.'; no '..', not "
            f"absolute), got {value!r}"
        )
    return value.strip("/")


def with_variant(name: str, variant: str | None) -> str:
    """Insert ``variant`` before the last suffix: ``a.safetensors`` -> ``a.fp16.safetensors``."""
    if not variant:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}" if dot else f"{name}.{variant}"


def single_file_name(prefix: str, ext: str, variant: str | None) -> str:
    return with_variant(f"{prefix}.{ext}", variant)


def index_file_name(prefix: str, ext: str, variant: str | None) -> str:
    return with_variant(f"{prefix}.{ext}.index.json", variant)


def shard_file_name(prefix: str, ext: str, variant: str | None, i: int, n: int) -> str:
    base = f"{prefix}.{variant}" if variant else prefix
    return f"{base}-{i:05d}-of-{n:05d}.{ext}"


def shard_pattern(prefix: str, ext: str, variant: str | None) -> re.Pattern:
    base = re.escape(f"{prefix}.{variant}" if variant else prefix)
    return re.compile(rf"^{base}-\d{{5}}-of-\d{{5}}\.{re.escape(ext)}$")


_VARIANT_IN_NAME = re.compile(
    r"^(?P<prefix>[^.]+)\.(?:(?P<ext>safetensors|bin)\.index\.(?P<ivar>[^.]+)\.json|(?P<var>[^.\-]+)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin))$"
)


def variants_present(names, prefixes) -> list[str]:
    """The variants that weight files in ``names`` carry (``['fp16', 'non_ema']``)."""
    found = set()
    for n in names:
        m = _VARIANT_IN_NAME.match(n)
        if m and m.group("prefix") in prefixes:
            found.add(m.group("ivar") or m.group("var"))
    return sorted(found)


@dataclass
class WeightChoice:
    """The weight files chosen for one component, relative to its folder."""

    format: str  # SAFETENSORS or PICKLE
    files: list[str]  # the single file, or the shards (remote listing: those matching the pattern)
    index: str | None = None  # the shard index, when sharded
    notes: list[str] = field(default_factory=list)

    @property
    def all_files(self) -> list[str]:
        return ([self.index] if self.index else []) + self.files


def choose_weights(
    names,
    *,
    prefixes: dict[str, str],
    variant: str | None,
    use_safetensors: bool | None,
    where: str,
) -> WeightChoice:
    """Pick the weight files for one component from the file ``names`` in its folder.

    ``prefixes`` maps format to file prefix, e.g. ``{"safetensors": "diffusion_pytorch_model",
    "bin": "diffusion_pytorch_model"}``. ``use_safetensors``: ``True`` only safetensors, ``False`` only
    pickle files, ``None`` safetensors when present and pickle files otherwise. ``where`` names the
    folder in errors.
    """
    if variant is not None:
        check_plain_name(variant, "variant")
    names = set(names)
    formats = {True: [SAFETENSORS], False: [PICKLE], None: [SAFETENSORS, PICKLE]}[use_safetensors]
    for fmt in formats:
        prefix = prefixes[fmt]
        single = single_file_name(prefix, fmt, variant)
        if single in names:
            return WeightChoice(fmt, [single])
        index = index_file_name(prefix, fmt, variant)
        if index in names:
            pattern = shard_pattern(prefix, fmt, variant)
            return WeightChoice(fmt, sorted(n for n in names if pattern.match(n)), index=index)
    raise _no_weights_error(names, prefixes, variant, use_safetensors, formats, where)


def _no_weights_error(names, prefixes, variant, use_safetensors, formats, where) -> CheckpointNotFoundError:
    tried = []
    for fmt in formats:
        tried += [single_file_name(prefixes[fmt], fmt, variant), index_file_name(prefixes[fmt], fmt, variant)]
    weight_like = sorted(n for n in names if n.endswith((".safetensors", ".bin", ".index.json")) or ".index." in n)
    msg = f"{where}: no weight file found; tried {', '.join(tried)}."
    msg += f" Weight files present: {', '.join(weight_like) if weight_like else 'none'}."
    present_variants = variants_present(names, set(prefixes.values()))
    if variant and present_variants and variant not in present_variants:
        msg += f" The variant {variant!r} was asked for; variants present: {', '.join(present_variants)}."
    elif variant:
        msg += f" The variant {variant!r} was asked for; drop `variant=` to load the original weights."
    elif present_variants:
        msg += f" Only variant files are present: pass variant={present_variants[0]!r}."
    if use_safetensors is True and any(n.endswith(".bin") for n in weight_like):
        msg += (
            " Only pickle (.bin) files exist and use_safetensors=True was given: pass use_safetensors=None "
            "to allow them (they are loaded with weights_only=True), or convert them to safetensors."
        )
    if use_safetensors is False and any(n.endswith(".safetensors") for n in weight_like):
        msg += " Safetensors files exist but use_safetensors=False was given: drop that argument."
    return CheckpointNotFoundError(msg)
