"""FluxTransformer2DModel: the Flux.1 (dev, schnell) denoiser, with the reference's parameter names,
config keys and outputs.

Inputs are packed latents ``[B, N, in_channels]`` (image patches already flattened by the pipeline)
and text-encoder states ``[B, T, joint_attention_dim]``. Both are projected to ``inner_dim =
num_attention_heads * attention_head_dim``; ``num_layers`` double-stream blocks keep image and text
apart but attend jointly over ``[text, image]``, then ``num_single_layers`` single-stream blocks run
on the concatenation. The conditioning vector (timestep ``* 1000``, guidance ``* 1000`` for dev,
pooled text) modulates every block and the final :class:`AdaLayerNormContinuous`. Positions enter
through a 3-axis rotary embedding over ``[txt_ids; img_ids]``. The output is ``[B, N, patch_size**2 *
out_channels]`` for the image tokens.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..nn.flux_blocks import (
    AdaLayerNormContinuous,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
    _ignored_attention_kwargs,
)
from ..nn.flux_embeddings import (
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    FluxPosEmbed,
)
from .modeling import ModelMixin
from .outputs import Transformer2DModelOutput

logger = logging.getLogger(__name__)


def _shape(x: torch.Tensor | None) -> Any:
    return None if x is None else tuple(x.shape)


class FluxTransformer2DModel(ModelMixin):
    """The Flux.1 transformer. Defaults are the published FLUX.1 configs (``guidance_embeds=True`` for
    dev, ``False`` for schnell)."""

    @classmethod
    def _gguf_single_file(cls, gguf_file):
        """(config, key map) of a GGUF Flux file in the BFL layout (city96's): the config read from the
        shapes, the names mapped and fused tensors cut (quantized rows stay quantized)."""
        from ..single_file import flux_keys

        shapes = {name: tensor.shape for name, tensor in gguf_file.tensors.items()}
        if not flux_keys.is_bfl(shapes):
            return None, None
        return flux_keys.config_from_shapes(shapes), lambda state: flux_keys.convert(state)

    _no_split_modules = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _repeated_blocks = ["FluxTransformerBlock", "FluxSingleTransformerBlock"]

    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {tuple(axes_dims_rope)} must add up to attention_head_dim={attention_head_dim} "
                "(each rope axis rotates its share of every head's channels)"
            )
        if any(d % 2 for d in axes_dims_rope):
            raise ValueError(f"every entry of axes_dims_rope must be even, got {tuple(axes_dims_rope)}")
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=axes_dims_rope)
        embedder = CombinedTimestepGuidanceTextProjEmbeddings if guidance_embeds else CombinedTimestepTextProjEmbeddings
        self.time_text_embed = embedder(embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, self.inner_dim)
        self.x_embedder = nn.Linear(in_channels, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [FluxTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [
                FluxSingleTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim, eps=1e-6)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)

    # ------------------------------------------------------------------ inputs
    def _ids(self, ids: torch.Tensor | None, name: str, tokens: int) -> torch.Tensor:
        if ids is None:
            raise ValueError(f"`{name}` is required: position ids [{tokens}, {len(self.config.axes_dims_rope)}]")
        if ids.ndim == 3:
            logger.warning(
                "Passing `%s` 3d torch.Tensor is deprecated. Please remove the batch dimension and pass it as a 2d "
                "torch Tensor",
                name,
            )
            ids = ids[0]
        axes = len(self.config.axes_dims_rope)
        if ids.ndim != 2 or ids.shape != (tokens, axes):
            raise ValueError(
                f"`{name}` must have shape [{tokens}, {axes}] (one row per token, one column per rope axis), "
                f"got {tuple(ids.shape)}"
            )
        return ids

    def _check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance):
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be packed latents [batch, tokens, in_channels={cfg.in_channels}], got "
                f"{_shape(hidden_states)}"
            )
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ValueError("encoder_hidden_states, pooled_projections and timestep are required")
        if (
            encoder_hidden_states.ndim != 3
            or encoder_hidden_states.shape[0] != batch
            or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be [batch={batch}, text tokens, joint_attention_dim="
                f"{cfg.joint_attention_dim}], got {_shape(encoder_hidden_states)}"
            )
        if pooled_projections.shape != (batch, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be [batch={batch}, pooled_projection_dim={cfg.pooled_projection_dim}], "
                f"got {_shape(pooled_projections)}"
            )
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this model embeds guidance (guidance_embeds=True, FLUX.1-dev): pass `guidance`")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(
                "`guidance` was given, but this model has no guidance embedding (guidance_embeds=False, "
                "FLUX.1-schnell); pass guidance=None"
            )

    @staticmethod
    def _per_sample(value, batch: int, name: str, device) -> torch.Tensor:
        """A 1-d tensor of ``batch`` values (a number or 0-d tensor is repeated)."""
        value = torch.as_tensor(value, device=device)
        if value.ndim == 0:
            value = value.expand(batch)
        if value.ndim != 1 or value.shape[0] not in (1, batch):
            raise ValueError(f"`{name}` must be a number or a 1-d tensor of {batch} values, got {tuple(value.shape)}")
        return value

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        pooled_projections: torch.Tensor = None,
        timestep: torch.LongTensor = None,
        img_ids: torch.Tensor = None,
        txt_ids: torch.Tensor = None,
        guidance: torch.Tensor = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
        controlnet_block_samples=None,
        controlnet_single_block_samples=None,
        return_dict: bool = True,
        controlnet_blocks_repeat: bool = False,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict for packed latents ``hidden_states`` ``[B, N, in_channels]``.

        ``timestep`` and ``guidance`` are in [0, 1] (sigma) and [~1, ~10] units; both are multiplied by
        1000 before the sinusoidal embedding. ``img_ids`` ``[N, 3]`` and ``txt_ids`` ``[T, 3]`` are the
        rope positions (3-d ids are deprecated: the first batch entry is used).
        ``joint_attention_kwargs={"scale": s}`` (the LoRA scale) is accepted and has no effect.
        ``controlnet_block_samples`` / ``controlnet_single_block_samples`` are added to the image stream
        after the double / single blocks (spread over the blocks, or cycled with ``controlnet_blocks_repeat``).
        """
        self._check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance)
        _ignored_attention_kwargs(joint_attention_kwargs)
        batch = hidden_states.shape[0]
        txt_ids = self._ids(txt_ids, "txt_ids", encoder_hidden_states.shape[1])
        img_ids = self._ids(img_ids, "img_ids", hidden_states.shape[1])

        hidden_states = self.x_embedder(hidden_states)
        timestep = self._per_sample(timestep, batch, "timestep", hidden_states.device).to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = self._per_sample(guidance, batch, "guidance", hidden_states.device)
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = self.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        image_rotary_emb = self.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        for index, block in enumerate(self.transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
            if controlnet_block_samples is not None and len(controlnet_block_samples):
                samples = controlnet_block_samples
                if controlnet_blocks_repeat:
                    hidden_states = hidden_states + samples[index % len(samples)]
                else:
                    interval = int(math.ceil(len(self.transformer_blocks) / len(samples)))
                    hidden_states = hidden_states + samples[index // interval]

        for index, block in enumerate(self.single_transformer_blocks):
            encoder_hidden_states, hidden_states = block(
                hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
            )
            if controlnet_single_block_samples is not None and len(controlnet_single_block_samples):
                samples = controlnet_single_block_samples
                interval = int(math.ceil(len(self.single_transformer_blocks) / len(samples)))
                hidden_states = hidden_states + samples[index // interval]

        output = self.proj_out(self.norm_out(hidden_states, temb))
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
