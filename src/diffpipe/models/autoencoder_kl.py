"""AutoencoderKL: the VAE that maps images to Stable Diffusion latents and back.

``encode`` returns a :class:`DiagonalGaussianDistribution` over latents (``latent_dist``), ``decode``
maps latents to images. Slicing (one batch item at a time) and tiling (overlapping tiles blended
linearly, with the reference's tile sizes and overlap) bound memory; tiled results equal the
reference's tiled results.

Config keys match the reference. ``scaling_factor``, ``shift_factor``, ``latents_mean``/``latents_std``
and ``force_upcast`` are read by pipelines (latents are ``(z - shift) * scaling_factor``); the model
itself does not apply them.
"""

from __future__ import annotations

from typing import MutableMapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..io.key_fixes import rename_old_vae_attention
from ..nn.activations import get_activation
from ..nn.attention import AttentionHostMixin
from ..nn.memory import MemorySwitchesMixin
from ..runtime.cpu_kernels import with_float32_kernels
from .modeling import ModelMixin
from .outputs import AutoencoderKLOutput, DecoderOutput
from .unet_2d_blocks import UNetMidBlock2D
from .unet_block_factory import get_down_block, get_up_block


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance given as ``[mean, logvar]`` stacked along channels.

    ``logvar`` is clamped to [-30, 20]. With ``deterministic=True`` the distribution is a point mass
    at the mean (std and var are zero).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, 1)`` drawn from ``generator``.

        A CPU generator draws on the CPU and the noise moves to the mean's device (reproducible
        across devices); a list of generators draws one batch item from each.
        """
        noise = _standard_normal(self.mean.shape, generator, self.parameters.device, self.parameters.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL divergence to ``other`` (default: the standard normal), summed over C, H, W."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * terms.sum(dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        log_two_pi = 1.8378770664093453  # log(2 pi)
        return 0.5 * (log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var).sum(dim=list(dims))


def _standard_normal(shape, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
            return torch.cat([_standard_normal((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = device
    if generator is not None and generator.device.type != torch.device(device).type:
        if generator.device.type != "cpu":
            raise ValueError(f"cannot draw {device} noise from a {generator.device.type} generator")
        draw_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _mid_block(channels: int, act_fn: str, norm_num_groups: int, add_attention: bool) -> UNetMidBlock2D:
    """The encoder's and the decoder's mid block: resnet, single-head pixel attention, resnet."""
    return UNetMidBlock2D(
        in_channels=channels,
        temb_channels=None,
        resnet_eps=1e-6,
        resnet_act_fn=act_fn,
        output_scale_factor=1,
        resnet_time_scale_shift="default",
        attention_head_dim=channels,
        resnet_groups=norm_num_groups,
        add_attention=add_attention,
    )


def decoder_up_blocks(
    up_block_types: Sequence[str],
    block_out_channels: Sequence[int],
    layers_per_block: int,
    norm_num_groups: int,
    act_fn: str,
) -> nn.ModuleList:
    """A VAE decoder's up blocks, widest first, each upsampling but the last (no time embedding)."""
    reversed_channels = list(reversed(block_out_channels))
    blocks, output_channel = [], reversed_channels[0]
    for i, block_type in enumerate(up_block_types):
        prev_output_channel, output_channel = output_channel, reversed_channels[i]
        blocks.append(
            get_up_block(
                block_type,
                num_layers=layers_per_block + 1,
                in_channels=prev_output_channel,
                out_channels=output_channel,
                prev_output_channel=prev_output_channel,
                temb_channels=None,
                add_upsample=i < len(block_out_channels) - 1,
                resnet_eps=1e-6,
                resnet_act_fn=act_fn,
                resnet_groups=norm_num_groups,
                resnet_time_scale_shift="group",
            )
        )
    return nn.ModuleList(blocks)


class Encoder(nn.Module):
    """conv_in -> down blocks -> mid block (resnet, attention, resnet) -> GroupNorm/SiLU -> conv_out.

    Outputs ``2 * out_channels`` channels (mean and log-variance) with ``double_z``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, stride=1, padding=1)
        blocks = []
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=None,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    downsample_padding=0,  # asymmetric padding: bottom/right only
                )
            )
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = _mid_block(block_out_channels[-1], act_fn, norm_num_groups, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[-1], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for block in self.down_blocks:
            sample = block(sample)
        sample = self.mid_block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class Decoder(nn.Module):
    """conv_in -> mid block -> up blocks -> GroupNorm/SiLU -> conv_out.

    (``up_blocks`` is registered before ``mid_block``: that is the checkpoint's key order.)
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        # The mid block is built before the up blocks (the reference's order, so a seeded construction
        # draws the reference's initial weights) but registered after them (the checkpoint order).
        mid_block = _mid_block(block_out_channels[-1], act_fn, norm_num_groups, mid_block_add_attention)
        self.up_blocks = decoder_up_blocks(
            up_block_types, block_out_channels, layers_per_block, norm_num_groups, act_fn
        )
        self.mid_block = mid_block
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.mid_block(self.conv_in(sample))
        for block in self.up_blocks:
            sample = block(sample)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


def _ramp(extent: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-fade weights ``k / extent`` and ``1 - k / extent`` (computed in float64, then cast)."""
    w = torch.arange(extent, dtype=torch.float64) / extent
    return w.to(device=like.device, dtype=like.dtype), (1 - w).to(device=like.device, dtype=like.dtype)


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """``tile`` with its first ``extent`` rows cross-faded from the last rows of ``above``."""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent <= 0:
        return tile
    w_new, w_old = _ramp(extent, tile)
    head = above[:, :, above.shape[2] - extent :, :] * w_old[:, None] + tile[:, :, :extent, :] * w_new[:, None]
    return torch.cat([head, tile[:, :, extent:, :]], dim=2)


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> torch.Tensor:
    """``tile`` with its first ``extent`` columns cross-faded from the last columns of ``left``."""
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent <= 0:
        return tile
    w_new, w_old = _ramp(extent, tile)
    head = left[:, :, :, left.shape[3] - extent :] * w_old + tile[:, :, :, :extent] * w_new
    return torch.cat([head, tile[:, :, :, extent:]], dim=3)


class AutoencoderKL(ModelMixin, AttentionHostMixin, MemorySwitchesMixin):
    """KL-regularised VAE (Stable Diffusion's image <-> latent codec)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ConfigError(
                f"AutoencoderKL: {len(block_out_channels)} block_out_channels, {len(down_block_types)} "
                f"down_block_types and {len(up_block_types)} up_block_types; they must all match"
            )
        get_activation(act_fn)  # fail early on an unknown activation name
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        # Tiling geometry as in the reference: image tiles of `sample_size`, latent tiles of that size
        # divided by the downsampling factor, tiles overlapping by a quarter.
        self.tile_sample_min_size = sample_size
        first_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_latent_min_size = int(first_size / (2 ** (len(block_out_channels) - 1)))
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------------ legacy checkpoints
    @classmethod
    def _convert_legacy_state_dict(cls, state_dict: MutableMapping[str, torch.Tensor]):
        """Old VAE checkpoints name the mid-block attention ``query/key/value/proj_attn`` (1x1 conv shapes)."""
        return rename_old_vae_attention(state_dict)

    # ------------------------------------------------------------------ memory modes
    def enable_slicing(self) -> None:
        """Encode/decode one batch item at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode large inputs in overlapping tiles (``tile_sample_min_size`` pixels)."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.enable_tiling(False)

    # ------------------------------------------------------------------ checks
    def _check_channels(self, tensor: torch.Tensor, expected: int, what: str, shape_hint: str) -> None:
        if not torch.is_tensor(tensor) or tensor.ndim != 4 or tensor.shape[1] != expected:
            found = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(f"AutoencoderKL.{what} expects a tensor of shape {shape_hint}; got {found}")

    # ------------------------------------------------------------------ encode
    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        tile = self.tile_sample_min_size
        if self.use_tiling and (x.shape[-1] > tile or x.shape[-2] > tile):
            return self._tiled_encode(x)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments

    @with_float32_kernels(lambda self: (self,))
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images ``[B, in_channels, H, W]`` (in [-1, 1]) -> ``latent_dist`` over ``[B, latent_channels, H/f, W/f]``."""
        c = self.config.in_channels
        self._check_channels(x, c, "encode", f"[batch, {c}, height, width] (in_channels={c})")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode_moments(part) for part in x.split(1)])
        else:
            moments = self._encode_moments(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    def _tiled_encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder moments computed tile by tile and blended; matches the reference's tiled encode."""
        size = self.tile_sample_min_size
        stride = int(size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_latent_min_size * self.tile_overlap_factor)
        keep = self.tile_latent_min_size - blend

        def encode_tile(tile):
            tile = self.encoder(tile)
            return self.quant_conv(tile) if self.quant_conv is not None else tile

        return self._tile(x, size, stride, blend, keep, encode_tile)

    # ------------------------------------------------------------------ decode
    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        tile = self.tile_latent_min_size
        if self.use_tiling and (z.shape[-1] > tile or z.shape[-2] > tile):
            return self._tiled_decode(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @with_float32_kernels(lambda self: (self,))
    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        """Latents ``[B, latent_channels, h, w]`` (unscaled: divide by ``scaling_factor`` first) -> images."""
        c = self.config.latent_channels
        self._check_channels(z, c, "decode", f"[batch, {c}, height, width] (latent_channels={c})")
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode_one(part) for part in z.split(1)])
        else:
            decoded = self._decode_one(z)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def _tiled_decode(self, z: torch.Tensor) -> torch.Tensor:
        size = self.tile_latent_min_size
        stride = int(size * (1 - self.tile_overlap_factor))
        blend = int(self.tile_sample_min_size * self.tile_overlap_factor)
        keep = self.tile_sample_min_size - blend

        def decode_tile(tile):
            if self.post_quant_conv is not None:
                tile = self.post_quant_conv(tile)
            return self.decoder(tile)

        return self._tile(z, size, stride, blend, keep, decode_tile)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode in tiles regardless of size."""
        decoded = self._tiled_decode(z)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)

    @staticmethod
    def _tile(x: torch.Tensor, size: int, stride: int, blend: int, keep: int, fn) -> torch.Tensor:
        """Run ``fn`` on ``size``-square tiles of ``x`` every ``stride`` pixels, cross-fade each output tile
        with the (already blended) tiles above and to its left over ``blend`` pixels, keep the first
        ``keep`` rows/columns of each and stitch."""
        grid = [
            [fn(x[:, :, i : i + size, j : j + size]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)
        ]
        rows = []
        for r, row in enumerate(grid):
            for c in range(len(row)):
                tile = row[c]
                if r > 0:
                    tile = _blend_rows(grid[r - 1][c], tile, blend)
                if c > 0:
                    tile = _blend_cols(row[c - 1], tile, blend)
                row[c] = tile  # later neighbours blend with the blended tile
            rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        return torch.cat(rows, dim=2)

    # ------------------------------------------------------------------ round trip
    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Encode then decode (the posterior's mode, or a sample of it)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)
