"""Stable Diffusion image-to-image: start from the encoded image, noised to ``strength``."""

from __future__ import annotations

import torch

from .. import images as imgs
from ..schedulers.base import randn
from . import stages
from .request import CallState, SDRequest
from .stable_diffusion import DENOISE_AND_DECODE, StableDiffusionBase, encode_prompt_stage


def strength_timesteps(scheduler, num_inference_steps: int, strength: float, device, timesteps=None, sigmas=None):
    """Set the schedule, then skip its first ``1 - strength``: (timesteps left, steps left)."""
    stages.set_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    if timesteps is not None or sigmas is not None:
        num_inference_steps = len(scheduler.timesteps)
    kept = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - kept, 0)
    order = getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start * order)
    if num_inference_steps - start < 1:
        raise ValueError(
            f"strength={strength} with {num_inference_steps} steps leaves no denoising step; raise strength or "
            "num_inference_steps"
        )
    return scheduler.timesteps[start * order :], num_inference_steps - start


def image_or_latents(pipeline, image, *, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The image as a (B, C, H, W) tensor in ``[-1, 1]``; a tensor with the VAE's latent channels is
    taken as latents and handed on as it is (another pipeline's ``output_type="latent"``)."""
    if torch.is_tensor(image) and image.ndim == 4 and image.shape[1] == pipeline.vae.config.latent_channels:
        return image
    return imgs.preprocess(image, height=height, width=width, multiple=pipeline.vae_scale_factor, what="image")


def tile_to_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat a batch of images/latents (whole-batch tiling, as the reference does) up to ``batch``."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot spread {x.shape[0]} {what} over {batch} outputs; pass 1 or {batch} of them")
    return torch.cat([x] * (batch // x.shape[0]), dim=0)


def noised_image_latents(
    pipeline, image: torch.Tensor, timestep, *, batch: int, generator, device, dtype, add_noise: bool = True
):
    """Encode ``image`` (already a (B, C, H, W) tensor) and noise it to ``timestep`` (unless ``add_noise``
    is off: a refiner continuing from another pipeline's partly denoised latents)."""
    image = image.to(device=device, dtype=dtype)
    if image.shape[1] == pipeline.unet.config.in_channels and image.shape[1] != 3:
        latents = image  # already latents
    else:
        if isinstance(generator, list):
            image = tile_to_batch(image, batch, "images")
        latents = pipeline._encode_image(image, generator).to(dtype)
    latents = tile_to_batch(latents, batch, "images")
    if not add_noise:
        return latents
    noise = randn(latents.shape, generator=generator, device=device, dtype=dtype)
    return pipeline.scheduler.add_noise(latents, noise, timestep.repeat(batch))


# ---------------------------------------------------------------------------------------- stages
def preprocess_image(pipe, request: SDRequest, state: CallState) -> CallState:
    state.pixels = image_or_latents(pipe, request.image, height=request.height, width=request.width)
    return state


def strength_schedule(pipe, request: SDRequest, state: CallState) -> CallState:
    """The schedule without its first ``1 - strength`` (the image gives the start)."""
    state.timesteps, state.num_inference_steps = strength_timesteps(
        pipe.scheduler, request.num_inference_steps, request.strength, state.device, request.timesteps, request.sigmas
    )
    return state


def image_latents(pipe, request: SDRequest, state: CallState, *, add_noise: bool = True) -> CallState:
    """The encoded image noised to the first timestep left (``add_noise=False``: as it is)."""
    state.latents = noised_image_latents(
        pipe,
        state.pixels,
        state.timesteps[:1],
        batch=request.total,
        generator=request.generator,
        device=state.device,
        dtype=state.dtype,
        add_noise=add_noise,
    )
    return state


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Image to image with Stable Diffusion 1.x / 2.x."""

    task = "image"
    call_stages = (preprocess_image, encode_prompt_stage, strength_schedule, image_latents, *DENOISE_AND_DECODE)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        height: int | None = None,
        width: int | None = None,
        **kwargs,
    ):
        return self._generate(locals())
