"""What ``diffpipe inspect FILE`` says about a single checkpoint file, from its header alone."""

from __future__ import annotations

from collections import Counter

from ..errors import ConfigError
from . import keymap
from .detect import detect
from .source import IGNORED_TOP_LEVEL, locate, open_single_file

PART_PREFIXES = {"unet": keymap.UNET_PREFIX, "vae": keymap.VAE_PREFIX}


def describe(path_or_url, **hub) -> list[str]:
    """Lines describing the file: detected type, the pipeline it loads as, each part's tensors and
    parameters, dtypes, ignored tensors and the embedded metadata (``modelspec.*``, ``ss_*``, ...)."""
    path = locate(path_or_url, **hub)
    source = open_single_file(path)
    size = path.stat().st_size
    kind = "pickle" if source.is_pickle else "safetensors"
    lines = [f"{path}  ({size / 1e9:.2f} GB, {len(source.shapes)} tensors, {kind})"]
    try:
        found = detect(source.shapes, str(path))
    except ConfigError as e:
        lines.append(f"  not loadable as a single-file checkpoint: {e}")
        found = None
    if found is not None:
        lines.append(f"  detected: {found.kind}  (text-encoder layout {found.family})")
        if found.kind != "vae":
            lines.append(f"  loads as: {found.pipeline_class} with the shipped {found.kind} configs (or config=...)")
        else:
            lines.append("  loads as: AutoencoderKL.from_single_file(path)")
        prefixes = dict(PART_PREFIXES)
        prefixes.update(keymap.TEXT_PREFIXES.get(found.family, {}))
        if found.family == "vae":
            prefixes = {"vae": ""}
        counted = set()
        for name, prefix in prefixes.items():
            keys = [k for k in source.shapes if k.startswith(prefix)]
            counted.update(keys)
            if keys:
                params = sum(_numel(source.shapes[k]) for k in keys)
                lines.append(f"  {name:<15} {len(keys):5d} tensors  {params / 1e6:9.2f} M params  under {prefix!r}")
        rest = [k for k in source.shapes if k not in counted]
        ignored = [k for k in rest if IGNORED_TOP_LEVEL.match(k)]
        if ignored:
            lines.append(f"  ignored        {len(ignored):5d} tensors (training buffers / EMA copies)")
        other = [k for k in rest if k not in ignored]
        if other:
            lines.append(f"  unused         {len(other):5d} tensors, e.g. {', '.join(sorted(other)[:3])}")
        for note in found.notes:
            lines.append(f"  note: {note}")
    dtypes = Counter(source.dtypes)
    lines.append("  dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    if source.metadata:
        lines.append("  metadata:")
        for key in sorted(source.metadata):
            value = str(source.metadata[key])
            lines.append(f"    {key}: {value if len(value) <= 200 else value[:200] + '...'}")
    return lines


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
