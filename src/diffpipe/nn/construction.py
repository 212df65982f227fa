"""Building a model without spending time on weights that loading will replace."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

# Layers whose constructors run an initializer; loading replaces every value they would produce.
_INITIALIZED = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Embedding,
)


def _skip(self) -> None:
    return None


@contextlib.contextmanager
def empty_modules():
    """Construct modules on the meta device with their initializers switched off.

    Parameters are shapes only (no memory); the checkpoint's tensors are assigned afterwards. On the
    meta device an initializer computes nothing, but its Python overhead is most of the time a
    full-size UNet takes to construct, so it is skipped too. Not thread-safe: the layers'
    ``reset_parameters`` are patched for the duration of the block.
    """
    owners = {next(k for k in cls.__mro__ if "reset_parameters" in k.__dict__) for cls in _INITIALIZED}
    saved = [(owner, owner.__dict__["reset_parameters"]) for owner in owners]
    for cls, _ in saved:
        cls.reset_parameters = _skip
    try:
        with torch.device("meta"):
            yield
    finally:
        for cls, original in saved:
            cls.reset_parameters = original
