"""Opening a GGUF file: its tensors as raw bytes memory-mapped from the file, in torch's order.

The gguf package (the ``gguf`` extra) parses the header; the tensor data is a copy-on-write memory
map of the file, so nothing is read until used and nothing is written back. Shapes are given in
torch's order (GGUF lists dimensions innermost first); a tensor's bytes are ``uint8`` of shape
``(..., bytes per row)``, for plain types as well as quantized ones.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError
from .gguf_kernels import TYPES, byte_shape, check_supported, dequantize, is_quantized, type_name

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install diffpipe[gguf]"


def require_gguf():
    """The gguf package, or an ImportError that says how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"reading GGUF files needs the gguf package: {INSTALL_HINT} (or pip install gguf)") from e
    return gguf


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its GGML type, its values' shape (torch order), its raw bytes."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    raw: torch.Tensor  # uint8 (..., bytes per row), a view of the file's memory map

    @property
    def type_name(self) -> str:
        return type_name(self.qtype)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.qtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values, shape ``self.shape`` (plain types keep their dtype when ``dtype`` is None)."""
        check_supported(self.qtype, self.name)
        return dequantize(self.raw, self.qtype, dtype).reshape(self.shape)


@dataclass
class GGUFFile:
    path: Path
    tensors: dict[str, GGUFTensor]
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def types(self) -> dict[str, int]:
        """Type name -> how many tensors have it."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts


def is_gguf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read ``path``'s GGUF header; the tensors are memory-mapped views (no data is read)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise CorruptCheckpointError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC!r}); quantization_config="
            "GGUFQuantizationConfig(...) loads .gguf files only"
        )
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(path, "c")  # copy-on-write map: writable views, the file untouched
    except Exception as e:  # truncated or malformed: the parser's own error is the cause
        raise CorruptCheckpointError(f"{path}: cannot read the GGUF file ({type(e).__name__}: {e})") from e
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        shape = tuple(int(n) for n in reversed([int(x) for x in t.shape]))
        if t.name in tensors:
            raise CorruptCheckpointError(f"{path}: the tensor {t.name!r} is in the file twice")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy views of a map
            flat = torch.from_numpy(t.data.reshape(-1).view("uint8"))
        if qtype in TYPES:
            try:
                rows = byte_shape(shape, qtype)
            except ValueError as e:
                raise CorruptCheckpointError(f"{path}: tensor {t.name!r} of shape {list(shape)}: {e}") from None
            if flat.numel() != _prod(rows):
                raise CorruptCheckpointError(
                    f"{path}: tensor {t.name!r} ({type_name(qtype)}, shape {list(shape)}) has {flat.numel()} bytes, "
                    f"expected {_prod(rows)}; the file is truncated or damaged"
                )
            raw = flat.reshape(rows)
        else:  # refused when used (its name and type in the message); keep the bytes as they are
            raw = flat
        tensors[t.name] = GGUFTensor(t.name, qtype, shape, raw)
    metadata = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            metadata[name] = f.contents()
        except Exception:  # an odd field type: its name is still listed
            metadata[name] = None
    return GGUFFile(path, tensors, metadata)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
