"""Images in and out: load_image, PIL <-> numpy <-> tensor, GIF/video export.

Tensors handed to models are ``(B, C, H, W)`` in ``[-1, 1]``; numpy images are ``(B, H, W, C)`` in
``[0, 1]``; PIL images are RGB.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from .errors import DiffpipeError

ImageInput = "PIL.Image.Image | np.ndarray | torch.Tensor | list"


class ImageLoadError(DiffpipeError, ValueError):
    """An image path, URL or object that cannot be turned into an RGB image."""


def load_image(image, *, timeout: float = 30.0, convert_method=None) -> PIL.Image.Image:
    """An RGB ``PIL.Image`` from a path, an http(s) URL, or a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(text, timeout=timeout) as response:  # follows redirects
                    data = io.BytesIO(response.read())
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise ImageLoadError(f"could not download the image {text}: {e}") from e
            source = text
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise ImageLoadError(f"no image file at {path} (expected a path, an http(s) URL or a PIL image)")
            data = path
            source = str(path)
        try:
            loaded = PIL.Image.open(data)
            loaded = PIL.ImageOps.exif_transpose(loaded)
        except (PIL.UnidentifiedImageError, OSError) as e:
            raise ImageLoadError(f"{source} is not an image PIL can read: {e}") from e
        image = loaded
    elif not isinstance(image, PIL.Image.Image):
        raise ImageLoadError(f"load_image expects a path, an http(s) URL or a PIL.Image, got {type(image).__name__}")
    if convert_method is not None:
        return convert_method(image)
    return image.convert("RGB")


import PIL.ImageOps  # noqa: E402  (exif_transpose)


def numpy_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """``(B, H, W, C)`` floats in ``[0, 1]`` -> PIL images (rounded to the nearest 8-bit value)."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [PIL.Image.fromarray(im.squeeze(-1), mode="L") for im in images]
    return [PIL.Image.fromarray(im) for im in images]


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def make_image_grid(images: list, rows: int, cols: int, resize: int | None = None) -> PIL.Image.Image:
    """One RGB image of ``rows`` x ``cols`` cells filled row by row; each cell is the size of the first
    image (``resize``: every image scaled to ``resize`` x ``resize`` first)."""
    if len(images) != rows * cols:
        raise ValueError(f"make_image_grid: {len(images)} images do not fill {rows} rows x {cols} columns")
    if resize is not None:
        images = [image.resize((resize, resize)) for image in images]
    width, height = images[0].size
    grid = PIL.Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        row, col = divmod(i, cols)
        grid.paste(image, (col * width, row * height))
    return grid


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")


def postprocess(images: torch.Tensor, output_type: str = "pil", do_denormalize: Sequence[bool] | None = None):
    """Decoded ``(B, C, H, W)`` in ``[-1, 1]`` -> ``output_type`` (``pil``, ``np``, ``pt``, ``latent``)."""
    check_output_type(output_type)
    if output_type == "latent":
        return images
    if do_denormalize is None:
        do_denormalize = [True] * images.shape[0]
    images = torch.stack([(im * 0.5 + 0.5).clamp(0, 1) if d else im for im, d in zip(images, do_denormalize)])
    if output_type == "pt":
        return images
    array = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return array if output_type == "np" else numpy_to_pil(array)


def default_size(image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """The image's size rounded down to ``multiple``, unless height/width are given."""
    if isinstance(image, PIL.Image.Image):
        h, w = image.height, image.width
    elif isinstance(image, torch.Tensor):
        h, w = image.shape[-2:]
    else:
        h, w = image.shape[-3:-1] if image.ndim >= 3 and image.shape[-1] in (1, 3, 4) else image.shape[-2:]
    height = height if height is not None else h
    width = width if width is not None else w
    return height - height % multiple, width - width % multiple


def preprocess(
    image,
    *,
    height: int | None = None,
    width: int | None = None,
    multiple: int = 8,
    resample: str = "lanczos",
    normalize: bool = True,
    what: str = "image",
) -> torch.Tensor:
    """PIL / numpy / tensor image(s) -> ``(B, C, H, W)`` float tensor in ``[-1, 1]`` (or ``[0, 1]``)."""
    images = image if isinstance(image, list) else [image]
    if not images:
        raise ValueError(f"{what}: got an empty list")
    first = images[0]
    if isinstance(first, PIL.Image.Image):
        if not all(isinstance(i, PIL.Image.Image) for i in images):
            raise TypeError(f"{what}: a list must hold images of one type")
        height, width = default_size(first, height, width, multiple)
        filt = {
            "lanczos": PIL.Image.LANCZOS,
            "bilinear": PIL.Image.BILINEAR,
            "bicubic": PIL.Image.BICUBIC,
            "nearest": PIL.Image.NEAREST,
        }[resample]
        arrays = [
            np.asarray(i.convert("RGB").resize((width, height), resample=filt)).astype(np.float32) / 255.0
            for i in images
        ]
        tensor = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2))
    elif isinstance(first, np.ndarray):
        array = np.concatenate([i[None] if i.ndim == 3 else i for i in images], axis=0).astype(np.float32)
        if array.max() > 1.0 + 1e-6:
            array = array / 255.0
        tensor = torch.from_numpy(array.transpose(0, 3, 1, 2))
        tensor = _resize_tensor(tensor, height, width, multiple)
    elif isinstance(first, torch.Tensor):
        tensor = torch.cat([i[None] if i.ndim == 3 else i for i in images], dim=0)
        if tensor.min() < 0:  # already in [-1, 1]
            normalize = False
        tensor = _resize_tensor(tensor.float(), height, width, multiple)
    else:
        raise TypeError(
            f"{what} must be a PIL.Image, a numpy array, a torch.Tensor or a list of them, got {type(first).__name__}"
        )
    return 2.0 * tensor - 1.0 if normalize else tensor


def _resize_tensor(tensor: torch.Tensor, height, width, multiple) -> torch.Tensor:
    h, w = default_size(tensor, height, width, multiple)
    if (h, w) != tuple(tensor.shape[-2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False)
    return tensor


def _frames_as_pil(frames, what: str) -> list[PIL.Image.Image]:
    """One video's frames (PIL images, ``[H, W, C]`` arrays in ``[0, 1]`` or uint8, or one
    ``[F, H, W, C]`` array) as PIL images."""
    if isinstance(frames, np.ndarray) and frames.ndim == 4:
        frames = list(frames)
    if isinstance(frames, PIL.Image.Image) or not isinstance(frames, (list, tuple)) or not frames:
        raise TypeError(
            f"{what} takes one video: a non-empty list of frames (PIL images or arrays), got {type(frames).__name__}"
        )
    if isinstance(frames[0], (list, tuple)):
        raise TypeError(
            f"{what} takes one video, got a list of {len(frames)} videos; pass one of them "
            "(pipeline output `.frames[0]`)"
        )
    out = []
    for f in frames:
        if isinstance(f, PIL.Image.Image):
            out.append(f)
            continue
        array = np.asarray(f)
        if array.ndim != 3:
            raise TypeError(f"{what}: a frame must be a PIL image or an [H, W, C] array, got shape {array.shape}")
        out.append(PIL.Image.fromarray(array) if array.dtype == np.uint8 else numpy_to_pil(array)[0])
    return out


def _output_path(path, suffix: str) -> str:
    if path is None:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=suffix, delete=False) as f:
            return f.name
    return os.fspath(path)


def export_to_gif(frames: list, path: str | os.PathLike | None = None, fps: int = 10) -> str:
    """Write one video's frames as a looping GIF (``fps`` frames a second); returns the path (a
    temporary file when ``path`` is None)."""
    images = _frames_as_pil(frames, "export_to_gif")
    path = _output_path(path, ".gif")
    images[0].save(path, save_all=True, append_images=images[1:], optimize=False, duration=int(1000 / fps), loop=0)
    return path


def export_to_video(
    frames: list,
    path: str | os.PathLike | None = None,
    fps: int = 10,
    quality: float | None = 5.0,
    bitrate: int | None = None,
    macro_block_size: int | None = 16,
) -> str:
    """Write one video's frames as an MP4 (H.264 through imageio's ffmpeg plugin); returns the path.

    Needs the optional ``video`` extra (``pip install "diffpipe[video]"``: imageio and imageio-ffmpeg).
    ``quality`` (0-10), ``bitrate`` and ``macro_block_size`` (sizes not divisible by it are padded up)
    are imageio's.
    """
    try:
        import imageio
        import imageio_ffmpeg  # noqa: F401  (imageio's ffmpeg plugin runs its bundled ffmpeg)
    except ImportError as e:
        raise ImportError(
            f"export_to_video needs imageio and imageio-ffmpeg ({e}); install them with "
            '`pip install "diffpipe[video]"` (or `pip install imageio imageio-ffmpeg`), or use export_to_gif'
        ) from e
    images = [np.asarray(im.convert("RGB")) for im in _frames_as_pil(frames, "export_to_video")]
    path = _output_path(path, ".mp4")
    with imageio.get_writer(path, fps=fps, quality=quality, bitrate=bitrate, macro_block_size=macro_block_size) as w:
        for image in images:
            w.append_data(image)
    return path


def preprocess_mask(mask, *, height: int, width: int, multiple: int = 8, resample: str = "lanczos") -> torch.Tensor:
    """Mask image(s) -> ``(B, 1, H, W)`` float tensor of 0 (keep) and 1 (repaint).

    PIL masks are read as luminance; arrays and tensors may be ``(H, W)``, ``(B, H, W)``,
    ``(H, W, 1)`` / ``(B, H, W, 1)`` (numpy) or ``(B, 1, H, W)`` (torch) in ``[0, 1]``.
    """
    masks = mask if isinstance(mask, list) else [mask]
    if not masks:
        raise ValueError("mask_image: got an empty list")
    first = masks[0]
    if isinstance(first, PIL.Image.Image):
        filt = {"lanczos": PIL.Image.LANCZOS, "bilinear": PIL.Image.BILINEAR, "nearest": PIL.Image.NEAREST}[resample]
        arrays = [
            np.asarray(m.convert("L").resize((width, height), resample=filt)).astype(np.float32) / 255.0 for m in masks
        ]
        tensor = torch.from_numpy(np.stack(arrays))[:, None]
    elif isinstance(first, np.ndarray):
        parts = []
        for m in masks:
            m = m.astype(np.float32)
            if m.ndim == 3 and m.shape[-1] == 1:
                m = m[..., 0]
            if m.ndim == 2:
                m = m[None]
            if m.ndim == 4 and m.shape[-1] == 1:
                m = m[..., 0]
            parts.append(m)
        tensor = torch.from_numpy(np.concatenate(parts))[:, None]
        tensor = _resize_tensor(tensor, height, width, multiple)
    elif isinstance(first, torch.Tensor):
        parts = []
        for m in masks:
            m = m.float()
            if m.ndim == 2:
                m = m[None, None]
            elif m.ndim == 3:
                m = m[:, None] if m.shape[0] != 1 else m[None]
            parts.append(m)
        tensor = _resize_tensor(torch.cat(parts), height, width, multiple)
    else:
        raise TypeError(
            "mask_image must be a PIL.Image, a numpy array, a torch.Tensor or a list of them, "
            f"got {type(first).__name__}"
        )
    return (tensor >= 0.5).to(torch.float32)


def parse_image_size(value) -> tuple[int, int]:
    """An image size as people write it, ``"WIDTHxHEIGHT"``, ``"N"`` or ``N``, -> (height, width).
    A ValueError for anything else; the caller checks the range it needs."""
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value, value
        if isinstance(value, str) and "x" in value.lower():
            w, h = (int(p) for p in value.lower().split("x"))
            return h, w
        if isinstance(value, str):
            return int(value), int(value)
        raise ValueError
    except ValueError:
        raise ValueError(f"size must be N or WIDTHxHEIGHT, got {value!r}") from None
