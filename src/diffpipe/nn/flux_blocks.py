"""Flux's transformer blocks, with the reference's parameter names.

- :class:`FluxTransformerBlock` (double stream): image and text tokens keep their own modulation
  (``norm1`` / ``norm1_context``), projections and MLPs (``ff`` / ``ff_context``) but attend jointly
  over ``[text, image]``.
- :class:`FluxSingleTransformerBlock` (single stream): one sequence ``[text, image]``; attention and
  MLP run in parallel from the same modulated input and are projected back together (``proj_out``).
- :class:`FluxAttention`: q/k RMSNorm per head (``norm_q``, ``norm_k``; ``norm_added_q``/``_k`` and
  ``add_{q,k,v}_proj``/``to_add_out`` for the text stream), rotary embedding on q and k, and torch's
  ``scaled_dot_product_attention``.
- the adaptive norms :class:`AdaLayerNormZero`, :class:`AdaLayerNormZeroSingle` and
  :class:`AdaLayerNormContinuous` (the final norm).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .activations import FeedForward
from .flux_embeddings import apply_rotary_emb

logger = logging.getLogger(__name__)

_FP16_MAX = 65504.0


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 activations of the residual stream saturate instead of overflowing to inf."""
    return x.clip(-_FP16_MAX, _FP16_MAX) if x.dtype == torch.float16 else x


def _plain_layer_norm(dim: int, eps: float = 1e-6) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps, bias=False)


class AdaLayerNormZero(nn.Module):
    """LayerNorm modulated by ``linear(silu(emb))``, chunked into shift/scale/gate for attention and MLP.

    Returns ``(normed, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
    """

    def __init__(self, embedding_dim: int, bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim, bias=bias)
        self.norm = _plain_layer_norm(embedding_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nn.Module):
    """LayerNorm modulated by ``linear(silu(emb))`` chunked into shift/scale/gate; returns ``(normed, gate)``."""

    def __init__(self, embedding_dim: int, bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 3 * embedding_dim, bias=bias)
        self.norm = _plain_layer_norm(embedding_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None], gate


class AdaLayerNormContinuous(nn.Module):
    """The final norm: LayerNorm, then ``* (1 + scale) + shift`` with ``scale, shift = linear(silu(c))``
    (scale first)."""

    def __init__(self, embedding_dim: int, conditioning_embedding_dim: int, eps: float = 1e-6, bias: bool = True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, 2 * embedding_dim, bias=bias)
        self.norm = _plain_layer_norm(embedding_dim, eps)

    def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
        scale, shift = emb.chunk(2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FluxAttention(nn.Module):
    """Joint attention. With ``added_kv_proj_dim`` the text stream has its own projections and norms and
    ``forward`` returns ``(image_out, text_out)``; ``pre_only`` layers (single stream) have no output
    projection and return the attention output itself."""

    def __init__(
        self,
        query_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        added_kv_proj_dim: int | None = None,
        bias: bool = True,
        out_bias: bool = True,
        eps: float = 1e-6,
        pre_only: bool = False,
        context_pre_only: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = dim_head
        inner = heads * dim_head
        self.pre_only = pre_only
        self.norm_q = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(0.0)])
        self.added_kv_proj_dim = added_kv_proj_dim
        if added_kv_proj_dim is not None:
            self.norm_added_q = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
            self.norm_added_k = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
            self.add_q_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            self.add_k_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, inner, bias=bias)
            if not context_pre_only:
                self.to_add_out = nn.Linear(inner, query_dim, bias=out_bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1))  # [B, S, H, D]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        query = self.norm_q(self._heads(self.to_q(hidden_states)))
        key = self.norm_k(self._heads(self.to_k(hidden_states)))
        value = self._heads(self.to_v(hidden_states))
        text_len = 0
        if encoder_hidden_states is not None and self.added_kv_proj_dim is not None:
            text_len = encoder_hidden_states.shape[1]
            text_q = self.norm_added_q(self._heads(self.add_q_proj(encoder_hidden_states)))
            text_k = self.norm_added_k(self._heads(self.add_k_proj(encoder_hidden_states)))
            text_v = self._heads(self.add_v_proj(encoder_hidden_states))
            query = torch.cat([text_q, query], dim=1)
            key = torch.cat([text_k, key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if text_len:
            text_out, out = out[:, :text_len], out[:, text_len:]
            out = self.to_out[1](self.to_out[0](out))
            return out, self.to_add_out(text_out)
        if not self.pre_only:
            out = self.to_out[1](self.to_out[0](out))
        return out


def _ignored_attention_kwargs(kwargs: dict | None) -> None:
    unknown = sorted(k for k in (kwargs or {}) if k != "scale")
    if unknown:
        logger.warning("joint_attention_kwargs %s are not used by the Flux attention and are ignored", unknown)


class FluxTransformerBlock(nn.Module):
    """Double-stream block; ``forward`` returns ``(encoder_hidden_states, hidden_states)``."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim)
        self.norm1_context = AdaLayerNormZero(dim)
        self.attn = FluxAttention(
            query_dim=dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            added_kv_proj_dim=dim,
            eps=eps,
        )
        self.norm2 = _plain_layer_norm(dim, eps)
        self.ff = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")
        self.norm2_context = _plain_layer_norm(dim, eps)
        self.ff_context = FeedForward(dim=dim, dim_out=dim, activation_fn="gelu-approximate")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ):
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
        normed_ctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, emb=temb
        )
        attn_out, ctx_attn_out = self.attn(normed, normed_ctx, image_rotary_emb=image_rotary_emb)

        hidden_states = hidden_states + gate_msa.unsqueeze(1) * attn_out
        normed = self.norm2(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(normed)

        encoder_hidden_states = encoder_hidden_states + c_gate_msa.unsqueeze(1) * ctx_attn_out
        normed_ctx = self.norm2_context(encoder_hidden_states) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(normed_ctx)
        return _clip_fp16(encoder_hidden_states), hidden_states


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over ``[text, image]``; ``forward`` returns ``(encoder_hidden_states,
    hidden_states)`` split back at the text length."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZeroSingle(dim)
        self.proj_mlp = nn.Linear(dim, self.mlp_hidden_dim)
        self.act_mlp = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(dim + self.mlp_hidden_dim, dim)
        self.attn = FluxAttention(
            query_dim=dim,
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            eps=1e-6,
            pre_only=True,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict | None = None,
    ):
        text_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        normed, gate = self.norm(residual, emb=temb)
        mlp = self.act_mlp(self.proj_mlp(normed))
        attn_out = self.attn(normed, image_rotary_emb=image_rotary_emb)
        out = gate.unsqueeze(1) * self.proj_out(torch.cat([attn_out, mlp], dim=2))
        out = _clip_fp16(residual + out)
        return out[:, :text_len], out[:, text_len:]
