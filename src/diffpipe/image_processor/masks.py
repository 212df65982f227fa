"""IPAdapterMaskProcessor: IP-Adapter region masks (grayscale, binarized) and their downsampling."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F


from .vae import VaeImageProcessor
from .inputs import (
    ImageInputError,
    _kind,
    _positive_int,
)


class IPAdapterMaskProcessor(VaeImageProcessor):
    """Prepares IP-Adapter region masks: grayscale, binarized, not normalized, ``(B, 1, H, W)`` in {0, 1}.

    Args:
        do_resize: round the size down to a multiple of ``vae_scale_factor`` (or use ``height``/``width``).
        vae_scale_factor: the VAE's downsampling factor.
        resample: the PIL filter for resizing PIL masks.
        do_normalize: map to ``[-1, 1]`` (off for masks).
        do_binarize: threshold at 0.5 to 0/1.
        do_convert_grayscale: read masks as single-channel images.
    """

    config_name = "config.json"

    def __init__(
        self,
        do_resize: bool = True,
        vae_scale_factor: int = 8,
        resample: str = "lanczos",
        do_normalize: bool = False,
        do_binarize: bool = True,
        do_convert_grayscale: bool = True,
    ):
        super().__init__(
            do_resize=do_resize,
            vae_scale_factor=vae_scale_factor,
            resample=resample,
            do_normalize=do_normalize,
            do_binarize=do_binarize,
            do_convert_grayscale=do_convert_grayscale,
        )
        # The reference's config also holds the base class's other settings, listed as defaults (so a
        # VaeImageProcessor built from this config keeps the mask settings above and its own defaults).
        self.register_to_config(
            vae_latent_channels=4,
            reducing_gap=None,
            do_convert_rgb=False,
            _use_default_values=["vae_latent_channels", "reducing_gap", "do_convert_rgb"],
        )

    @staticmethod
    def downsample(mask: torch.Tensor, batch_size: int, num_queries: int, value_embed_dim: int) -> torch.Tensor:
        """Masks ``(N, H, W)`` -> attention masks ``(max(N, ...), num_queries, value_embed_dim)``.

        Each mask is resized (bicubic) to a grid of ``num_queries`` cells with about the mask's aspect ratio,
        flattened, padded with zeros to ``num_queries`` when the grid falls short (with a UserWarning: the
        mask's aspect ratio does not match the image's), and repeated over ``value_embed_dim``. When there
        are fewer masks than ``batch_size``, the masks are repeated ``batch_size`` times (as in the reference).
        """
        if not isinstance(mask, torch.Tensor) or mask.ndim != 3:
            raise ImageInputError(f"downsample expects a torch.Tensor of masks (N, H, W), got {_kind(mask)}")
        num_queries = _positive_int(num_queries, "downsample's num_queries")
        mask_height, mask_width = mask.shape[1], mask.shape[2]
        grid_height = int(math.sqrt(num_queries / (mask_width / mask_height)))
        if grid_height >= 1:
            grid_height += int(num_queries % grid_height != 0)
        grid_width = num_queries // grid_height if grid_height >= 1 else 0
        if grid_width < 1:
            raise ImageInputError(
                f"downsample: a {mask_width}x{mask_height} mask is too elongated to spread over {num_queries} queries"
            )
        grid = F.interpolate(mask.unsqueeze(0), size=(grid_height, grid_width), mode="bicubic").squeeze(0)
        if grid.shape[0] < batch_size:
            grid = grid.repeat(batch_size, 1, 1)
        flat = grid.reshape(grid.shape[0], -1)
        cells = grid_height * grid_width
        if cells < num_queries:
            warnings.warn(
                f"the aspect ratio of the {mask_width}x{mask_height} mask does not match the output image's: "
                f"{num_queries - cells} of {num_queries} queries get no mask value (0); use masks of the output's "
                "aspect ratio for best results",
                UserWarning,
                stacklevel=2,
            )
            flat = F.pad(flat, (0, num_queries - cells), value=0.0)
        return flat.unsqueeze(-1).repeat(1, 1, value_embed_dim)
