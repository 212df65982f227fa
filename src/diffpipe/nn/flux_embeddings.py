"""Flux's position and conditioning embeddings.

- :class:`FluxPosEmbed`: rotary position embedding over ``n_axes`` position axes. Each token has an
  id row (``[0, 0, 0]`` for text, ``[0, row, col]`` for image patches); axis ``i`` rotates
  ``axes_dim[i]`` channels of every head by angles ``pos_i * theta ** (-2j / axes_dim[i])``. The tables
  are built in float64 (float32 where the device has no float64) and returned as float32 ``(cos, sin)``
  ``[S, sum(axes_dim)]``, each angle repeated for the two channels of its pair.
- :func:`apply_rotary_emb`: rotates interleaved channel pairs ``(x[2j], x[2j+1])`` of ``[B, S, H, D]``.
- :class:`CombinedTimestepTextProjEmbeddings` (schnell) and
  :class:`CombinedTimestepGuidanceTextProjEmbeddings` (dev): the conditioning vector, the sum of the
  timestep MLP, the guidance MLP (dev only) and the pooled-text projection.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import TimestepEmbedding, Timesteps


def _rope_table(dim: int, pos: torch.Tensor, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[S, dim]`` float32 for positions ``pos`` ``[S]`` on one axis (``dim`` even)."""
    exponents = torch.arange(0, dim, 2, dtype=dtype, device=pos.device)[: dim // 2] / dim
    freqs = 1.0 / (theta**exponents)
    angles = torch.outer(pos.to(dtype), freqs)
    cos = angles.cos().repeat_interleave(2, dim=1).float()
    sin = angles.sin().repeat_interleave(2, dim=1).float()
    return cos, sin


class FluxPosEmbed(nn.Module):
    """Rotary tables for token ids ``[S, len(axes_dim)]`` (no parameters)."""

    def __init__(self, theta: int, axes_dim: list[int] | tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.ndim != 2 or ids.shape[-1] != len(self.axes_dim):
            raise ValueError(
                f"position ids must be [tokens, {len(self.axes_dim)}] (one column per rope axis), "
                f"got shape {tuple(ids.shape)}"
            )
        pos = ids.float()
        # float64 angles where the device supports them (MPS does not)
        dtype = torch.float32 if pos.device.type in ("mps", "npu") else torch.float64
        tables = [_rope_table(dim, pos[:, i], self.theta, dtype) for i, dim in enumerate(self.axes_dim)]
        cos = torch.cat([c for c, _ in tables], dim=-1).to(ids.device)
        sin = torch.cat([s for _, s in tables], dim=-1).to(ids.device)
        return cos, sin


def apply_rotary_emb(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, D]`` by ``freqs = (cos, sin)`` ``[S, D]``; computed in float32, returned
    in ``x``'s dtype."""
    cos, sin = (f[None, :, None, :].to(x.device) for f in freqs)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class PixArtAlphaTextProjection(nn.Module):
    """``linear_1`` -> ``act_1`` -> ``linear_2``: the pooled text embedding to the conditioning width."""

    def __init__(self, in_features: int, hidden_size: int, out_features: int | None = None, act_fn: str = "silu"):
        super().__init__()
        out_features = hidden_size if out_features is None else out_features
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=True)
        if act_fn == "silu":
            self.act_1: nn.Module = nn.SiLU()
        elif act_fn == "gelu_tanh":
            self.act_1 = nn.GELU(approximate="tanh")
        else:
            raise ValueError(f"unknown text projection activation {act_fn!r}; expected 'silu' or 'gelu_tanh'")
        self.linear_2 = nn.Linear(hidden_size, out_features, bias=True)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """Conditioning without guidance (schnell): ``timestep_embedder(t) + text_embedder(pooled)``."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu")

    def forward(self, timestep: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        time_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype=pooled_projection.dtype))
        return time_emb + self.text_embedder(pooled_projection)


class CombinedTimestepGuidanceTextProjEmbeddings(nn.Module):
    """Conditioning with guidance (dev): timestep, guidance and pooled-text embeddings summed."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.guidance_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)
        self.text_embedder = PixArtAlphaTextProjection(pooled_projection_dim, embedding_dim, act_fn="silu")

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor, pooled_projection: torch.Tensor) -> torch.Tensor:
        dtype = pooled_projection.dtype
        time_emb = self.timestep_embedder(self.time_proj(timestep).to(dtype=dtype))
        guidance_emb = self.guidance_embedder(self.time_proj(guidance).to(dtype=dtype))
        return (time_emb + guidance_emb) + self.text_embedder(pooled_projection)
