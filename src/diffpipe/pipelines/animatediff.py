"""AnimateDiff text-to-video: Stable Diffusion's components plus a MotionAdapter.

What is special here: the UNet is a :class:`~diffpipe.models.unet_motion.UNetMotionModel` built
around the given image UNet (sharing its parameters, so ``from_pipe(pipe_sd, motion_adapter=...)``
adds only the adapter's memory and leaves ``pipe_sd`` as it was); latents carry a frame axis
``[B, C, F, h, w]``; the prompt embeddings are repeated per frame; frames are decoded in chunks of
``decode_chunk_size``. Prompt encoding, the denoising loop and decoding are the shared stages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .. import images as imgs
from ..models.motion import MotionAdapter
from ..models.outputs import ModelOutput
from ..models.unet_2d_condition import UNet2DConditionModel
from ..models.unet_motion import UNetMotionModel
from . import stages
from .free_init import FreeInitMixin, denoise_with_free_init
from .free_noise import FreeNoiseMixin, encode_prompt_schedule, prompt_schedule, reschedule_noise
from .request import CallState, SDRequest
from .stable_diffusion import StableDiffusionBase, encode_prompt_stage, text_timesteps


@dataclass
class AnimateDiffPipelineOutput(ModelOutput):
    """``frames``: per video a list of PIL frames (``output_type="pil"``), or ``[B, F, H, W, C]`` numpy
    (``"np"``), ``[B, F, C, H, W]`` torch (``"pt"``), or the ``[B, C, F, h, w]`` latents (``"latent"``)."""

    frames: Any


@dataclass(frozen=True)
class VideoRequest(SDRequest):
    """An AnimateDiff call: Stable Diffusion's fields and the video's length and decoding chunk."""

    num_frames: int = 16
    decode_chunk_size: int = 16
    renamed = {"num_videos_per_prompt": "num_images_per_prompt"}

    @property
    def batch(self) -> int:
        return 1 if isinstance(self.prompt, dict) else super().batch

    def check_task(self, pipe) -> None:
        num_frames, chunk = self.num_frames, self.decode_chunk_size
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
        longest, free_noise = pipe.unet.config.motion_max_seq_length, pipe.free_noise
        if free_noise is None and num_frames > longest:
            raise ValueError(
                f"num_frames={num_frames} is more than this motion adapter's motion_max_seq_length={longest}; "
                f"generate at most {longest} frames, or enable FreeNoise (pipe.enable_free_noise()) for longer videos"
            )
        if free_noise is not None and min(num_frames, free_noise.windows.length) > longest:
            raise ValueError(
                f"FreeNoise's context_length={free_noise.windows.length} is more than this motion adapter's "
                f"motion_max_seq_length={longest}; call pipe.enable_free_noise(context_length={longest}) or less"
            )
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"decode_chunk_size must be a positive integer, got {chunk!r}")
        super().check_task(pipe)

    def check_common(self, pipe) -> None:
        scheduled = isinstance(self.prompt, dict) or isinstance(self.negative_prompt, dict)
        if pipe.free_noise is None or self.prompt_embeds is not None:
            if scheduled:
                raise ValueError(
                    "a dict prompt ({frame: prompt}) needs FreeNoise: call pipe.enable_free_noise() first"
                    if pipe.free_noise is None
                    else "a dict negative_prompt goes with a prompt, not with prompt_embeds="
                )
            return super().check_common(pipe)
        prompt_schedule(self.prompt, self.num_frames, "prompt")
        if self.negative_prompt is not None:
            prompt_schedule(self.negative_prompt, self.num_frames, "negative_prompt")

        # the common rules, with each schedule standing in as its first prompt
        def first(prompt):
            return prompt[min(prompt)] if isinstance(prompt, dict) else prompt

        plain = replace(self, prompt=first(self.prompt), negative_prompt=first(self.negative_prompt))
        super(VideoRequest, plain).check_common(pipe)


# ---------------------------------------------------------------------------------------- stages
def video_latents(pipe, request: VideoRequest, state: CallState) -> CallState:
    """``[B, C, F, h, w]`` noise."""
    state.height, state.width = request.size(pipe)
    factor = pipe.vae_scale_factor
    shape = (
        request.total,
        pipe.unet.config.in_channels,
        request.num_frames,
        state.height // factor,
        state.width // factor,
    )
    state.latents = stages.initial_latents(
        shape,
        generator=request.generator,
        device=state.device,
        dtype=state.dtype,
        latents=request.latents,
        init_noise_sigma=pipe.scheduler.init_noise_sigma,
    )
    free_noise = pipe.free_noise  # FreeNoise reschedules fresh noise (the caller's latents stay as given)
    if free_noise is not None and free_noise.noise_type == "shuffle_context" and request.latents is None:
        reschedule_noise(state.latents, free_noise.windows, request.generator)
    return state


def decode_video(pipe, request: VideoRequest, state: CallState) -> CallState:
    if request.output_type == "latent":
        state.images = state.latents
        return state
    video = pipe.decode_latents(state.latents, request.decode_chunk_size)
    frames = [imgs.postprocess(v.permute(1, 0, 2, 3), output_type=request.output_type) for v in video]
    if request.output_type == "np":
        frames = np.stack(frames)
    elif request.output_type == "pt":
        frames = torch.stack(frames)
    state.images = frames
    return state


def video_output(pipe, request: VideoRequest, state: CallState) -> CallState:
    state.output = AnimateDiffPipelineOutput(frames=state.images) if request.return_dict else (state.images,)
    return state


class AnimateDiffPipeline(FreeInitMixin, FreeNoiseMixin, StableDiffusionBase):
    """Text to video with a Stable Diffusion 1.x checkpoint and an AnimateDiff motion adapter."""

    _config_keys = ()
    _optional_components = ("feature_extractor", "image_encoder", "motion_adapter")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"

    def __init__(
        self, vae, text_encoder, tokenizer, unet, motion_adapter, scheduler, feature_extractor=None, image_encoder=None
    ):
        super(StableDiffusionBase, self).__init__()  # no safety checker, no SD config fixes (as the reference)
        if motion_adapter is not None and not isinstance(motion_adapter, MotionAdapter):
            raise TypeError(
                f"AnimateDiffPipeline: motion_adapter must be a MotionAdapter, got {type(motion_adapter).__name__}"
            )
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
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            motion_adapter=motion_adapter,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )

    embeds_guidance_scale = False  # the reference guides every motion UNet by CFG, LCM-distilled or not
    request_type = VideoRequest
    call_stages = (
        encode_prompt_stage,
        text_timesteps,
        video_latents,
        denoise_with_free_init,
        decode_video,
        video_output,
    )

    def _encode_text(self, request: VideoRequest, state: CallState) -> None:
        """Embeddings per frame (``[videos * frames, L, D]``): the prompt's repeated, or under FreeNoise
        interpolated between the keyframes of a ``{frame: prompt}`` schedule."""
        if self.free_noise is not None and request.prompt_embeds is None:
            encode_prompt_schedule(self, request, state)
            return
        super()._encode_text(request, state)
        state.embeds = state.embeds.repeat_interleave(request.num_frames, dim=0)
        if state.negative is not None:
            state.negative = state.negative.repeat_interleave(request.num_frames, dim=0)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """``[B, C, F, h, w]`` latents -> ``[B, C, F, H, W]`` float32 frames in ``[-1, 1]``, decoding
        ``decode_chunk_size`` frames at a time."""
        batch, channels, frames, height, width = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        decoded = torch.cat(
            [
                stages.decode_latents(self.vae, flat[i : i + decode_chunk_size])
                for i in range(0, flat.shape[0], decode_chunk_size)
            ]
        )
        return decoded.reshape(batch, frames, *decoded.shape[1:]).permute(0, 2, 1, 3, 4).float()

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
        **kwargs,
    ):
        """Generate ``num_frames``-frame videos from text; ``latents`` are ``[B, C, F, h, w]``."""
        return self._generate(locals())
