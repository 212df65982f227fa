"""IP-Adapter image projections: the modules that turn a CLIP image embedding into image tokens of
the UNet's cross-attention width, and building the right one from a checkpoint's ``image_proj``
keys (plain, plus / perceiver resampler, full-face), in the reference's module and parameter names.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn

from ..errors import StateDictMismatchError, summarize
from ..nn.activations import FeedForward
from ..nn.attention import Attention


class ImageProjection(nn.Module):
    """Plain IP-Adapter: ``image_embeds`` (Linear to ``tokens * width``), then ``norm`` per token."""

    def __init__(self, image_embed_dim: int = 768, cross_attention_dim: int = 768, num_image_text_embeds: int = 4):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(tokens.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class IPAdapterFullImageProjection(nn.Module):
    """Full-face IP-Adapter: an MLP (``ff``) and ``norm`` applied to every hidden-state token."""

    def __init__(self, image_embed_dim: int = 1024, cross_attention_dim: int = 1024):
        super().__init__()
        self.ff = FeedForward(image_embed_dim, cross_attention_dim, mult=1, activation_fn="gelu")
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.ff(image_embeds))


class IPAdapterPlusImageProjectionBlock(nn.Module):
    """One resampler layer: the queries attend to [image tokens, queries], then an MLP; both residual."""

    def __init__(self, embed_dims: int = 768, dim_head: int = 64, heads: int = 16, ffn_ratio: float = 4):
        super().__init__()
        self.ln0 = nn.LayerNorm(embed_dims)
        self.ln1 = nn.LayerNorm(embed_dims)
        self.attn = Attention(query_dim=embed_dims, dim_head=dim_head, heads=heads, out_bias=False)
        self.ff = nn.Sequential(
            nn.LayerNorm(embed_dims),
            FeedForward(embed_dims, embed_dims, activation_fn="gelu", mult=ffn_ratio, bias=False),
        )

    def forward(self, x: torch.Tensor, latents: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        queries = self.ln1(latents)
        context = torch.cat([self.ln0(x), queries], dim=-2)
        latents = self.attn(queries, context) + residual
        return self.ff(latents) + latents


class IPAdapterPlusImageProjection(nn.Module):
    """IP-Adapter Plus: ``num_queries`` learned queries resample the projected hidden states."""

    def __init__(
        self,
        embed_dims: int = 768,
        output_dims: int = 1024,
        hidden_dims: int = 1280,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 16,
        num_queries: int = 8,
        ffn_ratio: float = 4,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, hidden_dims) / hidden_dims**0.5)
        self.proj_in = nn.Linear(embed_dims, hidden_dims)
        self.proj_out = nn.Linear(hidden_dims, output_dims)
        self.norm_out = nn.LayerNorm(output_dims)
        self.layers = nn.ModuleList(
            IPAdapterPlusImageProjectionBlock(hidden_dims, dim_head, heads, ffn_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for block in self.layers:
            latents = block(x, latents, latents)
        return self.norm_out(self.proj_out(latents))


class MultiIPAdapterImageProjection(nn.Module):
    """The UNet's ``encoder_hid_proj`` while IP-Adapters are loaded: one projection per adapter.

    Takes a list with one tensor per adapter, ``[batch, images, embed]`` (plain) or ``[batch, images,
    tokens, embed]`` (plus, full-face), and returns ``[batch, images, tokens, width]`` per adapter.
    """

    def __init__(self, IPAdapterImageProjectionLayers: Sequence[nn.Module]):
        super().__init__()
        self.image_projection_layers = nn.ModuleList(IPAdapterImageProjectionLayers)

    @property
    def num_ip_adapters(self) -> int:
        return len(self.image_projection_layers)

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        if torch.is_tensor(image_embeds):
            image_embeds = [image_embeds.unsqueeze(1)]  # the old single-tensor form: one image per prompt
        if not isinstance(image_embeds, (list, tuple)) or len(image_embeds) != self.num_ip_adapters:
            found = len(image_embeds) if isinstance(image_embeds, (list, tuple)) else type(image_embeds).__name__
            raise ValueError(
                f"added_cond_kwargs['image_embeds'] must be a list with one tensor per IP-Adapter "
                f"({self.num_ip_adapters} loaded); got {found}"
            )
        projected = []
        for embeds, projection in zip(image_embeds, self.image_projection_layers):
            batch, images = embeds.shape[:2]
            out = projection(embeds.reshape(batch * images, *embeds.shape[2:]))
            projected.append(out.reshape(batch, images, *out.shape[1:]))
        return projected


def projection_kind(image_proj: dict[str, torch.Tensor]) -> str:
    """'plain', 'plus' or 'full' from the keys of an ``image_proj`` dict; anything else is an error."""
    keys = set(image_proj)
    if "proj.weight" in keys and "norm.weight" in keys:
        return "plain"
    if {"proj.0.weight", "proj.2.weight", "proj.3.weight"} <= keys:
        return "full"
    if "latents" in keys and "proj_in.weight" in keys and "proj_out.weight" in keys:
        return "plus"
    if any(k.startswith("perceiver_resampler.") for k in keys) or ("norm.weight" in keys and "proj.0.weight" in keys):
        raise NotImplementedError(
            "IP-Adapter FaceID checkpoints (face-embedding projections) are not implemented "
            "in diffpipe; the plain, plus and full-face IP-Adapters are"
        )
    raise StateDictMismatchError(
        "unknown IP-Adapter image projection layout: expected the plain ('proj.weight', 'norm.weight'), plus "
        "('latents', 'proj_in.*', 'layers.*') or full-face ('proj.0' .. 'proj.3') keys; found "
        f"{summarize(sorted(keys), limit=8)}"
    )


def _plus_key(key: str) -> str:
    """A resampler key of the original repo -> the module name here (keys already in this form stay)."""
    m = re.fullmatch(r"layers\.(\d+)\.(\d)\.(.+)", key)
    if m is None:
        return key
    layer, part, rest = m.groups()
    head, _, tail = rest.partition(".")
    if part == "0":  # the attention, with its two input norms
        if head in ("norm1", "norm2"):
            return f"layers.{layer}.{'ln0' if head == 'norm1' else 'ln1'}.{tail}"
        if head == "to_out":
            return f"layers.{layer}.attn.to_out.0.{tail}"
        return f"layers.{layer}.attn.{rest}"
    mlp = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}  # LayerNorm, Linear, GELU, Linear
    return f"layers.{layer}.{mlp.get(head, head)}.{tail}"


def build_image_projection(image_proj: dict[str, torch.Tensor], where: str) -> tuple[nn.Module, int]:
    """(the projection module holding ``image_proj``'s weights, the number of image tokens it makes)."""
    kind = projection_kind(image_proj)
    if kind == "plain":
        weight, width = image_proj["proj.weight"], image_proj["norm.weight"].shape[0]
        if weight.shape[0] % width:
            raise StateDictMismatchError(
                f"{where}: proj.weight {tuple(weight.shape)} is not a multiple of the token width {width} (norm.weight)"
            )
        tokens = weight.shape[0] // width
        module = ImageProjection(
            image_embed_dim=weight.shape[1], cross_attention_dim=width, num_image_text_embeds=tokens
        )
        state = {("image_embeds." + k[5:] if k.startswith("proj.") else k): v for k, v in image_proj.items()}
    elif kind == "full":
        module = IPAdapterFullImageProjection(
            image_embed_dim=image_proj["proj.0.weight"].shape[1],
            cross_attention_dim=image_proj["proj.3.weight"].shape[0],
        )
        names = {"proj.0": "ff.net.0.proj", "proj.2": "ff.net.2", "proj.3": "norm"}
        state = {
            names[k.rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v
            for k, v in image_proj.items()
            if k.rsplit(".", 1)[0] in names
        }
        tokens = 257  # CLIP-H's 256 patches + CLS; informational (the processors use the real length)
    else:
        state = {}
        for key, value in image_proj.items():
            new = _plus_key(key)
            if new.endswith("to_kv.weight"):  # the original fuses keys and values
                k, v = value.chunk(2, dim=0)
                state[new.replace("to_kv", "to_k")], state[new.replace("to_kv", "to_v")] = k, v
            else:
                state[new] = value
        latents = state["latents"]
        hidden = latents.shape[2]
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        ff_in = state.get("layers.0.ff.1.net.0.proj.weight")
        ratio = ff_in.shape[0] / hidden if ff_in is not None else 4
        to_q = state.get("layers.0.attn.to_q.weight")
        module = IPAdapterPlusImageProjection(
            embed_dims=state["proj_in.weight"].shape[1],
            output_dims=state["proj_out.weight"].shape[0],
            hidden_dims=hidden,
            depth=depth,
            dim_head=64,
            heads=max(to_q.shape[0] // 64, 1) if to_q is not None else 1,
            num_queries=latents.shape[1],
            ffn_ratio=int(ratio) if float(ratio).is_integer() else ratio,
        )
        tokens = latents.shape[1]
    load_strict(module, state, f"{where}: image_proj ({kind})")
    return module, tokens


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})" for k in wrong[:5])
        details = [
            f"missing {summarize(missing)}" if missing else "",
            f"unexpected {summarize(unexpected)}" if unexpected else "",
            f"wrong shapes {shapes}" if wrong else "",
        ]
        raise StateDictMismatchError(f"{where}: the weights do not fit: " + "; ".join(d for d in details if d))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
