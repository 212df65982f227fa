"""Model outputs: attribute access (``out.sample``) and tuple-style access (``out[0]``) to the same values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..outputs import BaseOutput


ModelOutput = BaseOutput  # the name models and their users import


@dataclass
class UNet2DConditionOutput(ModelOutput):
    """``sample``: the UNet's prediction, ``[batch, out_channels, height, width]``."""

    sample: torch.Tensor


@dataclass
class DecoderOutput(ModelOutput):
    """``sample``: the decoded images, ``[batch, out_channels, height, width]``; ``commit_loss``: a
    quantising VAE's commitment loss (None for the others)."""

    sample: torch.Tensor
    commit_loss: torch.Tensor | None = None


@dataclass
class AutoencoderKLOutput(ModelOutput):
    """``latent_dist``: the encoder's :class:`~diffpipe.models.autoencoder_kl.DiagonalGaussianDistribution`."""

    latent_dist: Any


@dataclass
class AutoencoderTinyOutput(ModelOutput):
    """``latents``: :class:`~diffpipe.models.autoencoder_tiny.AutoencoderTiny`'s encoded latents (raw,
    before ``scaling_factor``)."""

    latents: torch.Tensor


@dataclass
class ControlNetOutput(ModelOutput):
    """A ControlNet's residuals: ``down_block_res_samples``, one per UNet down-block skip (``conv_in``'s
    output first), and ``mid_block_res_sample``, for the UNet's mid block."""

    down_block_res_samples: tuple[torch.Tensor, ...]
    mid_block_res_sample: torch.Tensor


@dataclass
class Transformer2DModelOutput(ModelOutput):
    """``sample``: a transformer's prediction (Flux: ``[batch, image tokens, patch_size**2 * out_channels]``,
    the packed latent layout of its input)."""

    sample: torch.Tensor
