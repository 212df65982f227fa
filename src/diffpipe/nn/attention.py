"""Multi-head attention with a replaceable processor per layer.

:class:`Attention` owns the weights (``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``: these
names are the checkpoint keys) and delegates the computation to ``attn.processor``, a callable

    processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs)

so that features such as IP-Adapter or self-attention guidance can swap the computation of single
layers without touching the weights. A processor that is an ``nn.Module`` becomes a submodule (its
parameters then appear under ``...attn2.processor.*``, as in the reference format).

Models that contain attention layers mix in :class:`AttentionHostMixin` for ``attn_processors`` and
``set_attn_processor``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# cross_attention_kwargs that callers pass to every layer but only some processors use; dropping
# them for the others is expected and not worth a warning.
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states", "scale"})


class AttnProcessor:
    """Default processor: ``torch.nn.functional.scaled_dot_product_attention``.

    Like the reference's default processor it leaves the precision of the softmax to the SDPA kernel
    (the fused kernels accumulate in float32); ``upcast_attention``/``upcast_softmax`` are honoured by
    :class:`AttnProcessorMath`, which materialises the probabilities.
    """

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, image_shape = attn.flatten_input(hidden_states)
        context = attn.context_for(hidden_states, encoder_hidden_states)

        batch = hidden_states.shape[0]
        query, key, value = (attn.split_heads(x) for x in attn.project_qkv(hidden_states, context))
        mask = attn.sdpa_mask(attention_mask, batch, key.shape[-2])

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        return attn.finish(out, residual, image_shape)


# Name under which the reference's configs and code know the SDPA processor.
AttnProcessor2_0 = AttnProcessor


class AttnProcessorMath:
    """Explicit attention: softmax(q k^T * scale + mask) v with the probabilities materialised.

    Honours ``attn.upcast_attention`` (q and k in float32) and ``attn.upcast_softmax`` (softmax in
    float32). Slower than :class:`AttnProcessor`; useful when the probabilities themselves are needed.
    """

    def __call__(
        self,
        attn: "Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, image_shape = attn.flatten_input(hidden_states)
        context = attn.context_for(hidden_states, encoder_hidden_states)
        batch = hidden_states.shape[0]
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)

        query, key, value = (attn.head_to_batch_dim(x) for x in attn.project_qkv(hidden_states, context))
        out = attn.batch_to_head_dim(self.attend(attn, query, key, value, mask))
        return attn.finish(out, residual, image_shape)

    def attend(self, attn: "Attention", query, key, value, mask) -> torch.Tensor:
        """``[B * heads, L_q, d]`` attention output from ``[B * heads, L, d]`` queries, keys, values."""
        return torch.bmm(self.probabilities(attn, query, key, mask), value)

    def probabilities(
        self, attn: "Attention", query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The ``[B * heads, L_q, L_k]`` attention probabilities; a subclass may keep or alter them
        (self-attention guidance reads the mid block's map this way)."""
        return attn.get_attention_scores(query, key, mask)


class SlicedAttnProcessor(AttnProcessorMath):
    """Explicit attention computed ``slice_size`` (batch x head) rows at a time: the probabilities of
    only those rows exist at once, which bounds the attention's peak memory (``enable_attention_slicing``).
    The result is the same as unsliced attention."""

    def __init__(self, slice_size: int):
        if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive integer, got {slice_size!r}")
        self.slice_size = slice_size

    def attend(self, attn: "Attention", query, key, value, mask) -> torch.Tensor:
        rows = range(0, query.shape[0], self.slice_size)
        parts = []
        for start in rows:
            end = start + self.slice_size
            part_mask = None if mask is None else mask[start:end]
            probs = self.probabilities(attn, query[start:end], key[start:end], part_mask)
            parts.append(torch.bmm(probs, value[start:end]))
        return torch.cat(parts)


def _accepted_kwargs(processor: Callable) -> tuple[frozenset[str], bool]:
    """(keyword names the processor takes beyond ``attn, hidden_states``, whether it takes ``**kwargs``)."""
    try:
        params = list(inspect.signature(processor).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: pass everything
        return frozenset(), True
    names = frozenset(p.name for p in params[2:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


class Attention(nn.Module):
    """Multi-head (cross-)attention.

    ``heads * dim_head`` is the inner width; ``cross_attention_dim`` (default ``query_dim``) is the
    width of ``encoder_hidden_states``. ``norm_num_groups`` adds the VAE's ``group_norm`` over the
    input channels; ``residual_connection`` and ``rescale_output_factor`` give ``(out + x) / factor``.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        processor: Callable | None = None,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.query_dim = query_dim
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        self.heads = heads
        self.dim_head = dim_head
        self.inner_dim = inner_dim
        self.scale = dim_head**-0.5
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        # Attributes processors written for the reference look at; diffpipe never sets them.
        self.spatial_norm = None
        self.norm_cross = None
        self.norm_q = None
        self.norm_k = None

        self.group_norm = (
            nn.GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True)
            if norm_num_groups is not None
            else None
        )
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.fused_projections = False
        self.set_processor(AttnProcessor() if processor is None else processor)

    # ------------------------------------------------------------------ projections
    def project_qkv(self, hidden_states: torch.Tensor, context: torch.Tensor):
        """(query, key, value) ``[B, L, heads * d]``: three matmuls, or after :meth:`fuse_projections`
        one (self-attention: ``to_qkv``) or two (cross-attention: ``to_q`` and ``to_kv``)."""
        if not self.fused_projections:
            return self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        if not self.is_cross_attention:
            return self.to_qkv(hidden_states).chunk(3, dim=-1)
        return (self.to_q(hidden_states), *self.to_kv(context).chunk(2, dim=-1))

    def fuse_projections(self) -> None:
        """Join the key and value projections (and the query's, for self-attention) into one Linear,
        ``to_qkv`` / ``to_kv`` as the reference names them; the separate ones stay for unfusing."""
        if self.fused_projections:
            return
        parts = [self.to_k, self.to_v] if self.is_cross_attention else [self.to_q, self.to_k, self.to_v]
        first = parts[0]
        fused = nn.Linear(
            first.in_features,
            sum(p.out_features for p in parts),
            bias=first.bias is not None,
            device=first.weight.device,
            dtype=first.weight.dtype,
        )
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if first.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        setattr(self, "to_kv" if self.is_cross_attention else "to_qkv", fused)
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        """Back to the separate projections; the fused Linear is removed."""
        for name in ("to_qkv", "to_kv"):
            if name in self._modules:
                del self._modules[name]
        self.fused_projections = False

    # ------------------------------------------------------------------ processor
    def set_processor(self, processor: Callable) -> None:
        if processor is None or not callable(processor):
            raise TypeError(f"an attention processor must be callable, got {type(processor).__name__}")
        if "processor" in self._modules and not isinstance(processor, nn.Module):
            del self._modules["processor"]  # replacing a processor that had weights
        self.processor = processor
        self._processor_kwargs = _accepted_kwargs(processor)

    def get_processor(self) -> Callable:
        return self.processor

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> torch.Tensor:
        if cross_attention_kwargs:
            names, takes_any = self._processor_kwargs
            if not takes_any:
                dropped = [k for k in cross_attention_kwargs if k not in names and k not in _QUIET_KWARGS]
                if dropped:
                    logger.warning(
                        "cross_attention_kwargs %s are not taken by %s and are ignored",
                        dropped,
                        type(self.processor).__name__,
                    )
                cross_attention_kwargs = {k: v for k, v in cross_attention_kwargs.items() if k in names}
        return self.processor(
            self,
            hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            **cross_attention_kwargs,
        )

    # ------------------------------------------------------------------ helpers for processors
    def flatten_input(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """Apply ``group_norm`` if any; image input ``[B, C, H, W]`` becomes tokens ``[B, H*W, C]``.

        Returns the tokens and the image shape (``None`` for token input) for :meth:`finish`.
        """
        if hidden_states.ndim == 4:
            shape = tuple(hidden_states.shape)
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            return hidden_states.flatten(2).transpose(1, 2), shape
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, None

    def context_for(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> torch.Tensor:
        """What keys and values are computed from: the encoder states, or the input for self-attention."""
        if encoder_hidden_states is None:
            return hidden_states
        if self.norm_cross is not None:
            return self.norm_cross(encoder_hidden_states)
        return encoder_hidden_states

    def finish(self, out: torch.Tensor, residual: torch.Tensor, image_shape: tuple[int, ...] | None) -> torch.Tensor:
        """Output projection, back to image layout, residual and rescale."""
        out = self.to_out[1](self.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out

    def split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, L, heads * d]`` -> ``[B, heads, L, d]``."""
        batch, length, width = tensor.shape
        return tensor.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

    def sdpa_mask(self, attention_mask: torch.Tensor | None, batch: int, key_length: int) -> torch.Tensor | None:
        """An additive (or boolean) mask shaped to broadcast over ``[B, heads, L_q, L_k]``.

        Accepts ``[B, L_k]``, ``[B, L_q or 1, L_k]``, ``[B * heads, L_q or 1, L_k]`` and 4-d masks.
        """
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention mask covers {attention_mask.shape[-1]} keys (shape {tuple(attention_mask.shape)}), "
                f"but the attention has {key_length} keys"
            )
        if attention_mask.ndim == 2:
            return attention_mask[:, None, None, :]
        if attention_mask.ndim == 3:
            if self.heads > 1 and attention_mask.shape[0] == batch * self.heads:
                return attention_mask.view(batch, self.heads, attention_mask.shape[1], key_length)
            return attention_mask[:, None]
        return attention_mask

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """``[B, L, heads * d]`` -> ``[B * heads, L, d]`` (``out_dim=3``) or ``[B, heads, L, d]`` (4)."""
        tensor = self.split_heads(tensor)
        if out_dim == 3:
            batch, heads, length, dim = tensor.shape
            tensor = tensor.reshape(batch * heads, length, dim)
        return tensor

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B * heads, L, d]`` -> ``[B, L, heads * d]``."""
        batch_heads, length, dim = tensor.shape
        tensor = tensor.view(batch_heads // self.heads, self.heads, length, dim).transpose(1, 2)
        return tensor.reshape(batch_heads // self.heads, length, self.heads * dim)

    def prepare_attention_mask(
        self, attention_mask: torch.Tensor | None, target_length: int, batch_size: int, out_dim: int = 3
    ) -> torch.Tensor | None:
        """A mask with one row per (batch, head): ``[B * heads, L_q, L_k]`` or ``[B, heads, L_q, L_k]``."""
        if attention_mask is None:
            return None
        mask = self.sdpa_mask(attention_mask, batch_size, target_length)  # [B, 1 or heads, L_q, L_k]
        mask = mask.expand(mask.shape[0], self.heads, mask.shape[2], mask.shape[3])
        if out_dim == 3:
            mask = mask.reshape(-1, mask.shape[2], mask.shape[3])
        return mask

    def get_attention_scores(
        self, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention probabilities for ``[B * heads, L, d]`` queries and keys, in the query's dtype."""
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * self.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)


class AttentionHostMixin:
    """``attn_processors`` / ``set_attn_processor`` for a module that contains :class:`Attention` layers."""

    @property
    def attn_processors(self) -> dict[str, Callable]:
        """``{"<layer path>.processor": processor}`` for every attention layer, in module order."""
        return {
            f"{name}.processor": module.processor
            for name, module in self.named_modules()  # type: ignore[attr-defined]
            if isinstance(module, Attention)
        }

    def set_attn_processor(self, processor: Callable | dict[str, Callable]) -> None:
        """Set one processor for every attention layer, or a dict keyed as ``attn_processors``."""
        layers = {
            f"{name}.processor": module
            for name, module in self.named_modules()  # type: ignore[attr-defined]
            if isinstance(module, Attention)
        }
        if isinstance(processor, dict):
            missing = [k for k in layers if k not in processor]
            unknown = [k for k in processor if k not in layers]
            if missing or unknown:
                from ..errors import summarize

                raise ValueError(
                    f"set_attn_processor needs exactly one processor per attention layer ({len(layers)} layers, "
                    f"keys as in `attn_processors`); missing {summarize(missing)}, unknown {summarize(unknown)}"
                )
            for key, layer in layers.items():
                layer.set_processor(processor[key])
        else:
            for layer in layers.values():
                layer.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Go back to the SDPA processor in every attention layer."""
        self.set_attn_processor(AttnProcessor())
