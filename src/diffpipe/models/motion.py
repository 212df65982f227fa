"""AnimateDiff's motion modules and :class:`MotionAdapter`, the checkpoint that holds them.

A motion module (:class:`AnimateDiffTransformer3D`) is a transformer over *time*: every pixel of a
feature map becomes a sequence of ``num_frames`` tokens, which attend to each other (two
self-attentions with a sinusoidal code of the frame index, then a GEGLU MLP), and the result is added
back to the input. AnimateDiff puts one after every layer of a Stable Diffusion UNet's blocks; a
:class:`MotionAdapter` stores them in the UNet's block layout (``down_blocks.i.motion_modules.j``,
``mid_block.motion_modules.0``, ``up_blocks.i.motion_modules.j``) without the UNet itself.
:class:`~diffpipe.models.unet_motion.UNetMotionModel` runs them inside a UNet.

Config keys and state-dict names are the reference's. The published adapters differ in
``motion_max_seq_length`` (24 for v1.4, 32 after) and ``use_motion_mid_block`` (True only for
v1.5-2); v3 adds nothing here (its ``conv_in_channels`` is for PIA, which diffpipe does not run).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.transformer_2d import BasicTransformerBlock
from .modeling import ModelMixin


def per_block(name: str, value, n: int) -> list:
    """A per-block setting given once for all ``n`` blocks or once per block, as a list of ``n``."""
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ConfigError(f"`{name}` has {len(value)} entries ({value}), expected one per block ({n})")
    return value


class AnimateDiffTransformer3D(nn.Module):
    """Temporal transformer over ``[batch * frames, C, H, W]`` features, added to its input.

    ``norm`` (GroupNorm over channels, frames and pixels of one video) -> ``proj_in`` -> ``num_layers``
    :class:`BasicTransformerBlock` with two frame-position-coded self-attentions -> ``proj_out``.
    """

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        max_seq_length: int = 32,
    ):
        super().__init__()
        if in_channels % num_attention_heads:
            raise ConfigError(
                f"a motion module of {in_channels} channels cannot have {num_attention_heads} attention heads "
                "(channels must divide evenly between heads)"
            )
        if in_channels % norm_num_groups:
            raise ConfigError(
                f"a motion module of {in_channels} channels cannot be normalised in {norm_num_groups} groups "
                "(channels must divide evenly between groups)"
            )
        self.in_channels = in_channels
        self.max_seq_length = max_seq_length
        self.norm = nn.GroupNorm(num_groups=norm_num_groups, num_channels=in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, in_channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                in_channels,
                num_attention_heads,
                in_channels // num_attention_heads,
                double_self_attention=True,
                positional_embeddings="sinusoidal",
                num_positional_embeddings=max_seq_length,
            )
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(in_channels, in_channels)

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        frames_total, channels, height, width = hidden_states.shape
        batch = frames_total // num_frames
        # [B*F, C, H, W] -> [B, C, F, H, W]: one video's frames are normalised together
        video = hidden_states.reshape(batch, num_frames, channels, height, width).permute(0, 2, 1, 3, 4)
        video = self.norm(video)
        # every pixel of every video is a sequence of F tokens: [B*H*W, F, C]
        tokens = video.permute(0, 3, 4, 2, 1).reshape(batch * height * width, num_frames, channels)
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self.proj_out(tokens)
        out = tokens.reshape(batch, height, width, num_frames, channels).permute(0, 3, 4, 1, 2)
        return out.reshape(frames_total, channels, height, width) + hidden_states


class MotionModules(nn.Module):
    """The motion modules of one UNet block: ``motion_modules.j`` runs after the block's layer ``j``."""

    def __init__(
        self,
        in_channels: int,
        layers_per_block: int = 2,
        transformer_layers_per_block: int | Sequence[int] = 8,
        num_attention_heads: int = 8,
        norm_num_groups: int = 32,
        max_seq_length: int = 32,
    ):
        super().__init__()
        depths = per_block("transformer_layers_per_block", transformer_layers_per_block, layers_per_block)
        self.motion_modules = nn.ModuleList(
            AnimateDiffTransformer3D(in_channels, num_attention_heads, depth, norm_num_groups, max_seq_length)
            for depth in depths
        )


def motion_stacks(
    block_out_channels: Sequence[int],
    layers_per_block: Sequence[int],
    transformer_layers: Sequence,
    up_transformer_layers: Sequence,
    heads: Sequence[int],
    norm_num_groups: int,
    max_seq_length: int,
    mid: tuple[int, int | Sequence[int]] | None,
) -> tuple[list[MotionModules], MotionModules | None, list[MotionModules]]:
    """(down, mid or None, up) motion modules for a UNet with these blocks; up block ``i`` mirrors down
    block ``n - 1 - i`` with one layer more. ``mid`` is (layers, transformer layers) or None."""
    n = len(block_out_channels)
    down = [
        MotionModules(
            block_out_channels[i], layers_per_block[i], transformer_layers[i], heads[i], norm_num_groups, max_seq_length
        )
        for i in range(n)
    ]
    middle = None
    if mid is not None:
        middle = MotionModules(block_out_channels[-1], mid[0], mid[1], heads[-1], norm_num_groups, max_seq_length)
    up = [
        MotionModules(
            block_out_channels[n - 1 - i],
            layers_per_block[n - 1 - i] + 1,
            up_transformer_layers[i],
            heads[n - 1 - i],
            norm_num_groups,
            max_seq_length,
        )
        for i in range(n)
    ]
    return down, middle, up


class MotionAdapter(ModelMixin):
    """AnimateDiff's motion modules for a UNet with ``block_out_channels``, in the reference's format.

    ``motion_layers_per_block`` must equal the UNet's ``layers_per_block``; ``motion_max_seq_length``
    is the longest video (in frames) the modules can take. The adapter only stores the modules; run
    them with ``UNetMotionModel.from_unet2d(unet, adapter)`` or ``AnimateDiffPipeline``.
    """

    def __init__(
        self,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        motion_layers_per_block: int | Sequence[int] = 2,
        motion_transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1,
        motion_mid_block_layers_per_block: int = 1,
        motion_transformer_layers_per_mid_block: int | Sequence[int] = 1,
        motion_num_attention_heads: int | Sequence[int] = 8,
        motion_norm_num_groups: int = 32,
        motion_max_seq_length: int = 32,
        use_motion_mid_block: bool = True,
        conv_in_channels: int | None = None,
    ):
        super().__init__()
        n = len(block_out_channels)
        layers = per_block("motion_layers_per_block", motion_layers_per_block, n)
        depths = per_block("motion_transformer_layers_per_block", motion_transformer_layers_per_block, n)
        heads = per_block("motion_num_attention_heads", motion_num_attention_heads, n)
        per_block(
            "motion_transformer_layers_per_mid_block",
            motion_transformer_layers_per_mid_block,
            motion_mid_block_layers_per_block,
        )  # length check
        # PIA's image-conditioned input convolution (the first 4 input channels replace the UNet's)
        self.conv_in = (
            nn.Conv2d(conv_in_channels, block_out_channels[0], kernel_size=3, padding=1) if conv_in_channels else None
        )
        mid = (motion_mid_block_layers_per_block, motion_transformer_layers_per_mid_block)
        down, middle, up = motion_stacks(
            block_out_channels,
            layers,
            depths,
            depths[::-1],
            heads,
            motion_norm_num_groups,
            motion_max_seq_length,
            mid if use_motion_mid_block else None,
        )
        self.mid_block = middle  # registered first, as in the reference's state dict
        self.down_blocks = nn.ModuleList(down)
        self.up_blocks = nn.ModuleList(up)
