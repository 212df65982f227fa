"""The attention processor of the cross-attention layers while an IP-Adapter is loaded: attention to
the text, plus ``scale *`` attention to each adapter's image tokens (optionally per image, weighed by a
region mask)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..image_processor import IPAdapterMaskProcessor
from ..nn.attention import Attention


class IPAdapterAttnProcessor(nn.Module):
    """Cross-attention to the text states plus, per loaded adapter, ``scale *`` attention to its image
    tokens (same queries, the adapter's own ``to_k_ip`` / ``to_v_ip``); then the layer's output projection.

    ``scale`` holds one entry per adapter: a number, or a list of numbers (one per image of that
    adapter) as :meth:`IPAdapterMixin.set_ip_adapter_scale` sets it.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int | None = None, num_tokens=(4,), scale=1.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = list(num_tokens) if isinstance(num_tokens, (list, tuple)) else [num_tokens]
        scales = scale if isinstance(scale, list) else [scale] * len(self.num_tokens)
        if len(scales) != len(self.num_tokens):
            raise ValueError(f"IPAdapterAttnProcessor: {len(scales)} scales for {len(self.num_tokens)} adapters")
        self.scale = scales
        width = cross_attention_dim or hidden_size
        self.to_k_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in self.num_tokens)
        self.to_v_ip = nn.ModuleList(nn.Linear(width, hidden_size, bias=False) for _ in self.num_tokens)

    def forward(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask: torch.Tensor | None = None,
        temb=None,
        ip_adapter_masks=None,
        **kwargs: Any,
    ):
        if not isinstance(encoder_hidden_states, tuple):
            raise ValueError(
                "this cross-attention layer runs an IP-Adapter and needs (text states, image tokens); call the UNet "
                "with added_cond_kwargs={'image_embeds': [...]} (pipelines: ip_adapter_image= or "
                "ip_adapter_image_embeds=)"
            )
        text, image_tokens = encoder_hidden_states
        residual = hidden_states
        tokens, image_shape = attn.flatten_input(hidden_states)
        batch = tokens.shape[0]
        context = attn.context_for(tokens, text)
        query = attn.split_heads(attn.to_q(tokens))
        mask = attn.sdpa_mask(attention_mask, batch, context.shape[1])
        out = self._attend(attn, query, attn.to_k(context), attn.to_v(context), mask)
        masks = self._masks(ip_adapter_masks, image_tokens)
        for states, scale, to_k, to_v, region in zip(image_tokens, self.scale, self.to_k_ip, self.to_v_ip, masks):
            if all(s == 0 for s in (scale if isinstance(scale, list) else [scale])):
                continue
            if region is None:
                if isinstance(scale, list):
                    raise ValueError(
                        "per-image IP-Adapter scales (a list per adapter) weigh each image by its region: pass "
                        "cross_attention_kwargs={'ip_adapter_masks': [...]} with one mask per image"
                    )
                out = out + scale * self._attend(attn, query, to_k(states), to_v(states), None)
                continue
            per_image = scale if isinstance(scale, list) else [scale] * region.shape[1]
            for i in range(region.shape[1]):
                part = self._attend(attn, query, to_k(states[:, i]), to_v(states[:, i]), None)
                weight = IPAdapterMaskProcessor.downsample(region[:, i], batch, part.shape[1], part.shape[2])
                out = out + per_image[i] * part * weight.to(dtype=part.dtype, device=part.device)
        return attn.finish(out, residual, image_shape)

    def _masks(self, ip_adapter_masks, image_tokens) -> list:
        """One region mask ``[1, images, H, W]`` (or None) per adapter, checked against its image tokens."""
        if ip_adapter_masks is None:
            return [None] * len(self.scale)
        if torch.is_tensor(ip_adapter_masks):
            ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))
        if not (len(ip_adapter_masks) == len(self.scale) == len(image_tokens)):
            raise ValueError(
                f"ip_adapter_masks has {len(ip_adapter_masks)} entries for {len(self.scale)} loaded IP-Adapters; "
                "pass one mask tensor (or None) per adapter"
            )
        for index, (mask, scale, states) in enumerate(zip(ip_adapter_masks, self.scale, image_tokens)):
            if mask is None:
                continue
            if not torch.is_tensor(mask) or mask.ndim != 4:
                raise ValueError(
                    f"ip_adapter_masks[{index}] must be a tensor [1, images of that adapter, height, width] (from "
                    f"IPAdapterMaskProcessor().preprocess(...).reshape(1, -1, height, width)), got {mask!r:.60}"
                )
            if states.ndim != 4 or mask.shape[1] != states.shape[1]:
                images = states.shape[1] if states.ndim == 4 else 1
                raise ValueError(
                    f"ip_adapter_masks[{index}] has {mask.shape[1]} masks for {images} images of that adapter; "
                    "pass one mask per image"
                )
            if isinstance(scale, list) and len(scale) != mask.shape[1]:
                raise ValueError(
                    f"IP-Adapter {index} has {len(scale)} per-image scales for {mask.shape[1]} masks; "
                    "pass one per image"
                )
        return list(ip_adapter_masks)

    @staticmethod
    def _attend(attn: Attention, query, key, value, mask) -> torch.Tensor:
        """SDPA of ``[B, heads, L, d]`` queries over ``[B, ..., width]`` keys/values -> ``[B, L, heads * d]``."""
        batch = query.shape[0]
        key = key.reshape(batch, -1, key.shape[-1])
        value = value.reshape(batch, -1, value.shape[-1])
        out = F.scaled_dot_product_attention(
            query, attn.split_heads(key), attn.split_heads(value), attn_mask=mask, scale=attn.scale
        )
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)


# Name under which the reference's code knows the SDPA IP-Adapter processor.
IPAdapterAttnProcessor2_0 = IPAdapterAttnProcessor
