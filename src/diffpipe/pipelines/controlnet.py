"""ControlNet for the UNet families: what every ControlNet pipeline adds to its task's stages.

A ControlNet (or a list of them: ``MultiControlNetModel``) reads a conditioning image beside the
latents at every step and hands the UNet residuals for its down blocks and mid block. The pieces:

- :class:`ControlFields`: the call arguments (``control_image``, ``controlnet_conditioning_scale``,
  ``guess_mode``, ``control_guidance_start`` / ``_end``), checked before any model runs;
- :func:`prepare_control`: the conditioning images at the output size in ``[0, 1]``, batched as the
  latents are, and the per-step scales (a net is off outside its ``[start, end]`` window of the
  schedule), installed as the loop's ``state.unet_extra``;
- :class:`ControlNetMixin`: the ``controlnet`` component (a list becomes a ``MultiControlNetModel``).

Guess mode (or nets with ``global_pool_conditions``) runs the ControlNet on the conditional half only
and gives the unconditional half zero residuals, as the reference does.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import torch

from .request import CallState


@dataclass(frozen=True)
class ControlFields:
    """The ControlNet call arguments (mixed into a task's request dataclass)."""

    control_image: Any = None
    controlnet_conditioning_scale: float | list[float] = 1.0
    guess_mode: bool = False
    control_guidance_start: float | list[float] = 0.0
    control_guidance_end: float | list[float] = 1.0

    def check_task(self, pipe) -> None:
        self.check_control(pipe)  # first: the task's own checks read the size from the conditioning image
        super().check_task(pipe)

    def size(self, pipe) -> tuple[int, int]:
        """The call's size, else the conditioning image's (text-to-image) or the image's (inpainting),
        as the reference's ControlNet pipelines default."""
        if self.height is not None and self.width is not None or pipe.task == "image":
            return super().size(pipe)
        if pipe.task == "text":
            own = control_size(pipe, self)
        else:
            image = self.image[0] if isinstance(self.image, list) else self.image
            own = tuple(pipe.image_processor.get_default_height_width(image))
        return self.height or own[0], self.width or own[1]

    def check_control(self, pipe) -> None:
        nets = pipe._controlnets()
        n = len(nets)
        unet = pipe.unet.config
        for i, net in enumerate(nets):
            mine = net.config
            for key in ("cross_attention_dim", "addition_embed_type"):
                if mine.get(key) != unet.get(key):
                    raise ValueError(
                        f"ControlNet {i} was made for another model family: its {key} is {mine.get(key)!r}, the "
                        f"UNet's {unet.get(key)!r} (an SD 1.x ControlNet needs an SD 1.x pipeline, an SDXL one SDXL)"
                    )
        images = self.control_image
        if images is None:
            name = "image" if pipe.task == "text" else "control_image"
            raise ValueError(f"{type(pipe).__name__} needs the conditioning image: pass {name}=")
        if n > 1 and not isinstance(images, list):
            raise TypeError(f"{n} ControlNets take a list of {n} conditioning images (one per net), got one")
        if n > 1 and len(images) != n:
            raise ValueError(f"{n} ControlNets take {n} conditioning images, got {len(images)}")
        for image in images if n > 1 else [images]:
            count = _image_count(image)
            if count not in (1, self.batch):
                raise ValueError(
                    f"the conditioning image batch has {count} images for {self.batch} prompt(s): pass one image "
                    "(used for every prompt) or one per prompt"
                )
        scales = self.controlnet_conditioning_scale
        if isinstance(scales, (list, tuple)):
            if n == 1 or len(scales) != n:
                raise ValueError(f"controlnet_conditioning_scale: {len(scales)} scales for {n} ControlNet(s)")
        elif isinstance(scales, bool) or not isinstance(scales, numbers.Real):
            raise TypeError(f"controlnet_conditioning_scale must be a number or a list of numbers, got {scales!r}")
        starts, ends = guidance_windows(self.control_guidance_start, self.control_guidance_end, n)
        for start, end in zip(starts, ends):
            if not (0.0 <= start < end <= 1.0):
                raise ValueError(
                    f"control_guidance_start ({start}) must be >= 0 and below control_guidance_end ({end}), which "
                    "must be <= 1: the fraction of the schedule in which the ControlNet acts"
                )


def guidance_windows(start, end, n: int) -> tuple[list[float], list[float]]:
    """Per net ``(starts, ends)``: a number is every net's; a list is one per net."""
    starts = list(start) if isinstance(start, (list, tuple)) else [start] * n
    ends = list(end) if isinstance(end, (list, tuple)) else [end] * n
    if len(starts) != n or len(ends) != n:
        raise ValueError(
            f"control_guidance_start / control_guidance_end: {len(starts)} / {len(ends)} values for {n} ControlNet(s)"
        )
    return [float(s) for s in starts], [float(e) for e in ends]


def _image_count(image) -> int:
    if isinstance(image, list):
        return sum(_image_count(i) for i in image) if image and torch.is_tensor(image[0]) else len(image)
    if torch.is_tensor(image):
        return image.shape[0] if image.ndim == 4 else 1
    shape = getattr(image, "shape", None)
    return shape[0] if shape is not None and len(shape) == 4 else 1


def control_size(pipe, request) -> tuple[int, int] | None:
    """A text task's output size when the call gives none: the conditioning image's."""
    images = request.control_image
    first = images[0] if isinstance(images, list) and len(pipe._controlnets()) > 1 else images
    if isinstance(first, list):
        first = first[0]
    return tuple(pipe.control_image_processor.get_default_height_width(first))


# ---------------------------------------------------------------------------------------- the stage
def prepare_control(pipe, request, state: CallState) -> CallState:
    """The conditioning images and the per-step ControlNet call, as ``state.unet_extra``."""
    nets = pipe._controlnets()
    height, width = _output_size(pipe, request, state)
    images = request.control_image if len(nets) > 1 else [request.control_image]
    guess = bool(request.guess_mode) or all(net.config.get("global_pool_conditions", False) for net in nets)
    dtype = nets[0].dtype
    prepared = []
    for image, net in zip(images, nets):
        pixels = pipe.control_image_processor.preprocess(image, height=height, width=width).to(torch.float32)
        if pixels.shape[-2:] != (height, width):
            raise ValueError(f"the conditioning image is {tuple(pixels.shape[-2:])}, the output {(height, width)}")
        repeat = request.total if pixels.shape[0] == 1 else request.num_images_per_prompt
        pixels = pixels.repeat_interleave(repeat, dim=0).to(device=state.device, dtype=net.dtype)
        if state.guidance.active and not guess:
            pixels = torch.cat([pixels] * 2)
        prepared.append(pixels)
    scales = request.controlnet_conditioning_scale
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales] * len(nets)
    starts, ends = guidance_windows(request.control_guidance_start, request.control_guidance_end, len(nets))
    n = len(state.timesteps)
    keep = [
        [1.0 - float(i / n < s or (i + 1) / n > e) for s, e in zip(starts, ends)] for i in range(n)
    ]  # fmt: skip

    def residuals(model_input, t, tensors):
        step_scales = [scale * on for scale, on in zip(scales, keep[state.step_index])]
        paired = state.guidance.active
        half = guess and paired
        embeds = tensors["prompt_embeds"]
        added = {name: tensors[key] for name, key in state.added_cond.items()}
        if half:  # the conditional half only
            model_input, embeds = model_input.chunk(2)[1], embeds.chunk(2)[1]
            added = {k: v.chunk(2)[1] for k, v in added.items()}
        down, mid = None, None
        for net, pixels, scale in zip(nets, prepared, step_scales):
            d, m = net(
                model_input.to(dtype),
                t,
                encoder_hidden_states=embeds.to(dtype),
                controlnet_cond=pixels,
                conditioning_scale=scale,
                guess_mode=guess,
                added_cond_kwargs=added or None,
                return_dict=False,
            )
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        if half:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    state.unet_extra = residuals
    return state


def _output_size(pipe, request, state: CallState) -> tuple[int, int]:
    if state.height is not None and state.width is not None:
        return state.height, state.width
    if state.pixels is not None and state.pixels.shape[1] == 3:  # image-to-image: the input image's size
        height, width = state.pixels.shape[-2:]
    else:
        height, width = request.size(pipe)
    if request.height is None and request.width is None:
        own = control_size(pipe, request)
        if own != (height, width):
            raise ValueError(
                f"the conditioning image is {own[0]}x{own[1]} (height x width) but the image is {height}x{width}: "
                "pass height= and width= to resize both, or give images of the same size"
            )
    return int(height), int(width)


# ---------------------------------------------------------------------------------------- the component
class ControlNetMixin:
    """The ``controlnet`` component of a pipeline and what the ControlNet stages ask of it."""

    def _register_controlnet(self, controlnet) -> None:
        if isinstance(controlnet, (list, tuple)):
            from ..models.multicontrolnet import MultiControlNetModel

            controlnet = MultiControlNetModel(list(controlnet))
        self.register_modules(controlnet=controlnet)

    def _controlnets(self) -> list:
        net = self.controlnet
        return list(net.nets) if hasattr(net, "nets") else [net]

    @property
    def control_image_processor(self):
        """Conditioning images as ControlNets read them: RGB, resized, in ``[0, 1]`` (not normalized)."""
        from ..image_processor import VaeImageProcessor

        cache = self.__dict__.setdefault("_processors", {})
        key = ("control", self.vae_scale_factor)
        if key not in cache:
            cache[key] = VaeImageProcessor(
                vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True, do_normalize=False
            )
        return cache[key]

    def _components_needed(self, request) -> list[str]:
        return [*super()._components_needed(request), "controlnet"]
