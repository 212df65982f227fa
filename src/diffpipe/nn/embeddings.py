"""Timestep embeddings: the sinusoidal projection and the MLP that follows it."""

from __future__ import annotations

import math

import torch
from torch import nn

from .activations import get_activation


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: int = 10000,
) -> torch.Tensor:
    """Sinusoidal embedding ``[N, dim]`` (float32) of a 1-d tensor of (possibly fractional) timesteps.

    Frequencies are ``max_period ** (-i / (dim // 2 - downscale_freq_shift))`` for ``i < dim // 2``;
    the output is ``[sin, cos]`` of ``scale * t * freq`` (``[cos, sin]`` with ``flip_sin_to_cos``),
    zero-padded by one column when ``dim`` is odd. The small frequency table is rebuilt per call: it
    costs less than caching it per device and dtype, and keeps the module free of buffers.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-d tensor, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) * -math.log(max_period)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    angles = scale * (timesteps[:, None].float() * freqs[None, :])
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    else:
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """Module form of :func:`timestep_embedding` (no parameters)."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: float = 1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
        )


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> act -> ``linear_2`` [-> post_act]; ``cond_proj`` adds a projected condition first."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
    ):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, bias=sample_proj_bias)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim if out_dim is None else out_dim, bias=sample_proj_bias)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError(
                    "a timestep condition (`timestep_cond`) was given, but this model has no `time_cond_proj_dim`"
                )
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds a fixed sine/cosine code of each position to a ``[B, L, dim]`` sequence (``L <= max_seq_length``).

    Column ``2i`` holds ``sin(p * w_i)`` and column ``2i + 1`` ``cos(p * w_i)`` with
    ``w_i = 10000 ** (-2i / dim)``. The table is the persistent buffer ``pe`` ``[1, max_seq_length, dim]``,
    saved with the weights as the reference saves it (AnimateDiff's temporal transformers).
    """

    def __init__(self, embed_dim: int, max_seq_length: int = 32):
        super().__init__()
        self.max_seq_length = max_seq_length
        positions = torch.arange(max_seq_length, dtype=torch.float32)[:, None]
        freqs = torch.exp(torch.arange(0, embed_dim, 2, dtype=torch.float32) * (-math.log(10000.0) / embed_dim))
        table = torch.zeros(1, max_seq_length, embed_dim)
        table[0, :, 0::2] = torch.sin(positions * freqs)
        table[0, :, 1::2] = torch.cos(positions * freqs[: embed_dim // 2])
        self.register_buffer("pe", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.max_seq_length:
            raise ValueError(
                f"a sequence of {length} positions is longer than this positional embedding's "
                f"max_seq_length={self.max_seq_length}"
            )
        return x + self.pe[:, :length]
