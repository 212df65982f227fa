"""Flux.1 (dev and schnell): a flow-matching diffusion transformer over 2x2-packed latents.

The prompt goes through CLIP (its pooled output conditions every block) and T5 (its token states are
the sequence the image tokens attend to). Latents ``[B, C, H/8, W/8]`` are packed into ``[B, (H/16)
(W/16), 4C]`` tokens with 3-axis position ids (0, row, column); text tokens get ids of zeros. The
schedule is FlowMatchEuler's, shifted by ``mu``, which grows with the image's token count. Guidance is
either embedded (dev: ``guidance_scale`` goes into the transformer) or "true" classifier-free guidance
with a negative prompt (``true_cfg_scale`` > 1), one extra transformer call per step.

The pipelines reuse the shared loop (``stages.denoise``) with their own model call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .. import images as imgs
from ..adapters import LoraLoaderMixin
from ..outputs import BaseOutput
from ..schedulers.base import randn
from ..schedulers.flow_match_euler import calculate_shift
from . import stages
from .pipeline import DiffusionPipeline
from .request import CallState, SDRequest

logger = logging.getLogger(__name__)
CLIP_LENGTH = 77
MAX_T5_LENGTH = 512


@dataclass
class FluxPipelineOutput(BaseOutput):
    images: Any


@dataclass(frozen=True)
class FluxRequest(SDRequest):
    """A Flux call: SD's fields (prompts, sizes, steps, batch, outputs, callbacks) and Flux's own."""

    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    true_cfg_scale: float = 1.0
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    negative_ip_adapter_image: Any = None
    negative_ip_adapter_image_embeds: Any = None
    joint_attention_kwargs: dict | None = None
    max_sequence_length: int = MAX_T5_LENGTH

    @property
    def lora_scale(self) -> float | None:
        return (self.joint_attention_kwargs or {}).get("scale")

    @property
    def true_cfg(self) -> bool:
        negative = self.negative_prompt is not None or self.negative_prompt_embeds is not None
        return self.true_cfg_scale > 1 and negative

    def size(self, pipe) -> tuple[int, int]:
        multiple = pipe.vae_scale_factor * 2
        height = self.height or pipe.default_sample_size * pipe.vae_scale_factor
        width = self.width or pipe.default_sample_size * pipe.vae_scale_factor
        return multiple * (int(height) // multiple), multiple * (int(width) // multiple)

    def check(self, pipe) -> None:
        missing = [n for n in ("transformer", "scheduler", "vae") if getattr(pipe, n, None) is None]
        if self.prompt_embeds is None:
            missing += [
                n for n in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if getattr(pipe, n) is None
            ]
        if missing:
            raise ValueError(f"{type(pipe).__name__} has no {', '.join(missing)}, which this call needs")
        stages.check_prompt_inputs(self.prompt, self.negative_prompt, self.prompt_embeds, self.negative_prompt_embeds)
        if self.prompt_embeds is not None and self.pooled_prompt_embeds is None:
            raise ValueError("with prompt_embeds=, pass pooled_prompt_embeds= too (CLIP's pooled output)")
        if self.negative_prompt_embeds is not None and self.negative_pooled_prompt_embeds is None:
            raise ValueError("with negative_prompt_embeds=, pass negative_pooled_prompt_embeds= too")
        if not isinstance(self.max_sequence_length, int) or not 0 < self.max_sequence_length <= MAX_T5_LENGTH:
            raise ValueError(f"max_sequence_length must be an integer in [1, 512], got {self.max_sequence_length!r}")
        stages.check_callback_inputs(self.callback_on_step_end_tensor_inputs, pipe.callback_tensor_inputs)
        n = self.num_images_per_prompt
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {n!r}")
        stages.check_generators(self.generator, self.total)
        imgs.check_output_type(self.output_type)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and value % (pipe.vae_scale_factor * 2):
                logger.warning(
                    "%s=%s is not a multiple of %d (the VAE's factor times the 2x2 packing): using %d",
                    name,
                    value,
                    pipe.vae_scale_factor * 2,
                    value // (pipe.vae_scale_factor * 2) * pipe.vae_scale_factor * 2,
                )
        self.check_task(pipe)

    def check_task(self, pipe) -> None:
        if pipe.task == "text":
            return
        if self.image is None or (pipe.task == "inpaint" and self.mask_image is None):
            raise ValueError(
                f"{type(pipe).__name__} needs image=" + (" and mask_image=" if pipe.task == "inpaint" else "")
            )
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {self.strength}")


# ---------------------------------------------------------------------------------------- packing
def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/2)(W/2), 4C]``: each 2x2 patch one token."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """The inverse of :func:`pack` for an image of ``height`` x ``width`` pixels."""
    b, _, channels = latents.shape
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    latents = latents.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """``[h*w, 3]`` position ids of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------- stages
def encode_prompt_stage(pipe, request: FluxRequest, state: CallState) -> CallState:
    state.guidance_scale = request.guidance_scale
    state.guidance = stages.Guidance(scale=1.0)  # embedded guidance, or true CFG inside the model call
    state.embeds, state.pooled, state.text_ids = pipe.encode_prompt(
        request.prompt,
        request.prompt_2,
        device=state.device,
        num_images_per_prompt=request.num_images_per_prompt,
        prompt_embeds=request.prompt_embeds,
        pooled_prompt_embeds=request.pooled_prompt_embeds,
        max_sequence_length=request.max_sequence_length,
    )
    if request.true_cfg:  # (a negative prompt or its embeddings were given)
        state.negative, state.negative_pooled, _ = pipe.encode_prompt(
            request.negative_prompt,
            request.negative_prompt_2,
            device=state.device,
            num_images_per_prompt=request.num_images_per_prompt,
            prompt_embeds=request.negative_prompt_embeds,
            pooled_prompt_embeds=request.negative_pooled_prompt_embeds,
            max_sequence_length=request.max_sequence_length,
        )
    state.tensors.update(prompt_embeds=state.embeds)
    return state


def noise_latents(pipe, request: FluxRequest, state: CallState) -> CallState:
    state.height, state.width = request.size(pipe)
    channels = pipe.transformer.config.in_channels // 4
    factor = pipe.vae_scale_factor
    h, w = 2 * (state.height // (factor * 2)), 2 * (state.width // (factor * 2))
    state.ids = image_ids(h // 2, w // 2, state.device, state.dtype)
    if request.latents is not None:
        state.latents = request.latents.to(device=state.device, dtype=state.dtype)
        return state
    noise = randn((request.total, channels, h, w), generator=request.generator, device=state.device, dtype=state.dtype)
    state.latents = pack(noise)
    return state


def flow_sigmas(num_inference_steps: int) -> np.ndarray:
    return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)


def set_flow_timesteps(pipe, request: FluxRequest, state: CallState, image_seq_len: int):
    """The shifted flow-matching schedule for this many image tokens (the caller's ``sigmas`` or
    ``linspace(1, 1/N, N)``)."""
    scheduler = pipe.scheduler
    sigmas = flow_sigmas(request.num_inference_steps) if request.sigmas is None else request.sigmas
    config = scheduler.config
    mu = None
    if config.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
    scheduler.set_timesteps(len(sigmas), device=state.device, sigmas=sigmas, mu=mu)
    return scheduler.timesteps, len(scheduler.timesteps)


def text_schedule(pipe, request: FluxRequest, state: CallState) -> CallState:
    state.timesteps, state.num_inference_steps = set_flow_timesteps(pipe, request, state, state.latents.shape[1])
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    return state


def transformer_call(pipe, request: FluxRequest, state: CallState) -> CallState:
    """The loop's model call: the transformer at ``t / 1000`` with the embedded guidance scale; with
    true CFG a second call on the negative prompt, combined as ``neg + s * (pos - neg)``."""
    transformer = pipe.transformer
    batch = state.latents.shape[0]
    guidance = None
    if transformer.config.get("guidance_embeds", False):
        guidance = torch.full([1], request.guidance_scale, device=state.device, dtype=torch.float32).expand(batch)
    kwargs = request.joint_attention_kwargs

    def run(latents, t, embeds, pooled):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=state.text_ids,
            img_ids=state.ids,
            joint_attention_kwargs=kwargs,
            return_dict=False,
        )[0]

    def predict(model_input, t, tensors, image_embeds):
        positive = run(model_input, t, tensors["prompt_embeds"], state.pooled)
        if not request.true_cfg:
            return positive
        negative = run(model_input, t, state.negative, state.negative_pooled)
        return negative + request.true_cfg_scale * (positive - negative)

    state.predict = predict
    return state


def decode_images(pipe, request: FluxRequest, state: CallState) -> CallState:
    if request.output_type == "latent":
        state.images = state.latents
        return state
    latents = unpack(state.latents, state.height, state.width, pipe.vae_scale_factor)
    image = stages.decode_latents(pipe.vae, latents, request.generator, **state.decode_kwargs)
    state.images = imgs.postprocess(image, output_type=request.output_type)
    return state


def output(pipe, request: FluxRequest, state: CallState) -> CallState:
    state.output = FluxPipelineOutput(images=state.images) if request.return_dict else (state.images,)
    return state


# ---------------------------------------------------------------------------------------- pipelines
class FluxBase(LoraLoaderMixin, DiffusionPipeline):
    """The Flux components, prompt encoding and sizes every Flux task shares."""

    _lora_components = ("transformer", "text_encoder")

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        """A LoRA for the transformer (and CLIP): diffusers / peft keys, kohya's ``lora_unet_double_blocks_*``
        and the BFL original names (see ``adapters/lora_flux.py``); keys that map nowhere are reported."""
        from ..adapters.lora import read_lora_source
        from ..adapters.lora_flux import is_flux_original, to_peft

        fetch = {
            k: kwargs[k]
            for k in (
                "weight_name",
                "subfolder",
                "use_safetensors",
                "cache_dir",
                "local_files_only",
                "token",
                "revision",
            )
            if k in kwargs
        }
        tensors, metadata = read_lora_source(pretrained_model_name_or_path_or_dict, "load_lora_weights", **fetch)
        rest = {k: v for k, v in kwargs.items() if k not in fetch}
        if is_flux_original(tensors):
            tensors = to_peft(tensors, self.transformer)
            return super().load_lora_weights(tensors, adapter_name, **rest)
        return super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name, **kwargs)

    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->transformer->vae"
    _optional_components = ("image_encoder", "feature_extractor")
    callback_tensor_inputs = ("latents", "prompt_embeds")
    _slot_classes = {
        **DiffusionPipeline._slot_classes,
        "transformer": ("FluxTransformer2DModel",),
        "text_encoder_2": ("PreTrainedModel",),
        "tokenizer_2": ("PreTrainedTokenizerBase",),
    }
    default_sample_size = 128
    request_type = FluxRequest
    task = "text"

    def __init__(
        self,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        transformer,
        image_encoder=None,
        feature_extractor=None,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @property
    def image_processor(self):
        from ..image_processor import VaeImageProcessor

        cache = self.__dict__.setdefault("_processors", {})
        key = ("image", self.vae_scale_factor)
        if key not in cache:  # sizes in multiples of the VAE's factor times the 2x2 packing
            cache[key] = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        return cache[key]

    @property
    def _execution_device(self) -> torch.device:
        device = getattr(self, "_offload_device", None)
        if device is not None:
            return device
        return self.transformer.device if self.transformer is not None else self.device

    def _prompt_list(self, prompt) -> list[str]:
        return [prompt] if isinstance(prompt, str) else list(prompt)

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = MAX_T5_LENGTH,
        lora_scale: float | None = None,
    ):
        """(T5 token states ``[B, L, D]``, CLIP pooled ``[B, D']``, text ids ``[L, 3]``) as the
        reference's ``encode_prompt`` returns them; ``prompt_2`` (T5's) defaults to ``prompt``."""
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = self._prompt_list(prompt)
            prompts_2 = prompts if prompt_2 is None else self._prompt_list(prompt_2)
            pooled_prompt_embeds = self._clip_pooled(prompts, device)
            prompt_embeds = self._t5_states(prompts_2, device, max_sequence_length)
        dtype = self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device).repeat_interleave(num_images_per_prompt, dim=0)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    def _clip_pooled(self, prompts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        stages.bring_to_device(self.text_encoder)
        out = self.text_encoder(tokens.to(self.text_encoder.device), output_hidden_states=False)
        return out.pooler_output.to(dtype=self.text_encoder.dtype, device=device)

    def _t5_states(self, prompts: list[str], device, length: int) -> torch.Tensor:
        tokens = self.tokenizer_2(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        stages.bring_to_device(self.text_encoder_2)
        return self.text_encoder_2(tokens.to(self.text_encoder_2.device), output_hidden_states=False)[0].to(device)


class FluxPipeline(FluxBase):
    """Text to image with Flux.1 (dev: ``guidance_scale`` embedded; schnell: few steps, no guidance)."""

    call_stages = (
        encode_prompt_stage,
        noise_latents,
        text_schedule,
        transformer_call,
        stages.denoise,
        decode_images,
        output,
    )

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float = 3.5,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        negative_ip_adapter_image=None,
        negative_ip_adapter_image_embeds=None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = MAX_T5_LENGTH,
    ):
        """Generate images from text (``prompt_2`` goes to T5, ``prompt`` to CLIP and to T5 when
        ``prompt_2`` is not given)."""
        return self._generate(locals())
