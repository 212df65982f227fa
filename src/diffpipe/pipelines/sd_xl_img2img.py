"""Stable Diffusion XL image-to-image, and the refiner.

A refiner checkpoint has only ``text_encoder_2`` and conditions on an aesthetic score instead of
the target size (``requires_aesthetics_score``). ``denoising_start`` continues another pipeline's
partly denoised latents (the base's ``denoising_end`` with ``output_type="latent"``) instead of
noising an image to ``strength``.
"""

from __future__ import annotations

import torch

from . import stages
from .request import CallState
from .sd_img2img import image_latents, preprocess_image, strength_timesteps
from .sd_xl import SDXLRequest, StableDiffusionXLBase, micro_conditioning, stop_at_denoising_end
from .stable_diffusion import DENOISE_AND_DECODE, encode_prompt_stage


def start_timesteps(
    scheduler, num_inference_steps: int, strength: float, device, denoising_start, timesteps=None, sigmas=None
):
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


def start_schedule(pipe, request: SDXLRequest, state: CallState) -> CallState:
    state.timesteps, state.num_inference_steps = start_timesteps(
        pipe.scheduler,
        request.num_inference_steps,
        request.strength,
        state.device,
        request.denoising_start,
        request.timesteps,
        request.sigmas,
    )
    return state


def start_latents(pipe, request: SDXLRequest, state: CallState) -> CallState:
    """The caller's latents, else the encoded image, noised to the first timestep unless it continues
    another pipeline's partly denoised latents (``denoising_start``)."""
    if request.latents is not None:
        state.latents = request.latents.to(device=state.device)
        return state
    return image_latents(pipe, request, state, add_noise=request.denoising_start is None)


class StableDiffusionXLImageBase(StableDiffusionXLBase):
    """What SDXL's image-conditioned tasks (image-to-image, inpainting) share: the refiner switch
    ``requires_aesthetics_score`` and the micro-conditioning it chooses between."""

    _config_keys = StableDiffusionXLBase._config_keys + ("requires_aesthetics_score",)

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae,
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
            unet,
            scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    def _conditioning_size(self, request: SDXLRequest, state: CallState) -> tuple[int, int]:
        """(height, width) that ``original_size`` and ``target_size`` default to; each task says which."""
        raise NotImplementedError

    def _time_id_rows(self, request: SDXLRequest, state: CallState) -> tuple[list, list, str]:
        size = self._conditioning_size(request, state)
        original_size = request.original_size or size
        target_size = request.target_size or size
        negative_original_size = request.negative_original_size or original_size
        negative_target_size = request.negative_target_size or target_size
        crop = request.crops_coords_top_left
        if self.config.requires_aesthetics_score:
            rows = (
                [*original_size, *crop, request.aesthetic_score],
                [*negative_original_size, *request.negative_crops_coords_top_left, request.negative_aesthetic_score],
            )
        else:  # the reference's negative row keeps the positive crop corner here
            rows = ([*original_size, *crop, *target_size], [*negative_original_size, *crop, *negative_target_size])
        hint = (
            f" requires_aesthetics_score={self.config.requires_aesthetics_score} makes "
            f"{len(rows[0])} ids (5 with an aesthetic score for refiners, 6 with the target size); change it "
            "with pipe.register_to_config(requires_aesthetics_score=...) if the UNet wants the other."
        )
        return rows[0], rows[1], hint


class StableDiffusionXLImg2ImgPipeline(StableDiffusionXLImageBase):
    """Image to image with Stable Diffusion XL; also the refiner (``requires_aesthetics_score=True``)."""

    def _conditioning_size(self, request: SDXLRequest, state: CallState) -> tuple[int, int]:
        # the size of the latents the call starts from (checked before the VAE runs)
        start = request.latents if request.latents is not None else state.pixels
        factor = 1 if start.shape[1] == 3 else self.vae_scale_factor
        return start.shape[-2] * factor, start.shape[-1] * factor

    request_type = SDXLRequest
    task = "image"
    call_stages = (
        preprocess_image,
        encode_prompt_stage,
        micro_conditioning,
        start_schedule,
        start_latents,
        stop_at_denoising_end,
        *DENOISE_AND_DECODE,
    )

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
        height: int | None = None,
        width: int | None = None,
        **kwargs,
    ):
        """Rework ``image`` (PIL / array / tensor, or latents from a base pipeline) toward the prompt.

        ``height`` / ``width`` (ours, as in SD image-to-image; the reference ignores them): resize the
        image to that size first; by default the result has the image's size."""
        return self._generate(locals())
