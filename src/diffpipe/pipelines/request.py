"""What one pipeline call asks for (a request) and what its stages hand each other (the call state).

A pipeline's ``__call__`` keeps the reference's public signature and does one thing: it hands its
arguments to :meth:`DiffusionPipeline._generate`, which builds the pipeline's ``request_type`` from
them, checks it (:meth:`SDRequest.check`, every input rule in one place, before any model runs) and
runs the pipeline's ``call_stages`` in order. Each stage is a function ``stage(pipe, request, state) ->
state``: it reads the components from ``pipe``, the caller's arguments from ``request`` (never
changed), and what earlier stages computed from ``state``, and returns the state for the next stage.
"""

from __future__ import annotations

import difflib
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import torch

from .. import images as imgs
from ..callbacks import MultiPipelineCallbacks, PipelineCallback
from . import stages


@dataclass(frozen=True)
class SDRequest:
    """The arguments of a Stable Diffusion family call (text-to-image, image-to-image, inpainting).

    Fields a task's signature does not have keep these neutral values; the task's own defaults are
    those of its ``__call__`` signature (the reference's), which always passes every field it has.
    """

    prompt: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = 50
    timesteps: list[int] | None = None
    sigmas: list[float] | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    num_images_per_prompt: int = 1
    eta: float = 0.0
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: torch.Tensor | None = None
    ip_adapter_image: Any = None
    ip_adapter_image_embeds: list[torch.Tensor] | None = None
    output_type: str = "pil"
    return_dict: bool = True
    cross_attention_kwargs: dict | None = None
    clip_skip: int | None = None
    callback_on_step_end: Callable | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] | None = ("latents",)
    # the reference's deprecated ``callback(step, t, latents)`` every ``callback_steps`` progress steps
    callback: Callable[[int, Any, torch.Tensor], None] | None = None
    callback_steps: int | None = None
    # image-to-image and inpainting
    image: Any = None
    mask_image: Any = None
    masked_image_latents: torch.Tensor | None = None
    padding_mask_crop: int | None = None
    strength: float = 1.0

    # call-argument names that differ from the field they fill (AnimateDiff's num_videos_per_prompt)
    renamed = {}

    @classmethod
    def of_call(cls, arguments: dict) -> "SDRequest":
        """The request from a ``__call__``'s ``locals()``; a name that is no field is a bug in the
        pipeline's signature, not a user error, so it fails loudly."""
        names = {f.name for f in fields(cls)}
        arguments = dict(arguments)
        pipe = arguments.pop("self", None)
        extra = arguments.pop("kwargs", {})
        arguments.update(legacy_call_arguments(type(pipe).__name__, extra, known=list(arguments)))
        values = {cls.renamed.get(k, k): v for k, v in arguments.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field for the call argument(s) {unknown}")
        callback = values.get("callback_on_step_end")
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            values["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs  # what the callback reads
        return cls(**values)

    # ------------------------------------------------------------------ derived values
    @property
    def batch(self) -> int:
        """Prompts in the call (before ``num_images_per_prompt``)."""
        return stages.batch_size_of(self.prompt, self.prompt_embeds)

    @property
    def total(self) -> int:
        """Images the call makes."""
        return self.batch * self.num_images_per_prompt

    @property
    def lora_scale(self) -> float | None:
        """``cross_attention_kwargs["scale"]``: the strength of every LoRA for this call."""
        return (self.cross_attention_kwargs or {}).get("scale")

    def size(self, pipe) -> tuple[int, int]:
        """(height, width): the call's, or the UNet's default."""
        default_h, default_w = pipe._default_size()
        return self.height or default_h, self.width or default_w

    # ------------------------------------------------------------------ checks
    def check(self, pipe) -> None:
        """Every input rule of the call, before any model runs: the components the call needs, the
        task's own inputs, then the common ones."""
        pipe._check_components(self)
        self.check_task(pipe)
        self.check_common(pipe)

    def check_task(self, pipe) -> None:
        task = pipe.task
        if task == "text":
            stages.check_size(*self.size(pipe), pipe.vae_scale_factor)
            return
        if self.image is None or (task == "inpaint" and self.mask_image is None):
            needs = "image= and mask_image=" if task == "inpaint" else "image= (a PIL image, array or tensor)"
            raise ValueError(f"{type(pipe).__name__} needs {needs}")
        check_strength(self.strength)
        if task == "inpaint":
            stages.check_size(*self.size(pipe), pipe.vae_scale_factor)
            self._check_padding_mask_crop()
            unet_channels, latent_channels = pipe.unet.config.in_channels, pipe.vae.config.latent_channels
            if unet_channels not in (latent_channels, 2 * latent_channels + 1):
                raise ValueError(
                    f"inpainting needs a UNet with {latent_channels} or {2 * latent_channels + 1} input channels, "
                    f"this one has {unet_channels}"
                )
            given_latents = (
                torch.is_tensor(self.image) and self.image.ndim == 4 and self.image.shape[1] == latent_channels
            )
            if given_latents and unet_channels != latent_channels and self.masked_image_latents is None:
                raise ValueError(
                    "image= is latents, so there is no masked image to encode for this inpainting UNet's extra "
                    "channels: pass masked_image_latents= too (or the image itself)"
                )

    def _check_padding_mask_crop(self) -> None:
        if self.padding_mask_crop is None:
            return
        import PIL.Image

        if not (isinstance(self.image, PIL.Image.Image) and isinstance(self.mask_image, PIL.Image.Image)):
            raise ValueError(
                "padding_mask_crop crops around the mask of one PIL image: pass image= and mask_image= as PIL "
                f"images, got {type(self.image).__name__} and {type(self.mask_image).__name__}"
            )
        if self.output_type != "pil":
            raise ValueError(
                'padding_mask_crop pastes the result back into the image: use output_type="pil", '
                f"got {self.output_type!r}"
            )

    def check_common(self, pipe) -> None:
        stages.check_prompt_inputs(self.prompt, self.negative_prompt, self.prompt_embeds, self.negative_prompt_embeds)
        stages.check_callback_inputs(self.callback_on_step_end_tensor_inputs, pipe.callback_tensor_inputs)
        check_legacy_callback(self.callback, self.callback_steps)
        n = self.num_images_per_prompt
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        stages.check_generators(self.generator, self.total)
        if (
            self.guidance_scale > 1
            and self.prompt_embeds is not None
            and self.negative_prompt_embeds is None
            and self.negative_prompt is not None
        ):
            raise ValueError("with prompt_embeds=, pass the negative side as negative_prompt_embeds=")
        imgs.check_output_type(self.output_type)
        pipe._check_image_prompt(self.ip_adapter_image, self.ip_adapter_image_embeds, pipe._guidance(self).active)
        scale = self.lora_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
            raise TypeError(f"cross_attention_kwargs['scale'] (the LoRA strength) must be a number, got {scale!r}")


LEGACY_CALL_ARGUMENTS = ("callback", "callback_steps")


def legacy_call_arguments(pipeline: str, extra: dict, known: list[str]) -> dict:  # known: the call's own names
    """The reference's deprecated ``callback=`` / ``callback_steps=``, which its pipelines take through
    ``**kwargs``, with its FutureWarning; any other name there is refused (the reference drops it
    silently, so a misspelt argument would be lost without a word)."""
    for name in extra:
        if name not in LEGACY_CALL_ARGUMENTS:
            refuse_unknown(pipeline, name, known)
        warnings.warn(
            f"`{name}` is deprecated and will be removed in version 1.0.0. Passing `{name}` as an input argument "
            "to `__call__` is deprecated, consider using `callback_on_step_end`",
            FutureWarning,
            stacklevel=4,
        )
    return extra


def refuse_unknown(pipeline: str, name: str, known) -> None:
    """The TypeError for an argument the call does not take, with the closest name it does take."""
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; see help({pipeline}.__call__)"
    raise TypeError(f"{pipeline}.__call__() got an unexpected keyword argument {name!r}{hint}")


def check_legacy_callback(callback, every) -> None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function callback(step, timestep, latents), got {type(callback).__name__}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"callback_steps must be a positive integer (steps between callbacks), got {every!r}")


def check_strength(strength: float) -> None:
    if not (0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be between 0 and 1, got {strength}")


def check_fraction(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a fraction of the schedule in (0, 1], got {value!r}")


@dataclass
class CallState:
    """What a call's stages have computed so far; the template starts it and each stage adds to it."""

    device: torch.device
    height: int | None = None
    width: int | None = None
    pixels: torch.Tensor | None = None  # the input image in [-1, 1] (or latents handed on as they are)
    crop: tuple[int, int, int, int] | None = None  # padding_mask_crop's box in the input image
    mask_pixels: torch.Tensor | None = None  # inpainting's mask, 1 where to repaint
    # prompt stage
    guidance_scale: float | None = None  # the call's guidance_scale, what ``pipe.guidance_scale`` says
    guidance: stages.Guidance | None = None  # what the loop does now (a callback may turn it off)
    embeds: torch.Tensor | None = None
    negative: torch.Tensor | None = None
    pooled: torch.Tensor | None = None  # SDXL's pooled text embeddings
    negative_pooled: torch.Tensor | None = None
    image_embeds: list[torch.Tensor] | None = None  # IP-Adapter image prompt, one tensor per adapter
    # schedule and latents
    timesteps: torch.Tensor | None = None
    num_inference_steps: int | None = None
    latents: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None  # the encoded input image (inpainting with a plain UNet)
    noise: torch.Tensor | None = None  # the noise the start latents were made with (inpainting)
    # what the UNet reads at every step, guidance-batched: the names a callback may read and replace
    tensors: dict[str, Any] = field(default_factory=dict)
    added_cond: dict[str, str] = field(default_factory=dict)  # UNet added_cond_kwargs name -> tensors key
    concat: tuple[str, ...] = ()  # tensors joined to the UNet input's channels (inpainting)
    timestep_cond: torch.Tensor | None = None  # guidance embedding of a guidance-distilled UNet
    after_step: Callable | None = None  # (latents, i, t) -> latents after each step (inpainting's blend)
    guide: Callable | None = None  # a further guidance term on the guided prediction (SAG)
    predict: Callable | None = None  # the model call of the loop, if not the text-conditioned UNet's
    unet_extra: Callable | None = None  # (model_input, t, tensors) -> more UNet arguments (ControlNet)
    text_ids: torch.Tensor | None = None  # a transformer's position ids of the text tokens (Flux)
    ids: torch.Tensor | None = None  # ... and of the image tokens
    step_index: int = 0  # the loop's position in the schedule
    step_kwargs: dict[str, Any] = field(default_factory=dict)  # more scheduler.step arguments
    decode_kwargs: dict[str, Any] = field(default_factory=dict)  # more vae.decode arguments (the masked VAE)
    # result
    images: Any = None
    nsfw: list[bool] | None = None
    output: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    @property
    def condition(self) -> torch.Tensor:
        """The prompt embeddings as the UNet reads them: ``[negative, positive]`` under guidance."""
        return self.paired(self.embeds, self.negative)

    def paired(self, positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """``[negative, positive]`` under guidance (the UNet's batch layout), else ``positive``."""
        return torch.cat([negative, positive]) if self.guidance.active else positive
