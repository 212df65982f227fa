"""Reading and writing tensors: checked safetensors headers, memory-mapped reads, safe pickles.

A safetensors file is checked before any tensor is made: the 8-byte header length, the JSON header,
every tensor's dtype, shape and byte range (no holes, overlaps or trailing bytes). Only then are the
tensors created as views of a memory map of the file, so loading copies nothing; pages are read when
a tensor is first used. Pickle (``.bin``) files are opened with ``torch.load(weights_only=True)``
only, so a pickle that carries code is refused instead of run.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from .atomic import as_os_error

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[_code] = getattr(torch, _name)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_not_lfs_pointer(path: Path, head: bytes) -> None:
    if head.startswith(LFS_POINTER_PREFIX):
        raise CorruptCheckpointError(
            f"{path} is a git-lfs pointer file, not the weights it points to. The repository was cloned "
            "without its LFS content: run `git lfs install && git lfs pull` in the clone, or load the "
            "repo id from the Hub instead of the clone."
        )


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Check a safetensors file's header and byte layout; return (tensors, metadata, data_start).

    ``tensors`` maps name -> (dtype, shape, start, end) with offsets relative to ``data_start``.
    Raises :class:`CorruptCheckpointError` naming the file and the fault.
    """
    path = Path(path)
    size = path.stat().st_size
    raw = _raw_header(path, size)
    header = _parse_header(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(f"{path}: '__metadata__' in the safetensors header is not an object")
    tensors = {name: _tensor_entry(path, name, info) for name, info in header.items()}
    _check_layout(path, tensors, data_len=size - 8 - len(raw))
    return tensors, metadata, 8 + len(raw)


def _raw_header(path: Path, size: int) -> bytes:
    """The header's bytes, after checking the length field against the file's size."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) >= 8 or size < 8:
            check_not_lfs_pointer(path, head + f.read(40))
        if size < 8:
            raise CorruptCheckpointError(
                f"{path} is truncated: {size} bytes, too short to hold a safetensors header "
                "(re-download or re-save the file)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(
                f"{path}: the safetensors header claims {n} bytes, over the format's limit of "
                f"{MAX_HEADER_BYTES}; the file is corrupt or not a safetensors file"
            )
        if 8 + n > size:
            raise CorruptCheckpointError(
                f"{path} is truncated: its header claims {n} bytes but the file has only {size - 8} "
                "after the length field (re-download or re-save the file)"
            )
        f.seek(8)
        return f.read(n)


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header as a JSON object, refusing non-UTF-8 text, bad JSON and names given twice."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(f"{path}: the safetensors header is not UTF-8 ({e})") from e
    duplicates: list[str] = []

    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                duplicates.append(k)
            seen[k] = v
        return seen

    try:
        header = json.loads(text, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:  # bad JSON, an over-long integer, nesting too deep
        raise CorruptCheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
    if duplicates:
        raise CorruptCheckpointError(
            f"{path}: the safetensors header names tensor(s) twice: {sorted(set(duplicates))[:5]}"
        )
    return header


def _tensor_entry(path: Path, name: str, info) -> tuple:
    """One header entry checked: (dtype, shape, start, end), its span matching its shape and dtype."""
    if not isinstance(info, dict):
        raise CorruptCheckpointError(f"{path}: header entry {name!r} is not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if code not in SAFETENSORS_DTYPES:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} has dtype {code!r}, which is not a safetensors dtype this torch "
            f"supports ({', '.join(SAFETENSORS_DTYPES)})"
        )
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptCheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES[code]
    expected = math.prod(shape) * _itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise CorruptCheckpointError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} of {code} "
            f"needs {expected}"
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_layout(path: Path, tensors: dict, *, data_len: int) -> None:
    """The tensors tile the data section exactly: no overlap, no gap, nothing missing or left over."""
    position = 0
    for name, (_, _, start, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if start != position:
            kind = "overlaps the previous tensor" if start < position else f"leaves a gap of {start - position} bytes"
            raise CorruptCheckpointError(f"{path}: tensor {name!r} at byte {start} {kind}; the file is corrupt")
        position = end
    if position > data_len:
        raise CorruptCheckpointError(
            f"{path} is truncated: its tensors need {position} data bytes but the file holds {data_len} "
            "(re-download or re-save the file)"
        )
    if position < data_len:
        raise CorruptCheckpointError(
            f"{path}: {data_len - position} unexpected trailing bytes after the last tensor; the file is corrupt"
        )


def load_safetensors(path: str | os.PathLike, *, cast_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a checked safetensors file, as views of a private memory map (nothing is copied).

    ``cast_to``: floating tensors of another dtype are converted as they are read, and the file's
    pages each one occupied are dropped from this process right after (they stay in the page cache):
    loading an fp32 file as fp16 then peaks at the fp16 size plus one tensor, not at both sizes.
    """
    path = Path(path)
    tensors, _, data_start = read_safetensors_header(path)
    if not tensors:
        return {}
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(os.fspath(path), False, size)
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    out: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, start, end) in tensors.items():
        raw = whole[data_start + start : data_start + end]
        if dtype == torch.bool:
            out[name] = raw.view(torch.bool).reshape(shape)
            continue
        mapped = raw
        if (data_start + start) % _itemsize(dtype):  # unaligned: copy just this tensor
            raw = raw.clone()
        tensor = raw.view(dtype).reshape(shape)
        if cast_to is not None and tensor.is_floating_point() and dtype != cast_to:
            tensor = tensor.to(cast_to)
            _drop_pages(mapped)  # the mapping's pages, never the copy's
        out[name] = tensor
    return out


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def _drop_pages(mapped: torch.Tensor) -> None:
    """Unmap from this process the whole pages inside ``mapped``'s bytes (a part of a private file
    mapping this module made and never wrote to, so the pages re-read the file if touched again)."""
    madvise = _madvise()
    start = mapped.data_ptr()
    first = -(-start // _PAGE) * _PAGE
    last = (start + mapped.nbytes) // _PAGE * _PAGE
    if madvise is not None and last > first:
        madvise(first, last - first, _MADV_DONTNEED)  # advisory: a failure only keeps the pages


def load_pickle(path: str | os.PathLike, *, nested: bool = False) -> dict[str, torch.Tensor]:
    """A ``.bin`` checkpoint through ``torch.load(weights_only=True)``: code in the pickle never runs.

    ``nested``: the values may also be dicts of tensors, one level deep (IP-Adapter files)."""
    path = Path(path)
    with open(path, "rb") as f:
        check_not_lfs_pointer(path, f.read(64))
    if path.stat().st_size == 0:
        raise CorruptCheckpointError(f"{path} is empty (0 bytes); re-download or re-save it")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} was refused: it is a pickle that needs more than tensors to load (it may carry "
            f"code), and diffpipe loads pickles only with weights_only=True. Convert it to safetensors "
            f"in a trusted environment. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as e:
        raise CorruptCheckpointError(f"{path} could not be read as a PyTorch checkpoint: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(_tensor_or_nested(v, nested) for v in state.values()):
        what = "a dict of dicts of tensors" if nested else "a dict of tensors"
        raise CorruptCheckpointError(f"{path} does not hold {what} (found {type(state).__name__})")
    return state


def _tensor_or_nested(value, nested: bool) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return nested and isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def load_tensors(path: str | os.PathLike, *, cast_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A weight file's tensors; ``cast_to`` as for :func:`load_safetensors` (pickles are cast later,
    by the caller)."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        return load_safetensors(path, cast_to=cast_to)
    return load_pickle(path)


# ------------------------------------------------------------------------------------- writing
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """``"10GB"`` -> 10**10 bytes, ``"5GiB"`` -> 5 * 2**30, an int stays as it is."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"max_shard_size must be a number of bytes or a size like '10GB', got {value!r}")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = " KMGT".index(unit or " ")
    return int(number * (1024 if binary else 1000) ** power)


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.device.type) if t.numel() else None


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with storage of its own (safetensors refuses shared storage)."""
    seen = set()
    out = {}
    for k, t in state_dict.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        key = _storage_key(t)
        if key in seen or not t.is_contiguous():
            t = t.contiguous().clone() if key in seen else t.contiguous()
        if key is not None:
            seen.add(key)
        out[k] = t
    return out


def split_shards(state_dict: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split in key order into groups of at most ``max_bytes`` (a larger tensor gets a group of its own)."""
    shards: list[dict] = [{}]
    used = 0
    for k, t in state_dict.items():
        n = t.numel() * t.element_size()
        if shards[-1] and used + n > max_bytes:
            shards.append({})
            used = 0
        shards[-1][k] = t
        used += n
    return shards


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with as_os_error(path):  # a full disk is an OSError, not safetensors' own error type
        save_file(tensors, os.fspath(path), metadata=metadata or {"format": "pt"})


def save_pickle(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        try:
            torch.save(tensors, f)
        except RuntimeError as e:  # torch wraps a failed write (a full disk) in a RuntimeError
            if not isinstance(e.__context__, OSError):
                raise
            failed = e.__context__
            raise OSError(failed.errno, f"{failed.strerror}: could not write {path}") from e
