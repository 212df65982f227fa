"""Block name -> class tables and the builders the UNet and VAE use to assemble themselves.

Config files name blocks (``"CrossAttnDownBlock2D"``); these tables are the only place a name
becomes a class, and the builders check the options each block type needs.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    UpDecoderBlock2D,
)

# Block types of the reference that diffpipe does not build (they raise NotImplementedError, so a
# config naming them fails with a clear message instead of "unknown block").
_KNOWN_UNIMPLEMENTED = {
    "ResnetDownsampleBlock2D",
    "AttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
    "AttnDownEncoderBlock2D",
    "KDownBlock2D",
    "KCrossAttnDownBlock2D",
    "ResnetUpsampleBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "AttnUpBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
    "AttnUpDecoderBlock2D",
    "KUpBlock2D",
    "KCrossAttnUpBlock2D",
    "UNetMidBlock2DSimpleCrossAttn",
}


DOWN_BLOCKS: dict[str, type[nn.Module]] = {
    "DownBlock2D": DownBlock2D,
    "CrossAttnDownBlock2D": CrossAttnDownBlock2D,
    "DownEncoderBlock2D": DownEncoderBlock2D,
}
UP_BLOCKS: dict[str, type[nn.Module]] = {
    "UpBlock2D": UpBlock2D,
    "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
    "UpDecoderBlock2D": UpDecoderBlock2D,
}
MID_BLOCKS: dict[str, type[nn.Module]] = {
    "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn,
    "UNetMidBlock2D": UNetMidBlock2D,
}
_CROSS_ATTENTION_BLOCKS = {"CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn"}


def _lookup(table: dict[str, type[nn.Module]], block_type: str, where: str) -> type[nn.Module]:
    # Configs may prefix block names with "UNetRes" (an old alias the reference accepts).
    name = (
        block_type[len("UNetRes") :] if isinstance(block_type, str) and block_type.startswith("UNetRes") else block_type
    )
    if name in table:
        return table[name]
    if name in _KNOWN_UNIMPLEMENTED:
        raise NotImplementedError(f"{where} {block_type!r} is not implemented in diffpipe; supported: {sorted(table)}")
    raise ValueError(f"unknown {where} {block_type!r}; supported: {sorted(table)}")


def _check_cross_attention(name: str, cross_attention_dim, dual_cross_attention: bool, attention_type: str) -> None:
    if name not in _CROSS_ATTENTION_BLOCKS:
        return
    if cross_attention_dim is None:
        raise ValueError(f"{name} needs `cross_attention_dim`")
    if dual_cross_attention:
        raise NotImplementedError("dual_cross_attention=True (DualTransformer2DModel) is not implemented in diffpipe")
    if attention_type != "default":
        raise NotImplementedError(f"attention_type={attention_type!r} (GLIGEN) is not implemented in diffpipe")


def get_down_block(
    down_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    add_downsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int | None = None,
    transformer_layers_per_block: int | Sequence[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    downsample_padding: int = 1,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    resnet_time_scale_shift: str = "default",
    attention_type: str = "default",
    dropout: float = 0.0,
    **_only_for_other_block_types: Any,
) -> nn.Module:
    """Build a down block by config name. Extra keyword arguments that only matter for block types
    diffpipe does not implement (``resnet_skip_time_act``, ``attention_head_dim``, ...) are accepted."""
    cls = _lookup(DOWN_BLOCKS, down_block_type, "down block type")
    spec = dict(
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
        dropout=dropout,
    )
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        add_downsample=add_downsample,
        downsample_padding=downsample_padding,
    )
    if cls is DownEncoderBlock2D:
        return cls(**common, **spec)
    if cls is DownBlock2D:
        return cls(temb_channels=temb_channels, **common, **spec)
    _check_cross_attention("CrossAttnDownBlock2D", cross_attention_dim, dual_cross_attention, attention_type)
    return cls(
        temb_channels=temb_channels,
        transformer_layers_per_block=transformer_layers_per_block,
        only_cross_attention=only_cross_attention,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        upcast_attention=upcast_attention,
        **common,
        **spec,
    )


def get_mid_block(
    mid_block_type: str | None,
    *,
    in_channels: int,
    temb_channels: int | None,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int | None,
    output_scale_factor: float = 1.0,
    transformer_layers_per_block: int | Sequence[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    upcast_attention: bool = False,
    resnet_time_scale_shift: str = "default",
    attention_type: str = "default",
    dropout: float = 0.0,
    **_only_for_other_block_types: Any,
) -> nn.Module | None:
    """Build the UNet's mid block by config name (``None`` -> no mid block)."""
    if mid_block_type is None:
        return None
    cls = _lookup(MID_BLOCKS, mid_block_type, "mid block type")
    spec = dict(
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
        dropout=dropout,
        output_scale_factor=output_scale_factor,
    )
    if cls is UNetMidBlock2D:  # as the UNet configures it: resnet only, no attention
        return cls(in_channels=in_channels, temb_channels=temb_channels, num_layers=0, add_attention=False, **spec)
    _check_cross_attention("UNetMidBlock2DCrossAttn", cross_attention_dim, dual_cross_attention, attention_type)
    return cls(
        in_channels=in_channels,
        temb_channels=temb_channels,
        transformer_layers_per_block=transformer_layers_per_block,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        upcast_attention=upcast_attention,
        **spec,
    )


def get_up_block(
    up_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    prev_output_channel: int,
    temb_channels: int | None,
    add_upsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resolution_idx: int | None = None,
    resnet_groups: int | None = None,
    transformer_layers_per_block: int | Sequence[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    resnet_time_scale_shift: str = "default",
    attention_type: str = "default",
    dropout: float = 0.0,
    **_only_for_other_block_types: Any,
) -> nn.Module:
    """Build an up block by config name (see :func:`get_down_block` for extra keyword arguments)."""
    cls = _lookup(UP_BLOCKS, up_block_type, "up block type")
    spec = dict(
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
        dropout=dropout,
    )
    if cls is UpDecoderBlock2D:
        return cls(
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            add_upsample=add_upsample,
            temb_channels=temb_channels,
            resolution_idx=resolution_idx,
            **spec,
        )
    common = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        prev_output_channel=prev_output_channel,
        temb_channels=temb_channels,
        num_layers=num_layers,
        add_upsample=add_upsample,
        resolution_idx=resolution_idx,
    )
    if cls is UpBlock2D:
        return cls(**common, **spec)
    _check_cross_attention("CrossAttnUpBlock2D", cross_attention_dim, dual_cross_attention, attention_type)
    return cls(
        transformer_layers_per_block=transformer_layers_per_block,
        only_cross_attention=only_cross_attention,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        upcast_attention=upcast_attention,
        **common,
        **spec,
    )
