"""What clients send, and how it becomes one :class:`Generation`: the OpenAI images bodies, the job
body, and A1111's txt2img/img2img payloads, each checked against the server's limits.

Unknown fields are refused with a 400 that names them (and the closest known name), so a typo never
silently falls back to a default. A1111 clients send many fields of A1111's own features; the ones
that change nothing here are accepted, and the ones that would change the image (hires fix, face
restoration, scripts...) are refused when they ask for something, rather than ignored.
"""

from __future__ import annotations

import difflib
import random
from dataclasses import dataclass

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ..images import parse_image_size
from .settings import Settings

DEFAULT_STEPS = 30
MAX_SEED = 2**63 - 1

# OpenAI fields with no meaning for a local model: accepted, no effect.
OPENAI_NO_EFFECT = {"quality", "style", "user", "moderation", "background", "output_compression"}
# A1111 fields accepted with no effect (saving on the server, sampler noise knobs, UI bookkeeping).
A1111_NO_EFFECT = {
    "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples", "do_not_save_grid", "eta",
    "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings_restore_afterwards",
    "refiner_switch_at", "disable_extra_networks", "comments", "firstphase_width", "firstphase_height",
    "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
    "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "force_task_id", "script_args",
    "send_images", "save_images", "infotext", "subseed", "firstpass_image", "denoising_strength",
    "resize_mode", "image_cfg_scale", "mask_blur", "mask_blur_x", "mask_blur_y", "mask_round",
    "inpainting_fill", "inpaint_full_res_padding", "initial_noise_multiplier", "include_init_images",
    "latent_mask", "inpaint_full_res",
}  # fmt: skip
# A1111 features this server does not have: accepted only while they ask for nothing.
A1111_UNSUPPORTED = {
    "enable_hr": "the hires fix",
    "restore_faces": "face restoration",
    "tiling": "tiling",
    "styles": "prompt styles",
    "script_name": "scripts",
    "alwayson_scripts": "scripts",
    "override_settings": "per-request settings",
    "refiner_checkpoint": "a refiner checkpoint",
    "subseed_strength": "variation seeds",
    "scheduler": "A1111 schedule types (use sampler_name)",
}


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str
    n: int = 1
    size: str = "512x512"
    response_format: str = "b64_json"
    output_format: str = "png"
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None  # a scheduler class name or an A1111 sampler name
    model: str | None = None


class JobRequest(OpenAIImageRequest):
    """``POST /jobs``: a generation, and optionally an image (base64 or a data URL) to start from."""

    image: str | None = None
    mask: str | None = None  # white: repaint
    strength: float | None = None


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None
    options: dict = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None  # white: repaint
    inpainting_mask_invert: int = 0  # 1: black is repainted
    denoising_strength: float = 0.75


@dataclass
class Generation:
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float | None
    seed: int
    n: int
    sampler: str | None = None
    image: object = None  # a PIL image: image-to-image (inpainting with ``mask``)
    mask: object = None
    strength: float = 0.75


# ------------------------------------------------------------------------------------ checks
def refuse_unknown(body: BaseModel, no_effect: set[str], unsupported: dict[str, str] | None = None) -> None:
    """A 400 for a field the model does not declare, unless it has no effect here (or asks for nothing)."""
    known = sorted(set(type(body).model_fields) | no_effect | set(unsupported or {}))
    for name, value in (body.model_extra or {}).items():
        if name in no_effect:
            continue
        if unsupported and name in unsupported:
            if value in (None, False, 0, "", [], {}, "Automatic"):
                continue
            raise HTTPException(
                400, f"{name}={value!r} asks for {unsupported[name]}, which this server does not have; leave it out"
            )
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise HTTPException(400, f"unknown field {name!r}{hint}")


def parse_size(size: str) -> tuple[int, int]:
    """A request's ``size`` -> (width, height); a 400 naming the field otherwise."""
    try:
        height, width = parse_image_size(size)
    except ValueError:
        raise HTTPException(400, f"size must be WIDTHxHEIGHT, e.g. 512x512; got {size!r}") from None
    return width, height


def check_limits(gen: Generation, settings: Settings) -> None:
    if gen.width < 8 or gen.height < 8 or gen.width % 8 or gen.height % 8:
        raise HTTPException(
            400, f"width and height must be positive multiples of 8; got width={gen.width}, height={gen.height}"
        )
    if gen.width * gen.height > settings.max_pixels:
        raise HTTPException(
            400,
            f"width*height = {gen.width}x{gen.height} = {gen.width * gen.height} pixels is over the limit "
            f"max_pixels={settings.max_pixels}",
        )
    if not 1 <= gen.steps <= settings.max_steps:
        raise HTTPException(400, f"steps={gen.steps} must be between 1 and the limit max_steps={settings.max_steps}")
    if not 1 <= gen.n <= settings.max_n:
        raise HTTPException(400, f"n={gen.n} images must be between 1 and the limit max_n={settings.max_n}")
    if not 0 <= gen.seed <= MAX_SEED - gen.n:
        raise HTTPException(400, f"seed={gen.seed} must be -1 (random) or between 0 and {MAX_SEED - gen.n}")
    if gen.guidance_scale is not None and not 0 <= gen.guidance_scale <= 100:
        raise HTTPException(400, f"guidance_scale={gen.guidance_scale} must be between 0 and 100")
    if not 0.0 <= gen.strength <= 1.0:
        raise HTTPException(400, f"strength={gen.strength} must be between 0 and 1")


def random_seed() -> int:
    return random.randrange(2**32 - 1)


def decode_image(data: str | bytes, what: str):
    """A base64 string (optionally a ``data:`` URL) or raw bytes -> a PIL image; a 400 naming ``what``."""
    import base64
    import io

    import PIL.Image

    try:
        if isinstance(data, str):
            data = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=False)
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        return image
    except PIL.Image.UnidentifiedImageError:
        reason = f"{len(data)} bytes in no image format PIL knows"
    except Exception as e:  # truncated, bad base64, ...
        reason = f"{type(e).__name__}: {e}"
    raise HTTPException(400, f"the field {what!r} is not a readable image ({reason}); send a PNG, JPEG or WebP file")


def mask_from_alpha(mask):
    """OpenAI's edit mask: fully transparent pixels are the ones to repaint -> white there, black elsewhere."""
    if "A" in mask.getbands():
        alpha = mask.getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0).convert("L")
    return mask.convert("L")


# ------------------------------------------------------------------------------------ -> Generation
def openai_generation(body: OpenAIImageRequest, settings: Settings, served: str, **image) -> Generation:
    """An OpenAI images body as a Generation; ``served`` is the model name this server answers to."""
    refuse_unknown(body, OPENAI_NO_EFFECT)
    if body.model is not None and body.model != served:
        raise HTTPException(400, f"model={body.model!r}: this server serves one model, {served!r} (GET /v1/models)")
    if body.response_format != "b64_json":
        raise HTTPException(
            400, f"response_format={body.response_format!r} is not supported: use 'b64_json' (no 'url')"
        )
    if body.output_format != "png":
        raise HTTPException(400, f"output_format={body.output_format!r} is not supported: use 'png'")
    width, height = parse_size(body.size)
    return Generation(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        width=width,
        height=height,
        steps=body.steps if body.steps is not None else min(DEFAULT_STEPS, settings.max_steps),
        guidance_scale=body.guidance_scale,
        seed=body.seed if body.seed is not None and body.seed >= 0 else random_seed(),
        n=body.n,
        sampler=body.scheduler,
        **image,
    )


def job_generation(body: JobRequest, settings: Settings, served: str) -> Generation:
    image = {}
    if body.image:
        image["image"] = decode_image(body.image, "image")
        if body.mask:
            image["mask"] = decode_image(body.mask, "mask").convert("L")
        image["strength"] = body.strength if body.strength is not None else (1.0 if body.mask else 0.75)
    elif body.mask or body.strength is not None:
        raise HTTPException(400, "mask and strength need an image to start from (the field 'image')")
    return openai_generation(body, settings, served, **image)


def a1111_generation(body: Txt2ImgRequest, **image) -> Generation:
    """An A1111 request (txt2img, or img2img with ``image``/``mask``/``strength``) as a Generation."""
    refuse_unknown(body, A1111_NO_EFFECT, A1111_UNSUPPORTED)
    return Generation(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt or None,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=body.seed if body.seed >= 0 else random_seed(),
        n=body.batch_size * body.n_iter,
        sampler=body.sampler_name or body.sampler_index,
        **image,
    )
