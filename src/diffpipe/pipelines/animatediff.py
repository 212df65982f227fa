"""AnimateDiff text-to-video: Stable Diffusion's components plus a MotionAdapter.

What is special here: the UNet is a :class:`~diffpipe.models.unet_motion.UNetMotionModel` built
around the given image UNet (sharing its parameters, so ``from_pipe(pipe_sd, motion_adapter=...)``
adds only the adapter's memory and leaves ``pipe_sd`` as it was); latents carry a frame axis
``[B, C, F, h, w]``; the prompt embeddings are repeated per frame; frames are decoded in chunks of
``decode_chunk_size``. Prompt encoding, the denoising loop and decoding are the shared stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import images as imgs
from ..models.motion import MotionAdapter
from ..models.outputs import ModelOutput
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.unet_motion import UNetMotionModel
from . import stages
from .pipeline import pipeline_call
from .stable_diffusion import StableDiffusionBase


@dataclass
class AnimateDiffPipelineOutput(ModelOutput):
    """``frames``: per video a list of PIL frames (``output_type="pil"``), or ``[B, F, H, W, C]`` numpy
    (``"np"``), ``[B, F, C, H, W]`` torch (``"pt"``), or the ``[B, C, F, h, w]`` latents (``"latent"``)."""

    frames: Any


class AnimateDiffPipeline(StableDiffusionBase):
    """Text to video with a Stable Diffusion 1.x checkpoint and an AnimateDiff motion adapter."""

    _config_keys = ()
    _optional_components = ("feature_extractor", "image_encoder", "motion_adapter")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, motion_adapter, scheduler, feature_extractor=None,
                 image_encoder=None):
        super(StableDiffusionBase, self).__init__()  # no safety checker, no SD config fixes (as the reference)
        if motion_adapter is not None and not isinstance(motion_adapter, MotionAdapter):
            raise TypeError(f"AnimateDiffPipeline: motion_adapter must be a MotionAdapter, got "
                            f"{type(motion_adapter).__name__}")
        if isinstance(unet, UNet2DConditionModel):
            if motion_adapter is None:
                raise ValueError(
                    "AnimateDiffPipeline needs motion_adapter= (a MotionAdapter) to animate a UNet2DConditionModel"
                )
            unet = UNetMotionModel.from_unet2d(unet, motion_adapter)
        elif not isinstance(unet, UNetMotionModel):
            raise TypeError(
                f"AnimateDiffPipeline: unet must be a UNet2DConditionModel (with motion_adapter=) or a "
                f"UNetMotionModel, got {type(unet).__name__}"
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              motion_adapter=motion_adapter, scheduler=scheduler,
                              feature_extractor=feature_extractor, image_encoder=image_encoder)

    embeds_guidance_scale = False  # the reference guides every motion UNet by CFG, LCM-distilled or not

    def _guidance(self, guidance_scale: float, guidance_rescale: float) -> stages.Guidance:
        return stages.Guidance(scale=guidance_scale)  # and takes no guidance_rescale

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """``[B, C, F, h, w]`` latents -> ``[B, C, F, H, W]`` float32 frames in ``[-1, 1]``, decoding
        ``decode_chunk_size`` frames at a time."""
        batch, channels, frames, height, width = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        decoded = torch.cat([stages.decode_latents(self.vae, flat[i : i + decode_chunk_size])
                             for i in range(0, flat.shape[0], decode_chunk_size)])
        return decoded.reshape(batch, frames, *decoded.shape[1:]).permute(0, 2, 1, 3, 4).float()

    def _check_video_inputs(self, num_frames, decode_chunk_size):
        longest = self.unet.config.motion_max_seq_length
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        if num_frames > longest:
            raise ValueError(
                f"num_frames={num_frames} is more than this motion adapter's motion_max_seq_length={longest}; "
                f"generate at most {longest} frames"
            )
        if isinstance(decode_chunk_size, bool) or not isinstance(decode_chunk_size, int) or decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be a positive integer, got {decode_chunk_size!r}")

    @pipeline_call
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_videos_per_prompt: int = 1,
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
        decode_chunk_size: int = 16,
    ):
        """Generate ``num_frames``-frame videos from text; ``latents`` are ``[B, C, F, h, w]``."""
        self._check_video_inputs(num_frames, decode_chunk_size)
        default_h, default_w = self._default_size()
        height, width = height or default_h, width or default_w
        stages.check_size(height, width, self.vae_scale_factor)
        run = self._begin(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_videos_per_prompt,
                          generator=generator, guidance_scale=guidance_scale, guidance_rescale=0.0,
                          clip_skip=clip_skip, output_type=output_type,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        steps, num_inference_steps = stages.set_timesteps(self.scheduler, num_inference_steps, run.device)
        shape = (run.total, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = stages.initial_latents(shape, generator=generator, device=run.device, dtype=run.dtype,
                                         latents=latents, init_noise_sigma=self.scheduler.init_noise_sigma)
        added_cond, tensors = run.with_image_prompt(None, {
            "prompt_embeds": run.condition.repeat_interleave(num_frames, dim=0), "negative_prompt_embeds": run.negative})
        latents = stages.denoise(
            self, latents=latents, timesteps=steps, num_inference_steps=num_inference_steps,
            predict=self._unet_predictor(cross_attention_kwargs, added_cond=added_cond), guidance=run.guidance,
            step_kwargs={"eta": eta, "generator": generator}, callback_on_step_end=callback_on_step_end,
            callback_tensors=tensors, callback_tensor_names=callback_on_step_end_tensor_inputs,
        )
        if output_type == "latent":
            frames = latents
        else:
            video = self.decode_latents(latents, decode_chunk_size)
            frames = [imgs.postprocess(v.permute(1, 0, 2, 3), output_type=output_type) for v in video]
            if output_type == "np":
                frames = np.stack(frames)
            elif output_type == "pt":
                frames = torch.stack(frames)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return AnimateDiffPipelineOutput(frames=frames)
