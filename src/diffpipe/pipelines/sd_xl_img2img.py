"""Stable Diffusion XL image-to-image, and the refiner.

A refiner checkpoint has only ``text_encoder_2`` and conditions on an aesthetic score instead of
the target size (``requires_aesthetics_score``). ``denoising_start`` continues another pipeline's
partly denoised latents (the base's ``denoising_end`` with ``output_type="latent"``) instead of
noising an image to ``strength``.
"""

from __future__ import annotations

import torch

from . import stages
from .pipeline import pipeline_call
from .sd_img2img import check_strength, image_or_latents, noised_image_latents, strength_timesteps
from .sd_xl import StableDiffusionXLBase, check_fraction, cut_at_denoising_end


def start_timesteps(scheduler, num_inference_steps: int, strength: float, device, denoising_start,
                    timesteps=None, sigmas=None):
    """(timesteps left, steps left): skip ``1 - strength`` of the schedule, or everything above
    ``denoising_start``'s point of the training schedule."""
    if denoising_start is None:
        return strength_timesteps(scheduler, num_inference_steps, strength, device, timesteps, sigmas)
    stages.set_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
    schedule = scheduler.timesteps
    trained = scheduler.config.num_train_timesteps
    cutoff = int(round(trained - denoising_start * trained))
    kept = int((schedule < cutoff).sum())
    if getattr(scheduler, "order", 1) == 2 and kept % 2 == 0:
        kept += 1  # second-order schedulers repeat timesteps: do not start between a step's two halves
    if kept < 1 or kept > len(schedule):
        raise ValueError(f"denoising_start={denoising_start} leaves no denoising step of {len(schedule)}")
    start = len(schedule) - kept
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return schedule[start:], kept


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLBase):
    """Image to image with Stable Diffusion XL; also the refiner (``requires_aesthetics_score=True``)."""

    _config_keys = StableDiffusionXLBase._config_keys + ("requires_aesthetics_score",)

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, requires_aesthetics_score: bool = False,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                         image_encoder=image_encoder, feature_extractor=feature_extractor,
                         force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def _img2img_time_ids(self, run, size, original_size, crops_coords_top_left, target_size, negative_original_size,
                          negative_crops_coords_top_left, negative_target_size, aesthetic_score,
                          negative_aesthetic_score):
        original_size = original_size or size
        target_size = target_size or size
        negative_original_size = negative_original_size or original_size
        negative_target_size = negative_target_size or target_size
        if self.config.requires_aesthetics_score:
            rows = ([*original_size, *crops_coords_top_left, aesthetic_score],
                    [*negative_original_size, *negative_crops_coords_top_left, negative_aesthetic_score])
        else:  # the reference's negative row keeps the positive crop corner here
            rows = ([*original_size, *crops_coords_top_left, *target_size],
                    [*negative_original_size, *crops_coords_top_left, *negative_target_size])
        hint = (f" requires_aesthetics_score={self.config.requires_aesthetics_score} makes "
                f"{len(rows[0])} ids (5 with an aesthetic score for refiners, 6 with the target size); change it "
                "with pipe.register_to_config(requires_aesthetics_score=...) if the UNet wants the other.")
        return self._time_ids(rows[0], run, hint), self._time_ids(rows[1], run, hint)

    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Rework ``image`` (PIL / array / tensor, or latents from a base pipeline) toward the prompt."""
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image= (a PIL image, array or tensor, or latents)")
        check_strength(strength)
        check_fraction("denoising_end", denoising_end)
        check_fraction("denoising_start", denoising_start)
        if denoising_start is not None and denoising_start >= 1.0:
            raise ValueError(f"denoising_start={denoising_start} leaves nothing to denoise; pass a value below 1")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        pixels = image_or_latents(self, image)
        if latents is not None and latents.ndim != 4:
            raise ValueError(f"latents must be a (B, C, H, W) tensor, got shape {tuple(latents.shape)}")
        run = self._begin_xl(
            prompt=prompt, prompt_2=prompt_2, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt, generator=generator, guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip, output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        # the micro-conditioning size is the latents' (checked before the VAE runs)
        start = latents if latents is not None else pixels
        factor = 1 if start.shape[1] == 3 else self.vae_scale_factor
        size = (start.shape[-2] * factor, start.shape[-1] * factor)
        time_ids, negative_time_ids = self._img2img_time_ids(
            run, size, original_size, crops_coords_top_left, target_size, negative_original_size,
            negative_crops_coords_top_left, negative_target_size, aesthetic_score, negative_aesthetic_score)
        steps, num_inference_steps = start_timesteps(self.scheduler, num_inference_steps, strength, run.device,
                                                     denoising_start, timesteps, sigmas)
        if latents is None:
            latents = noised_image_latents(self, pixels, steps[:1], batch=run.total, generator=generator,
                                           device=run.device, dtype=run.dtype, add_noise=denoising_start is None)
        else:
            latents = latents.to(device=run.device)
        steps, num_inference_steps = cut_at_denoising_end(self.scheduler, steps, num_inference_steps, denoising_end)
        return self._denoise_and_finish(
            run, latents, steps, num_inference_steps, eta=eta, generator=generator,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict, extra_tensors=self._added_conditions(run, time_ids, negative_time_ids),
            added_cond=self.ADDED_COND)
