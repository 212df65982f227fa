"""The spatial transformer of SD-family UNets: image features as tokens through self-/cross-attention."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .activations import FeedForward
from .attention import Attention
from .embeddings import SinusoidalPositionalEmbedding


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``[B, L]`` keep(1)/discard(0) mask as an additive bias ``[B, 1, L]`` (0 / -10000); others unchanged."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: ``norm1``/``attn1`` (self-attention), ``norm2``/``attn2`` (cross-attention),
    ``norm3``/``ff`` (GEGLU MLP), each added to the residual stream.

    With ``only_cross_attention`` the first attention also attends to the encoder states; with
    ``double_self_attention`` the second one is a self-attention. ``positional_embeddings="sinusoidal"``
    adds ``pos_embed`` (a fixed code of each position, up to ``num_positional_embeddings``) to the
    normalised input of each attention (AnimateDiff's temporal blocks).
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: int | None = None,
        activation_fn: str = "geglu",
        attention_bias: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        final_dropout: bool = False,
        ff_inner_dim: int | None = None,
        ff_bias: bool = True,
        attention_out_bias: bool = True,
        positional_embeddings: str | None = None,
        num_positional_embeddings: int | None = None,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        if positional_embeddings not in (None, "sinusoidal"):
            raise ValueError(f"positional_embeddings={positional_embeddings!r}; expected None or 'sinusoidal'")
        if positional_embeddings is not None and num_positional_embeddings is None:
            raise ValueError(
                "positional_embeddings='sinusoidal' needs num_positional_embeddings (the longest sequence)"
            )
        self.pos_embed = (
            SinusoidalPositionalEmbedding(dim, max_seq_length=num_positional_embeddings)
            if positional_embeddings is not None
            else None
        )
        attention = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            dropout=dropout,
            bias=attention_bias,
            upcast_attention=upcast_attention,
            out_bias=attention_out_bias,
        )
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(
            dim, cross_attention_dim=cross_attention_dim if only_cross_attention else None, **attention
        )
        if cross_attention_dim is not None or double_self_attention:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
            self.attn2 = Attention(
                dim, cross_attention_dim=None if double_self_attention else cross_attention_dim, **attention
            )
        else:
            self.norm2 = None
            self.attn2 = None
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(
            dim,
            dropout=dropout,
            activation_fn=activation_fn,
            final_dropout=final_dropout,
            inner_dim=ff_inner_dim,
            bias=ff_bias,
        )
        self._chunk_size: int | None = None  # enable_forward_chunking: feed-forward in chunks
        self._chunk_dim = 0
        self.context_windows = None  # FreeNoise: attention within sliding windows of the sequence

    def set_chunk_feed_forward(self, chunk_size: int | None, dim: int = 0) -> None:
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def _feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self._chunk_size is None:
            return self.ff(hidden_states)
        length = hidden_states.shape[self._chunk_dim]
        if length % self._chunk_size:
            raise ValueError(
                f"forward chunking: dimension {self._chunk_dim} has {length} entries, which chunks of "
                f"{self._chunk_size} do not divide; pick a chunk_size that divides it"
            )
        return torch.cat(
            [self.ff(c) for c in hidden_states.split(self._chunk_size, dim=self._chunk_dim)], dim=self._chunk_dim
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        kwargs = cross_attention_kwargs or {}

        def attend(hidden_states: torch.Tensor) -> torch.Tensor:
            hidden_states = hidden_states + self.attn1(
                self._normed(self.norm1, hidden_states),
                encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                attention_mask=attention_mask,
                **kwargs,
            )
            if self.attn2 is None:
                return hidden_states
            return hidden_states + self.attn2(
                self._normed(self.norm2, hidden_states),
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask,
                **kwargs,
            )

        windows = self.context_windows
        hidden_states = attend(hidden_states) if windows is None else windows.blend(hidden_states, attend)
        return hidden_states + self._feed_forward(self.norm3(hidden_states))

    def _normed(self, norm: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """An attention's input: the normalised states, plus the positional code if the block has one."""
        hidden_states = norm(hidden_states)
        return hidden_states if self.pos_embed is None else self.pos_embed(hidden_states)


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv, or Linear with ``use_linear_projection``), ``transformer_blocks``,
    ``proj_out``, plus the input as residual. ``in_channels`` in and out; inner width = heads * head dim.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        activation_fn: str = "geglu",
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        if in_channels is None:
            raise ValueError("Transformer2DModel needs `in_channels` (only continuous image input is implemented)")
        inner_dim = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.inner_dim = inner_dim
        self.use_linear_projection = use_linear_projection

        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear_projection:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                activation_fn=activation_fn,
                attention_bias=attention_bias,
                only_cross_attention=only_cross_attention,
                double_self_attention=double_self_attention,
                upcast_attention=upcast_attention,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        if use_linear_projection:
            self.proj_out = nn.Linear(inner_dim, self.out_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, self.out_channels, kernel_size=1, stride=1, padding=0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, C_out, H, W]``. 2-d masks (1 keep / 0 discard) become additive biases."""
        attention_mask = mask_to_bias(attention_mask, hidden_states.dtype)
        encoder_attention_mask = mask_to_bias(encoder_attention_mask, hidden_states.dtype)

        batch, _, height, width = hidden_states.shape
        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        if self.use_linear_projection:
            tokens = self.proj_in(hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, -1))
        else:
            hidden_states = self.proj_in(hidden_states)
            tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, self.inner_dim)

        for block in self.transformer_blocks:
            tokens = block(
                tokens,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                cross_attention_kwargs=cross_attention_kwargs,
            )

        if self.use_linear_projection:
            tokens = self.proj_out(tokens)
            out = tokens.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        else:
            out = tokens.reshape(batch, height, width, self.inner_dim).permute(0, 3, 1, 2).contiguous()
            out = self.proj_out(out)
        return out + residual
