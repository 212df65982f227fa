"""The memory and speed switches of models with attention layers, under the reference's names.

Each trades memory or speed for nothing in the result (outputs stay within rounding of the plain call):

- ``set_attention_slice(size)``: attention computed ``size`` (batch x head) rows at a time;
  ``"auto"`` halves each layer's heads, ``"max"`` is one row at a time, ``None`` turns it off. Layers
  running a processor of an adapter (IP-Adapter) keep it.
- ``enable_forward_chunking(chunk_size, dim)``: the transformer blocks' feed-forward run in chunks of
  the batch (``dim=0``) or the sequence (``dim=1``).
- ``fuse_qkv_projections()``: one matmul for query, key and value (self-attention) or key and value
  (cross-attention); ``unfuse_qkv_projections()`` takes the fused weights away again.
- ``enable_xformers_memory_efficient_attention()``: diffpipe's attention already runs on torch's
  ``scaled_dot_product_attention``, which picks a memory-efficient kernel where one exists; the switch
  says so, or says that xformers is not installed, as the reference's does.
"""

from __future__ import annotations

import importlib.util
import logging

from torch import nn

from .attention import Attention, AttnProcessor, AttnProcessorMath, SlicedAttnProcessor
from .transformer_2d import BasicTransformerBlock

logger = logging.getLogger(__name__)

_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessorMath)  # SlicedAttnProcessor is one of these


def _attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


class MemorySwitchesMixin:
    """Mixed into models that contain :class:`Attention` layers."""

    def set_attention_slice(self, slice_size: str | int | list[int] | None) -> None:
        layers = [layer for layer in _attention_layers(self) if isinstance(layer.processor, _PLAIN_PROCESSORS)]
        if slice_size is None:
            sizes = [None] * len(layers)
        elif slice_size == "auto":
            sizes = [max(layer.heads // 2, 1) for layer in layers]
        elif slice_size == "max":
            sizes = [1] * len(layers)
        elif isinstance(slice_size, list):
            if len(slice_size) != len(layers):
                raise ValueError(
                    f"set_attention_slice got {len(slice_size)} sizes for {len(layers)} attention layers; pass "
                    "one per layer, or one int, 'auto', 'max' or None"
                )
            sizes = slice_size
        elif isinstance(slice_size, int) and not isinstance(slice_size, bool) and slice_size > 0:
            sizes = [slice_size] * len(layers)
        else:
            raise ValueError(
                f"slice_size must be 'auto', 'max', a positive int, a list of them or None, got {slice_size!r}"
            )
        for layer, size in zip(layers, sizes):
            layer.set_processor(AttnProcessor() if size is None else SlicedAttnProcessor(size))

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (batch) or 1 (sequence length), got {dim!r}")
        chunk_size = chunk_size or 1
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        for block in self.modules():
            if isinstance(block, BasicTransformerBlock):
                block.set_chunk_feed_forward(chunk_size, dim)

    def disable_forward_chunking(self) -> None:
        for block in self.modules():
            if isinstance(block, BasicTransformerBlock):
                block.set_chunk_feed_forward(None, 0)

    def fuse_qkv_projections(self) -> None:
        for layer in _attention_layers(self):
            layer.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        for layer in _attention_layers(self):
            layer.unfuse_projections()

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        if importlib.util.find_spec("xformers") is None:
            raise ModuleNotFoundError(
                "enable_xformers_memory_efficient_attention: xformers is not installed (pip install xformers). "
                "diffpipe does not need it: its attention runs on torch's scaled_dot_product_attention, which "
                "uses a memory-efficient kernel where one exists"
            )
        logger.info(
            "xformers is installed, but diffpipe's attention already runs on torch's scaled_dot_product_attention "
            "(flash / memory-efficient kernels); the attention is left as it is"
        )

    def disable_xformers_memory_efficient_attention(self) -> None:
        """Nothing to undo (see :meth:`enable_xformers_memory_efficient_attention`)."""
