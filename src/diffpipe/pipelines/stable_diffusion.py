"""Stable Diffusion text-to-image, and the parts every Stable Diffusion task shares."""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .. import images as imgs
from ..outputs import BaseOutput
from ..adapters import IPAdapterMixin, LoraLoaderMixin, TextualInversionLoaderMixin
from ..config import fix_scheduler_for_sd, fix_unet_for_sd
from ..runtime import deepcache
from . import stages
from .pipeline import DiffusionPipeline
from .request import LEGACY_CALL_ARGUMENTS, CallState, SDRequest, refuse_unknown

logger = logging.getLogger(__name__)

SAFETY_CHECKER_DISABLED = (
    "You have disabled the safety checker for {cls} by passing `safety_checker=None`. Ensure that you abide "
    "by the conditions of the Stable Diffusion license and do not expose unfiltered results in services or "
    "applications open to the public. Both the diffusers team and Hugging Face strongly recommend keeping the "
    "safety filter enabled in all public-facing circumstances, disabling it only for use cases that involve "
    "analyzing network behavior or auditing its results."
)


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """``images``, and per image whether the safety checker flagged it (None without a checker)."""

    images: Any
    nsfw_content_detected: list[bool] | None = None


class StableDiffusionBase(TextualInversionLoaderMixin, IPAdapterMixin, LoraLoaderMixin, DiffusionPipeline):
    """Components, prompt encoding, the safety checker and output handling shared by SD tasks."""

    _config_keys = ("requires_safety_checker",)
    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    embeds_guidance_scale = True  # see _embeds_guidance
    request_type = SDRequest
    task = "text"  # "text", "image" (image-to-image) or "inpaint": which inputs the request checks

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        if safety_checker is None and requires_safety_checker:
            logger.warning(SAFETY_CHECKER_DISABLED.format(cls=type(self).__name__))
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                f"{type(self).__name__}: a safety_checker needs its feature_extractor (a CLIPImageProcessor); "
                "pass feature_extractor= or safety_checker=None"
            )
        scheduler = fix_scheduler_for_sd(scheduler)
        fix_unet_for_sd(unet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # ------------------------------------------------------------------ helpers
    @property
    def image_processor(self):
        """The reference's ``pipe.image_processor`` (a ``VaeImageProcessor`` at this VAE's scale)."""
        return self._processor("image")

    @property
    def mask_processor(self):
        """Masks as inpainting reads them: grayscale, binarized, not normalized."""
        return self._processor("mask")

    def _processor(self, kind: str):
        from ..image_processor import VaeImageProcessor

        cache = self.__dict__.setdefault("_processors", {})
        key = (kind, self.vae_scale_factor)
        if key not in cache:
            settings = dict(do_normalize=False, do_binarize=True, do_convert_grayscale=True) if kind == "mask" else {}
            cache[key] = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, **settings)
        return cache[key]

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @property
    def _execution_device(self) -> torch.device:
        device = getattr(self, "_offload_device", None)
        if device is not None:
            return device
        unet = getattr(self, "unet", None)
        return unet.device if unet is not None else self.device  # a pipeline of only its text parts

    def _default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def _prompt_dtype(self) -> torch.dtype:
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return self.unet.dtype

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        clip_skip=None,
        **unused,
    ):
        """(prompt embeddings, negative embeddings) as the reference's ``encode_prompt`` returns them."""
        return stages.encode_prompt(
            self.tokenizer,
            self.text_encoder,
            prompt,
            num_images_per_prompt=num_images_per_prompt,
            do_cfg=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            clip_skip=clip_skip,
            dtype=self._prompt_dtype(),
            device=device,
        )

    def _encode_text(self, request: SDRequest, state: CallState) -> None:
        """The call's prompt embeddings into ``state`` (``embeds``, ``negative``, SDXL's pooled ones)."""
        state.embeds, state.negative, *pooled = self.encode_prompt(
            prompt=request.prompt,
            device=state.device,
            num_images_per_prompt=request.num_images_per_prompt,
            do_classifier_free_guidance=state.guidance.active,
            negative_prompt=request.negative_prompt,
            prompt_embeds=request.prompt_embeds,
            negative_prompt_embeds=request.negative_prompt_embeds,
            clip_skip=request.clip_skip,
            **self._more_prompt_arguments(request),
        )
        if pooled:
            state.pooled, state.negative_pooled = pooled

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the UNet (see ``models/freeu.py``): sharper detail at no cost; ``disable_freeu`` undoes it."""
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def enable_deepcache(self, cache_interval: int = 3, cache_branch_id: int = 0) -> None:
        """DeepCache on the UNet (see ``runtime/deepcache.py``): the whole UNet runs only at every
        ``cache_interval``-th step; the steps between run the blocks above skip branch
        ``cache_branch_id`` (``0 .. 3 * len(unet.down_blocks) - 1``; 0 is the shallowest, the fastest)
        and reuse the deeper features. ``disable_deepcache`` undoes it."""
        deepcache.enable(self.unet, cache_interval=cache_interval, cache_branch_id=cache_branch_id)

    def disable_deepcache(self) -> None:
        deepcache.disable(self.unet)

    @contextlib.contextmanager
    def _call_context(self, request):
        """The call context of every pipeline, in which the UNet's DeepCache (if on) counts the steps."""
        unet, scheduler = getattr(self, "unet", None), getattr(self, "scheduler", None)
        with super()._call_context(request) as state, deepcache.counting_steps(unet, scheduler, state):
            yield state

    def _components_needed(self, request: SDRequest) -> list[str]:
        """The components this call runs: the UNet and scheduler always, the VAE unless text-to-image
        stops at latents, the text encoder and tokenizer unless the call gives ``prompt_embeds``."""
        needed = ["unet", "scheduler"]
        if request.output_type != "latent" or self.task != "text":
            needed.append("vae")
        if request.prompt_embeds is None:
            needed += ["text_encoder", "tokenizer"]
        return needed

    def _check_components(self, request: SDRequest) -> None:
        missing = [name for name in self._components_needed(request) if getattr(self, name, None) is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__} has no {', '.join(missing)} (loaded with {missing[0]}=None?), which "
                "this call needs. A pipeline of the text parts only can encode_prompt(); to generate, load "
                "it with every component or pass the missing ones (from_pipe(pipe, unet=...))."
            )

    def _more_prompt_arguments(self, request: SDRequest) -> dict:
        """Arguments of this family's ``encode_prompt`` beyond SD's (SDXL's second prompt, pooled embeds)."""
        return {}

    def _embeds_guidance(self) -> bool:
        """Whether the UNet is guidance-distilled (LCM: ``time_cond_proj_dim``) and this task gives it the
        scale as an embedding instead of running classifier-free guidance. The reference does so in its
        SD and SDXL tasks; its SAG and AnimateDiff pipelines guide every UNet with CFG and no embedding."""
        return self.embeds_guidance_scale and self.unet.config.get("time_cond_proj_dim") is not None

    def _guidance(self, request: SDRequest) -> stages.Guidance:
        return self._guidance_for(request.guidance_scale, request.guidance_rescale)

    def _guidance_for(self, scale: float, rescale: float = 0.0) -> stages.Guidance:
        """Classifier-free guidance at ``scale``; none for a UNet that takes the scale as an embedding."""
        if self._embeds_guidance():
            return stages.Guidance(scale=1.0)
        return stages.Guidance(scale=scale, rescale=rescale)

    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """``[len(w), embedding_dim]`` sinusoidal code of ``1000 * w`` (``w`` = guidance scale - 1), the
        condition a guidance-distilled (LCM) UNet reads through ``timestep_cond``."""
        if w.ndim != 1:
            raise ValueError(f"w must be a 1-d tensor of guidance scales, got shape {tuple(w.shape)}")
        half = embedding_dim // 2
        freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = (w * 1000.0).to(dtype)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
        if embedding_dim % 2 == 1:
            emb = torch.nn.functional.pad(emb, (0, 1))
        return emb

    def run_safety_checker(self, image: torch.Tensor, device, dtype):
        if getattr(self, "safety_checker", None) is None:
            return image, None
        pil = imgs.postprocess(image, output_type="pil")
        inputs = self.feature_extractor(pil, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=device, dtype=dtype)
        return self.safety_checker(images=image, clip_input=pixels)

    def _decode(self, latents, generator=None, **decode_kwargs) -> torch.Tensor:
        return stages.decode_latents(self.vae, latents, generator, **decode_kwargs)

    def _encode_image(self, pixels, generator) -> torch.Tensor:
        """Image in ``[-1, 1]`` -> scaled latents (img2img's and inpainting's start)."""
        return stages.encode_image_latents(self.vae, pixels, generator)

    def _output(self, state: CallState, request: SDRequest):
        if not request.return_dict:
            return state.images, state.nsfw
        return StableDiffusionPipelineOutput(images=state.images, nsfw_content_detected=state.nsfw)


# ============================================================================ the SD family's stages
# Each is ``stage(pipe, request, state) -> state``; a pipeline lists the ones its task runs.
def encode_prompt_stage(pipe: StableDiffusionBase, request: SDRequest, state: CallState) -> CallState:
    """The prompt (and the IP-Adapter image prompt) as embeddings; decides classifier-free guidance."""
    state.guidance_scale, state.guidance = request.guidance_scale, pipe._guidance(request)
    if request.ip_adapter_image is not None or request.ip_adapter_image_embeds is not None:
        state.image_embeds = pipe.prepare_ip_adapter_image_embeds(
            request.ip_adapter_image,
            request.ip_adapter_image_embeds,
            state.device,
            request.total,
            state.guidance.active,
        )
    pipe._encode_text(request, state)
    state.tensors.update(prompt_embeds=state.condition, negative_prompt_embeds=state.negative)
    return state


def text_timesteps(pipe, request: SDRequest, state: CallState) -> CallState:
    """The whole schedule (steps, or the caller's ``timesteps=`` / ``sigmas=``)."""
    state.timesteps, state.num_inference_steps = stages.set_timesteps(
        pipe.scheduler, request.num_inference_steps, state.device, request.timesteps, request.sigmas
    )
    return state


def noise_latents(pipe, request: SDRequest, state: CallState) -> CallState:
    """Pure noise (or the caller's ``latents=``) at the image size, scaled for the scheduler."""
    state.height, state.width = request.size(pipe)
    factor = pipe.vae_scale_factor
    shape = (request.total, pipe.unet.config.in_channels, state.height // factor, state.width // factor)
    state.latents = stages.initial_latents(
        shape,
        generator=request.generator,
        device=state.device,
        dtype=state.dtype,
        latents=request.latents,
        init_noise_sigma=pipe.scheduler.init_noise_sigma,
    )
    return state


def guidance_embedding(pipe: StableDiffusionBase, request: SDRequest, state: CallState) -> CallState:
    """A guidance-distilled (LCM) UNet's ``timestep_cond``: the guidance scale as an embedding."""
    if pipe._embeds_guidance():
        w = torch.full((request.total,), request.guidance_scale - 1.0)
        emb = pipe.get_guidance_scale_embedding(w, pipe.unet.config.time_cond_proj_dim)
        state.timestep_cond = emb.to(device=state.device, dtype=state.latents.dtype)
    return state


def decode_images(pipe: StableDiffusionBase, request: SDRequest, state: CallState) -> CallState:
    """Latents -> images through the VAE and the safety checker (unless ``output_type="latent"``)."""
    if request.output_type == "latent":
        state.images = state.latents
        return state
    image = pipe._decode(state.latents, request.generator, **state.decode_kwargs)
    image, state.nsfw = pipe.run_safety_checker(image, state.device, state.dtype)
    denormalize = None if state.nsfw is None else [not flagged for flagged in state.nsfw]
    state.images = imgs.postprocess(image, output_type=request.output_type, do_denormalize=denormalize)
    return state


def output(pipe: StableDiffusionBase, request: SDRequest, state: CallState) -> CallState:
    state.output = pipe._output(state, request)
    return state


# The steps every SD-family image task ends with.
DENOISE_AND_DECODE = (guidance_embedding, stages.denoise, decode_images, output)


class StableDiffusionPipeline(StableDiffusionBase):
    """Text to image with Stable Diffusion 1.x / 2.x."""

    def _other_task(self, **kwargs):
        """Run the image-to-image or inpainting task on these components (``image=`` was given)."""
        from .auto import AutoPipelineForImage2Image, AutoPipelineForInpainting

        own = inspect.signature(StableDiffusionPipeline.__call__).parameters
        task_only = {"image", "mask_image", "strength", "masked_image_latents"}
        for name in sorted(set(kwargs) - set(own) - task_only - set(LEGACY_CALL_ARGUMENTS)):
            refuse_unknown(type(self).__name__, name, [*own, *task_only])
        auto = AutoPipelineForInpainting if "mask_image" in kwargs else AutoPipelineForImage2Image
        task = auto.from_pipe(self)
        accepted = inspect.signature(task.__call__).parameters
        for name in list(kwargs):
            if name in accepted or name in LEGACY_CALL_ARGUMENTS:
                continue
            default = own[name].default if name in own else inspect.Parameter.empty
            value = kwargs.pop(name)
            if value is not default and not (not torch.is_tensor(value) and value == default):
                raise TypeError(f"{name}= has no meaning for {type(task).__name__}, which this call runs")
        return task(**kwargs)

    call_stages = (encode_prompt_stage, text_timesteps, noise_latents, *DENOISE_AND_DECODE)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        """Generate images from text. Given ``image=`` (and ``mask_image=``), the same components run
        the image-to-image (inpainting) task instead, as the spec's loading guide promises."""
        arguments = dict(locals())
        legacy = {k: v for k, v in kwargs.items() if k in LEGACY_CALL_ARGUMENTS}
        task_inputs = {k: v for k, v in kwargs.items() if k not in legacy}
        if "image" in task_inputs:
            del arguments["self"], arguments["kwargs"]
            return self._other_task(**arguments, **legacy, **task_inputs)
        return self._generate(arguments)
