"""Unconditional image generation with a ``UNet2DModel``: ``DDPMPipeline`` and ``DDIMPipeline``.

Noise of the UNet's sample size, the shared denoising loop with the plain UNet call (no prompt, no
guidance), then the images from ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .. import images as imgs
from ..outputs import BaseOutput
from ..schedulers.base import randn
from . import stages
from .pipeline import DiffusionPipeline
from .request import CallState


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: PIL images, or a ``[batch, height, width, channels]`` numpy array (``output_type="np"``)."""

    images: Any


@dataclass(frozen=True)
class UnconditionalRequest:
    """The arguments of an unconditional call (and the loop's neutral settings it has no argument for)."""

    batch_size: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    num_inference_steps: int = 1000
    eta: float = 0.0
    use_clipped_model_output: bool | None = None
    output_type: str = "pil"
    return_dict: bool = True
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ()
    cross_attention_kwargs: dict | None = None
    lora_scale = None

    @classmethod
    def of_call(cls, arguments: dict) -> "UnconditionalRequest":
        return cls(**{k: v for k, v in arguments.items() if k != "self"})

    def check(self, pipe) -> None:
        n = self.batch_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch_size must be a positive integer, got {n!r}")
        stages.check_generators(self.generator, n)
        imgs.check_output_type(self.output_type)
        if pipe.unet is None or pipe.scheduler is None:
            raise ValueError(f"{type(pipe).__name__} needs a unet and a scheduler")


def noise(pipe, request: UnconditionalRequest, state: CallState) -> CallState:
    size = pipe.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    shape = (request.batch_size, pipe.unet.config.in_channels, height, width)
    state.latents = randn(shape, generator=request.generator, device=state.device, dtype=pipe.unet.dtype)
    return state


def schedule(pipe, request: UnconditionalRequest, state: CallState) -> CallState:
    """The schedule, the plain UNet call for the loop, and no guidance."""
    state.timesteps, state.num_inference_steps = stages.set_timesteps(
        pipe.scheduler, request.num_inference_steps, state.device
    )
    state.guidance = stages.Guidance(scale=1.0)
    state.predict = lambda model_input, t, tensors, image_embeds: pipe.unet(model_input, t, return_dict=False)[0]
    if request.use_clipped_model_output is not None:
        state.step_kwargs["use_clipped_model_output"] = request.use_clipped_model_output
    return state


def images_out(pipe, request: UnconditionalRequest, state: CallState) -> CallState:
    images = state.latents if request.output_type == "latent" else imgs.postprocess(state.latents, request.output_type)
    state.output = ImagePipelineOutput(images=images) if request.return_dict else (images,)
    return state


class _Unconditional(DiffusionPipeline):
    model_cpu_offload_seq = "unet"
    request_type = UnconditionalRequest
    call_stages = (noise, schedule, stages.denoise, images_out)
    _slot_classes = {**DiffusionPipeline._slot_classes, "unet": ("UNet2DModel",)}

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)


class DDPMPipeline(_Unconditional):
    """Unconditional images by ancestral DDPM sampling (Ho et al. 2020)."""

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 1000,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ):
        return self._generate(locals())


class DDIMPipeline(_Unconditional):
    """Unconditional images by DDIM sampling (Song et al. 2020); the scheduler is made a DDIM scheduler
    from its config, as in the reference."""

    def __init__(self, unet, scheduler):
        from ..schedulers.ddim import DDIMScheduler

        super().__init__(unet, scheduler if scheduler is None else DDIMScheduler.from_config(scheduler.config))

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: bool | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
    ):
        return self._generate(locals())
