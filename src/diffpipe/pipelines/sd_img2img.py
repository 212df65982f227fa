"""Stable Diffusion image-to-image: start from the encoded image, noised to ``strength``."""

from __future__ import annotations

import torch

from .. import images as imgs
from ..schedulers.base import randn
from . import stages
from .pipeline import pipeline_call
from .stable_diffusion import StableDiffusionBase


def strength_timesteps(scheduler, num_inference_steps: int, strength: float, device, timesteps=None,
                       sigmas=None):
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


def check_strength(strength: float) -> None:
    if not (0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be between 0 and 1, got {strength}")


def tile_to_batch(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """Repeat a batch of images/latents (whole-batch tiling, as the reference does) up to ``batch``."""
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot spread {x.shape[0]} {what} over {batch} outputs; pass 1 or {batch} of them")
    return torch.cat([x] * (batch // x.shape[0]), dim=0)


def noised_image_latents(pipeline, image: torch.Tensor, timestep, *, batch: int, generator, device, dtype,
                         add_noise: bool = True):
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


class StableDiffusionImg2ImgPipeline(StableDiffusionBase):
    """Image to image with Stable Diffusion 1.x / 2.x."""

    @pipeline_call
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
    ):
        if image is None:
            raise ValueError("StableDiffusionImg2ImgPipeline needs image= (a PIL image, array or tensor)")
        check_strength(strength)
        pixels = image_or_latents(self, image, height=height, width=width)
        run = self._begin(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
                          generator=generator, guidance_scale=guidance_scale, guidance_rescale=0.0,
                          clip_skip=clip_skip, output_type=output_type,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        steps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength, run.device,
                                                        timesteps, sigmas)
        latents = noised_image_latents(self, pixels, steps[:1], batch=run.total, generator=generator,
                                       device=run.device, dtype=run.dtype)
        return self._denoise_and_finish(
            run, latents, steps, num_inference_steps, eta=eta, generator=generator,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict)
