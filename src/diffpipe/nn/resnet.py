"""Residual block and the 2x down/up-sampling layers of UNets and VAEs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import get_activation


class ResnetBlock2D(nn.Module):
    """GroupNorm -> act -> conv, plus a projected time embedding, GroupNorm -> act -> dropout -> conv.

    ``time_embedding_norm``: ``"default"`` adds the projected embedding before ``norm2``;
    ``"scale_shift"`` projects to twice the width and applies ``norm2(h) * (1 + scale) + shift``.
    With ``temb_channels=None`` (the VAE) there is no ``time_emb_proj`` and any other value (the VAE
    decoder passes ``"group"``) behaves like ``"default"``. A 1x1 ``conv_shortcut`` appears when the
    channel count changes. Output: ``(shortcut(x) + h) / output_scale_factor``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        dropout: float = 0.0,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        skip_time_act: bool = False,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if time_embedding_norm in ("spatial", "ada_group"):
            raise NotImplementedError(
                f"ResnetBlock2D with time_embedding_norm={time_embedding_norm!r} is not implemented"
            )
        if temb_channels is not None and time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"unknown time_embedding_norm {time_embedding_norm!r}; expected 'default' or 'scale_shift'"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act

        self.norm1 = nn.GroupNorm(num_groups=groups, num_channels=in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            width = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, width)
        self.norm2 = nn.GroupNorm(
            num_groups=groups if groups_out is None else groups_out, num_channels=out_channels, eps=eps, affine=True
        )
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=conv_shortcut_bias)
            if use_in_shortcut
            else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.conv1(self.nonlinearity(self.norm1(input_tensor)))

        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        else:
            temb = None

        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError("this ResnetBlock2D uses time_embedding_norm='scale_shift' and needs `temb`")
            scale, shift = temb.chunk(2, dim=1)
            hidden = self.norm2(hidden) * (1 + scale) + shift
        else:
            if temb is not None:
                hidden = hidden + temb
            hidden = self.norm2(hidden)

        hidden = self.conv2(self.dropout(self.nonlinearity(hidden)))
        shortcut = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        out = shortcut + hidden
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Halve the resolution: a stride-2 3x3 ``conv`` or, without ``use_conv``, 2x2 average pooling.

    ``padding=0`` is the VAE encoder's layout: pad one row/column at the bottom/right only, then an
    unpadded stride-2 conv.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = channels if out_channels is None else out_channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample2D without a conv cannot change the channel count")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Double the resolution (nearest neighbour, or to ``output_size``), then an optional 3x3 ``conv``."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = channels if out_channels is None else out_channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        if hidden_states.shape[0] >= 64:
            # nearest upsampling of large channels-last batches is broken in some torch builds
            hidden_states = hidden_states.contiguous()
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states
