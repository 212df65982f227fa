"""Tiny models and folders the tests build (random weights, a few KB)."""

from __future__ import annotations

import torch
from torch import nn

from diffpipe.models.modeling import ModelMixin


class TinyModel(ModelMixin):
    """The smallest ModelMixin with the parts that matter to I/O: nested names, a norm, a buffer-free body."""

    def __init__(self, width: int = 8, depth: int = 2, groups: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.norm = nn.GroupNorm(groups, width)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x.unsqueeze(-1)).squeeze(-1)


def tiny_model(seed: int = 0, **config) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


# A tiny config for each exported model class, the same in both libraries (the reference builds them too).
TINY_MODELS = {
    "AutoencoderTiny": dict(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
    ),
    "AutoencoderKL": dict(
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    ),
    "AsymmetricAutoencoderKL": dict(
        down_block_out_channels=(8,),
        up_block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_down_block=1,
        layers_per_up_block=1,
    ),
    "UNet2DConditionModel": dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ),
    "ControlNetModel": dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        conditioning_embedding_out_channels=(4, 8),
    ),
    "FluxTransformer2DModel": dict(
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        axes_dims_rope=(2, 2, 4),
    ),
    "UNet2DModel": dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=2,
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
    "MotionAdapter": dict(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    ),
    "UNetMotionModel": dict(
        block_out_channels=(8, 16),
        norm_num_groups=4,
        cross_attention_dim=8,
        num_attention_heads=2,
        layers_per_block=1,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
    ),
}
