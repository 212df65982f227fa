"""GGML block formats, dequantized in torch (any device, no gguf package needed).

Each quantized row of a GGUF tensor is a run of blocks; a block holds ``BLOCK[type][0]`` values in
``BLOCK[type][1]`` bytes. The kernels take the raw bytes of whole rows (``uint8``, shape
``(..., bytes per row)``) and return float32 values, shape ``(..., values per row)``; fp16 scales are
read from their little-endian bytes. Layouts, from the GGML format:

- ``Q8_0`` (32 values, 34 bytes): fp16 scale ``d``, 32 int8 ``q``; ``x = d * q``.
- ``Q4_0`` (32, 18): ``d``, 16 bytes of nibbles; value ``j`` is byte ``j``'s low nibble and value
  ``j + 16`` its high one, both offset by 8. ``Q4_1`` (32, 20) adds an fp16 minimum ``m`` (no offset).
- ``Q5_0`` (32, 22) / ``Q5_1`` (32, 24): as Q4, with a 32-bit word of fifth bits (bit ``i`` for value
  ``i``); Q5_0 offsets by 16.
- K-quants, super-blocks of 256 values in 16 or 8 sub-blocks with their own small scales:
  ``Q2_K`` (84), ``Q3_K`` (110), ``Q4_K`` (144), ``Q5_K`` (176), ``Q6_K`` (210); see each kernel.
"""

from __future__ import annotations

import torch

from ..errors import DiffpipeError

# GGML type id -> (name, values per block, bytes per block)
TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    30: ("BF16", 1, 2),
}
PLAIN = {
    0: torch.float32,
    1: torch.float16,
    24: torch.int8,
    25: torch.int16,
    26: torch.int32,
    27: torch.int64,
    28: torch.float64,
    30: torch.bfloat16,
}


class UnsupportedQuantTypeError(DiffpipeError, ValueError):
    """A GGUF tensor in a block format diffpipe cannot dequantize."""


def type_name(qtype: int) -> str:
    if qtype in TYPES:
        return TYPES[qtype][0]
    try:  # a name for the message when the gguf package knows the type
        import gguf

        return gguf.GGMLQuantizationType(qtype).name
    except Exception:
        return f"type {qtype}"


def check_supported(qtype: int, name: str) -> None:
    if qtype not in TYPES or (qtype not in PLAIN and qtype not in _KERNELS):
        supported = ", ".join(TYPES[t][0] for t in TYPES)
        raise UnsupportedQuantTypeError(
            f"GGUF tensor {name!r} is quantized as {type_name(qtype)}, which diffpipe does not dequantize "
            f"(supported: {supported}); convert the file with another quantization type"
        )


def is_quantized(qtype: int) -> bool:
    return qtype not in PLAIN


def byte_shape(shape: tuple[int, ...], qtype: int) -> tuple[int, ...]:
    """The raw-bytes shape of a tensor of ``shape`` (torch order: the last dimension is the row)."""
    _, block, size = TYPES[qtype]
    if shape[-1] % block:
        raise ValueError(f"a {TYPES[qtype][0]} row of {shape[-1]} values is not a whole number of {block}-value blocks")
    return (*shape[:-1], shape[-1] // block * size)


def value_shape(raw_shape: tuple[int, ...], qtype: int) -> tuple[int, ...]:
    """The values' shape of raw bytes of ``raw_shape``."""
    _, block, size = TYPES[qtype]
    return (*raw_shape[:-1], raw_shape[-1] // size * block)


def dequantize(raw: torch.Tensor, qtype: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values of ``raw`` (``uint8``, rows of whole blocks) as ``dtype`` (float32 by default; plain
    types keep their own dtype when ``dtype`` is None)."""
    if qtype in PLAIN:
        out = raw.contiguous().view(PLAIN[qtype])
        return out if dtype is None else out.to(dtype)
    kernel = _KERNELS[qtype]
    _, block, size = TYPES[qtype]
    lead = raw.shape[:-1]
    blocks = raw.reshape(-1, size)
    values = kernel(blocks).reshape(*lead, raw.shape[-1] // size * block)
    return values if dtype is None or dtype == torch.float32 else values.to(dtype)


# ------------------------------------------------------------------------------------------ helpers
# Speed: dequantizing runs at every forward of a GGUF layer, so each kernel does its bit work on uint8
# (a quarter of int32's memory traffic), converts to float32 once, and scales in place. The float
# operations keep the GGML reference's order, so results are bit-equal to it.
def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte ``at`` of each block, as float32, shape (n, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Low nibbles then high nibbles of each row of ``qs`` (n, k) -> (n, 2k), uint8."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=-1)


def _bits(packed: torch.Tensor) -> torch.Tensor:
    """The bits of each row of bytes ``packed`` (n, k) -> (n, 8k), uint8; bit ``i`` of the little-endian
    word is value ``i``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


def _float(q: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``q - offset`` as float32 (exact: small integers)."""
    out = q.to(torch.float32)
    return out.sub_(offset) if offset else out


# ------------------------------------------------------------------------------------------ 32-value blocks
def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return _float(blocks[:, 2:34].view(torch.int8)).mul_(d)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return _float(_nibbles(blocks[:, 2:18]), 8).mul_(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    return _float(_nibbles(blocks[:, 4:20])).mul_(d).add_(m)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6]) << 4)
    return _float(q, 16).mul_(d)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8]) << 4)
    return _float(q).mul_(d).add_(m)


# ------------------------------------------------------------------------------------------ K-quants
def _scale_min_k4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8 six-bit scales and 8 six-bit minimums packed in 12 bytes (Q4_K, Q5_K) -> (n, 8) each.
    Sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins). Sub-blocks 4-7: the low
    nibble (scale) / high nibble (min) of bytes 8-11, topped by the 2 high bits of bytes 0-3 / 4-7."""
    lo_s, lo_m, tail = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = torch.cat((lo_s & 63, (tail & 0x0F) | ((lo_s >> 6) << 4)), dim=-1)
    mins = torch.cat((lo_m & 63, (tail >> 4) | ((lo_m >> 6) << 4)), dim=-1)
    return scales.float(), mins.float()


def _sub_blocks(q: torch.Tensor, d, dmin, scales, mins) -> torch.Tensor:
    """``d * scale * q - dmin * min`` per sub-block: ``q`` (n, 8, 32) uint8 -> (n, 256) float32."""
    out = _float(q).mul_((d * scales).unsqueeze(-1))
    return out.sub_((dmin * mins).unsqueeze(-1)).reshape(-1, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, 12 bytes of scales/mins, 128 bytes: 4 chunks of 32 bytes, each the low nibbles
    # (sub-block 2c) then the high nibbles (2c + 1)
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    q = blocks[:, 16:144].reshape(-1, 4, 1, 32)
    q = torch.cat((q & 0x0F, q >> 4), dim=2).reshape(-1, 8, 32)
    return _sub_blocks(q, d, dmin, scales, mins)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # as Q4_K, with 32 bytes of fifth bits before the nibbles: bit s of byte l is value l of sub-block s
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _scale_min_k4(blocks[:, 4:16])
    qh = blocks[:, 16:48].unsqueeze(1)  # (n, 1, 32)
    shifts = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
    high = ((qh >> shifts) & 1) << 4  # (n, 8, 32)
    q = blocks[:, 48:176].reshape(-1, 4, 1, 32)
    q = torch.cat((q & 0x0F, q >> 4), dim=2).reshape(-1, 8, 32) | high
    return _sub_blocks(q, d, dmin, scales, mins)


def _two_bits(qs: torch.Tensor) -> torch.Tensor:
    """Each half's 32 bytes read four times, 2 bits further each time: (n, 64) -> (n, 2, 4, 32) uint8."""
    shifts = torch.arange(0, 8, 2, device=qs.device, dtype=torch.uint8).view(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d. Each half of 128 values
    # uses 64 low bytes and 32 high bytes: group g of 32 takes nibble (g // 2) of low bytes
    # [32 (g % 2), +32) and bits 2g..2g+1 of the high bytes; scale 16 values at a time.
    d = _f16(blocks, 208)
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)  # (n, half, _, which 32, l)
    low = torch.cat((ql & 0x0F, ql >> 4), dim=2).reshape(-1, 2, 4, 32)  # groups: lo0, lo1, hi0, hi1
    q = _float(low | (_two_bits(blocks[:, 128:192]) << 4), 32).reshape(-1, 16, 16)
    scales = blocks[:, 192:208].view(torch.int8).float()  # (n, 16)
    return q.mul_((d * scales).unsqueeze(-1)).reshape(-1, 256)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # 16 bytes of scales (low nibble scale, high nibble min), 64 bytes of 2-bit values, d, dmin.
    # Each half of 128 values reads 32 bytes four times, 2 bits further each time; 16 values a scale.
    packed = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    q = _float(_two_bits(blocks[:, 16:80])).reshape(-1, 16, 16)
    scale = (d * (packed & 0x0F).float()).unsqueeze(-1)
    low = (dmin * (packed >> 4).float()).unsqueeze(-1)
    return q.mul_(scale).sub_(low).reshape(-1, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # 32 bytes of high-bit masks, 64 bytes of 2-bit values, 12 bytes of 16 six-bit scales (offset by
    # 32), d. Values as Q2_K; group h*4 + j's third bit is bit h*4 + j of the mask byte (set: +4, and
    # every value is offset by 4).
    d = _f16(blocks, 108)
    hmask = blocks[:, 0:32].unsqueeze(1)  # (n, 1, 32)
    sc = blocks[:, 96:108]
    bit = torch.arange(8, device=blocks.device, dtype=torch.uint8).view(1, 8, 1)
    q = _two_bits(blocks[:, 32:96]).reshape(-1, 8, 32) | (((hmask >> bit) & 1) << 2)
    low4 = torch.cat((sc[:, 0:8] & 0x0F, sc[:, 0:8] >> 4), dim=-1)  # scale i: byte i % 8, nibble i // 8
    tops = sc[:, 8:12].repeat(1, 4)  # scale i: bits 2 (i // 4) of byte 8 + i % 4
    top_shift = ((torch.arange(16, device=blocks.device) // 4) * 2).to(torch.uint8)
    scales = _float(low4 | (((tops >> top_shift) & 3) << 4), 32)
    return _float(q, 4).reshape(-1, 16, 16).mul_((d * scales).unsqueeze(-1)).reshape(-1, 256)


_KERNELS = {
    2: _q4_0,
    3: _q4_1,
    6: _q5_0,
    7: _q5_1,
    8: _q8_0,
    10: _q2_k,
    11: _q3_k,
    12: _q4_k,
    13: _q5_k,
    14: _q6_k,
}
