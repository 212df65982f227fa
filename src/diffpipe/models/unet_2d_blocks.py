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
from .freeu import join_skip

# The per-layer hook of the UNet's blocks: (layer index, hidden states) -> hidden states.
LayerHook = Callable[[int, torch.Tensor], torch.Tensor]


def _after(hook: LayerHook | None, i: int, hidden_states: torch.Tensor) -> torch.Tensor:
    return hidden_states if hook is None else hook(i, hidden_states)


def _skips_from(res_hidden_states_tuple: tuple[torch.Tensor, ...], start: int) -> list[torch.Tensor]:
    """An up block's skip features as a stack for its layers from ``start`` on: layer ``i`` reads the
    ``i``-th from the end, so the ``start`` last ones belong to layers that do not run (DeepCache)."""
    skips = list(res_hidden_states_tuple)
    del skips[len(skips) - start :]
    return skips


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


def _paired_layers(
    num_layers: int,
    resnet: Callable[[int], nn.Module],
    attention: Callable[[int], nn.Module | None],
    *,
    mid: bool = False,
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(attentions, resnets) of a block, built in the reference's construction order: each layer's
    resnet, then its attention; a mid block (``mid``) has a lone first resnet, then each attention
    followed by its resnet. Registration order (``attentions`` before ``resnets``) is the checkpoint's;
    construction order is the order in which ``torch.manual_seed(0); Model(**config)`` draws the
    initial weights, so matching it gives the reference's weights for the same seed.
    ``resnet(k)`` builds the k-th resnet, ``attention(i)`` the i-th attention (None: no attention)."""
    resnets = [resnet(0)] if mid else []
    attentions = []
    for i in range(num_layers):
        if mid:
            attentions.append(attention(i))
        resnets.append(resnet(len(resnets)))
        if not mid:
            attentions.append(attention(i))
    return nn.ModuleList(a for a in attentions if a is not None), nn.ModuleList(resnets)


def downsampled(downsamplers: nn.ModuleList | None, hidden_states: torch.Tensor, outputs: list) -> tuple:
    """A down block's (output, skips): through its downsampler, whose output is a skip too, if it has one."""
    if downsamplers is not None:
        for down in downsamplers:
            hidden_states = down(hidden_states)
        outputs.append(hidden_states)
    return hidden_states, tuple(outputs)


def pixel_attention(channels: int, head_dim: int | None, spec: dict, groups: int | None) -> Attention:
    """Self-attention over pixels with its own GroupNorm and a residual connection (one head per
    ``head_dim`` channels, one head when None): the VAE's and the unconditional UNet's attention."""
    head_dim = channels if head_dim is None else head_dim
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=spec["output_scale_factor"],
        eps=spec["resnet_eps"],
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
    )


def attention_groups(attn_groups: int | None, spec: dict) -> int | None:
    """The pixel attention's GroupNorm groups: the resnets' unless given (none with a spatial time shift)."""
    if attn_groups is None and spec["resnet_time_scale_shift"] == "default":
        return spec["resnet_groups"]
    return attn_groups


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
            nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
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
        return downsampled(self.downsamplers, hidden_states, outputs)


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
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda i: _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, spec),
            lambda i: _transformer(out_channels, layers[i], spec, only_cross_attention),
        )
        self.downsamplers = (
            nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
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
        return downsampled(self.downsamplers, hidden_states, outputs)


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
            nn.ModuleList(
                [Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=downsample_padding)]
            )
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
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda _: _resnet(in_channels, in_channels, temb_channels, spec),
            lambda i: _transformer(in_channels, layers[i], spec, only_cross_attention=False),
            mid=True,
        )

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
        groups = attention_groups(attn_groups, spec)
        self.add_attention = add_attention
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda _: _resnet(in_channels, in_channels, temb_channels, spec),
            lambda _: pixel_attention(in_channels, attention_head_dim, spec, groups) if add_attention else None,
            mid=True,
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.add_attention:
                hidden_states = self.attentions[i](hidden_states, temb=temb)
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


# ====================================================================================== up blocks
def _up_resnet(
    i: int,
    in_channels: int,
    prev_output_channel: int,
    out_channels: int,
    temb_channels: int | None,
    num_layers: int,
    spec,
) -> ResnetBlock2D:
    """An up block's i-th resnet: it takes the running features concatenated with one skip connection."""
    skip_channels = in_channels if i == num_layers - 1 else out_channels
    running_channels = prev_output_channel if i == 0 else out_channels
    return _resnet(running_channels + skip_channels, out_channels, temb_channels, spec)


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
        self.resnets = nn.ModuleList(
            _up_resnet(i, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, spec)
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        after_layer: LayerHook | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        skips = _skips_from(res_hidden_states_tuple, start)
        for i in range(start, len(self.resnets)):
            hidden_states = self.resnets[i](join_skip(self, hidden_states, skips.pop()), temb)
            hidden_states = _after(after_layer, i, hidden_states)
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
        self.attentions, self.resnets = _paired_layers(
            num_layers,
            lambda i: _up_resnet(i, in_channels, prev_output_channel, out_channels, temb_channels, num_layers, spec),
            lambda i: _transformer(out_channels, layers[i], spec, only_cross_attention),
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
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
        start: int = 0,
    ) -> torch.Tensor:
        ctx = dict(
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
        )
        skips = _skips_from(res_hidden_states_tuple, start)
        for i in range(start, len(self.resnets)):
            hidden_states = self.resnets[i](join_skip(self, hidden_states, skips.pop()), temb)
            hidden_states = _after(after_layer, i, _attend(self.attentions[i], hidden_states, ctx))
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
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


# ====================================================================================== factories
