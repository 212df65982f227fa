"""Model outputs: attribute access (``out.sample``) and tuple-style access (``out[0]``) to the same values."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


class ModelOutput:
    """Base for output dataclasses. Like the reference's outputs, integer indexing and iteration see
    only the fields that are not ``None``, in declaration order; string indexing reads a field."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclass
class UNet2DConditionOutput(ModelOutput):
    """``sample``: the UNet's prediction, ``[batch, out_channels, height, width]``."""

    sample: torch.Tensor


@dataclass
class DecoderOutput(ModelOutput):
    """``sample``: the decoded images, ``[batch, out_channels, height, width]``."""

    sample: torch.Tensor


@dataclass
class AutoencoderKLOutput(ModelOutput):
    """``latent_dist``: the encoder's :class:`~diffpipe.models.autoencoder_kl.DiagonalGaussianDistribution`."""

    latent_dist: Any
