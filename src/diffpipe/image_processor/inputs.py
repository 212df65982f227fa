"""The input kinds, constants and checks the image processors share."""

from __future__ import annotations

import operator

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch

from ..errors import DiffpipeError

PipelineImageInput = (
    PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray] | list[torch.Tensor]
)
"""What pipelines accept as an image: one PIL image, array or tensor, or a list of one of those kinds."""

PipelineDepthInput = PipelineImageInput
"""What depth pipelines accept as a depth map (the same kinds as an image)."""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
"""The ``output_type`` values ``postprocess`` knows."""

RESIZE_MODES = ("default", "fill", "crop")
"""``default``: stretch to the size; ``fill``: fit inside and extend the edges; ``crop``: cover and cut."""

RESAMPLE_FILTERS = {
    "nearest": PIL.Image.NEAREST,
    "linear": PIL.Image.BILINEAR,
    "bilinear": PIL.Image.BILINEAR,
    "bicubic": PIL.Image.BICUBIC,
    "lanczos": PIL.Image.LANCZOS,
}
"""The ``resample`` names a processor understands and the PIL filters they stand for."""

_ARRAY_TYPES = (np.ndarray, torch.Tensor)


class ImageInputError(DiffpipeError, ValueError, TypeError):
    """An image, mask or argument of a kind, shape or value an image processor cannot use."""


def _kind(value) -> str:
    """A short description of ``value`` for error messages: its type, and its shape for arrays."""
    if isinstance(value, _ARRAY_TYPES):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    if isinstance(value, PIL.Image.Image):
        return f"PIL image ({value.mode}, {value.width}x{value.height})"
    return type(value).__name__


def _require_pil(image, what: str) -> None:
    """Raise unless ``image`` is a PIL image."""
    if not isinstance(image, PIL.Image.Image):
        raise ImageInputError(f"{what} expects a PIL.Image.Image, got {_kind(image)}")


def _positive_int(value, what: str) -> int:
    """``value`` as an int if it is an integer above zero; an :class:`ImageInputError` otherwise."""
    try:
        number = operator.index(value)
    except TypeError:
        raise ImageInputError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None
    if number <= 0:
        raise ImageInputError(f"{what} must be above 0, got {number}")
    return number


def is_valid_image(image) -> bool:
    """Whether ``image`` is one image: a PIL image, or a 2-D/3-D numpy array or torch tensor."""
    return isinstance(image, PIL.Image.Image) or (isinstance(image, _ARRAY_TYPES) and image.ndim in (2, 3))


def is_valid_image_imagelist(images) -> bool:
    """Whether ``images`` is what ``preprocess`` takes: one image, a 4-D batch, or a list of single images."""
    if isinstance(images, _ARRAY_TYPES) and images.ndim == 4:
        return True
    if is_valid_image(images):
        return True
    if isinstance(images, list):
        return all(is_valid_image(image) for image in images)
    return False


def _fit_span(low, high, size):
    """Move the span ``[low, high)`` back inside ``[0, size]`` without changing its length, then clip it."""
    if high >= size:
        overshoot = high - size
        low, high = low - overshoot, high - overshoot
    if low < 0:
        high, low = high - low, 0
    if high >= size:
        high = size
    return low, high


def _fitted_size(image_width: int, image_height: int, width: int, height: int, cover: bool) -> tuple[int, int]:
    """The image's size scaled, aspect ratio kept, to fit inside (``cover=False``) or cover a width x height box."""
    box_is_wider = width / height > image_width / image_height
    if box_is_wider != cover:  # the height is the binding side
        size = image_width * height // image_height, height
    else:
        size = width, image_height * width // image_width
    if min(size) < 1:
        raise ImageInputError(
            f"resize_mode {'crop' if cover else 'fill'} cannot scale a {image_width}x{image_height} image to "
            f"{width}x{height}: it would be {size[0]}x{size[1]} (sizes must be above 0)"
        )
    return size


def _check_resize_mode(resize_mode) -> None:
    """Raise unless ``resize_mode`` is one of :data:`RESIZE_MODES`."""
    if resize_mode not in RESIZE_MODES:
        raise ImageInputError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
