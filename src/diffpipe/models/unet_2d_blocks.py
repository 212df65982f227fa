"""The down, mid and up blocks of SD-family UNets and of the KL VAE, built by name from configs.

Configs name blocks (``down_block_types``, ``mid_block_type``, ``up_block_types``); the factories
:func:`get_down_block`, :func:`get_mid_block` and :func:`get_up_block` build them. Attribute names and
registration order (``attentions`` before ``resnets``, then ``downsamplers``/``upsamplers``) are the
checkpoint layout.

The blocks of the denoising UNet take an optional ``after_layer(i, hidden_states)`` hook, called
on the output of each of their layers (resnet, or resnet + transformer) before anything else uses
it; AnimateDiff's motion UNet runs its temporal transformers there, on the very same blocks.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..nn.attention import Attention
from ..nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ..nn.transformer_2d import Transformer2DModel

# The per-layer hook of the UNet's blocks: (layer index, hidden states) -> hidden states.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def _after(hook: LayerHook | None, i: int, hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states if hook is None else hook(i, hidden_states)


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


def _per_layer(value: int | Sequence[int], num_layers: int) -> list[int]:
    """``transformer_layers_per_block`` for one block: an int for every layer, or a list read from the
    start (the mid block of an asymmetric UNet gets the last down block's list and uses its first entry)."""
    if isinstance(value, int):
        return [value] * num_layers
    value = list(value)
    if len(value) < num_layers:
        raise ValueError(f"expected {num_layers} transformer layer counts for this block, got {value}")
    return value[:num_layers]


def _resnet(in_channels: int, out_channels: int, temb_channels: int | None, spec: dict) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=spec["resnet_eps"],
        groups=spec["resnet_groups"],
        dropout=spec["dropout"],
        time_embedding_norm=spec["resnet_time_scale_shift"],
        non_linearity=spec["resnet_act_fn"],
        output_scale_factor=spec["output_scale_factor"],
    )


def _transformer(channels: int, layers: int, spec: dict, only_cross_attention: bool) -> Transformer2DModel:
    heads = spec["num_attention_heads"]
    return Transformer2DModel(
        heads,
        channels // heads,
        in_channels=channels,
        num_layers=layers,
        cross_attention_dim=spec["cross_attention_dim"],
        norm_num_groups=spec["resnet_groups"],
        use_linear_projection=spec["use_linear_projection"],
        only_cross_attention=only_cross_attention,
        upcast_attention=spec["upcast_attention"],
    )


def _attend(attn: Transformer2DModel, hidden_states: torch.Tensor, ctx: dict) -> torch.Tensor:
    return attn(
        hidden_states,
        encoder_hidden_states=ctx["encoder_hidden_states"],
        attention_mask=ctx["attention_mask"],
        encoder_attention_mask=ctx["encoder_attention_mask"],
        cross_attention_kwargs=ctx["cross_attention_kwargs"],
    )


def _block_spec(
    resnet_eps: float = 1e-6,
    resnet_act_fn: str = "swish",
    resnet_groups: int | None = 32,
    resnet_time_scale_shift: str = "default",
    dropout: float = 0.0,
    output_scale_factor: float = 1.0,
    num_attention_heads: int = 1,
    cross_attention_dim: int | None = 1280,
    use_linear_projection: bool = False,
    upcast_attention: bool = False,
) -> dict:
    return dict(locals())


# ====================================================================================== down blocks
class DownBlock2D(nn.Module):
    """``num_layers`` resnets, then an optional stride-2 conv; returns the output of every step."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, spec)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, after_layer: LayerHook | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        outputs = []
        for i, resnet in enumerate(self.resnets):
            hidden_states = _after(after_layer, i, resnet(hidden_states, temb))
            outputs.append(hidden_states)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            outputs.append(hidden_states)
        return hidden_states, tuple(outputs)


class CrossAttnDownBlock2D(nn.Module):
    """Resnet + spatial transformer pairs, then an optional stride-2 conv."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        only_cross_attention: bool = False,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.num_attention_heads = spec["num_attention_heads"]
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.attentions = nn.ModuleList(
            _transformer(out_channels, layers[i], spec, only_cross_attention) for i in range(num_layers)
        )
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, spec)
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        additional_residuals: torch.Tensor | None = None,
        after_layer: LayerHook | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        ctx = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        outputs = []
        last = len(self.resnets) - 1
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = _after(after_layer, i, _attend(attn, resnet(hidden_states, temb), ctx))
            if i == last and additional_residuals is not None:  # T2I-Adapter features
                hidden_states = hidden_states + additional_residuals
            outputs.append(hidden_states)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
            outputs.append(hidden_states)
        return hidden_states, tuple(outputs)


class DownEncoderBlock2D(nn.Module):
    """The VAE encoder's block: resnets without time embedding, then an optional downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        add_downsample: bool = True,
        downsample_padding: int = 1,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, None, spec) for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, None)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states)
        return hidden_states


# ====================================================================================== mid blocks
class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) ``num_layers`` times, at constant width."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        if spec["resnet_groups"] is None:
            spec["resnet_groups"] = min(in_channels // 4, 32)
        self.num_attention_heads = spec["num_attention_heads"]
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.attentions = nn.ModuleList(
            _transformer(in_channels, layers[i], spec, only_cross_attention=False) for i in range(num_layers)
        )
        self.resnets = nn.ModuleList(_resnet(in_channels, in_channels, temb_channels, spec) for _ in range(num_layers + 1))

    def forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        ctx = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
            hidden_states = resnet(_after(after_layer, i, _attend(attn, hidden_states, ctx)), temb)
        return hidden_states


class UNetMidBlock2D(nn.Module):
    """resnet, then (self-attention over pixels, resnet) ``num_layers`` times; the VAE's mid block.

    The attention is the VAE's single-head-per-``attention_head_dim`` layer with its own GroupNorm
    and a residual connection (``upcast_softmax`` as in the reference).
    """

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        add_attention: bool = True,
        attention_head_dim: int | None = 1,
        attn_groups: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        if spec["resnet_groups"] is None:
            spec["resnet_groups"] = min(in_channels // 4, 32)
        if attn_groups is None and spec["resnet_time_scale_shift"] == "default":
            attn_groups = spec["resnet_groups"]
        head_dim = in_channels if attention_head_dim is None else attention_head_dim
        self.add_attention = add_attention
        self.attentions = nn.ModuleList(
            Attention(
                in_channels,
                heads=in_channels // head_dim,
                dim_head=head_dim,
                rescale_output_factor=spec["output_scale_factor"],
                eps=spec["resnet_eps"],
                norm_num_groups=attn_groups,
                residual_connection=True,
                bias=True,
                upcast_softmax=True,
            )
            for _ in range(num_layers if add_attention else 0)
        )
        self.resnets = nn.ModuleList(_resnet(in_channels, in_channels, temb_channels, spec) for _ in range(num_layers + 1))

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                hidden_states = self.attentions[i](hidden_states, temb=temb)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


# ====================================================================================== up blocks
def _up_resnets(
    in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int | None, num_layers: int, spec
) -> nn.ModuleList:
    """Up-block resnets: each takes the running features concatenated with one skip connection."""
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        running_channels = prev_output_channel if i == 0 else out_channels
        resnets.append(_resnet(running_channels + skip_channels, out_channels, temb_channels, spec))
    return nn.ModuleList(resnets)


class UpBlock2D(nn.Module):
    """Resnets over (features ++ skip), then an optional 2x upsample + conv."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        num_layers: int = 1,
        add_upsample: bool = True,
        resolution_idx: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.resolution_idx = resolution_idx
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, spec)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)]) if add_upsample else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        skips = list(res_hidden_states_tuple)
        for i, resnet in enumerate(self.resnets):
            hidden_states = _after(after_layer, i, resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb))
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    """(resnet over features ++ skip, spatial transformer) pairs, then an optional upsampler."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int | None,
        num_layers: int = 1,
        transformer_layers_per_block: int | Sequence[int] = 1,
        add_upsample: bool = True,
        only_cross_attention: bool = False,
        resolution_idx: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.resolution_idx = resolution_idx
        self.num_attention_heads = spec["num_attention_heads"]
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.attentions = nn.ModuleList(
            _transformer(out_channels, layers[i], spec, only_cross_attention) for i in range(num_layers)
        )
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, temb_channels, num_layers, spec)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)]) if add_upsample else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        upsample_size: tuple[int, int] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        after_layer: LayerHook | None = None,
    ) -> torch.Tensor:
        ctx = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        skips = list(res_hidden_states_tuple)
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = resnet(torch.cat([hidden_states, skips.pop()], dim=1), temb)
            hidden_states = _after(after_layer, i, _attend(attn, hidden_states, ctx))
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, upsample_size)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """The VAE decoder's block: resnets without time embedding, then an optional upsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int = 1,
        add_upsample: bool = True,
        temb_channels: int | None = None,
        resolution_idx: int | None = None,
        **spec: Any,
    ):
        super().__init__()
        spec = _block_spec(**spec)
        self.resolution_idx = resolution_idx
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, spec)
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)]) if add_upsample else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


# ====================================================================================== factories
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
    name = block_type[len("UNetRes") :] if isinstance(block_type, str) and block_type.startswith("UNetRes") else block_type
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
