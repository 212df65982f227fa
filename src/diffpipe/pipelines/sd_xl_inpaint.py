"""Stable Diffusion XL inpainting: repaint the white part of a mask.

The stages are Stable Diffusion inpainting's (mask and masked-image latents, 9-channel inpainting
UNets or the blend after each step of a plain one, ``padding_mask_crop``) with SDXL's prompt and
micro-conditioning, and SDXL image-to-image's schedule: ``strength``, or ``denoising_start`` to
continue another pipeline's partly denoised latents (a base inpainting with ``denoising_end`` and
``output_type="latent"``, then a refiner).
"""

from __future__ import annotations

import torch

from . import stages
from .request import CallState
from .sd_inpaint import inpaint_conditions, inpaint_latents, paste_into_the_image, preprocess_image_and_mask
from .sd_xl import SDXLRequest, micro_conditioning, stop_at_denoising_end
from .sd_xl_img2img import StableDiffusionXLImageBase, start_schedule
from .stable_diffusion import decode_images, encode_prompt_stage, guidance_embedding, output


def start_inpaint_latents(pipe, request: SDXLRequest, state: CallState) -> CallState:
    """Inpainting's start latents; with ``denoising_start``, the image's latents are not noised."""
    return inpaint_latents(pipe, request, state, add_noise=request.denoising_start is None)


class StableDiffusionXLInpaintPipeline(StableDiffusionXLImageBase):
    """Inpainting with Stable Diffusion XL (9-channel inpainting UNets and plain ones; also a refiner
    with ``requires_aesthetics_score=True``)."""

    callback_tensor_inputs = (
        "latents",
        "prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
        "mask",
        "masked_image_latents",
    )

    _encode_with_latent_stats = False  # the reference's: see StableDiffusionXLBase._encode_image

    def _conditioning_size(self, request: SDXLRequest, state: CallState) -> tuple[int, int]:
        return state.height, state.width  # the output's (the call's, else the UNet's default)

    request_type = SDXLRequest
    task = "inpaint"
    call_stages = (
        preprocess_image_and_mask,
        encode_prompt_stage,
        micro_conditioning,
        start_schedule,
        start_inpaint_latents,
        stop_at_denoising_end,  # before the blend is set up: its last step keeps the clean image
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
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        **kwargs,
    ):
        """Repaint the white part of ``mask_image`` in ``image`` toward the prompt.

        ``strength`` (default 0.9999, as the reference: just below pure noise, so the image still
        seeds the start) is ignored when ``denoising_start`` continues another pipeline's latents
        (pass them as ``image``). ``original_size`` / ``target_size`` default to ``(height, width)``.
        """
        return self._generate(locals())
