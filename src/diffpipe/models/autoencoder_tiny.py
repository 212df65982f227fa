"""AutoencoderTiny: the tiny distilled VAE (TAESD for SD 1.x/2.x, TAESDXL for SDXL).

The encoder maps images in [-1, 1] to latents directly (no distribution: ``encode`` returns
``latents``); the decoder soft-clamps latents to ``(-3, 3)`` with ``3 * tanh(z / 3)`` and returns images in
[-1, 1]. Both are plain stacks of 3x3 convolutions and residual blocks (``conv -> act -> conv -> act ->
conv``, added to the input, then ReLU), with stride-2 convolutions (encoder) or ``upsample_fn``
upsampling (decoder) between stages.

Config keys, parameter names and construction order are the reference's. As the reference's, the config
also records ``block_out_channels`` (the decoder's widths; pipelines read it for the VAE scale factor), and
some reference quirks are kept because checkpoints and callers depend on them:

- the latents are the encoder's raw output; ``scaling_factor`` (1.0 for TAESD) and ``shift_factor`` are
  only read by pipelines, and ``scale_latents``/``unscale_latents`` map raw latents to and from [0, 1]
  (``z / (2 * latent_magnitude) + latent_shift``, clamped) for storing them as bytes;
- ``spatial_scale_factor`` is ``2 ** out_channels`` (8 for RGB), whatever the number of stages;
- tiling (``enable_tiling``) always tiles, with ``tile_sample_min_size`` (512) pixel tiles overlapping by
  ``tile_overlap_factor`` (1/8), each tile blended over its top-left neighbours by a linear ramp, and
  writes 4 latent / 3 image channels, as the reference's does;
- a stage whose width differs from the previous stage's builds, but (as in the reference) does not run.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.activations import get_activation
from ..runtime.cpu_kernels import with_float32_kernels
from .modeling import ModelMixin
from .outputs import AutoencoderTinyOutput, DecoderOutput


def _conv(in_channels: int, out_channels: int, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, **kwargs)


class AutoencoderTinyBlock(nn.Module):
    """``fuse(conv(x) + skip(x))``: three 3x3 convs with ``act_fn`` between them, a 1x1 skip (identity
    when the widths match) and a ReLU."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(in_channels, out_channels),
            get_activation(act_fn),
            _conv(out_channels, out_channels),
            get_activation(act_fn),
            _conv(out_channels, out_channels),
        )
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        )
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class EncoderTiny(nn.Module):
    """[-1, 1] images -> raw latents: conv_in, then per stage (a stride-2 conv first, but for the first)
    ``num_blocks[i]`` residual blocks, then a conv to ``out_channels``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: Sequence[int],
        block_out_channels: Sequence[int],
        act_fn: str,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i, count in enumerate(num_blocks):
            width = block_out_channels[i]
            if i == 0:
                layers.append(_conv(in_channels, width))
            else:
                layers.append(_conv(width, width, stride=2, bias=False))
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(count))
        layers.append(_conv(block_out_channels[-1], out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))  # the network expects images in [0, 1]


class DecoderTiny(nn.Module):
    """Raw latents -> [-1, 1] images: ``3 * tanh(z / 3)``, conv_in and ``act_fn``, then per stage
    ``num_blocks[i]`` residual blocks and, but for the last stage, upsampling and a bias-free conv; the
    last stage ends in a conv to ``out_channels``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: Sequence[int],
        block_out_channels: Sequence[int],
        upsampling_scaling_factor: int,
        act_fn: str,
        upsample_fn: str,
    ):
        super().__init__()
        layers: list[nn.Module] = [_conv(in_channels, block_out_channels[0]), get_activation(act_fn)]
        last = len(num_blocks) - 1
        for i, count in enumerate(num_blocks):
            width = block_out_channels[i]
            layers.extend(AutoencoderTinyBlock(width, width, act_fn) for _ in range(count))
            if i < last:
                layers.append(nn.Upsample(scale_factor=upsampling_scaling_factor, mode=upsample_fn))
                layers.append(_conv(width, width, bias=False))
            else:
                layers.append(_conv(width, out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(x / 3) * 3
        return self.layers(x).mul(2).sub(1)  # the network outputs [0, 1]


def _blend_masks(tile_size: int, blend_size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column ramps ``k / (blend_size - 1)`` clamped to [0, 1], each ``[tile_size, tile_size]``."""
    ramp = torch.arange(tile_size, dtype=torch.float32) / (blend_size - 1)
    rows, cols = torch.meshgrid(ramp, ramp, indexing="ij")
    return rows.clamp(0, 1).to(like.device), cols.clamp(0, 1).to(like.device)


def _tiled(
    x: torch.Tensor, fn, *, tile_in: int, blend_in: int, scale: float, out_channels: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """Run ``fn`` on ``tile_in``-square tiles of ``x`` every ``tile_in - blend_in`` pixels and write each
    result (``scale`` times the tile's size) over the output so far: ``mask * tile + (1 - mask) * out``,
    where ``mask`` ramps from 0 to 1 over the tile's first ``blend_in * scale`` rows (but in the first tile
    row) and columns (but in the first tile column)."""
    stride = tile_in - blend_in
    tile_out, blend_out = round(tile_in * scale), round(blend_in * scale)
    out_h, out_w = int(x.shape[-2] * scale), int(x.shape[-1] * scale)
    out = torch.zeros(x.shape[0], out_channels, out_h, out_w, device=x.device, dtype=out_dtype)
    mask_rows, mask_cols = _blend_masks(tile_out, blend_out, out)
    ones = torch.ones_like(mask_rows)
    for i in range(0, x.shape[-2], stride):
        for j in range(0, x.shape[-1], stride):
            tile = fn(x[..., i : i + tile_in, j : j + tile_in])
            oi, oj = round(i * scale), round(j * scale)
            target = out[..., oi : oi + tile_out, oj : oj + tile_out]
            mask = (ones if i == 0 else mask_rows) * (ones if j == 0 else mask_cols)
            h, w = min(tile.shape[-2], target.shape[-2]), min(tile.shape[-1], target.shape[-1])
            tile, mask, target = tile[..., :h, :w], mask[:h, :w], target[..., :h, :w]
            target.copy_(mask * tile + (1 - mask) * target)
    return out


class AutoencoderTiny(ModelMixin):
    """Tiny distilled VAE (TAESD / TAESDXL): deterministic latents, no KL posterior."""

    config_name = "config.json"
    _derived_config_keys = ("block_out_channels",)  # __init__ records it, as the reference

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        encoder_block_out_channels: Sequence[int] = (64, 64, 64, 64),
        decoder_block_out_channels: Sequence[int] = (64, 64, 64, 64),
        act_fn: str = "relu",
        upsample_fn: str = "nearest",
        latent_channels: int = 4,
        upsampling_scaling_factor: int = 2,
        num_encoder_blocks: Sequence[int] = (1, 3, 3, 3),
        num_decoder_blocks: Sequence[int] = (3, 3, 3, 1),
        latent_magnitude: int = 3,
        latent_shift: float = 0.5,
        force_upcast: bool = False,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
    ):
        super().__init__()
        if len(encoder_block_out_channels) != len(num_encoder_blocks):
            raise ConfigError(
                f"AutoencoderTiny: encoder_block_out_channels ({len(encoder_block_out_channels)} entries) and "
                f"num_encoder_blocks ({len(num_encoder_blocks)} entries) must have the same length"
            )
        if len(decoder_block_out_channels) != len(num_decoder_blocks):
            raise ConfigError(
                f"AutoencoderTiny: decoder_block_out_channels ({len(decoder_block_out_channels)} entries) and "
                f"num_decoder_blocks ({len(num_decoder_blocks)} entries) must have the same length"
            )
        get_activation(act_fn)  # fail early on an unknown activation name
        self.encoder = EncoderTiny(
            in_channels=in_channels,
            out_channels=latent_channels,
            num_blocks=num_encoder_blocks,
            block_out_channels=encoder_block_out_channels,
            act_fn=act_fn,
        )
        self.decoder = DecoderTiny(
            in_channels=latent_channels,
            out_channels=out_channels,
            num_blocks=num_decoder_blocks,
            block_out_channels=decoder_block_out_channels,
            upsampling_scaling_factor=upsampling_scaling_factor,
            act_fn=act_fn,
            upsample_fn=upsample_fn,
        )
        self.latent_magnitude = latent_magnitude
        self.latent_shift = latent_shift
        self.scaling_factor = scaling_factor

        self.use_slicing = False
        self.use_tiling = False
        # The reference's tiling geometry (its spatial factor is 2 ** out_channels: 8 for RGB).
        self.spatial_scale_factor = 2**out_channels
        self.tile_overlap_factor = 0.125
        self.tile_sample_min_size = 512
        self.tile_latent_min_size = self.tile_sample_min_size // self.spatial_scale_factor

        # As the reference: pipelines read `block_out_channels` (the decoder's) for the VAE scale factor.
        self.register_to_config(block_out_channels=decoder_block_out_channels)

    # ------------------------------------------------------------------ latents <-> [0, 1]
    def scale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """raw latents -> [0, 1]"""
        return x.div(2 * self.latent_magnitude).add(self.latent_shift).clamp(0, 1)

    def unscale_latents(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> raw latents"""
        return x.sub(self.latent_shift).mul(2 * self.latent_magnitude)

    # ------------------------------------------------------------------ memory modes
    def enable_slicing(self) -> None:
        """Encode/decode one batch item at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode in overlapping tiles (``tile_sample_min_size`` pixels), whatever the input size."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    # ------------------------------------------------------------------ tiling
    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> latents, encoded tile by tile and blended (4 latent channels, as the reference)."""
        size = self.tile_sample_min_size
        return _tiled(
            x,
            self.encoder,
            tile_in=size,
            blend_in=int(size * self.tile_overlap_factor),
            scale=1 / self.spatial_scale_factor,
            out_channels=4,
            out_dtype=x.dtype,
        )

    def _tiled_decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images, decoded tile by tile and blended (3 image channels, as the reference)."""
        size = self.tile_latent_min_size
        return _tiled(
            x,
            self.decoder,
            tile_in=size,
            blend_in=int(size * self.tile_overlap_factor),
            scale=self.spatial_scale_factor,
            out_channels=3,
            out_dtype=x.dtype,
        )

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check(tensor: torch.Tensor, expected: int, what: str, name: str) -> None:
        if not torch.is_tensor(tensor) or tensor.ndim != 4 or tensor.shape[1] != expected:
            found = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(
                f"AutoencoderTiny.{what} expects a tensor of shape [batch, {expected}, height, width] "
                f"({name}={expected}); got {found}"
            )

    def _run(self, x: torch.Tensor, plain, tiled) -> torch.Tensor:
        fn = tiled if self.use_tiling else plain
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([fn(part) for part in x.split(1)])
        return fn(x)

    # ------------------------------------------------------------------ encode / decode
    @with_float32_kernels(lambda self: (self,))
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderTinyOutput | tuple:
        """Images ``[B, in_channels, H, W]`` in [-1, 1] -> raw ``latents`` ``[B, latent_channels, H/f, W/f]``."""
        self._check(x, self.config.in_channels, "encode", "in_channels")
        latents = self._run(x, self.encoder, self._tiled_encode)
        if not return_dict:
            return (latents,)
        return AutoencoderTinyOutput(latents=latents)

    @with_float32_kernels(lambda self: (self,))
    def decode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, return_dict: bool = True
    ) -> DecoderOutput | tuple:
        """Raw latents ``[B, latent_channels, h, w]`` (divide pipeline latents by ``scaling_factor`` first)
        -> images in [-1, 1]. ``generator`` is accepted for the reference's signature and unused."""
        self._check(x, self.config.latent_channels, "decode", "latent_channels")
        images = self._run(x, self.decoder, self._tiled_decode)
        if not return_dict:
            return (images,)
        return DecoderOutput(sample=images)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Encode, store the latents as bytes (``scale_latents`` then rounded to 1/255), decode.

        The bytes are read back in the latents' dtype (the reference reads them as float32, which a
        float16 model then refuses)."""
        latents = self.encode(sample).latents
        stored = self.scale_latents(latents).mul(255).round().byte()
        decoded = self.decode(self.unscale_latents(stored.to(latents.dtype) / 255.0)).sample
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)
