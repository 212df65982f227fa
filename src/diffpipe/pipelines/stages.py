"""The stages every text-conditioned pipeline shares, written once and imported.

encode prompt -> timesteps -> latents -> denoising loop (scheduler + guidance) -> decode -> images.
A pipeline file only says what is special about its task.
"""

from __future__ import annotations

import inspect

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from ..schedulers.base import randn
from .offload import bring_to_device

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ inputs
def batch_size_of(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    return prompt_embeds.shape[0]


def check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> None:
    """The prompt arguments' rules, checked before any model runs."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("pass either prompt= or prompt_embeds=, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("pass prompt= (a string or a list of strings) or prompt_embeds=")
    if prompt is not None and not (
        isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
    ):
        raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("prompt is an empty list")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt= or negative_prompt_embeds=, not both")
    if negative_prompt is not None and prompt is not None and not isinstance(negative_prompt, str):
        if not isinstance(negative_prompt, list) or type(prompt) is not list:
            raise TypeError(
                f"negative_prompt must be the same type as prompt ({type(prompt).__name__}), "
                f"got {type(negative_prompt).__name__}"
            )
        if len(negative_prompt) != len(prompt):
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but prompt has {len(prompt)}; pass one per prompt"
            )
    if prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )


def check_size(height: int, width: int, multiple: int) -> None:
    if height % multiple or width % multiple:
        raise ValueError(
            f"height and width must be divisible by {multiple}, got {height}x{width}; try "
            f"{height - height % multiple or multiple}x{width - width % multiple or multiple}"
        )


def check_callback_inputs(names, allowed) -> None:
    if names is None:
        return
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"callback_on_step_end_tensor_inputs may only name {list(allowed)}, got {bad}")


def check_generators(generator, batch: int) -> None:
    if isinstance(generator, list) and len(generator) != batch:
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch} images; pass one per image "
            "(batch size x num_images_per_prompt) or a single generator"
        )


# ------------------------------------------------------------------------------------------ prompt
def _tokenize(tokenizer, texts, max_length):
    return tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")


def _text_hidden_states(text_encoder, tokens, *, all_layers: bool, device):
    """The text encoder's last hidden state, or the tuple of every layer's."""
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    if not all_layers:
        return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states


def tokenize_prompt(tokenizer, texts: list[str], max_length: int | None = None):
    """Tokens padded to ``max_length`` (the tokenizer's by default), warning about any text cut off."""
    max_length = max_length or tokenizer.model_max_length
    tokens = _tokenize(tokenizer, texts, max_length)
    longest = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if longest.shape[-1] >= tokens.input_ids.shape[-1] and not torch.equal(tokens.input_ids, longest):
        removed = tokenizer.batch_decode(longest[:, max_length - 1 : -1])
        logger.warning("this part of the prompt was cut off (CLIP reads at most %d tokens): %s", max_length, removed)
    return tokens


def encode_text(
    tokenizer, text_encoder, texts: list[str], *, clip_skip: int | None, device, max_length: int | None = None
):
    """(B, seq, dim) embeddings of ``texts`` the way Stable Diffusion conditions on them."""
    tokens = tokenize_prompt(tokenizer, texts, max_length)
    if clip_skip is None:
        return _text_hidden_states(text_encoder, tokens, all_layers=False, device=device)
    hidden = _text_hidden_states(text_encoder, tokens, all_layers=True, device=device)
    # clip_skip=1 takes the layer before the last; the final layer norm still applies. transformers 5
    # flattened CLIPTextModel (no `.text_model`), older releases nest it.
    body = getattr(text_encoder, "text_model", text_encoder)
    return body.final_layer_norm(hidden[-(clip_skip + 1)])


def encode_prompt(
    tokenizer,
    text_encoder,
    prompt,
    *,
    num_images_per_prompt: int,
    do_cfg: bool,
    negative_prompt=None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    clip_skip: int | None = None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, negative embeddings or None), repeated ``num_images_per_prompt`` times."""
    batch = batch_size_of(prompt, prompt_embeds)
    if prompt_embeds is None:
        texts = [prompt] if isinstance(prompt, str) else prompt
        prompt_embeds = encode_text(tokenizer, text_encoder, texts, clip_skip=clip_skip, device=device)
    prompt_embeds = repeat_per_image(prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt)
    if not do_cfg:
        return prompt_embeds, None
    if negative_prompt_embeds is None:
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * batch
        else:
            negatives = negative_prompt
        tokens = _tokenize(tokenizer, negatives, prompt_embeds.shape[1])
        negative_prompt_embeds = _text_hidden_states(text_encoder, tokens, all_layers=False, device=device)
    negative_prompt_embeds = repeat_per_image(
        negative_prompt_embeds.to(dtype=dtype, device=device), num_images_per_prompt
    )
    return prompt_embeds, negative_prompt_embeds


def repeat_per_image(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[a, b]`` -> ``[a, a, b, b]`` along the batch (each prompt's images side by side)."""
    return x if n == 1 else x.repeat_interleave(n, dim=0)


# ------------------------------------------------------------------------------------------ schedule
def set_timesteps(scheduler, num_inference_steps: int | None, device, timesteps=None, sigmas=None):
    """(timesteps, number of steps) after ``scheduler.set_timesteps`` with steps, timesteps or sigmas."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass either timesteps= or sigmas=, not both")
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    elif sigmas is not None:
        scheduler.set_timesteps(sigmas=sigmas, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    steps = scheduler.timesteps
    return steps, (len(steps) if timesteps is not None or sigmas is not None else num_inference_steps)


def initial_latents(shape, *, generator, device, dtype, latents: torch.Tensor | None, init_noise_sigma: float):
    """Pure noise scaled by the scheduler's ``init_noise_sigma`` (or the given latents, scaled)."""
    if latents is None:
        latents = randn(shape, generator=generator, device=device, dtype=dtype)
    else:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype)
    return latents * init_noise_sigma


# ------------------------------------------------------------------------------------------ loop
def rescale_guidance(noise_cfg: torch.Tensor, noise_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Rescale classifier-free guidance toward the text branch's std (Lin et al. 2023, sec. 3.4)."""
    dims = list(range(1, noise_text.ndim))
    std_text = noise_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


@dataclass
class Guidance:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``, optionally rescaled."""

    scale: float
    rescale: float = 0.0

    @property
    def active(self) -> bool:
        return self.scale > 1.0

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x]) if self.active else x

    def combine(self, noise_pred: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0.0:
            guided = rescale_guidance(guided, cond, self.rescale)
        return guided


def unet_predictor(unet, cross_attention_kwargs: dict | None, state) -> Callable:
    """The UNet call of the loop: ``predict(model_input, t, tensors, image_embeds)``.

    ``tensors`` are the step's conditioning tensors (``state.tensors``: ``prompt_embeds`` and what the
    task adds); ``state.concat`` names those joined to the input channels (inpainting's mask and masked
    image), ``state.added_cond`` maps ``added_cond_kwargs`` names to them (SDXL's pooled text and time
    ids); ``image_embeds`` is the IP-Adapter image prompt (``added_cond_kwargs["image_embeds"]``);
    ``state.unet_extra(model_input, t, tensors)`` gives more UNet arguments (ControlNet residuals)."""
    concat, added_cond, timestep_cond, extra = state.concat, state.added_cond, state.timestep_cond, state.unet_extra

    def predict(model_input, t, tensors, image_embeds):
        residuals = extra(model_input, t, tensors) if extra is not None else {}  # ControlNet, on the latents
        if concat:
            model_input = torch.cat([model_input, *(tensors[k] for k in concat)], dim=1)
        added = {name: tensors[key] for name, key in added_cond.items()}
        if image_embeds is not None:
            added["image_embeds"] = image_embeds
        return unet(
            model_input,
            t,
            encoder_hidden_states=tensors["prompt_embeds"],
            timestep_cond=timestep_cond,
            cross_attention_kwargs=cross_attention_kwargs,
            added_cond_kwargs=added or None,
            return_dict=False,
            **residuals,
        )[0]

    return predict


def accepted_arguments(function, arguments: dict) -> dict:
    """The ``arguments`` ``function`` takes (all of them when it has ``**kwargs``): a scheduler without
    ``eta`` (flow matching, a user's own) is not handed one."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return arguments
    return {k: v for k, v in arguments.items() if k in parameters}


def denoise(pipe, request, state):
    """The denoising loop, every pipeline's, once: ``state.latents`` through ``state.timesteps``.

    At each step: the scheduler-scaled (guidance-batched) latents through the UNet, classifier-free
    guidance, an optional further term ``state.guide(noise_pred, model_output=, latents=, t=,
    tensors=, predict=)`` (SAG; ``model_output`` is the raw guidance-batched prediction), the scheduler
    step, an optional ``state.after_step(latents, i, t)`` (inpainting's blend), and the step-end
    callback ``callback(pipe, i, t, tensors)``, which may return replacements for the tensors it was
    given (the names in ``request.callback_on_step_end_tensor_inputs``; ``latents`` among them); then,
    at every ``callback_steps``-th progress step, the reference's deprecated ``callback(step, t, latents)``.
    A callback that sets ``pipe._interrupt = True`` skips the remaining steps.
    """
    scheduler = pipe.scheduler
    latents = initial = state.latents
    timesteps = state.timesteps
    predict = state.predict or unet_predictor(pipe.unet, request.cross_attention_kwargs, state)
    callback, names = request.callback_on_step_end, request.callback_on_step_end_tensor_inputs or ()
    legacy, every = getattr(request, "callback", None), getattr(request, "callback_steps", None) or 1
    tensors = state.tensors
    step_kwargs = accepted_arguments(
        scheduler.step, {"eta": request.eta, "generator": request.generator, **state.step_kwargs}
    )
    order = getattr(scheduler, "order", 1)
    warmup = len(timesteps) - state.num_inference_steps * order
    with pipe.progress_bar(total=state.num_inference_steps) as bar:
        for i, t in enumerate(timesteps):
            if pipe._interrupt:
                continue
            state.step_index = i  # what a step-dependent condition reads (ControlNet's guidance window)
            guidance = state.guidance  # read at every step: a callback may turn guidance off
            model_input = guidance.batch(latents)
            if hasattr(scheduler, "scale_model_input"):  # (flow-matching schedulers have none)
                model_input = scheduler.scale_model_input(model_input, t)
            model_output = predict(model_input, t, tensors, state.image_embeds)
            noise_pred = guidance.combine(model_output)
            if state.guide is not None:
                noise_pred = state.guide(
                    noise_pred, model_output=model_output, latents=latents, t=t, tensors=tensors, predict=predict
                )
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if state.after_step is not None:
                latents = state.after_step(latents, i, t)
            if callback is not None:
                tensors["latents"] = latents
                replaced = callback(pipe, i, t, {k: tensors[k] for k in names if k in tensors}) or {}
                latents = replaced.pop("latents", latents)
                tensors.update(replaced)
            if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                bar.update()
                if legacy is not None and i % every == 0:
                    legacy(i // order, t, latents)
    if not bool(torch.isfinite(latents).all()):
        if not bool(torch.isfinite(initial).all()):
            warn_non_finite(
                "the latents given to the denoising loop (latents=, or the image the VAE encoded)",
                "Check the input; a float16 VAE encoder can overflow: upcast the VAE.",
            )
        else:
            warn_non_finite(
                "the denoising loop (UNet and scheduler)",
                "Run the UNet in float32 or bfloat16, and check its weights with from_pretrained(..., verify=True).",
            )
    state.latents = latents
    return state


def warn_non_finite(stage: str, fix: str) -> None:
    """Say which stage produced NaN/Inf (the image would come out black) and how to fix it."""
    logger.warning("%s produced NaN or Inf values, so the images would be black or garbage. %s", stage, fix)


# ------------------------------------------------------------------------------------------ decode
def decode_latents(vae, latents: torch.Tensor, generator=None, **decode_kwargs) -> torch.Tensor:
    """Latents -> images in ``[-1, 1]``, undoing the VAE's scaling (and shift) factor; ``decode_kwargs``
    go to ``vae.decode`` (the masked VAE's ``image`` and ``mask``)."""
    bring_to_device(vae)
    config = vae.config
    latents = latents / config.scaling_factor
    if config.get("shift_factor") is not None:
        latents = latents + config.shift_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False, **decode_kwargs)[0]
    if not bool(torch.isfinite(image).all()) and bool(torch.isfinite(latents).all()):
        warn_non_finite(
            f"VAE decoding ({vae.dtype})",
            "This is the classic float16 VAE overflow: upcast the VAE (pipe.vae.to(torch.float32)) or use "
            "an fp16-safe VAE (such as madebyollin/sdxl-vae-fp16-fix).",
        )
    return image


def encode_image_latents(vae, image: torch.Tensor, generator, *, sample_mode: str = "sample") -> torch.Tensor:
    """Image in ``[-1, 1]`` -> scaled latents; a list of generators encodes one image with each."""
    bring_to_device(vae)
    image = image.to(device=vae.device, dtype=vae.dtype)
    if isinstance(generator, list):
        if len(generator) != image.shape[0]:
            raise ValueError(f"got {len(generator)} generators for {image.shape[0]} images")
        parts = [_latent_of(vae.encode(image[i : i + 1]), generator[i], sample_mode) for i in range(image.shape[0])]
        latents = torch.cat(parts, dim=0)
    else:
        latents = _latent_of(vae.encode(image), generator, sample_mode)
    config = vae.config
    if config.get("shift_factor") is not None:
        latents = latents - config.shift_factor
    return latents * config.scaling_factor


def _latent_of(encoded, generator, sample_mode):
    if not hasattr(encoded, "latent_dist") and hasattr(encoded, "latents"):
        return encoded.latents  # a deterministic encoder (AutoencoderTiny): no distribution to sample
    dist = encoded.latent_dist if hasattr(encoded, "latent_dist") else encoded[0]
    return dist.sample(generator) if sample_mode == "sample" else dist.mode()
