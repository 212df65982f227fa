"""PNG files with their generation settings in a `parameters` text chunk, in A1111's format."""

from __future__ import annotations

import base64
import io


def infotext(
    prompt: str,
    negative_prompt: str | None,
    *,
    steps: int,
    sampler: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
) -> str:
    """``prompt\\nNegative prompt: ...\\nSteps: N, Sampler: X, CFG scale: G, Seed: S, Size: WxH, Model: M``."""
    lines = [prompt or ""]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(
        f"Steps: {steps}, Sampler: {sampler}, CFG scale: {cfg_scale:g}, Seed: {seed}, "
        f"Size: {width}x{height}, Model: {model}"
    )
    return "\n".join(lines)


def png_bytes(image, parameters: str) -> bytes:
    """``image`` (PIL) as PNG bytes with ``parameters`` in a tEXt chunk (iTXt when not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    try:
        parameters.encode("latin-1")
        info.add_text("parameters", parameters)
    except UnicodeEncodeError:
        info.add_itxt("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image, parameters: str) -> str:
    return base64.b64encode(png_bytes(image, parameters)).decode("ascii")


def read_parameters(data: bytes) -> str | None:
    """The `parameters` text of PNG ``data``, or None."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.info.get("parameters")
