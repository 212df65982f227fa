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
from .sd_img2img import check_strength, strength_schedule, tile_to_batch
from .stable_diffusion import StableDiffusionBase


class StableDiffusionInpaintPipeline(StableDiffusionBase):
    """Inpainting with Stable Diffusion 1.x / 2.x (9-channel inpainting UNets and plain ones)."""

    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds", "mask", "masked_image_latents")

    @torch.no_grad()
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
        batch = self._check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   callback_on_step_end_tensor_inputs, num_images_per_prompt, generator,
                                   guidance_scale)
        imgs.check_output_type(output_type)
        unet_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if unet_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"inpainting needs a UNet with {latent_channels} or {2 * latent_channels + 1} input channels, "
                f"this one has {unet_channels}"
            )
        pixels = imgs.preprocess(image, height=height, width=width, multiple=self.vae_scale_factor, what="image")
        mask_pixels = imgs.preprocess_mask(mask_image, height=height, width=width, multiple=self.vae_scale_factor)
        device = self._execution_device
        guidance = self._guidance(guidance_scale, 0.0)
        embeds, negative = self.encode_prompt(prompt, device, num_images_per_prompt, guidance.active,
                                              negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip)
        condition = torch.cat([negative, embeds]) if guidance.active else embeds
        dtype = embeds.dtype
        stages.set_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        if timesteps is not None or sigmas is not None:
            num_inference_steps = len(self.scheduler.timesteps)
        steps, num_inference_steps = strength_schedule(self.scheduler, num_inference_steps, strength)
        if num_inference_steps < 1:
            raise ValueError(f"strength={strength} leaves no denoising step; raise strength or num_inference_steps")
        total = batch * num_images_per_prompt
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

        unet = self.unet
        timestep_cond = self._guidance_embedding(guidance_scale, total, device, latents.dtype)

        def predict(model_input, t, i, tensors):
            if not blend:
                model_input = torch.cat([model_input, tensors["mask"], tensors["masked_image_latents"]], dim=1)
            return unet(model_input, t, encoder_hidden_states=tensors["prompt_embeds"], timestep_cond=timestep_cond,
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False)[0]

        def keep_unmasked(latents, i, t):
            original = image_latents
            if i < len(steps) - 1:
                original = self.scheduler.add_noise(original, noise, torch.tensor([steps[i + 1]]))
            return (1 - mask) * original + mask * latents

        latents = stages.denoise(
            self, latents=latents, timesteps=steps, num_inference_steps=num_inference_steps, predict=predict,
            guidance=guidance, step_kwargs={"eta": eta, "generator": generator},
            callback_on_step_end=callback_on_step_end,
            callback_tensors={"prompt_embeds": condition, "negative_prompt_embeds": negative, "mask": mask_in,
                              "masked_image_latents": masked_in},
            callback_tensor_names=callback_on_step_end_tensor_inputs,
            after_step=keep_unmasked if blend else None,
        )
        return self._finish(latents, output_type=output_type, return_dict=return_dict, device=device, dtype=dtype,
                            generator=generator)
