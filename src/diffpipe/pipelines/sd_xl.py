"""Stable Diffusion XL text-to-image, and what every SDXL task shares.

SDXL conditions its UNet on two CLIP text encoders at once: the penultimate hidden states of
``text_encoder`` (CLIP ViT-L) and ``text_encoder_2`` (OpenCLIP bigG, with a projection) are joined
along the feature axis, and the projected, pooled output of the second rides along as
``added_cond_kwargs["text_embeds"]`` together with the "micro-conditioning" ``time_ids``
(original size, crop corner, target size, or an aesthetic score for the refiner). Everything else,
the loop, guidance, image encoding, is the Stable Diffusion base's.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..outputs import BaseOutput
from . import stages
from .pipeline import DiffusionPipeline
from .request import CallState, SDRequest, check_fraction
from .stable_diffusion import (
    DENOISE_AND_DECODE,
    StableDiffusionBase,
    encode_prompt_stage,
    noise_latents,
    text_timesteps,
)

# The 48-bit message Stability AI's reference code embeds (generative-models, streamlit_helpers.py).
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110


@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    images: Any


class InvisibleWatermark:
    """SDXL's invisible watermark, through the ``invisible-watermark`` package (``imwatermark``).

    diffpipe does not depend on that package: install it yourself (``pip install invisible-watermark``)
    to have images watermarked. Images narrower than 256 pixels are left as they are.
    """

    def __init__(self):
        try:
            from imwatermark import WatermarkEncoder
        except ImportError as e:
            raise ImportError(
                "add_watermarker=True needs the invisible-watermark package, which diffpipe does not install: "
                "`pip install invisible-watermark`, or pass add_watermarker=False"
            ) from e
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bits", [int(bit) for bit in format(WATERMARK_MESSAGE, "b")])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]`` (B, C, H, W) -> watermarked, same range and layout (as float32)."""
        if images.shape[-1] < 256:
            return images
        pixels = ((images / 2 + 0.5) * 255).float().cpu().permute(0, 2, 3, 1).numpy()
        # the encoder works on BGR images, as OpenCV reads them
        marked = np.stack([self.encoder.encode(img[:, :, ::-1], "dwtDct")[:, :, ::-1] for img in pixels])
        out = torch.from_numpy(np.ascontiguousarray(marked)).permute(0, 3, 1, 2).float()
        return (out / 255 * 2 - 1).clamp(-1.0, 1.0).to(images.device)


def watermark_available() -> bool:
    return importlib.util.find_spec("imwatermark") is not None


def cut_at_denoising_end(scheduler, timesteps: torch.Tensor, num_inference_steps: int, denoising_end):
    """Keep the timesteps above ``denoising_end``'s point of the training schedule (SDXL base -> refiner)."""
    check_fraction("denoising_end", denoising_end)
    if denoising_end is None or denoising_end >= 1.0:
        return timesteps, num_inference_steps
    trained = scheduler.config.num_train_timesteps
    cutoff = int(round(trained - denoising_end * trained))
    kept = int((timesteps >= cutoff).sum())
    return timesteps[:kept], kept


def _as_list(prompt, batch: int):
    return [prompt] * batch if isinstance(prompt, str) else prompt


def _check_text_list(name: str, value, batch: int) -> None:
    if value is None:
        return
    if isinstance(value, str):
        return
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}")
    if len(value) != batch:
        raise ValueError(f"{name} has {len(value)} entries but the batch has {batch} prompts; pass one per prompt")


@dataclass(frozen=True)
class SDXLRequest(SDRequest):
    """An SDXL call: the SD fields, the second prompt and pooled embeddings, the micro-conditioning
    (sizes, crop corner, aesthetic scores) and the base/refiner hand-over fractions."""

    prompt_2: str | list[str] | None = None
    negative_prompt_2: str | list[str] | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    denoising_start: float | None = None
    denoising_end: float | None = None

    def check_task(self, pipe) -> None:
        if pipe.task == "image" and self.image is None:
            raise ValueError(f"{type(pipe).__name__} needs image= (a PIL image, array or tensor, or latents)")
        super().check_task(pipe)
        check_fraction("denoising_end", self.denoising_end)
        check_fraction("denoising_start", self.denoising_start)
        start, end = self.denoising_start, self.denoising_end
        if start is not None and start >= 1.0:
            raise ValueError(f"denoising_start={start} leaves nothing to denoise; pass a value below 1")
        if start is not None and end is not None and start >= end:
            raise ValueError(f"denoising_start ({start}) must be below denoising_end ({end})")
        if self.latents is not None and pipe.task == "image" and self.latents.ndim != 4:
            raise ValueError(f"latents must be a (B, C, H, W) tensor, got shape {tuple(self.latents.shape)}")
        pipe._check_xl(self)


class StableDiffusionXLBase(StableDiffusionBase):
    """Components, the two-encoder prompt stage, micro-conditioning and VAE handling of SDXL tasks.

    ``add_watermarker``: None (the default) watermarks images when the ``invisible-watermark`` package
    is installed, which diffpipe never installs, so images are not watermarked unless you install it
    yourself; True requires the package, False turns it off.
    """

    _config_keys = ("force_zeros_for_empty_prompt", "add_watermarker")
    _optional_components = (
        "tokenizer",
        "tokenizer_2",
        "text_encoder",
        "text_encoder_2",
        "image_encoder",
        "feature_extractor",
    )
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->unet->vae"
    callback_tensor_inputs = ("latents", "prompt_embeds", "add_text_embeds", "add_time_ids")

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        DiffusionPipeline.__init__(self)
        if (text_encoder is None) != (tokenizer is None) or (text_encoder_2 is None) != (tokenizer_2 is None):
            raise ValueError(
                f"{type(self).__name__}: each text encoder needs its tokenizer (text_encoder with tokenizer, "
                f"text_encoder_2 with tokenizer_2); got text_encoder={type(text_encoder).__name__}, "
                f"tokenizer={type(tokenizer).__name__}, text_encoder_2={type(text_encoder_2).__name__}, "
                f"tokenizer_2={type(tokenizer_2).__name__}"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        if add_watermarker is None:
            add_watermarker = watermark_available()
        object.__setattr__(self, "watermark", InvisibleWatermark() if add_watermarker else None)

    # ------------------------------------------------------------------ prompt
    def _prompt_dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype if self.text_encoder_2 is not None else self.unet.dtype

    def _text_stack(self):
        """(tokenizer, text encoder) pairs in conditioning order: both, or only the second (refiner)."""
        pairs = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)]
        return [(tok, enc) for tok, enc in pairs if enc is not None]

    @staticmethod
    def _encode_texts(stack, texts_per_encoder, *, layer: int, device, max_length=None, warn: bool):
        """Joined hidden states of layer ``layer`` of every encoder, and the first pooled projection."""
        hidden, pooled = [], None
        for (tokenizer, encoder), texts in zip(stack, texts_per_encoder):
            if warn:
                tokens = stages.tokenize_prompt(tokenizer, texts, max_length)
            else:
                tokens = stages._tokenize(tokenizer, texts, max_length or tokenizer.model_max_length)
            out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = out[0]
            hidden.append(out.hidden_states[layer])
        return torch.cat(hidden, dim=-1), pooled

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        lora_scale=None,
        clip_skip=None,
    ):
        """(prompt embeddings, negative embeddings, pooled, negative pooled), as the reference returns them.

        ``prompt_2`` / ``negative_prompt_2`` go to the second encoder (default: ``prompt`` /
        ``negative_prompt``). With only ``text_encoder_2`` (the refiner), it reads ``prompt``, as the
        reference does. With ``force_zeros_for_empty_prompt`` and no ``negative_prompt``, the negative
        side is zeros.
        """
        device = device or self._execution_device
        batch = stages.batch_size_of(prompt, prompt_embeds)
        stack = self._text_stack()
        if prompt_embeds is None:
            self._check_text_encoder_2()
            texts = [_as_list(prompt, batch), _as_list(prompt_2 or prompt, batch)]
            layer = -2 if clip_skip is None else -(clip_skip + 2)
            prompt_embeds, pooled = self._encode_texts(stack, texts, layer=layer, device=device, warn=True)
            pooled_prompt_embeds = pooled if pooled_prompt_embeds is None else pooled_prompt_embeds
        if pooled_prompt_embeds is None:
            raise ValueError("with prompt_embeds=, pass pooled_prompt_embeds= too (the second encoder's pooled output)")
        negative = negative_pooled = None
        if do_classifier_free_guidance:
            negative, negative_pooled = negative_prompt_embeds, negative_pooled_prompt_embeds
            if negative is None and negative_prompt is None and self.config.force_zeros_for_empty_prompt:
                negative, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled_prompt_embeds)
            elif negative is None:
                if not stack:
                    raise ValueError(f"{type(self).__name__} has no text encoder to encode negative_prompt with")
                first = _as_list(negative_prompt or "", batch)
                texts = [first, _as_list(negative_prompt_2 or negative_prompt or "", batch)]
                negative, pooled = self._encode_texts(
                    stack, texts, layer=-2, device=device, max_length=prompt_embeds.shape[1], warn=False
                )
                negative_pooled = pooled if negative_pooled is None else negative_pooled
            if negative_pooled is None:
                raise ValueError("with negative_prompt_embeds=, pass negative_pooled_prompt_embeds= too")
        dtype = self._prompt_dtype()

        def per_image(x):
            return (
                None if x is None else stages.repeat_per_image(x.to(dtype=dtype, device=device), num_images_per_prompt)
            )

        return tuple(per_image(x) for x in (prompt_embeds, negative, pooled_prompt_embeds, negative_pooled))

    def _check_xl(self, request: SDXLRequest) -> None:
        """SDXL's own input rules, checked before any model runs (the common ones are the base's)."""
        prompt, prompt_embeds = request.prompt, request.prompt_embeds
        if request.prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt_2= or prompt_embeds=, not both")
        if request.negative_prompt_2 is not None and request.negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt_2= or negative_prompt_embeds=, not both")
        batch = len(prompt) if isinstance(prompt, list) else 1
        if prompt is None and torch.is_tensor(prompt_embeds):
            batch = prompt_embeds.shape[0]
        _check_text_list("prompt_2", request.prompt_2, batch)
        _check_text_list("negative_prompt_2", request.negative_prompt_2, batch)
        if prompt_embeds is not None and request.pooled_prompt_embeds is None:
            raise ValueError("with prompt_embeds=, pass pooled_prompt_embeds= too (the second encoder's pooled output)")
        if request.negative_prompt_embeds is not None and request.negative_pooled_prompt_embeds is None:
            raise ValueError("with negative_prompt_embeds=, pass negative_pooled_prompt_embeds= too")
        if self.unet.config.get("addition_embed_type") != "text_time":
            raise ValueError(
                f"{type(self).__name__} needs an SDXL UNet (addition_embed_type='text_time'), this UNet has "
                f"addition_embed_type={self.unet.config.get('addition_embed_type')!r}"
            )
        if prompt_embeds is None:
            self._check_text_encoder_2()

    def _components_needed(self, request: SDXLRequest) -> list[str]:
        # the text encoders are SDXL's optional parts (a refiner has only the second; _check_xl says
        # when a prompt needs it)
        return [n for n in super()._components_needed(request) if n not in ("text_encoder", "tokenizer")]

    def _more_prompt_arguments(self, request: SDXLRequest) -> dict:
        return dict(
            prompt_2=request.prompt_2,
            negative_prompt_2=request.negative_prompt_2,
            pooled_prompt_embeds=request.pooled_prompt_embeds,
            negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds,
        )

    def _check_text_encoder_2(self) -> None:
        if self.text_encoder_2 is None:
            raise ValueError(
                f"{type(self).__name__} has no text_encoder_2, which gives SDXL its pooled text embedding; "
                "pass prompt_embeds= and pooled_prompt_embeds= instead of a prompt"
            )

    # ------------------------------------------------------------------ micro-conditioning
    def _projection_dim(self, state: CallState) -> int:
        if self.text_encoder_2 is not None:
            return int(self.text_encoder_2.config.projection_dim)
        return int(state.pooled.shape[-1])

    def _time_ids(self, values, state: CallState, hint: str = "") -> torch.Tensor:
        """One row of micro-conditioning ids, checked against the UNet's added-embedding width."""
        values = [float(v) for v in values]
        cfg = self.unet.config
        made = cfg.addition_time_embed_dim * len(values) + self._projection_dim(state)
        wanted = cfg.projection_class_embeddings_input_dim
        if made != wanted:
            raise ValueError(
                f"the UNet expects an added embedding of width {wanted} (projection_class_embeddings_input_dim), "
                f"but {len(values)} time ids x {cfg.addition_time_embed_dim} + the text encoder's projection "
                f"{self._projection_dim(state)} make {made}.{hint} Check unet.config and "
                "text_encoder_2.config.projection_dim."
            )
        return torch.tensor([values], dtype=state.dtype)

    def _time_id_rows(self, request: SDXLRequest, state: CallState) -> tuple[list, list, str]:
        """(positive row, negative row, hint for a width mismatch) of micro-conditioning values; each
        SDXL task says which (text-to-image: original size, crop corner, target size)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ VAE
    @contextlib.contextmanager
    def _vae_upcast(self, applies: bool):
        """Run the VAE in float32 when its config says it overflows in float16 (``force_upcast``),
        then give it back its dtype. An fp16-safe VAE (``force_upcast: false``) is left alone."""
        vae = self.vae
        before = vae.dtype
        upcast = applies and bool(vae.config.get("force_upcast", False)) and before != torch.float32
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            yield upcast
        finally:
            if upcast:
                vae.to(dtype=before)

    def _latent_stats(self, like: torch.Tensor):
        config = self.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return None
        shape = (1, len(mean), 1, 1)
        return (
            torch.tensor(mean).view(shape).to(like.device, like.dtype),
            torch.tensor(std).view(shape).to(like.device, like.dtype),
        )

    def _decode(self, latents, generator=None, **decode_kwargs) -> torch.Tensor:
        # the reference upcasts for decoding only a float16 VAE
        with self._vae_upcast(self.vae.dtype == torch.float16):
            stats = self._latent_stats(latents)
            if stats is not None:  # VAEs with per-channel latent statistics: undo them around the scaling
                mean, std = stats
                latents = latents * std + mean * self.vae.config.scaling_factor
            image = super()._decode(latents, generator, **decode_kwargs)
        if self.watermark is not None:
            image = self.watermark.apply(image)
        return image

    # Whether encoding normalizes by the VAE's latents_mean / latents_std. The reference's inpainting
    # does not (its decoding does): StableDiffusionXLInpaintPipeline turns it off to give its numbers.
    _encode_with_latent_stats = True

    def _encode_image(self, pixels, generator) -> torch.Tensor:
        # the reference upcasts for encoding whenever the config asks
        with self._vae_upcast(True):
            latents = super()._encode_image(pixels, generator)  # cast to the VAE's dtype there
        stats = self._latent_stats(latents) if self._encode_with_latent_stats else None
        if stats is not None:
            mean, std = stats
            latents = (latents - mean * self.vae.config.scaling_factor) / std
        return latents

    def _output(self, state: CallState, request: SDXLRequest):
        if not request.return_dict:
            return (state.images,)
        return StableDiffusionXLPipelineOutput(images=state.images)


# ============================================================================ SDXL's own stages
def micro_conditioning(pipe: StableDiffusionXLBase, request: SDXLRequest, state: CallState) -> CallState:
    """The pooled text embeddings and the time ids, as the UNet's ``added_cond_kwargs`` (guidance-batched)."""
    row, negative_row, hint = pipe._time_id_rows(request, state)
    time_ids = pipe._time_ids(row, state, hint)
    negative_time_ids = time_ids if negative_row is None else pipe._time_ids(negative_row, state, hint)
    rows = request.total
    state.tensors.update(
        add_text_embeds=state.paired(state.pooled, state.negative_pooled).to(state.device),
        add_time_ids=state.paired(time_ids.repeat(rows, 1), negative_time_ids.repeat(rows, 1)).to(state.device),
    )
    state.added_cond = {"text_embeds": "add_text_embeds", "time_ids": "add_time_ids"}
    return state


def stop_at_denoising_end(pipe, request: SDXLRequest, state: CallState) -> CallState:
    """Keep only the timesteps above ``denoising_end`` (a base model handing over to a refiner)."""
    state.timesteps, state.num_inference_steps = cut_at_denoising_end(
        pipe.scheduler, state.timesteps, state.num_inference_steps, request.denoising_end
    )
    return state


def begin_at_the_start(pipe, request: SDXLRequest, state: CallState) -> CallState:
    """Text to image runs the schedule from its first step (as the reference says to the scheduler)."""
    if hasattr(pipe.scheduler, "set_begin_index"):
        pipe.scheduler.set_begin_index(0)
    return state


class StableDiffusionXLPipeline(StableDiffusionXLBase):
    """Text to image with Stable Diffusion XL (base models; ``denoising_end`` hands over to a refiner)."""

    request_type = SDXLRequest
    call_stages = (
        encode_prompt_stage,
        micro_conditioning,
        text_timesteps,
        noise_latents,
        stop_at_denoising_end,
        begin_at_the_start,
        *DENOISE_AND_DECODE,
    )

    def _time_id_rows(self, request: SDXLRequest, state: CallState) -> tuple[list, list | None, str]:
        size = request.size(self)
        row = [*(request.original_size or size), *request.crops_coords_top_left, *(request.target_size or size)]
        negative_row = None  # the positive ids, unless both negative sizes are given
        if request.negative_original_size is not None and request.negative_target_size is not None:
            negative_row = [
                *request.negative_original_size,
                *request.negative_crops_coords_top_left,
                *request.negative_target_size,
            ]
        return row, negative_row, ""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
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
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        **kwargs,
    ):
        """Generate images from text.

        ``original_size`` / ``target_size`` default to ``(height, width)``; the negative ones, when
        both are given, condition the unconditional branch. ``denoising_end`` (a fraction) stops early
        and, with ``output_type="latent"``, hands the latents to a refiner's ``denoising_start``.
        """
        return self._generate(locals())
