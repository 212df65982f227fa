"""Sliding context windows over the frame axis (FreeNoise, Qiu et al. 2023, "FreeNoise: Tuning-Free Longer
Video Diffusion via Noise Rescheduling"), and splitting a module's batch to bound its memory.

A motion module's temporal attention was trained on at most ``motion_max_seq_length`` frames. To make
longer videos, each temporal transformer block attends within windows of ``length`` frames that start
every ``stride`` frames, and every frame's result is the weighted mean of its windows' results (the
weights fall off towards a window's edges, so neighbouring windows blend smoothly). The block's
feed-forward then runs on all frames at once. The numbers are the reference's, including how it
counts the frames of a last, partial window (see :meth:`ContextWindows.blend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..runtime.hooks import ModuleHook, add_hook, remove_all_hooks

WEIGHTING_SCHEMES = ("flat", "pyramid", "delayed_reverse_sawtooth")


def frame_weights(length: int, scheme: str) -> list[float]:
    """The weight of each position of a ``length``-frame window under ``scheme``."""
    half = (length + 1) // 2
    if scheme == "flat":
        return [1.0] * length
    if scheme == "pyramid":  # 1, 2, ... up to the middle and back down
        rise = list(range(1, half + 1))
        return rise + rise[::-1][length % 2 :]
    if scheme == "delayed_reverse_sawtooth":  # almost nothing in the first half, then falling
        if length % 2:
            raise ValueError(f"weighting_scheme='delayed_reverse_sawtooth' needs an even context_length, got {length}")
        return [0.01] * (half - 1) + [half] + list(range(half, 0, -1))
    raise ValueError(f"weighting_scheme must be one of {list(WEIGHTING_SCHEMES)}, got {scheme!r}")


@dataclass(frozen=True)
class ContextWindows:
    """Windows of ``length`` frames every ``stride`` frames, blended with ``weighting`` weights."""

    length: int = 16
    stride: int = 4
    weighting: str = "pyramid"

    def __post_init__(self):
        for name in ("length", "stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"context_{name} must be a positive integer, got {value!r}")
        if self.stride > self.length:
            raise ValueError(
                f"context_stride={self.stride} is more than context_length={self.length}: the frames between "
                "windows would be left out; use a stride of at most the window's length"
            )
        frame_weights(self.length, self.weighting)  # checks the scheme

    def windows(self, num_frames: int) -> list[tuple[int, int]]:
        """The (start, end) of the full windows; frames past the last one are covered by :meth:`blend`."""
        return [(s, s + self.length) for s in range(0, num_frames - self.length + 1, self.stride)]

    def blend(self, hidden_states: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` over ``[N, frames, C]`` window by window, each frame the weighted mean of its windows.

        A video no longer than a window is one window. When the windows stop short of the last frame, one
        more window ends at the last frame and adds only the frames not yet covered; as in the reference,
        those frames are counted with the weight of the first of them (not each its own), which the
        parity tests pin.
        """
        num_frames = hidden_states.shape[1]
        if num_frames <= self.length:
            return fn(hidden_states)
        weights = torch.tensor(frame_weights(self.length, self.weighting), dtype=hidden_states.dtype)
        weights = weights.to(hidden_states.device)[None, :, None]
        total = torch.zeros_like(hidden_states)
        counts = torch.zeros(1, num_frames, 1, device=hidden_states.device)
        windows = self.windows(num_frames)
        for start, end in windows:
            total[:, start:end] += fn(hidden_states[:, start:end]) * weights
            counts[:, start:end] += weights
        tail = num_frames - windows[-1][1]
        if tail:
            out = fn(hidden_states[:, num_frames - self.length :])
            total[:, -tail:] += out[:, -tail:] * weights[:, -tail:]
            counts[:, -tail:] += weights[:, -tail]
        return (total / counts).to(hidden_states.dtype)


# --------------------------------------------------------------------------- split inference
SPLIT = "split_inference"


def _split_arg(value, size: int, batch: int):
    """``value`` cut into ``size``-row pieces if it is a tensor (or a tuple/list of them) of ``batch`` rows."""
    if torch.is_tensor(value) and value.ndim and value.shape[0] == batch:
        return list(value.split(size))
    if isinstance(value, (tuple, list)) and value and all(torch.is_tensor(v) for v in value):
        parts = [_split_arg(v, size, batch) for v in value]
        if all(isinstance(p, list) for p in parts):
            return [type(value)(p[i] for p in parts) for i in range(len(parts[0]))]
    return None


def _join(outputs: list):
    first = outputs[0]
    if torch.is_tensor(first):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return type(first)(_join([o[i] for o in outputs]) for i in range(len(first)))
    raise TypeError(f"split inference cannot join outputs of type {type(first).__name__}")


class SplitBatch(ModuleHook):
    """Run a module on ``size`` rows of its batch at a time: every tensor input with the batch's rows is
    cut alike, the outputs are joined. Same result, a fraction of the peak activation memory."""

    def __init__(self, module: nn.Module, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"split size must be a positive integer, got {size!r}")
        self.size = size
        forward = type(module).forward

        def split_forward(*args, **kwargs):
            batch = args[0].shape[0] if args else next(iter(kwargs.values())).shape[0]
            if batch <= size:
                return forward(module, *args, **kwargs)
            pieces = -(-batch // size)
            cut_args = [_split_arg(a, size, batch) or [a] * pieces for a in args]
            cut_kwargs = {k: _split_arg(v, size, batch) or [v] * pieces for k, v in kwargs.items()}
            return _join(
                [
                    forward(module, *[a[i] for a in cut_args], **{k: v[i] for k, v in cut_kwargs.items()})
                    for i in range(pieces)
                ]
            )

        module.__dict__["forward"] = split_forward

    def on_remove(self, module: nn.Module) -> None:
        module.__dict__.pop("forward", None)


def split_batches(modules, size: int) -> None:
    """:class:`SplitBatch` of ``size`` rows on each module (replacing an earlier split)."""
    for module in modules:
        add_hook(module, SPLIT, SplitBatch(module, size))


def remove_splits(root: nn.Module) -> None:
    remove_all_hooks(root, SPLIT)
