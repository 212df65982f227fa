"""Stable Diffusion 1.x / 2.x with ControlNet: text-to-image, image-to-image and inpainting.

Each is its task's pipeline with a ``controlnet`` component and the ControlNet stage
(:func:`~diffpipe.pipelines.controlnet.prepare_control`) before the denoising loop; ``from_pipe``
from a Stable Diffusion pipeline shares every other component.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .controlnet import ControlFields, ControlNetMixin, prepare_control
from .request import SDRequest
from .sd_img2img import image_latents, preprocess_image, strength_schedule
from .sd_inpaint import StableDiffusionInpaintPipeline
from .stable_diffusion import DENOISE_AND_DECODE, StableDiffusionBase, encode_prompt_stage, noise_latents
from .stable_diffusion import text_timesteps


@dataclass(frozen=True)
class ControlNetRequest(ControlFields, SDRequest):
    """A Stable Diffusion call with ControlNet."""


@dataclass(frozen=True)
class TextControlNetRequest(ControlNetRequest):
    renamed = {"image": "control_image"}  # text-to-image's `image` is the conditioning image


class StableDiffusionControlNetBase(ControlNetMixin, StableDiffusionBase):
    """The components: Stable Diffusion's and ``controlnet`` (one, or a list of them)."""

    request_type = ControlNetRequest

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        controlnet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = True,
    ):
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )
        self._register_controlnet(controlnet)


class StableDiffusionControlNetPipeline(StableDiffusionControlNetBase):
    """Text to image with Stable Diffusion and ControlNet (``image`` is the conditioning image)."""

    request_type = TextControlNetRequest
    call_stages = (encode_prompt_stage, text_timesteps, noise_latents, prepare_control, *DENOISE_AND_DECODE)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        height: int | None = None,
        width: int | None = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        """Generate images from text, steered by ``image`` (one per ControlNet); the output size is the
        conditioning image's unless ``height`` / ``width`` are given."""
        return self._generate(locals())


class StableDiffusionControlNetImg2ImgPipeline(StableDiffusionControlNetBase):
    """Image to image with Stable Diffusion and ControlNet (``control_image`` steers, ``image`` starts)."""

    task = "image"
    call_stages = (
        preprocess_image,
        encode_prompt_stage,
        strength_schedule,
        image_latents,
        prepare_control,
        *DENOISE_AND_DECODE,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.8,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        return self._generate(locals())


class StableDiffusionControlNetInpaintPipeline(StableDiffusionControlNetBase):
    """Inpainting with Stable Diffusion and ControlNet (9-channel inpainting UNets and plain ones)."""

    task = "inpaint"
    callback_tensor_inputs = StableDiffusionInpaintPipeline.callback_tensor_inputs
    call_stages = (
        *StableDiffusionInpaintPipeline.call_stages[:5],
        prepare_control,
        *StableDiffusionInpaintPipeline.call_stages[5:],
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        control_image=None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
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
        controlnet_conditioning_scale: float | list[float] = 0.5,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        return self._generate(locals())
