"""UNet2DModel: the unconditional image UNet of DDPM / DDIM (no text, no cross-attention), with the
reference's parameter names and config keys.

Resnet blocks as in the SD UNet; the attention blocks (``AttnDownBlock2D``, ``AttnUpBlock2D`` and the
mid block's) are self-attention over pixels with their own GroupNorm and a residual connection, the
VAE's kind. Old checkpoints (``google/ddpm-*``) name those projections ``query/key/value/proj_attn``;
they load as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..io.key_fixes import rename_old_attention
from ..nn.activations import get_activation
from ..nn.attention import AttentionHostMixin
from ..nn.embeddings import TimestepEmbedding, Timesteps
from ..nn.memory import MemorySwitchesMixin
from ..nn.resnet import Downsample2D, Upsample2D
from ..outputs import BaseOutput
from .modeling import ModelMixin
from .unet_2d_blocks import (
    DownBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
    _block_spec,
    _paired_layers,
    _resnet,
    _up_resnet,
    attention_groups,
    downsampled,
    pixel_attention,
)
from .unet_body import unet_body

_NOT_IMPLEMENTED = {
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
}


@dataclass
class UNet2DOutput(BaseOutput):
    """``sample``: the UNet's prediction, ``[batch, out_channels, height, width]``."""

    sample: torch.Tensor


class AttnDownBlock2D(nn.Module):
    """(resnet, self-attention) pairs, then an optional stride-2 conv; returns every step's output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        attention_head_dim: int | None = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        attn_groups: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        groups = attention_groups(attn_groups, spec)
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda i: _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, spec),
            lambda i: pixel_attention(out_channels, attention_head_dim, spec, groups),
        )
        self.downsamplers = (
            nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
            if add_downsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **unused):
        outputs = []
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb), temb=temb)
            outputs.append(hidden_states)
        return downsampled(self.downsamplers, hidden_states, outputs)


class AttnUpBlock2D(nn.Module):
    """(resnet over features ++ skip, self-attention) pairs, then an optional 2x upsample + conv."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        attention_head_dim: int | None = 1,
        add_upsample: bool = True,
        resolution_idx: int | None = None,
        attn_groups: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        groups = attention_groups(attn_groups, spec)
        self.resolution_idx = resolution_idx
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda i: _up_resnet(i, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, spec),
            lambda i: pixel_attention(out_channels, attention_head_dim, spec, groups),
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None, **unused):
        from .freeu import join_skip

        skips = list(res_hidden_states_tuple)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(join_skip(self, hidden_states, skips.pop()), temb), temb=temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


_DOWN = {"DownBlock2D": DownBlock2D, "AttnDownBlock2D": AttnDownBlock2D}
_UP = {"UpBlock2D": UpBlock2D, "AttnUpBlock2D": AttnUpBlock2D}


def _block(table: dict, name: str, what: str) -> type[nn.Module]:
    if name not in table:
        raise NotImplementedError(
            f"UNet2DModel: {what} {name!r} is not implemented in diffpipe; supported: {sorted(table)}"
        )
    return table[name]


def _attention_args(cls, attention_head_dim, attn_groups) -> dict:
    return dict(attention_head_dim=attention_head_dim, attn_groups=attn_groups) if cls in _ATTENTION_BLOCKS else {}


_ATTENTION_BLOCKS = (AttnDownBlock2D, AttnUpBlock2D)


class UNet2DModel(ModelMixin, AttentionHostMixin, MemorySwitchesMixin):
    """Unconditional 2-D UNet (DDPM, DDIM); ``forward(sample, timestep)`` predicts the noise (or the
    config's target) for images ``[batch, in_channels, height, width]``."""

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: Sequence[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ):
        super().__init__()
        for key, supported in _NOT_IMPLEMENTED.items():
            if locals()[key] not in supported:
                raise NotImplementedError(f"UNet2DModel: {key}={locals()[key]!r} is not implemented in diffpipe")
        if class_embed_type is not None or num_class_embeds is not None:
            raise NotImplementedError("UNet2DModel: class-conditional UNets are not implemented in diffpipe")
        if len(down_block_types) != len(up_block_types) or len(down_block_types) != len(block_out_channels):
            raise ValueError(
                "UNet2DModel: down_block_types, up_block_types and block_out_channels must have one entry per "
                f"resolution; got {len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)
        spec = dict(
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            dropout=dropout,
        )
        n = len(block_out_channels)
        down_blocks, output_channel = [], block_out_channels[0]
        for i, name in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            cls = _block(_DOWN, name, "down block type")
            down_blocks.append(
                cls(
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    num_layers=layers_per_block,
                    add_downsample=i < n - 1,
                    downsample_padding=downsample_padding,
                    **_attention_args(cls, attention_head_dim or output_channel, attn_norm_num_groups),
                    **spec,
                )
            )
        # built between the down and the up blocks (the reference's order: a seeded model draws its
        # initial weights), registered after them (the checkpoint's order)
        mid_block = None
        if mid_block_type is not None:
            if mid_block_type != "UNetMidBlock2D":
                raise NotImplementedError(f"UNet2DModel: mid_block_type={mid_block_type!r} is not implemented")
            mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1],
                temb_channels=time_embed_dim,
                output_scale_factor=mid_block_scale_factor,
                attention_head_dim=attention_head_dim or block_out_channels[-1],
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
                **spec,
            )
        up_blocks, reversed_channels = [], list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, name in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            cls = _block(_UP, name, "up block type")
            up_blocks.append(
                cls(
                    in_channels=reversed_channels[min(i + 1, n - 1)],
                    prev_output_channel=prev_output_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    num_layers=layers_per_block + 1,
                    add_upsample=i < n - 1,
                    resolution_idx=i,
                    **_attention_args(cls, attention_head_dim or output_channel, attn_norm_num_groups),
                    **spec,
                )
            )
        self.down_blocks = nn.ModuleList(down_blocks)
        self.up_blocks = nn.ModuleList(up_blocks)
        self.mid_block = mid_block
        self.num_upsamplers = n - 1
        groups = norm_num_groups if norm_num_groups is not None else min(block_out_channels[0] // 4, 32)
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=groups, eps=norm_eps)
        self.conv_act = get_activation("silu")
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    @classmethod
    def _convert_legacy_state_dict(cls, state_dict):
        """Old checkpoints (``google/ddpm-*``) name the attention projections ``query/key/value/proj_attn``."""
        return rename_old_attention(state_dict, r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        if class_labels is not None:
            raise ValueError("class_labels= was given, but this UNet2DModel has no class embedding")
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        batch = sample.shape[0]
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timestep = timestep * torch.ones(batch, dtype=timestep.dtype, device=timestep.device)
        emb = self.time_embedding(self.time_proj(timestep).to(dtype=self.dtype))
        out = unet_body(self, sample, emb, {})
        return UNet2DOutput(sample=out) if return_dict else (out,)
