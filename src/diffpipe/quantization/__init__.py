"""Quantized weights: GGUF files (``GGUFQuantizationConfig``), as the reference loads them.

``Model.from_single_file("x.gguf", quantization_config=GGUFQuantizationConfig(compute_dtype=...))``
keeps the weights of the model's linear layers as the file's quantized bytes and dequantizes them in
each forward; the ``gguf`` package (``pip install diffpipe[gguf]``) reads the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GGUFQuantizationConfig:
    """How a GGUF file's quantized weights are used: ``compute_dtype`` is the dtype they are
    dequantized to in forward (default float32); the model's other weights take it too unless
    ``torch_dtype=`` is given."""

    compute_dtype: torch.dtype | None = None
    quant_method: str = "gguf"
    pre_quantized: bool = True
    modules_to_not_convert: list[str] | None = None

    def __post_init__(self):
        if self.compute_dtype is None:
            self.compute_dtype = torch.float32
        elif isinstance(self.compute_dtype, str):
            value = getattr(torch, self.compute_dtype.removeprefix("torch."), None)
            if not isinstance(value, torch.dtype):
                raise TypeError(f"GGUFQuantizationConfig: compute_dtype {self.compute_dtype!r} is not a torch dtype")
            self.compute_dtype = value
        if not isinstance(self.compute_dtype, torch.dtype) or not self.compute_dtype.is_floating_point:
            raise TypeError(
                f"GGUFQuantizationConfig: compute_dtype must be a floating torch dtype, got {self.compute_dtype!r}"
            )

    def to_dict(self) -> dict:
        return {
            "quant_method": self.quant_method,
            "compute_dtype": self.compute_dtype,
            "pre_quantized": self.pre_quantized,
            "modules_to_not_convert": self.modules_to_not_convert,
        }


def __getattr__(name: str):
    if name in ("load_gguf_into", "GGUFLinear", "GGUFWeight", "quantized_bytes"):
        from . import gguf_linear

        return getattr(gguf_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GGUFQuantizationConfig", "load_gguf_into", "GGUFLinear", "GGUFWeight", "quantized_bytes"]
