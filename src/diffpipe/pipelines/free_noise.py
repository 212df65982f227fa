"""FreeNoise for AnimateDiff: videos longer than the motion adapter was trained on, and prompts that
change over the video.

``pipe.enable_free_noise(context_length, context_stride, weighting_scheme, noise_type,
prompt_interpolation_callback)`` makes three changes, each the reference's:

- the motion modules attend within sliding windows of ``context_length`` frames
  (:class:`~diffpipe.nn.context_windows.ContextWindows`), so ``num_frames`` may exceed the adapter's
  ``motion_max_seq_length``;
- with ``noise_type="shuffle_context"`` the starting noise past the first window repeats earlier frames'
  noise, shuffled within each ``context_stride`` run (the noise rescheduling of the FreeNoise paper), so
  distant windows start alike; ``"random"`` and ``"repeat_context"`` keep independent noise per frame;
- ``prompt`` (and ``negative_prompt``) may be a dict ``{frame: prompt}`` starting at frame 0: each frame's
  embedding is interpolated between the keyframes around it (linearly, or by
  ``prompt_interpolation_callback(start_frame, end_frame, start_embeds, end_embeds)``, which returns
  the embeddings of frames ``start_frame..end_frame``, both included; the reference calls it so too,
  though its type hint names a pipeline first).

``enable_free_noise_split_inference`` bounds the activation memory of long videos by running the motion
modules over a few pixels and the 2-D layers over a few frames at a time.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from ..nn.context_windows import ContextWindows

logger = logging.getLogger(__name__)

NOISE_TYPES = ("shuffle_context", "repeat_context", "random")


@dataclass(frozen=True)
class FreeNoise:
    windows: ContextWindows
    noise_type: str = "shuffle_context"
    interpolate: Callable | None = None


def lerp_embeddings(start: int, end: int, start_embeds: torch.Tensor, end_embeds: torch.Tensor):
    """The default interpolation: frames ``start..end`` (both included) from ``start_embeds`` to ``end_embeds``."""
    t = torch.linspace(0, 1, end - start + 1, dtype=start_embeds.dtype, device=start_embeds.device)
    t = t.reshape(-1, *[1] * (start_embeds.ndim - 1))
    return (1 - t) * start_embeds + t * end_embeds


# ------------------------------------------------------------------------------ prompt schedules
def prompt_schedule(prompt, num_frames: int, name: str = "prompt") -> dict[int, str]:
    """``{frame: prompt}`` from a string or a dict, checked, sorted, and held to the last frame."""
    if isinstance(prompt, str):
        prompt = {0: prompt}
    if not isinstance(prompt, dict) or not prompt:
        raise ValueError(
            f"with FreeNoise, {name} is a string or a dict {{frame: prompt}}, got {type(prompt).__name__}"
            + (" (one video per call: pass one prompt)" if isinstance(prompt, list) else "")
        )
    schedule = {}
    for frame, text in prompt.items():
        if isinstance(frame, str) and frame.strip().isdigit():
            frame = int(frame)  # keys read from JSON
        if isinstance(frame, bool) or not isinstance(frame, numbers.Integral) or not isinstance(text, str):
            raise ValueError(f"{name} dict maps frame numbers (ints) to prompts (strings); got {frame!r}: {text!r}")
        schedule[int(frame)] = text
    frames = sorted(schedule)
    if frames[0] != 0:
        raise ValueError(f"{name} dict must start at frame 0 (the first frame needs a prompt), not {frames[0]}")
    if frames[-1] >= num_frames:
        raise ValueError(
            f"{name} dict has frame {frames[-1]}, but the video has frames 0..{num_frames - 1} "
            f"(num_frames={num_frames})"
        )
    schedule = {f: schedule[f] for f in frames}
    schedule.setdefault(num_frames - 1, schedule[frames[-1]])
    return schedule


def interpolate_schedule(schedule: dict[int, str], encode, num_frames: int, interpolate) -> torch.Tensor:
    """``[num_frames, L, D]``: the keyframes' embeddings (``encode(list_of_prompts)``) filled in between."""
    frames = list(schedule)
    keys = encode([schedule[f] for f in frames])
    out = keys.new_zeros((num_frames, *keys.shape[1:]))
    out[frames[0]] = keys[0]
    for i, (start, end) in enumerate(zip(frames, frames[1:])):
        part = interpolate(start, end, keys[i : i + 1], keys[i + 1 : i + 2])
        if not torch.is_tensor(part) or part.shape[0] != end - start + 1 or part.shape[1:] != keys.shape[1:]:
            found = tuple(part.shape) if torch.is_tensor(part) else type(part).__name__
            raise ValueError(
                f"prompt_interpolation_callback returned {found} for frames {start}..{end}; expected a tensor of "
                f"shape {(end - start + 1, *keys.shape[1:])} (one embedding per frame, both ends included)"
            )
        out[start : end + 1] = part
    return out


def encode_prompt_schedule(pipe, request, state) -> None:
    """Per-frame embeddings for one video (``state.embeds``/``state.negative``, ``[videos * frames, L, D]``)."""
    free_noise: FreeNoise = pipe.free_noise
    frames, videos = request.num_frames, request.num_images_per_prompt
    interpolate = free_noise.interpolate or lerp_embeddings

    def encode(prompts: list[str]) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(
            prompt=prompts,
            device=state.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=request.clip_skip,
            **pipe._more_prompt_arguments(request),
        )
        return embeds

    def per_frame(prompt, name):
        return interpolate_schedule(prompt_schedule(prompt, frames, name), encode, frames, interpolate)

    state.embeds = per_frame(request.prompt, "prompt").repeat(videos, 1, 1)
    state.negative = None
    if state.guidance.active:
        negative = "" if request.negative_prompt is None else request.negative_prompt
        state.negative = per_frame(negative, "negative_prompt").repeat(videos, 1, 1)


# ------------------------------------------------------------------------------ starting noise
def reschedule_noise(latents: torch.Tensor, windows: ContextWindows, generator) -> torch.Tensor:
    """FreeNoise's noise rescheduling on ``[B, C, F, h, w]`` noise, in place: from frame ``length`` on,
    each run of ``stride`` frames copies the run ``length`` frames before it, shuffled. The copies read
    frames already rewritten, as the reference's do; one shuffle (from ``generator``, or each video's
    own generator) per run."""
    num_frames = latents.shape[2]
    generators = generator if isinstance(generator, list) else [generator] * latents.shape[0]
    per_video = isinstance(generator, list)
    for start in range(windows.length, num_frames, windows.stride):
        source = start - windows.length
        run = min(num_frames, source + windows.stride) - source
        count = min(run, num_frames - start)
        for b in range(latents.shape[0] if per_video else 1):
            order = torch.randperm(run, generator=generators[b]) + source
            videos = slice(b, b + 1) if per_video else slice(None)
            latents[videos, :, start : start + count] = latents[videos, :, order[:count]]
    return latents


# ------------------------------------------------------------------------------ the switches
class FreeNoiseMixin:
    """``enable_free_noise`` / ``disable_free_noise`` / ``enable_free_noise_split_inference`` for AnimateDiff."""

    @property
    def free_noise(self) -> FreeNoise | None:
        return self.__dict__.get("_free_noise")

    @property
    def free_noise_enabled(self) -> bool:
        return self.free_noise is not None

    def enable_free_noise(
        self,
        context_length: int | None = 16,
        context_stride: int = 4,
        weighting_scheme: str = "pyramid",
        noise_type: str = "shuffle_context",
        prompt_interpolation_callback: Callable | None = None,
    ) -> None:
        """Longer videos and per-frame prompts (see this module); ``context_length=None`` is the adapter's
        ``motion_max_seq_length``."""
        longest = self.unet.config.motion_max_seq_length
        if context_length is None:
            context_length = longest
        windows = ContextWindows(context_length, context_stride, weighting_scheme)
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"enable_free_noise: noise_type must be one of {list(NOISE_TYPES)}, got {noise_type!r}")
        if prompt_interpolation_callback is not None and not callable(prompt_interpolation_callback):
            raise TypeError("prompt_interpolation_callback must be callable (start, end, start_embeds, end_embeds)")
        if context_length > longest:
            logger.warning(
                "You have set context_length=%d which is greater than the motion adapter's motion_max_seq_length=%d; "
                "the motion modules cannot attend over windows that long",
                context_length,
                longest,
            )
        object.__setattr__(self, "_free_noise", FreeNoise(windows, noise_type, prompt_interpolation_callback))
        self.unet.set_context_windows(windows)

    def disable_free_noise(self) -> None:
        self.__dict__.pop("_free_noise", None)
        self.unet.set_context_windows(None)

    def enable_free_noise_split_inference(self, spatial_split_size: int = 256, temporal_split_size: int = 16) -> None:
        """Motion modules over ``spatial_split_size`` pixels, the 2-D layers over ``temporal_split_size``
        frames at a time: same video, less peak memory. ``pipe.unet.set_split_inference(None)`` undoes it."""
        self.unet.set_split_inference(spatial_split_size, temporal_split_size)
