"""Flux.1 image-to-image and inpainting: start from the encoded image, noised by flow matching
(``scheduler.scale_noise``) to the first step ``strength`` leaves; inpainting puts the image back
outside the mask after every step, noised to the next step's level."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..schedulers.base import randn
from . import stages
from .flux import (
    MAX_T5_LENGTH,
    FluxBase,
    FluxRequest,
    decode_images,
    encode_prompt_stage,
    image_ids,
    output,
    pack,
    set_flow_timesteps,
    transformer_call,
)
from .request import CallState
from .sd_img2img import tile_to_batch


def preprocess(pipe, request: FluxRequest, state: CallState) -> CallState:
    state.height, state.width = request.size(pipe)
    size = dict(height=state.height, width=state.width)
    state.pixels = pipe.image_processor.preprocess(request.image, **size).to(torch.float32)
    if pipe.task == "inpaint":
        state.mask_pixels = pipe.mask_processor.preprocess(request.mask_image, **size)
    return state


def strength_schedule(pipe, request: FluxRequest, state: CallState) -> CallState:
    """The shifted schedule for the image's token count, without its first ``1 - strength``."""
    factor = pipe.vae_scale_factor
    tokens = (state.height // factor // 2) * (state.width // factor // 2)
    timesteps, steps = set_flow_timesteps(pipe, request, state, tokens)
    kept = min(steps * request.strength, steps)
    start = int(max(steps - kept, 0))
    order = getattr(pipe.scheduler, "order", 1)
    if steps - start < 1:
        raise ValueError(
            f"strength={request.strength} with {request.num_inference_steps} steps leaves no denoising step; raise "
            "strength or num_inference_steps"
        )
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(start * order)
    state.timesteps, state.num_inference_steps = timesteps[start * order :], steps - start
    return state


def image_latents(pipe, request: FluxRequest, state: CallState) -> CallState:
    """The encoded image noised to the first timestep left, packed; the noise and the clean latents
    are kept for inpainting's blend."""
    batch, dtype, device = request.total, state.dtype, state.device
    channels = pipe.transformer.config.in_channels // 4
    clean = stages.encode_image_latents(pipe.vae, state.pixels, request.generator).to(device=device, dtype=dtype)
    clean = tile_to_batch(clean, batch, "images")
    h, w = clean.shape[-2:]
    state.ids = image_ids(h // 2, w // 2, device, dtype)
    noise = randn((batch, channels, h, w), generator=request.generator, device=device, dtype=dtype)
    if request.latents is not None:
        state.latents = request.latents.to(device=device, dtype=dtype)
    else:
        first = state.timesteps[:1].repeat(batch)
        state.latents = pack(pipe.scheduler.scale_noise(clean, first, noise))
    state.image_latents, state.noise = pack(clean), pack(noise)
    return state


def keep_outside_the_mask(pipe, request: FluxRequest, state: CallState) -> CallState:
    """After each step, the image (noised to the next step's level) where the mask is black."""
    channels = pipe.transformer.config.in_channels // 4
    h, w = state.height // pipe.vae_scale_factor, state.width // pipe.vae_scale_factor
    mask = F.interpolate(state.mask_pixels, size=(h, w)).to(device=state.device, dtype=state.dtype)
    mask = tile_to_batch(mask, request.total, "masks")
    mask = pack(mask.repeat(1, channels, 1, 1))
    timesteps, scheduler, clean, noise = state.timesteps, pipe.scheduler, state.image_latents, state.noise

    def blend(latents, i, t):
        proper = clean
        if i < len(timesteps) - 1:
            proper = scheduler.scale_noise(clean, torch.tensor([timesteps[i + 1]]), noise)
        return (1 - mask) * proper + mask * latents

    state.after_step = blend
    return state


class FluxImageBase(FluxBase):
    @property
    def mask_processor(self):
        from ..image_processor import VaeImageProcessor

        cache = self.__dict__.setdefault("_processors", {})
        key = ("mask", self.vae_scale_factor)
        if key not in cache:
            cache[key] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor * 2,
                vae_latent_channels=self.vae.config.latent_channels,
                do_normalize=False,
                do_binarize=True,
                do_convert_grayscale=True,
            )
        return cache[key]


class FluxImg2ImgPipeline(FluxImageBase):
    """Image to image with Flux.1."""

    task = "image"
    call_stages = (
        preprocess,
        encode_prompt_stage,
        strength_schedule,
        image_latents,
        transformer_call,
        stages.denoise,
        decode_images,
        output,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds=None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_T5_LENGTH,
    ):
        """Rework ``image`` toward the prompt; ``strength`` is how much of the schedule runs."""
        return self._generate(locals())


class FluxInpaintPipeline(FluxImageBase):
    """Inpainting with Flux.1: repaint the white part of ``mask_image``."""

    task = "inpaint"
    call_stages = (
        preprocess,
        encode_prompt_stage,
        strength_schedule,
        image_latents,
        keep_outside_the_mask,
        transformer_call,
        stages.denoise,
        decode_images,
        output,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.6,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds=None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_T5_LENGTH,
    ):
        """Repaint the white part of ``mask_image`` in ``image`` toward the prompt."""
        return self._generate(locals())
