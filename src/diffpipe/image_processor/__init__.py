"""Image processors: what pipelines use to turn user images into VAE inputs and VAE outputs into images.

The public surface is the reference's ``diffusers.image_processor``: :class:`VaeImageProcessor` (resize,
normalize, binarize, convert; ``preprocess`` and ``postprocess``), :class:`IPAdapterMaskProcessor` (IP-Adapter
region masks) and the ``PipelineImageInput`` type alias, so ``from diffpipe.image_processor import
VaeImageProcessor`` replaces ``from diffusers.image_processor import VaeImageProcessor``.

Layouts, as in the reference:

- PIL images are whatever mode they come in (``RGB``, ``L``, ``RGBA``...);
- numpy images are channels-last: ``(H, W)``, ``(H, W, C)`` or a batch ``(B, H, W, C)``, values in ``[0, 1]``;
- torch images are channels-first: ``(C, H, W)`` or a batch ``(B, C, H, W)``, values in ``[0, 1]``;
- what ``preprocess`` returns and ``postprocess`` takes is a ``(B, C, H, W)`` tensor, in ``[-1, 1]`` when the
  processor normalizes (``do_normalize``).

Inputs the reference refuses are refused here with an :class:`ImageInputError` naming what was expected and
what was found; it is both a ``ValueError`` (what the reference raises for unsupported inputs) and a
``TypeError`` (for inputs of the wrong kind), so existing ``except`` clauses keep working.
"""

from .inputs import (
    OUTPUT_TYPES,
    RESAMPLE_FILTERS,
    RESIZE_MODES,
    ImageInputError,
    PipelineDepthInput,
    PipelineImageInput,
    is_valid_image,
    is_valid_image_imagelist,
)
from .masks import IPAdapterMaskProcessor
from .vae import VaeImageProcessor

__all__ = [
    "OUTPUT_TYPES",
    "RESAMPLE_FILTERS",
    "RESIZE_MODES",
    "IPAdapterMaskProcessor",
    "ImageInputError",
    "PipelineDepthInput",
    "PipelineImageInput",
    "VaeImageProcessor",
    "is_valid_image",
    "is_valid_image_imagelist",
]
