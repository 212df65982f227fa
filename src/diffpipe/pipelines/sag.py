"""Stable Diffusion with self-attention guidance (SAG; Hong et al. 2022, arXiv:2210.00939).

At every step the UNet's mid-block self-attention map marks the regions the model attends to most.
The predicted clean latents are blurred there, noised back to the step's level and run through the
UNet a second time; the guided prediction is pushed away from that degraded one by ``sag_scale``.

Everything else (prompt, latents, loop, decoding, safety checker) is the Stable Diffusion pipeline's.
The map is read through the attention-processor interface: for the length of a call the mid block's
``attn1`` runs a capturing processor, and the UNet's previous processors are put back afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..nn.attention import AttnProcessorMath
from ..runtime.hooks import ModuleHook, add_hook, remove_hook
from . import stages
from .request import CallState, SDRequest
from .stable_diffusion import (
    StableDiffusionBase,
    decode_images,
    encode_prompt_stage,
    noise_latents,
    output,
    text_timesteps,
)

BLUR_KERNEL = 9
BLUR_SIGMA = 1.0
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_CAPTURE = "sag_capture"


class AttentionMapCapture(AttnProcessorMath):
    """Explicit attention that keeps the probabilities (``[B * heads, L, L]``) of its latest call."""

    def __init__(self) -> None:
        self.probs: torch.Tensor | None = None
        self.heads: int = 1
        self.map_size: tuple[int, int] | None = None  # spatial size of the attended feature map

    def probabilities(self, attn, query, key, mask):
        probs = super().probabilities(attn, query, key, mask)
        self.probs, self.heads = probs, attn.heads
        return probs


def _mid_self_attention(unet):
    """(the mid block's first transformer, its first self-attention layer), or a clear error."""
    mid = getattr(unet, "mid_block", None)
    attentions = getattr(mid, "attentions", None) or ()
    transformer = attentions[0] if len(attentions) else None
    if transformer is None or not hasattr(transformer, "transformer_blocks"):
        found = "no mid block" if mid is None else f"a {type(mid).__name__} mid block without a transformer"
        raise ValueError(
            "self-attention guidance reads the self-attention map of the UNet's mid block, so it needs a UNet "
            f"with mid_block_type='UNetMidBlock2DCrossAttn'; this UNet has {found}. Pass sag_scale=0 to run "
            "without it."
        )
    return transformer, transformer.transformer_blocks[0].attn1


class MidAttentionCapture(ModuleHook):
    """On the mid block's first transformer for the length of a call: its first self-attention runs an
    :class:`AttentionMapCapture`, and each forward records the feature map's size. Removing the hook
    puts that layer's processor back."""

    def __init__(self, attn1):
        self.attn1, self.previous = attn1, attn1.processor
        self.capture = AttentionMapCapture()
        attn1.set_processor(self.capture)

    def pre_forward(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.capture.map_size = tuple(hidden_states.shape[-2:])

    def on_remove(self, module) -> None:
        self.attn1.set_processor(self.previous)


@contextmanager
def capturing_mid_attention(unet) -> Iterator[AttentionMapCapture]:
    """The mid block's self-attention map, captured inside the block (the hook is removed on leaving,
    also after an exception)."""
    transformer, attn1 = _mid_self_attention(unet)
    hook = add_hook(transformer, _CAPTURE, MidAttentionCapture(attn1))
    try:
        yield hook.capture
    finally:
        remove_hook(transformer, _CAPTURE)


def gaussian_blur(x: torch.Tensor, kernel_size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """Per-channel Gaussian blur of ``[B, C, H, W]`` with reflected borders."""
    half = (kernel_size - 1) / 2
    offsets = torch.linspace(-half, half, kernel_size)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=x.device, dtype=x.dtype)
    kernel = (weights[:, None] * weights[None, :]).expand(x.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=x.shape[1])


def clean_and_noise(
    scheduler, sample: torch.Tensor, model_output: torch.Tensor, t
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x_0, predicted noise) from the model output at timestep ``t``, DDIM-style."""
    alpha = scheduler.alphas_cumprod[int(t)].to(sample.device)
    a, b = alpha**0.5, (1 - alpha) ** 0.5
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - b * model_output) / a, model_output
    if kind == "sample":
        return model_output, (sample - a * model_output) / b
    return a * sample - b * model_output, b * sample + a * model_output  # v_prediction


def saliency_mask(probs: torch.Tensor, heads: int, map_size, size) -> torch.Tensor:
    """1 where a position receives more than average self-attention (summed over queries, averaged
    over heads), at the latents' ``size``; ``[B, 1, H, W]``."""
    batch_heads, queries, keys = probs.shape
    received = probs.reshape(batch_heads // heads, heads, queries, keys).mean(1).sum(1)
    mask = (received > 1.0).to(probs.dtype).reshape(-1, 1, *map_size)
    return F.interpolate(mask, size)


@dataclass(frozen=True)
class SAGRequest(SDRequest):
    """A SAG call: Stable Diffusion's fields and the guidance strength (the reference's SAG takes the
    legacy ``callback=`` / ``callback_steps=`` as named arguments; the loop calls it as in every pipeline)."""

    sag_scale: float = 0.75

    def check_task(self, pipe) -> None:
        if isinstance(self.sag_scale, bool) or not isinstance(self.sag_scale, (int, float)):
            raise TypeError(f"sag_scale must be a number (0 turns self-attention guidance off), got {self.sag_scale!r}")
        if self.sag_scale > 0.0:
            _mid_self_attention(pipe.unet)
        super().check_task(pipe)


# ---------------------------------------------------------------------------------------- stages
def check_scheduler(pipe, request: SAGRequest, state: CallState) -> CallState:
    """SAG needs integer timesteps and ``alphas_cumprod`` (known once the schedule is set)."""
    if request.sag_scale > 0.0:
        pipe._check_scheduler(state.timesteps)
    return state


def denoise_with_sag(pipe, request: SAGRequest, state: CallState) -> CallState:
    """The denoising loop, with the mid block's self-attention map captured for the SAG term."""
    if request.sag_scale <= 0.0:
        return stages.denoise(pipe, request, state)
    with capturing_mid_attention(pipe.unet) as capture:
        state.guide = pipe._sag_term(capture, request.sag_scale, state)
        return stages.denoise(pipe, request, state)


class StableDiffusionSAGPipeline(StableDiffusionBase):
    """Text to image with Stable Diffusion and self-attention guidance.

    Needs a scheduler on integer timesteps that has ``alphas_cumprod`` (DDIM, PNDM, DDPM, DEIS, UniPC,
    DPM-Solver multistep/singlestep), as the reference does.
    """

    def _check_scheduler(self, timesteps: torch.Tensor) -> None:
        scheduler = self.scheduler
        name = type(scheduler).__name__
        if timesteps.is_floating_point() or not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{type(self).__name__} needs a scheduler with integer timesteps and alphas_cumprod (DDIMScheduler, "
                "PNDMScheduler, DDPMScheduler, DEISMultistepScheduler, UniPCMultistepScheduler, "
                f"DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler); got {name} with "
                f"{timesteps.dtype} timesteps. Swap it: pipe.scheduler = DDIMScheduler.from_config("
                "pipe.scheduler.config)"
            )
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind not in PREDICTION_TYPES:
            raise ValueError(
                f"self-attention guidance supports prediction_type {PREDICTION_TYPES}, but {name} has {kind!r}"
            )

    def _sag_term(self, capture: AttentionMapCapture, sag_scale: float, state: CallState) -> Callable:
        """The loop's ``guide``: ``+ sag_scale * (eps - eps(degraded latents))``, where eps is the
        unconditional prediction under classifier-free guidance, else the prediction."""
        scheduler, guidance, image_prompt = self.scheduler, state.guidance, state.image_embeds
        if guidance.active and image_prompt is not None:
            image_prompt = [e.chunk(2)[0] for e in image_prompt]

        def guide(noise_pred, *, model_output, latents, t, tensors, predict):
            own, probs, condition = model_output, capture.probs, tensors["prompt_embeds"]
            if guidance.active:  # the unconditional half, as in eq. (25) of the paper
                own, probs, condition = own.chunk(2)[0], probs.chunk(2)[0], condition.chunk(2)[0]
            x0, eps = clean_and_noise(scheduler, latents, own, t)
            mask = saliency_mask(probs, capture.heads, capture.map_size, x0.shape[-2:])
            degraded = gaussian_blur(x0) * mask + x0 * (1 - mask)
            degraded = scheduler.add_noise(degraded, eps, t[None])
            degraded_pred = predict(degraded, t, {**tensors, "prompt_embeds": condition}, image_prompt)
            return noise_pred + sag_scale * (own - degraded_pred)

        return guide

    request_type = SAGRequest
    embeds_guidance_scale = False  # the reference's SAG runs CFG and no guidance embedding on any UNet
    call_stages = (
        text_timesteps,
        check_scheduler,
        encode_prompt_stage,
        noise_latents,
        denoise_with_sag,
        decode_images,
        output,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        sag_scale: float = 0.75,
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
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        callback_steps: int = 1,
        cross_attention_kwargs: dict | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generate images from text with self-attention guidance of strength ``sag_scale`` (0 turns
        it off), with or without classifier-free guidance (``guidance_scale`` > 1 or <= 1)."""
        return self._generate(locals())
