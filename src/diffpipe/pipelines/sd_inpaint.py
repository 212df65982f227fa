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
from .pipeline import pipeline_call
from .sd_img2img import check_strength, strength_timesteps, tile_to_batch
from .stable_diffusion import StableDiffusionBase


class StableDiffusionInpaintPipeline(StableDiffusionBase):
    """Inpainting with Stable Diffusion 1.x / 2.x (9-channel inpainting UNets and plain ones)."""

    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
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
    ):
        if image is None or mask_image is None:
            raise ValueError("StableDiffusionInpaintPipeline needs image= and mask_image=")
        check_strength(strength)
        default_h, default_w = self._default_size()
        height, width = height or default_h, width or default_w
        stages.check_size(height, width, self.vae_scale_factor)
        unet_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"inpainting needs a UNet with {latent_channels} or {2 * latent_channels + 1} input channels, "
                f"this one has {unet_channels}"
            )
        pixels = imgs.preprocess(image, height=height, width=width, multiple=self.vae_scale_factor, what="image")
        mask_pixels = imgs.preprocess_mask(mask_image, height=height, width=width, multiple=self.vae_scale_factor)
        run = self._begin(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
                          generator=generator, guidance_scale=guidance_scale, guidance_rescale=0.0,
                          clip_skip=clip_skip, output_type=output_type,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        device, dtype, total, guidance = run.device, run.dtype, run.total, run.guidance
        steps, num_inference_steps = strength_timesteps(self.scheduler, num_inference_steps, strength, device,
                                                        timesteps, sigmas)
        shape = (total, latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        full_strength = strength == 1.0
        blend = unet_channels == latent_channels  # a plain UNet: keep the unmasked part by blending

        # 1. latents: pure noise at full strength, else the image noised to the first timestep
        image_latents = None
        if blend or (latents is None and not full_strength):
            image_latents = stages.encode_image_latents(self.vae, pixels.to(device=device, dtype=dtype), generator)
            image_latents = image_latents.to(dtype).repeat(total // image_latents.shape[0], 1, 1, 1)
        if latents is None:
            noise = randn(shape, generator=generator, device=device, dtype=dtype)
            if full_strength:
                latents = noise * self.scheduler.init_noise_sigma
            else:
                latents = self.scheduler.add_noise(image_latents, noise, steps[:1].repeat(total))
        else:
            noise = latents.to(device)
            latents = noise * self.scheduler.init_noise_sigma

        # 2. the mask at latent size and the encoded masked image, guidance-batched
        size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask = torch.nn.functional.interpolate(mask_pixels, size=size).to(device=device, dtype=dtype)
        if masked_image_latents is None:
            masked = (pixels * (mask_pixels < 0.5)).to(device=device, dtype=dtype)
            masked_image_latents = stages.encode_image_latents(self.vae, masked, generator)
        mask = tile_to_batch(mask, total, "masks")
        masked_image_latents = tile_to_batch(masked_image_latents.to(device=device, dtype=dtype), total, "images")
        mask_in, masked_in = guidance.batch(mask), guidance.batch(masked_image_latents)

        def keep_unmasked(latents, i, t):
            original = image_latents
            if i < len(steps) - 1:
                original = self.scheduler.add_noise(original, noise, torch.tensor([steps[i + 1]]))
            return (1 - mask) * original + mask * latents

        return self._denoise_and_finish(
            run, latents, steps, num_inference_steps, eta=eta, generator=generator,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict, extra_tensors={"mask": mask_in, "masked_image_latents": masked_in},
            concat=() if blend else ("mask", "masked_image_latents"), after_step=keep_unmasked if blend else None)
