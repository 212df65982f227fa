"""VaeImageProcessor: user images to VAE inputs, VAE outputs to images (the reference's surface)."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageFilter
import PIL.ImageOps
import torch
import torch.nn.functional as F

from ..config import ConfigMixin
from ..images import numpy_to_pil as _numpy_batch_to_pil
from .inputs import (
    ImageInputError,
    OUTPUT_TYPES,
    PipelineImageInput,
    RESAMPLE_FILTERS,
    _ARRAY_TYPES,
    _check_resize_mode,
    _fit_span,
    _fitted_size,
    _kind,
    _positive_int,
    _require_pil,
    is_valid_image_imagelist,
)


class VaeImageProcessor(ConfigMixin):
    """Prepares images for a VAE (``preprocess``) and turns decoded tensors into images (``postprocess``).

    Args:
        do_resize: round the size down to a multiple of ``vae_scale_factor`` (or resize to the ``height`` and
            ``width`` given to ``preprocess``).
        vae_scale_factor: the VAE's downsampling factor; sizes are made multiples of it.
        vae_latent_channels: tensors with this many channels are taken as latents and passed through as they are.
        resample: the PIL filter used to resize PIL images (``nearest``, ``linear``/``bilinear``, ``bicubic``,
            ``lanczos``); tensors and arrays are resized with nearest-neighbour interpolation.
        reducing_gap: PIL's ``reducing_gap`` for the default resize of PIL images (faster, slightly different).
        do_normalize: map ``[0, 1]`` to ``[-1, 1]`` in ``preprocess`` and back in ``postprocess``.
        do_binarize: set values below 0.5 to 0 and the rest to 1 (masks), after normalizing.
        do_convert_rgb: convert PIL images to RGB.
        do_convert_grayscale: convert PIL images to grayscale (``L``); 3-D arrays are then read as a batch of
            single-channel images.
    """

    config_name = "config.json"

    def __init__(
        self,
        do_resize: bool = True,
        vae_scale_factor: int = 8,
        vae_latent_channels: int = 4,
        resample: str = "lanczos",
        reducing_gap: int | None = None,
        do_normalize: bool = True,
        do_binarize: bool = False,
        do_convert_rgb: bool = False,
        do_convert_grayscale: bool = False,
    ):
        super().__init__()
        if do_convert_rgb and do_convert_grayscale:
            raise ImageInputError(
                "do_convert_rgb and do_convert_grayscale cannot both be True: set do_convert_grayscale=False to "
                "get RGB images, or do_convert_rgb=False to get grayscale images"
            )

    # ------------------------------------------------------------------ conversions between kinds
    @staticmethod
    def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
        """``(H, W, C)`` or ``(B, H, W, C)`` values in ``[0, 1]`` -> a list of PIL images.

        Values are scaled by 255, rounded and cast to 8 bits (as in the reference, values outside ``[0, 1]``
        wrap around rather than clip). One channel gives ``L`` images, two ``LA``, three ``RGB``, four ``RGBA``.
        """
        if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
            raise ImageInputError(
                f"numpy_to_pil expects a numpy array of shape (H, W, C) or (B, H, W, C), got {_kind(images)}"
            )
        if images.shape[-1] not in (1, 2, 3, 4):
            raise ImageInputError(
                f"numpy_to_pil expects 1 to 4 channels in the last axis, got shape {tuple(images.shape)}"
            )
        return _numpy_batch_to_pil(images)

    @staticmethod
    def pil_to_numpy(images: PIL.Image.Image | Sequence[PIL.Image.Image]) -> np.ndarray:
        """A PIL image or a list of them (one size and mode) -> float32 ``(B, H, W, C)`` in ``[0, 1]``.

        Single-band images (``L``, ``1``, ``I``...) give ``(B, H, W)``: pixel values divided by 255.
        """
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if not isinstance(images, (list, tuple)) or not images:
            raise ImageInputError(f"pil_to_numpy expects a PIL image or a non-empty list of them, got {_kind(images)}")
        for image in images:
            _require_pil(image, "pil_to_numpy")
        arrays = [np.array(image).astype(np.float32) / 255.0 for image in images]
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            found = ", ".join(f"{image.width}x{image.height} {image.mode}" for image in images[:4])
            raise ImageInputError(f"pil_to_numpy needs images of one size and band count to stack them, got {found}")
        return np.stack(arrays)

    @staticmethod
    def numpy_to_pt(images: np.ndarray) -> torch.Tensor:
        """Channels-last ``(B, H, W, C)`` -> channels-first ``(B, C, H, W)`` tensor (same dtype and memory).

        A 3-D array is read as a batch of single-channel images ``(B, H, W)``.
        """
        if not isinstance(images, np.ndarray) or images.ndim not in (3, 4):
            raise ImageInputError(
                f"numpy_to_pt expects a numpy array of shape (B, H, W, C) or (B, H, W), got {_kind(images)}"
            )
        if images.ndim == 3:
            images = images[..., None]
        return torch.from_numpy(images.transpose(0, 3, 1, 2))

    @staticmethod
    def pt_to_numpy(images: torch.Tensor) -> np.ndarray:
        """Channels-first ``(B, C, H, W)`` tensor (any device) -> float32 channels-last ``(B, H, W, C)`` array."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ImageInputError(f"pt_to_numpy expects a torch.Tensor of shape (B, C, H, W), got {_kind(images)}")
        if images.requires_grad:
            raise ImageInputError(
                "pt_to_numpy cannot convert a tensor that requires grad; pass `images.detach()` (or run under "
                "torch.no_grad())"
            )
        return images.cpu().permute(0, 2, 3, 1).float().numpy()

    @staticmethod
    def normalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map ``[0, 1]`` to ``[-1, 1]`` (``2 * x - 1``); integer inputs come back as floats."""
        if not isinstance(images, _ARRAY_TYPES):
            raise ImageInputError(f"normalize expects a numpy array or a torch.Tensor, got {_kind(images)}")
        return 2.0 * images - 1.0

    @staticmethod
    def denormalize(images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Map ``[-1, 1]`` back to ``[0, 1]`` (``x / 2 + 1/2``), clipping what falls outside."""
        if isinstance(images, torch.Tensor):
            return (images * 0.5 + 0.5).clamp(0, 1)
        if isinstance(images, np.ndarray):  # documented by the reference, though its own version fails on arrays
            return np.clip(images * 0.5 + 0.5, 0, 1)
        raise ImageInputError(f"denormalize expects a numpy array or a torch.Tensor, got {_kind(images)}")

    @staticmethod
    def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
        """The PIL image in RGB mode."""
        _require_pil(image, "convert_to_rgb")
        return image.convert("RGB")

    @staticmethod
    def convert_to_grayscale(image: PIL.Image.Image) -> PIL.Image.Image:
        """The PIL image in grayscale (``L``) mode."""
        _require_pil(image, "convert_to_grayscale")
        return image.convert("L")

    @staticmethod
    def blur(image: PIL.Image.Image, blur_factor: int = 4) -> PIL.Image.Image:
        """The PIL image with a Gaussian blur of radius ``blur_factor`` (softens mask edges)."""
        _require_pil(image, "blur")
        return image.filter(PIL.ImageFilter.GaussianBlur(blur_factor))

    # ------------------------------------------------------------------ masks and regions
    @staticmethod
    def get_crop_region(mask_image: PIL.Image.Image, width: int, height: int, pad=0) -> tuple[int, int, int, int]:
        """The box ``(x1, y1, x2, y2)`` around the mask's non-zero pixels, grown by ``pad`` on each side
        (within the image) and then widened or heightened to the aspect ratio ``width / height``, moved back
        inside the image where it overflows.

        Used to inpaint only the masked area: the box is cut out, processed at ``width`` x ``height`` and
        pasted back. The padded box is truncated to whole pixels. For an all-zero mask the box is inverted
        (x2 < x1), as in the reference.
        """
        _require_pil(mask_image, "get_crop_region")
        mask = np.asarray(mask_image.convert("L"))
        image_height, image_width = mask.shape
        cols = np.flatnonzero(mask.any(axis=0))
        rows = np.flatnonzero(mask.any(axis=1))
        left, right = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (image_width, 0)
        top, bottom = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (image_height, 0)
        x1, y1 = int(max(left - pad, 0)), int(max(top - pad, 0))
        x2, y2 = int(min(right + pad, image_width)), int(min(bottom + pad, image_height))
        if y2 == y1 or not width or not height:
            raise ImageInputError(
                f"get_crop_region: cannot match the box {(x1, y1, x2, y2)} (mask {image_width}x{image_height}, "
                f"pad {pad}) to the aspect ratio of {width}x{height}"
            )
        target_ratio = width / height
        if (x2 - x1) / (y2 - y1) > target_ratio:  # too wide: make it taller
            grow = int((x2 - x1) / target_ratio - (y2 - y1))
            y1, y2 = _fit_span(y1 - grow // 2, y2 + grow - grow // 2, image_height)
        else:  # too tall (or just right): make it wider
            grow = int((y2 - y1) * target_ratio - (x2 - x1))
            x1, x2 = _fit_span(x1 - grow // 2, x2 + grow - grow // 2, image_width)
        return x1, y1, x2, y2

    def binarize(self, image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """A copy of the array or tensor with values below 0.5 set to 0 and the others to 1 (dtype kept).

        Unlike the reference, the input is not changed in place.
        """
        if isinstance(image, torch.Tensor):
            image = image.clone()
        elif isinstance(image, np.ndarray):
            image = image.copy()
        else:
            raise ImageInputError(f"binarize expects a numpy array or a torch.Tensor, got {_kind(image)}")
        low, high = image < 0.5, image >= 0.5  # NaNs are neither and stay NaN
        image[low] = 0
        image[high] = 1
        return image

    def apply_overlay(
        self,
        mask: PIL.Image.Image,
        init_image: PIL.Image.Image,
        image: PIL.Image.Image,
        crop_coords: tuple[int, int, int, int] | None = None,
    ) -> PIL.Image.Image:
        """Put the original back outside the mask: the result is ``image`` where ``mask`` is white,
        ``init_image`` where it is black, and a blend where it is gray (an RGB image).

        With ``crop_coords`` (from ``get_crop_region``), ``image`` is the inpainted crop: it is resized to the
        box (``crop`` mode) and placed there on a black canvas of ``init_image``'s size first.
        """
        for value, what in ((mask, "mask"), (init_image, "init_image"), (image, "image")):
            _require_pil(value, f"apply_overlay's {what}")
        if mask.size != init_image.size:
            raise ImageInputError(
                f"apply_overlay expects a mask the size of init_image ({init_image.width}x{init_image.height}), "
                f"got {mask.width}x{mask.height}"
            )
        width, height = init_image.width, init_image.height
        original = PIL.Image.new("RGBa", (width, height))  # premultiplied alpha: the original where kept
        original.paste(init_image.convert("RGBA").convert("RGBa"), (0, 0), PIL.ImageOps.invert(mask.convert("L")))
        original = original.convert("RGBA")
        if crop_coords is not None:
            x1, y1, x2, y2 = crop_coords
            canvas = PIL.Image.new("RGBA", (width, height))
            canvas.paste(self.resize(image, height=y2 - y1, width=x2 - x1, resize_mode="crop"), (x1, y1))
            image = canvas.convert("RGB")
        image = image.convert("RGBA")
        image.alpha_composite(original)
        return image.convert("RGB")

    # ------------------------------------------------------------------ sizes
    def get_default_height_width(
        self, image: PIL.Image.Image | np.ndarray | torch.Tensor, height: int | None = None, width: int | None = None
    ) -> tuple[int, int]:
        """``(height, width)``: the given values, or the image's own, rounded down to ``vae_scale_factor``.

        The image is read as a PIL image, a numpy batch ``(B, H, W[, C])`` or a torch batch ``(B, C, H, W)``.
        """
        if height is None or width is None:
            if isinstance(image, PIL.Image.Image):
                own = image.height, image.width
            elif isinstance(image, torch.Tensor) and image.ndim == 4:
                own = image.shape[2], image.shape[3]
            elif isinstance(image, np.ndarray) and image.ndim in (3, 4):
                own = image.shape[1], image.shape[2]
            else:
                raise ImageInputError(
                    "get_default_height_width expects a PIL image, a (B, H, W[, C]) numpy array or a "
                    f"(B, C, H, W) torch.Tensor, got {_kind(image)}"
                )
            height = own[0] if height is None else height
            width = own[1] if width is None else width
        factor = self.config.vae_scale_factor
        if not factor:
            raise ImageInputError(f"vae_scale_factor must be a positive integer, got {factor!r}")
        return height - height % factor, width - width % factor

    def _pil_filter(self) -> int:
        """The PIL filter named by ``resample``."""
        name = self.config.resample
        if name not in RESAMPLE_FILTERS:
            raise ImageInputError(f"resample must be one of {', '.join(RESAMPLE_FILTERS)}, got {name!r}")
        return RESAMPLE_FILTERS[name]

    def resize(
        self,
        image: PIL.Image.Image | np.ndarray | torch.Tensor,
        height: int,
        width: int,
        resize_mode: str = "default",
    ) -> PIL.Image.Image | np.ndarray | torch.Tensor:
        """The image at ``width`` x ``height``, of the same kind.

        ``resize_mode``: ``default`` stretches to the size; ``fill`` (PIL only) fits the image inside, centred,
        and fills the margins by stretching its edge rows or columns; ``crop`` (PIL only) covers the size,
        centred, and cuts what overflows. ``fill`` and ``crop`` give RGB images. PIL images use the
        ``resample`` filter; ``(B, C, H, W)`` tensors and ``(B, H, W[, C])`` arrays use nearest-neighbour
        interpolation (arrays come back as float32 ``(B, H, W, C)``).
        """
        _check_resize_mode(resize_mode)
        if resize_mode != "default" and not isinstance(image, PIL.Image.Image):
            raise ImageInputError(f"resize_mode {resize_mode!r} works on PIL images only, got {_kind(image)}")
        height, width = _positive_int(height, "resize's height"), _positive_int(width, "resize's width")
        if isinstance(image, PIL.Image.Image):
            if resize_mode == "fill":
                return self._resize_and_fill(image, width, height)
            if resize_mode == "crop":
                return self._resize_and_crop(image, width, height)
            return image.resize((width, height), resample=self._pil_filter(), reducing_gap=self.config.reducing_gap)
        if isinstance(image, torch.Tensor):
            if image.ndim != 4:
                raise ImageInputError(f"resize expects a torch.Tensor of shape (B, C, H, W), got {_kind(image)}")
            return F.interpolate(image, size=(height, width))
        if isinstance(image, np.ndarray):
            return self.pt_to_numpy(F.interpolate(self.numpy_to_pt(image), size=(height, width)))
        raise ImageInputError(f"resize expects a PIL image, a numpy array or a torch.Tensor, got {_kind(image)}")

    def _resize_and_fill(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        """Fit the image inside width x height (aspect ratio kept), centre it, and fill the two margins by
        stretching the image's first and last rows (or columns) across them."""
        fit_width, fit_height = _fitted_size(image.width, image.height, width, height, cover=False)
        fitted = image.resize((fit_width, fit_height), resample=self._pil_filter())
        result = PIL.Image.new("RGB", (width, height))
        left, top = width // 2 - fit_width // 2, height // 2 - fit_height // 2
        result.paste(fitted, box=(left, top))
        if fit_height < height and top > 0:
            result.paste(fitted.resize((width, top), box=(0, 0, width, 0)), box=(0, 0))
            result.paste(fitted.resize((width, top), box=(0, fit_height, width, fit_height)), box=(0, top + fit_height))
        elif fit_width < width and left > 0:
            result.paste(fitted.resize((left, height), box=(0, 0, 0, height)), box=(0, 0))
            result.paste(
                fitted.resize((left, height), box=(fit_width, 0, fit_width, height)), box=(left + fit_width, 0)
            )
        return result

    def _resize_and_crop(self, image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
        """Scale the image to cover width x height (aspect ratio kept), centre it, and cut what overflows."""
        cover_width, cover_height = _fitted_size(image.width, image.height, width, height, cover=True)
        covering = image.resize((cover_width, cover_height), resample=self._pil_filter())
        result = PIL.Image.new("RGB", (width, height))
        result.paste(covering, box=(width // 2 - cover_width // 2, height // 2 - cover_height // 2))
        return result

    # ------------------------------------------------------------------ preprocess
    def preprocess(
        self,
        image: PipelineImageInput,
        height: int | None = None,
        width: int | None = None,
        resize_mode: str = "default",
        crops_coords: tuple[int, int, int, int] | None = None,
    ) -> torch.Tensor:
        """Image(s) -> a ``(B, C, H, W)`` tensor for the VAE.

        ``image``: a PIL image, a numpy array (``(H, W)``, ``(H, W, C)``, ``(B, H, W, C)``), a torch tensor
        (``(C, H, W)``, ``(B, C, H, W)``), or a list of one kind. PIL images are cropped to ``crops_coords``
        (one ``(left, top, right, bottom)`` box for all), resized with ``resize_mode``, converted (RGB or
        grayscale) and scaled to ``[0, 1]``; arrays and tensors are taken as ``[0, 1]`` already and resized
        with nearest-neighbour interpolation (``crops_coords`` and ``fill``/``crop`` do not apply to them).
        The size is ``height`` x ``width`` when given, else the first image's, rounded down to
        ``vae_scale_factor`` (only with ``do_resize``). Then, per the config: normalized to ``[-1, 1]`` (skipped,
        with a FutureWarning, when the values are already negative) and binarized. A torch batch with
        ``vae_latent_channels`` channels is taken as latents and returned as it is.
        """
        _check_resize_mode(resize_mode)
        images = self._as_image_list(image)
        if isinstance(images[0], PIL.Image.Image):
            batch = self._pil_batch(images, height, width, resize_mode, crops_coords)
        else:
            ignored = [f"crops_coords={crops_coords!r}"] * (crops_coords is not None)
            ignored += [f"resize_mode={resize_mode!r}"] * (resize_mode != "default")
            if ignored:
                warnings.warn(
                    f"preprocess: {' and '.join(ignored)} apply to PIL images only and are ignored for "
                    f"{type(images[0]).__name__} inputs (as in the reference)",
                    UserWarning,
                    stacklevel=2,
                )
            batch = self._array_batch(images)
            if isinstance(images[0], torch.Tensor) and batch.shape[1] == self.config.vae_latent_channels:
                return batch  # latents: nothing to do
            if self.config.do_resize:
                batch = self.resize(batch, *self.get_default_height_width(batch, height, width))
        return self._normalize_and_binarize(batch)

    def _as_image_list(self, image) -> list:
        """The input as a non-empty list of PIL images, or of numpy arrays / tensors (one kind per list)."""
        if self.config.do_convert_grayscale and isinstance(image, _ARRAY_TYPES) and image.ndim == 3:
            # a grayscale processor reads a 3-D input as a batch of single-channel images
            if isinstance(image, torch.Tensor):
                image = image.unsqueeze(1)
            else:
                image = image[None] if image.shape[-1] == 1 else image[..., None]
        for array_type in _ARRAY_TYPES:
            if isinstance(image, list) and image and all(isinstance(i, array_type) and i.ndim == 4 for i in image):
                warnings.warn(
                    f"passing a list of 4-D {array_type.__module__}.{array_type.__name__} batches is deprecated; "
                    "concatenate them along the batch dimension and pass one 4-D batch",
                    FutureWarning,
                    stacklevel=3,
                )
                return image  # _array_batch concatenates the batches (after checking their shapes)
        expected = (
            "a PIL image, a numpy array ((H, W), (H, W, C) or (B, H, W, C)), a torch.Tensor ((C, H, W) or "
            "(B, C, H, W)), or a list of PIL images, of 2-D/3-D arrays or of 3-D tensors"
        )
        if is_valid_image_imagelist(image) and not isinstance(image, list):
            return [image]
        if not isinstance(image, list):
            raise ImageInputError(f"preprocess expects {expected}; got {_kind(image)}")
        if not image:
            raise ImageInputError(f"preprocess expects {expected}; got an empty list")
        kinds = {next((t for t in (PIL.Image.Image, *_ARRAY_TYPES) if isinstance(i, t)), type(i)) for i in image}
        if len(kinds) > 1 or not is_valid_image_imagelist(image):
            found = ", ".join(_kind(i) for i in image[:4]) + (", ..." if len(image) > 4 else "")
            raise ImageInputError(f"preprocess expects {expected}; got a list of {found}")
        return image

    def _pil_batch(self, images: list, height, width, resize_mode: str, crops_coords) -> torch.Tensor:
        """PIL images -> ``(B, C, H, W)`` tensor in ``[0, 1]``: cropped, resized, converted, scaled."""
        if crops_coords is not None:
            if not isinstance(crops_coords, (tuple, list)) or len(crops_coords) != 4:
                raise ImageInputError(
                    f"crops_coords must be one (left, top, right, bottom) box for all images, got {crops_coords!r}"
                )
            left, top, right, bottom = crops_coords
            if right <= left or bottom <= top:
                raise ImageInputError(
                    f"crops_coords must be (left, top, right, bottom) with right > left and bottom > top, "
                    f"got {crops_coords!r}"
                )
            images = [image.crop(tuple(crops_coords)) for image in images]
        if self.config.do_resize:
            height, width = self.get_default_height_width(images[0], height, width)
            images = [self.resize(image, height, width, resize_mode=resize_mode) for image in images]
        if self.config.do_convert_rgb:
            images = [self.convert_to_rgb(image) for image in images]
        elif self.config.do_convert_grayscale:
            images = [self.convert_to_grayscale(image) for image in images]
        return self.numpy_to_pt(self.pil_to_numpy(images))

    def _array_batch(self, images: list) -> torch.Tensor:
        """Numpy arrays or tensors -> one ``(B, C, H, W)`` tensor (values and dtype as given)."""
        batched = []
        for image in images:
            if image.ndim == 2 and isinstance(image, torch.Tensor) and not self.config.do_convert_grayscale:
                raise ImageInputError(
                    f"preprocess expects a torch image of shape (C, H, W) or (B, C, H, W), got {_kind(image)}; "
                    "add the channel dimension (image[None])"
                )
            if image.ndim == 2:
                image = image[None, None] if isinstance(image, torch.Tensor) else image[None, ..., None]
            elif image.ndim == 3:
                image = image[None]
            batched.append(image)
        shapes = {tuple(image.shape[1:]) for image in batched}
        if len(shapes) > 1:
            raise ImageInputError(f"preprocess: the images of a list must have one shape, got {sorted(shapes)}")
        if isinstance(batched[0], torch.Tensor):
            batch = torch.cat(batched, dim=0)
        else:
            batch = self.numpy_to_pt(np.concatenate(batched, axis=0))
        if batch.shape[0] == 0:
            raise ImageInputError(f"preprocess got an empty batch ({_kind(images[0])})")
        return batch

    def _normalize_and_binarize(self, batch: torch.Tensor) -> torch.Tensor:
        """Apply ``do_normalize`` (unless the values are already in ``[-1, 1]``) and then ``do_binarize``."""
        do_normalize = self.config.do_normalize
        if do_normalize and batch.min() < 0:
            warnings.warn(
                "preprocess: the image has negative values, so it is taken as already normalized to [-1, 1] and "
                f"left as it is (values in [{batch.min().item()}, {batch.max().item()}]); passing [-1, 1] images "
                "is deprecated: pass numpy arrays and torch tensors in [0, 1]",
                FutureWarning,
                stacklevel=3,
            )
            do_normalize = False
        if do_normalize:
            batch = self.normalize(batch)
        if self.config.do_binarize:
            batch = self.binarize(batch)
        return batch

    # ------------------------------------------------------------------ postprocess
    def _denormalize_conditionally(
        self, images: torch.Tensor, do_denormalize: Sequence[bool] | None = None
    ) -> torch.Tensor:
        """Denormalize the whole batch (``do_denormalize=None``: when the processor normalizes), or each
        image ``i`` for which ``do_denormalize[i]`` is true."""
        if do_denormalize is None:
            return self.denormalize(images) if self.config.do_normalize else images
        if isinstance(do_denormalize, (bool, str)) or not hasattr(do_denormalize, "__getitem__"):
            raise ImageInputError(
                f"do_denormalize must be a list of booleans, one per image, got {type(do_denormalize).__name__}"
            )
        if images.ndim == 0 or len(do_denormalize) < images.shape[0]:
            raise ImageInputError(
                f"do_denormalize must have one value per image: got {len(do_denormalize)} for {_kind(images)}"
            )
        return torch.stack(
            [self.denormalize(images[i]) if do_denormalize[i] else images[i] for i in range(images.shape[0])]
        )

    def postprocess(
        self, image: torch.Tensor, output_type: str = "pil", do_denormalize: list[bool] | None = None
    ) -> PIL.Image.Image | np.ndarray | torch.Tensor:
        """A decoded ``(B, C, H, W)`` tensor -> ``output_type``.

        ``latent``: the tensor as it is; ``pt``: the tensor in ``[0, 1]``; ``np``: a float32 ``(B, H, W, C)``
        array; ``pil``: a list of PIL images. ``do_denormalize`` (one boolean per image) says which images to
        map from ``[-1, 1]`` to ``[0, 1]``; by default all of them when the processor normalizes. An unknown
        ``output_type`` gives ``np`` with a FutureWarning, as in the reference.
        """
        if not isinstance(image, torch.Tensor):
            raise ImageInputError(f"postprocess expects a torch.Tensor of shape (B, C, H, W), got {_kind(image)}")
        if output_type not in OUTPUT_TYPES:
            warnings.warn(
                f"postprocess: output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}; returning 'np'. "
                "Unknown output types are deprecated",
                FutureWarning,
                stacklevel=2,
            )
            output_type = "np"
        if output_type == "latent":
            return image
        if output_type != "pt" and image.ndim != 4:
            raise ImageInputError(
                f"postprocess to {output_type!r} expects a tensor of shape (B, C, H, W), got {_kind(image)}"
            )
        image = self._denormalize_conditionally(image, do_denormalize)
        if output_type == "pt":
            return image
        array = self.pt_to_numpy(image)
        return array if output_type == "np" else self.numpy_to_pil(array)
