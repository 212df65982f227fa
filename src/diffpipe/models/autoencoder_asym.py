"""AsymmetricAutoencoderKL: a KL VAE whose decoder can be conditioned on the known part of an image.

The encoder is :class:`~diffpipe.models.autoencoder_kl.AutoencoderKL`'s. The decoder
(:class:`MaskConditionDecoder`) may have other widths and depths than the encoder, and when it is given
both ``image`` and ``mask`` it runs a small conv pyramid (:class:`MaskConditionEncoder`) over the masked
image ``(1 - mask) * image`` and, before each up block and before its output layers, keeps its own
features where ``mask`` is 1 and takes the pyramid's features of the same shape where ``mask`` is 0
(the mask resized to the features by nearest-neighbour interpolation). Inpainting pipelines decode
with ``decode(latents, image=init_image, mask=mask)`` so that the unmasked pixels come back intact.

Config keys, parameter names and construction order are the reference's; the config also records
``block_out_channels`` (the decoder's widths, which pipelines read for the VAE scale factor) and
``force_upcast=False``, as the reference's does. Slicing and tiling are not supported (as in the
reference, enabling them raises ``NotImplementedError``).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..nn.activations import get_activation
from ..runtime.cpu_kernels import with_float32_kernels
from .autoencoder_kl import DiagonalGaussianDistribution, Encoder, _mid_block, decoder_up_blocks
from .modeling import ModelMixin
from .outputs import AutoencoderKLOutput, DecoderOutput


def _shape_key(tensor: torch.Tensor) -> str:
    """The key under which :class:`MaskConditionEncoder` files a feature map: its full shape as text."""
    return str(tuple(tensor.shape))


class MaskConditionEncoder(nn.Module):
    """A conv pyramid over the masked image: a 3x3 conv to ``out_ch``, a 3x3 conv doubling the width,
    then stride-2 4x4 convs doubling the width (at most ``res_ch``), ``log2(stride)`` layers after the first.

    ``forward`` returns every layer's output (before the ReLU that feeds the next layer) keyed by its
    shape (:func:`_shape_key`); a later layer of the same shape replaces an earlier one.
    """

    def __init__(self, in_ch: int, out_ch: int = 192, res_ch: int = 768, stride: int = 16):
        super().__init__()
        steps = int(stride).bit_length() - 1  # log2(stride)
        widths = [min(out_ch * 2**level, res_ch) for level in range(steps + 1)]
        layers = [nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1)]
        for level in range(steps):
            kernel, step = (3, 1) if level == 0 else (4, 2)
            layers.append(nn.Conv2d(widths[level], widths[level + 1], kernel_size=kernel, stride=step, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        # `mask` is accepted for the reference's signature; the features depend on the masked image only.
        features: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = F.relu(x)
            x = layer(x)
            features[_shape_key(x)] = x
        return features


def _blend(sample: torch.Tensor, features: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``sample`` where ``mask`` is 1, the condition features of ``sample``'s shape where it is 0."""
    key = _shape_key(sample)
    if key not in features:
        raise KeyError(
            f"{key}: the mask-condition encoder has no features of the decoder's shape {key} "
            f"(it has {sorted(features)}); the image and latents must match in batch and size"
        )
    resized = F.interpolate(mask, size=sample.shape[-2:], mode="nearest")
    return sample * resized + features[key] * (1 - resized)


class MaskConditionDecoder(nn.Module):
    """conv_in -> mid block -> up blocks -> GroupNorm/SiLU -> conv_out, optionally conditioned on a
    masked image (see the module docstring). Checkpoint order: conv_in, up_blocks, mid_block,
    condition_encoder, conv_norm_out, conv_out."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
    ):
        super().__init__()
        self.layers_per_block = layers_per_block
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, stride=1, padding=1)
        # Built in the reference's order (mid block before the up blocks), registered in the checkpoint's.
        mid_block = _mid_block(block_out_channels[-1], act_fn, norm_num_groups, add_attention=True)
        self.up_blocks = decoder_up_blocks(
            up_block_types, block_out_channels, layers_per_block, norm_num_groups, act_fn
        )
        self.mid_block = mid_block
        self.condition_encoder = MaskConditionEncoder(
            in_ch=out_channels, out_ch=block_out_channels[0], res_ch=block_out_channels[-1]
        )
        self.conv_norm_out = nn.GroupNorm(num_channels=block_out_channels[0], num_groups=norm_num_groups, eps=1e-6)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(
        self,
        z: torch.Tensor,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        latent_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents (after ``post_quant_conv``) -> images; conditioned only when both ``image`` and ``mask``
        are given. ``latent_embeds`` is accepted for the reference's signature (group norms here take none)."""
        sample = self.mid_block(self.conv_in(z))
        features = None
        if image is not None and mask is not None:
            features = self.condition_encoder((1 - mask) * image, mask)
        for block in self.up_blocks:
            if features is not None:
                sample = _blend(sample, features, mask)
            sample = block(sample)
        if features is not None:
            sample = _blend(sample, features, mask)
        return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


class AsymmetricAutoencoderKL(ModelMixin):
    """KL VAE with a larger, mask-conditioned decoder (``cross-attention/asymmetric-autoencoder-kl-x-*``)."""

    config_name = "config.json"
    decodes_with_mask = True  # inpainting hands decode() the image and the mask
    _derived_config_keys = ("block_out_channels", "force_upcast")  # __init__ records them, as the reference

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        down_block_out_channels: Sequence[int] = (64,),
        layers_per_down_block: int = 1,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        up_block_out_channels: Sequence[int] = (64,),
        layers_per_up_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
    ) -> None:
        super().__init__()
        if len(down_block_types) != len(down_block_out_channels):
            raise ConfigError(
                f"AsymmetricAutoencoderKL: {len(down_block_types)} down_block_types but "
                f"{len(down_block_out_channels)} down_block_out_channels; they must match"
            )
        if len(up_block_types) != len(up_block_out_channels):
            raise ConfigError(
                f"AsymmetricAutoencoderKL: {len(up_block_types)} up_block_types but "
                f"{len(up_block_out_channels)} up_block_out_channels; they must match"
            )
        get_activation(act_fn)  # fail early on an unknown activation name
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=down_block_out_channels,
            layers_per_block=layers_per_down_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            double_z=True,
        )
        self.decoder = MaskConditionDecoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=up_block_out_channels,
            layers_per_block=layers_per_up_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.use_slicing = False
        self.use_tiling = False
        # As the reference: pipelines read `block_out_channels` (the decoder's) for the VAE scale factor.
        self.register_to_config(block_out_channels=tuple(up_block_out_channels), force_upcast=False)

    # ------------------------------------------------------------------ memory modes (unsupported)
    def enable_slicing(self) -> None:
        raise NotImplementedError(f"Slicing doesn't seem to be implemented for {type(self).__name__}.")

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, use_tiling: bool = True) -> None:
        raise NotImplementedError(f"Tiling doesn't seem to be implemented for {type(self).__name__}.")

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # ------------------------------------------------------------------ encode / decode
    @staticmethod
    def _check(tensor: torch.Tensor, expected: int, what: str, name: str) -> None:
        if not torch.is_tensor(tensor) or tensor.ndim != 4 or tensor.shape[1] != expected:
            found = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise ValueError(
                f"AsymmetricAutoencoderKL.{what} expects a tensor of shape [batch, {expected}, height, width] "
                f"({name}={expected}); got {found}"
            )

    @with_float32_kernels(lambda self: (self,))
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images ``[B, in_channels, H, W]`` (in [-1, 1]) -> ``latent_dist`` over the latents."""
        self._check(x, self.config.in_channels, "encode", "in_channels")
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    @with_float32_kernels(lambda self: (self,))
    def decode(
        self,
        z: torch.Tensor,
        generator: torch.Generator | None = None,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple:
        """Latents (unscaled) -> images. With both ``image`` (``[B, out_channels, H, W]`` in [-1, 1]) and
        ``mask`` (``[B, 1, H, W]``, 1 where the decoder paints), the pixels where ``mask`` is 0 follow
        ``image``; with either missing the decode is unconditioned. ``generator`` is unused (the
        reference's signature)."""
        self._check(z, self.config.latent_channels, "decode", "latent_channels")
        decoded = self.decoder(self.post_quant_conv(z), image, mask)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(
        self,
        sample: torch.Tensor,
        mask: torch.Tensor | None = None,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> DecoderOutput | tuple:
        """Encode then decode (the posterior's mode, or a sample of it), conditioned on ``sample`` and
        ``mask`` when a mask is given."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z, generator=generator, image=sample, mask=mask).sample
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)
