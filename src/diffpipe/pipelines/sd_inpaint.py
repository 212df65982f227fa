"""Stable Diffusion inpainting: repaint the white part of a mask.

A 9-channel inpainting UNet sees the mask and the encoded masked image beside the latents; a plain
4-channel UNet is steered by putting the (re-noised) original latents back outside the mask after
every step.
"""

from __future__ import annotations

import torch

from .. import images as imgs
from ..schedulers.base import randn
from . import stages
from .request import CallState, SDRequest
from .sd_img2img import image_or_latents, strength_schedule, tile_to_batch
from .stable_diffusion import (
    StableDiffusionBase,
    decode_images,
    encode_prompt_stage,
    guidance_embedding,
    output,
)


# ---------------------------------------------------------------------------------------- stages
def preprocess_image_and_mask(pipe, request: SDRequest, state: CallState) -> CallState:
    state.height, state.width = request.size(pipe)
    if request.padding_mask_crop is not None:
        return _crop_around_the_mask(pipe, request, state)
    size = dict(height=state.height, width=state.width)
    state.pixels = image_or_latents(pipe, request.image, **size)  # latents: another pipeline's, as they are
    state.mask_pixels = imgs.preprocess_mask(request.mask_image, **size, multiple=pipe.vae_scale_factor)
    return state


def _crop_around_the_mask(pipe, request: SDRequest, state: CallState) -> CallState:
    """``padding_mask_crop``: repaint only the mask's bounding box (padded, at the output's aspect ratio),
    scaled to the output size; :func:`paste_into_the_image` puts the result back."""
    state.crop = pipe.mask_processor.get_crop_region(
        request.mask_image, state.width, state.height, pad=request.padding_mask_crop
    )
    crop = dict(height=state.height, width=state.width, crops_coords=state.crop, resize_mode="fill")
    state.pixels = pipe.image_processor.preprocess(request.image, **crop)
    state.mask_pixels = pipe.mask_processor.preprocess(request.mask_image, **crop)
    return state


def paste_into_the_image(pipe, request: SDRequest, state: CallState) -> CallState:
    """After ``padding_mask_crop``: each result pasted over the original image inside the mask."""
    if state.crop is not None:
        state.images = [
            pipe.image_processor.apply_overlay(request.mask_image, request.image, image, state.crop)
            for image in state.images
        ]
    return state


def _repaints_by_blending(pipe) -> bool:
    """A plain (4-channel) UNet keeps the unmasked part by blending after each step; a 9-channel
    inpainting UNet sees the mask and the masked image instead."""
    return pipe.unet.config.in_channels == pipe.vae.config.latent_channels


def _given_latents(pipe, pixels: torch.Tensor) -> bool:
    """Whether the call's image is latents already (another pipeline's ``output_type="latent"``)."""
    return pixels.shape[1] == pipe.vae.config.latent_channels


def _encode(pipe, pixels: torch.Tensor, generator) -> torch.Tensor:
    """Image(s) in ``[-1, 1]`` -> latents. With a list of generators, image ``i`` is encoded with
    generator ``i``: one image and a generator per output uses the first (as the reference does)."""
    if isinstance(generator, list):
        generator = generator[: pixels.shape[0]]
    return pipe._encode_image(pixels, generator)


def inpaint_latents(pipe, request: SDRequest, state: CallState, *, add_noise: bool = True) -> CallState:
    """Pure noise at full strength, else the image noised to the first timestep left; ``add_noise=False``
    (SDXL's ``denoising_start``): the image's latents as they are, continuing another pipeline's."""
    device, dtype, total = state.device, state.dtype, request.total
    full_strength = request.strength == 1.0
    factor = pipe.vae_scale_factor
    shape = (total, pipe.vae.config.latent_channels, state.height // factor, state.width // factor)
    if _repaints_by_blending(pipe) or (request.latents is None and not full_strength) or not add_noise:
        pixels = state.pixels.to(device=device, dtype=dtype)
        image_latents = pixels if _given_latents(pipe, pixels) else _encode(pipe, pixels, request.generator)
        state.image_latents = image_latents.to(dtype).repeat(total // image_latents.shape[0], 1, 1, 1)
    if not add_noise:
        state.noise = randn(shape, generator=request.generator, device=device, dtype=dtype)  # for the blend
        state.latents = state.image_latents
    elif request.latents is None:
        state.noise = randn(shape, generator=request.generator, device=device, dtype=dtype)
        if full_strength:
            state.latents = state.noise * pipe.scheduler.init_noise_sigma
        else:
            state.latents = pipe.scheduler.add_noise(
                state.image_latents, state.noise, state.timesteps[:1].repeat(total)
            )
    else:
        state.noise = request.latents.to(device)
        state.latents = state.noise * pipe.scheduler.init_noise_sigma
    return state


def inpaint_conditions(pipe, request: SDRequest, state: CallState) -> CallState:
    """The mask at latent size and the encoded masked image (guidance-batched, for the UNet and the
    callbacks); a plain UNet instead puts the re-noised original back outside the mask after each step."""
    device, dtype, total = state.device, state.dtype, request.total
    factor = pipe.vae_scale_factor
    mask = torch.nn.functional.interpolate(state.mask_pixels, size=(state.height // factor, state.width // factor))
    mask = tile_to_batch(mask.to(device=device, dtype=dtype), total, "masks")
    masked_image_latents = request.masked_image_latents
    if masked_image_latents is None and not _given_latents(pipe, state.pixels):
        masked = (state.pixels * (state.mask_pixels < 0.5)).to(device=device, dtype=dtype)
        masked_image_latents = _encode(pipe, masked, request.generator)
    state.tensors["mask"] = state.guidance.batch(mask)
    if masked_image_latents is not None:
        masked_image_latents = tile_to_batch(masked_image_latents.to(device=device, dtype=dtype), total, "images")
        state.tensors["masked_image_latents"] = state.guidance.batch(masked_image_latents)
    if getattr(pipe.vae, "decodes_with_mask", False):  # AsymmetricAutoencoderKL keeps the unmasked pixels
        state.decode_kwargs = {
            "image": tile_to_batch(state.pixels.to(device=device, dtype=dtype), total, "images"),
            "mask": tile_to_batch(state.mask_pixels.to(device=device, dtype=dtype), total, "masks"),
        }
    if not _repaints_by_blending(pipe):
        state.concat = ("mask", "masked_image_latents")
        return state
    steps, scheduler, original, noise = state.timesteps, pipe.scheduler, state.image_latents, state.noise
    tensors = state.tensors

    def keep_unmasked(latents, i, t):
        kept = original
        if i < len(steps) - 1:
            kept = scheduler.add_noise(original, noise, torch.tensor([steps[i + 1]]))
        # the mask as the loop holds it now (a step-end callback may have replaced it), unbatched
        current = tensors["mask"][: latents.shape[0]]
        return (1 - current) * kept + current * latents

    state.after_step = keep_unmasked
    return state


class StableDiffusionInpaintPipeline(StableDiffusionBase):
    """Inpainting with Stable Diffusion 1.x / 2.x (9-channel inpainting UNets and plain ones)."""

    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    task = "inpaint"
    call_stages = (
        preprocess_image_and_mask,
        encode_prompt_stage,
        strength_schedule,
        inpaint_latents,
        inpaint_conditions,
        guidance_embedding,
        stages.denoise,
        decode_images,
        paste_into_the_image,
        output,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        return self._generate(locals())
