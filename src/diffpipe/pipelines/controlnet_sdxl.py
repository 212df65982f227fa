"""Stable Diffusion XL with ControlNet (text-to-image): SDXL's stages with the ControlNet stage before
the loop; the ControlNet reads the pooled text embeddings and time ids as the UNet does."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .controlnet import ControlFields, ControlNetMixin, prepare_control
from .sd_xl import SDXLRequest, StableDiffusionXLPipeline


@dataclass(frozen=True)
class SDXLControlNetRequest(ControlFields, SDXLRequest):
    """An SDXL call with ControlNet; text-to-image's ``image`` is the conditioning image."""

    renamed = {"image": "control_image"}


class StableDiffusionXLControlNetPipeline(ControlNetMixin, StableDiffusionXLPipeline):
    """Text to image with Stable Diffusion XL and ControlNet (``image`` is the conditioning image)."""

    request_type = SDXLControlNetRequest
    call_stages = (
        *StableDiffusionXLPipeline.call_stages[:6],
        prepare_control,
        *StableDiffusionXLPipeline.call_stages[6:],
    )

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        controlnet,
        scheduler,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
        feature_extractor=None,
        image_encoder=None,
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
        self._register_controlnet(controlnet)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        """Generate images from text steered by ``image`` (one per ControlNet); the output size is the
        conditioning image's unless ``height`` / ``width`` are given."""
        return self._generate(locals())
