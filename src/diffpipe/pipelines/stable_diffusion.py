"""Stable Diffusion text-to-image, and the parts every Stable Diffusion task shares."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from .. import images as imgs
from ..adapters import IPAdapterMixin, LoraLoaderMixin
from ..config import fix_scheduler_for_sd, fix_unet_for_sd
from . import stages
from .pipeline import DiffusionPipeline, pipeline_call

logger = logging.getLogger(__name__)

SAFETY_CHECKER_DISABLED = (
    "You have disabled the safety checker for {cls} by passing `safety_checker=None`. Ensure that you abide "
    "by the conditions of the Stable Diffusion license and do not expose unfiltered results in services or "
    "applications open to the public. Both the diffusers team and Hugging Face strongly recommend keeping the "
    "safety filter enabled in all public-facing circumstances, disabling it only for use cases that involve "
    "analyzing network behavior or auditing its results."
)


@dataclass
class StableDiffusionPipelineOutput:
    images: Any
    nsfw_content_detected: list[bool] | None = None

    def __getitem__(self, i):
        return (self.images, self.nsfw_content_detected)[i]

    def __iter__(self):
        return iter((self.images, self.nsfw_content_detected))


class StableDiffusionBase(IPAdapterMixin, LoraLoaderMixin, DiffusionPipeline):
    """Components, prompt encoding, the safety checker and output handling shared by SD tasks."""

    _config_keys = ("requires_safety_checker",)
    _optional_components = ("safety_checker", "feature_extractor", "image_encoder")
    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    callback_tensor_inputs = ("latents", "prompt_embeds", "negative_prompt_embeds")
    embeds_guidance_scale = True  # see _embeds_guidance

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                 feature_extractor=None, image_encoder=None, requires_safety_checker: bool = True):
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
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler, safety_checker=safety_checker,
                              feature_extractor=feature_extractor, image_encoder=image_encoder)
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    # ------------------------------------------------------------------ helpers
    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8

    @property
    def _execution_device(self) -> torch.device:
        device = getattr(self, "_offload_device", None)
        return device if device is not None else self.unet.device

    def _default_size(self) -> tuple[int, int]:
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int:
        return getattr(self, "_num_timesteps", 0)

    def _prompt_dtype(self) -> torch.dtype:
        if self.text_encoder is not None:
            return self.text_encoder.dtype
        return self.unet.dtype

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None,
                      **unused):
        """(prompt embeddings, negative embeddings) as the reference's ``encode_prompt`` returns them."""
        return stages.encode_prompt(
            self.tokenizer, self.text_encoder, prompt, num_images_per_prompt=num_images_per_prompt,
            do_cfg=do_classifier_free_guidance, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip, dtype=self._prompt_dtype(),
            device=device,
        )

    def _check_common(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                      callback_on_step_end_tensor_inputs, num_images_per_prompt, generator,
                      guidance_scale) -> int:
        stages.check_prompt_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        stages.check_callback_inputs(callback_on_step_end_tensor_inputs, self.callback_tensor_inputs)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        batch = stages.batch_size_of(prompt, prompt_embeds)
        stages.check_generators(generator, batch * num_images_per_prompt)
        if guidance_scale > 1 and prompt_embeds is not None and negative_prompt_embeds is None \
                and negative_prompt is not None:
            raise ValueError("with prompt_embeds=, pass the negative side as negative_prompt_embeds=")
        return batch

    def _embeds_guidance(self) -> bool:
        """Whether the UNet is guidance-distilled (LCM: ``time_cond_proj_dim``) and this task gives it the
        scale as an embedding instead of running classifier-free guidance. The reference does so in its
        SD and SDXL tasks; its SAG and AnimateDiff pipelines guide every UNet with CFG and no embedding."""
        return self.embeds_guidance_scale and self.unet.config.get("time_cond_proj_dim") is not None

    def _guidance(self, guidance_scale: float, guidance_rescale: float) -> stages.Guidance:
        if self._embeds_guidance():
            return stages.Guidance(scale=1.0)
        return stages.Guidance(scale=guidance_scale, rescale=guidance_rescale)

    def _unet_predictor(self, cross_attention_kwargs, timestep_cond=None, added_cond=None, concat=()):
        """The UNet call of the loop. The (guidance-batched) condition is ``tensors["prompt_embeds"]``;
        ``concat`` names tensors joined to the input channels (inpainting's mask and masked image);
        ``added_cond`` maps ``added_cond_kwargs`` names to tensors (SDXL: ``{"text_embeds": "add_text_embeds"}``)."""
        unet = self.unet

        def predict(model_input, t, i, tensors):
            if concat:
                model_input = torch.cat([model_input, *(tensors[k] for k in concat)], dim=1)
            added = {name: tensors[key] for name, key in added_cond.items()} if added_cond else None
            return unet(model_input, t, encoder_hidden_states=tensors["prompt_embeds"], timestep_cond=timestep_cond,
                        cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added,
                        return_dict=False)[0]

        return predict

    def get_guidance_scale_embedding(self, w: torch.Tensor, embedding_dim: int = 512,
                                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
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

    def _guidance_embedding(self, guidance_scale: float, batch: int, device, dtype):
        if not self._embeds_guidance():
            return None
        w = torch.full((batch,), guidance_scale - 1.0)
        emb = self.get_guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim)
        return emb.to(device=device, dtype=dtype)

    def run_safety_checker(self, image: torch.Tensor, device, dtype):
        if getattr(self, "safety_checker", None) is None:
            return image, None
        pil = imgs.postprocess(image, output_type="pil")
        inputs = self.feature_extractor(pil, return_tensors="pt")
        pixels = inputs["pixel_values"].to(device=device, dtype=dtype)
        return self.safety_checker(images=image, clip_input=pixels)

    def _finish(self, latents, *, output_type: str, return_dict: bool, device, dtype, generator=None):
        if output_type == "latent":
            image, nsfw = latents, None
        else:
            image = self._decode(latents, generator)
            image, nsfw = self.run_safety_checker(image, device, dtype)
        denormalize = None if nsfw is None else [not flagged for flagged in nsfw]
        image = imgs.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        return self._output(image, nsfw, return_dict)

    def _decode(self, latents, generator=None) -> torch.Tensor:
        return stages.decode_latents(self.vae, latents, generator)

    def _encode_image(self, pixels, generator) -> torch.Tensor:
        """Image in ``[-1, 1]`` -> scaled latents (img2img's and inpainting's start)."""
        return stages.encode_image_latents(self.vae, pixels, generator)

    def _output(self, image, nsfw, return_dict: bool):
        if not return_dict:
            return image, nsfw
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)

    def _begin(self, *, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt,
               generator, guidance_scale, guidance_rescale, clip_skip, output_type,
               callback_on_step_end_tensor_inputs, prompt_kwargs: dict | None = None, ip_adapter_image=None,
               ip_adapter_image_embeds=None) -> "_Run":
        """Check the common inputs, then encode the prompt (and the IP-Adapter image prompt): what every
        SD task does first. ``prompt_kwargs`` go to ``encode_prompt`` as they are (SDXL's ``prompt_2``,
        pooled embeddings)."""
        batch = self._check_common(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds,
                                   callback_on_step_end_tensor_inputs, num_images_per_prompt, generator,
                                   guidance_scale)
        imgs.check_output_type(output_type)
        device = self._execution_device
        guidance = self._guidance(guidance_scale, guidance_rescale)
        image_embeds = self._ip_adapter_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                               batch * num_images_per_prompt, guidance.active)
        embeds, negative, *pooled = self.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=guidance.active, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, clip_skip=clip_skip, **(prompt_kwargs or {}))
        condition = torch.cat([negative, embeds]) if guidance.active else embeds
        run = _Run(device, guidance, embeds, negative, condition, batch * num_images_per_prompt, guidance_scale,
                   *pooled)
        run.image_embeds = image_embeds
        return run

    def _denoise_and_finish(self, run: "_Run", latents, steps, num_inference_steps, *, eta, generator,
                            cross_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                            output_type, return_dict, extra_tensors=None, concat=(), after_step=None, guide=None,
                            added_cond=None):
        """The denoising loop on the UNet, then decoding, the safety checker and the output."""
        timestep_cond = self._guidance_embedding(run.guidance_scale, run.total, run.device, latents.dtype)
        added_cond, extra_tensors = run.with_image_prompt(added_cond, extra_tensors)
        latents = stages.denoise(
            self, latents=latents, timesteps=steps, num_inference_steps=num_inference_steps,
            predict=self._unet_predictor(cross_attention_kwargs, timestep_cond, added_cond=added_cond, concat=concat),
            guidance=run.guidance, step_kwargs={"eta": eta, "generator": generator},
            callback_on_step_end=callback_on_step_end,
            callback_tensors={"prompt_embeds": run.condition, "negative_prompt_embeds": run.negative,
                              **(extra_tensors or {})},
            callback_tensor_names=callback_on_step_end_tensor_inputs, after_step=after_step, guide=guide,
        )
        return self._finish(latents, output_type=output_type, return_dict=return_dict, device=run.device,
                            dtype=run.dtype, generator=generator)


IMAGE_EMBEDS = "ip_adapter_image_embeds"  # the loop tensor holding the image prompt


@dataclass
class _Run:
    """What the prompt stage hands the rest of a call."""

    device: torch.device
    guidance: stages.Guidance
    embeds: torch.Tensor
    negative: torch.Tensor | None
    condition: torch.Tensor  # [negative, embeds] under guidance, else embeds
    total: int  # images in the batch
    guidance_scale: float
    pooled: torch.Tensor | None = None  # SDXL's pooled text embeddings
    negative_pooled: torch.Tensor | None = None
    image_embeds: list[torch.Tensor] | None = None  # IP-Adapter image prompt, one tensor per adapter

    def with_image_prompt(self, added_cond: dict | None, tensors: dict | None) -> tuple[dict | None, dict | None]:
        """The UNet's added conditions and the loop's tensors, plus the image prompt if the call has one
        (the UNet reads ``added_cond_kwargs["image_embeds"]``)."""
        if self.image_embeds is None:
            return added_cond, tensors
        return ({**(added_cond or {}), "image_embeds": IMAGE_EMBEDS},
                {**(tensors or {}), IMAGE_EMBEDS: self.image_embeds})

    def paired(self, positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """``[negative, positive]`` under guidance (the UNet's batch layout), else ``positive``."""
        return torch.cat([negative, positive]) if self.guidance.active else positive

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype


class StableDiffusionPipeline(StableDiffusionBase):
    """Text to image with Stable Diffusion 1.x / 2.x."""

    def _other_task(self, **kwargs):
        """Run the image-to-image or inpainting task on these components (``image=`` was given)."""
        from .auto import AutoPipelineForImage2Image, AutoPipelineForInpainting

        own = inspect.signature(StableDiffusionPipeline.__call__).parameters
        task_only = {"image", "mask_image", "strength", "masked_image_latents"}
        unknown = sorted(set(kwargs) - set(own) - task_only)
        if unknown or "image" not in kwargs:
            raise TypeError(f"{type(self).__name__}() got unexpected argument(s) {unknown or sorted(kwargs)}")
        auto = AutoPipelineForInpainting if "mask_image" in kwargs else AutoPipelineForImage2Image
        task = auto.from_pipe(self)
        accepted = inspect.signature(task.__call__).parameters
        for name in list(kwargs):
            if name in accepted:
                continue
            default = own[name].default if name in own else inspect.Parameter.empty
            value = kwargs.pop(name)
            if value is not default and not (not torch.is_tensor(value) and value == default):
                raise TypeError(f"{name}= has no meaning for {type(task).__name__}, which this call runs")
        return task(**kwargs)

    @pipeline_call
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
        **task_inputs,
    ):
        """Generate images from text. Given ``image=`` (and ``mask_image=``), the same components run
        the image-to-image (inpainting) task instead, as the spec's loading guide promises."""
        if task_inputs:
            return self._other_task(prompt=prompt, height=height, width=width,
                                    num_inference_steps=num_inference_steps, timesteps=timesteps, sigmas=sigmas,
                                    guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                                    num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator,
                                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                                    ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
                                    output_type=output_type, return_dict=return_dict,
                                    cross_attention_kwargs=cross_attention_kwargs, clip_skip=clip_skip,
                                    callback_on_step_end=callback_on_step_end,
                                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                                    latents=latents, guidance_rescale=guidance_rescale, **task_inputs)
        default_h, default_w = self._default_size()
        height, width = height or default_h, width or default_w
        stages.check_size(height, width, self.vae_scale_factor)
        run = self._begin(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, num_images_per_prompt=num_images_per_prompt,
                          generator=generator, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                          clip_skip=clip_skip, output_type=output_type,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds)
        steps, num_inference_steps = stages.set_timesteps(self.scheduler, num_inference_steps, run.device,
                                                          timesteps, sigmas)
        shape = (run.total, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = stages.initial_latents(shape, generator=generator, device=run.device, dtype=run.dtype,
                                         latents=latents, init_noise_sigma=self.scheduler.init_noise_sigma)
        return self._denoise_and_finish(
            run, latents, steps, num_inference_steps, eta=eta, generator=generator,
            cross_attention_kwargs=cross_attention_kwargs, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, output_type=output_type,
            return_dict=return_dict)
