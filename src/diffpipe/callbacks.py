"""Step-end callbacks as objects, under the reference's names: pass one (or a
:class:`MultiPipelineCallbacks`) as ``callback_on_step_end=``; its ``tensor_inputs`` become the
tensors the loop hands it, so ``callback_on_step_end_tensor_inputs`` need not be given.

A callback acts once, at its cutoff step: ``cutoff_step_index``, or ``cutoff_step_ratio`` of the
call's timesteps (``int(pipe.num_timesteps * ratio)``). The classifier-free-guidance cutoffs keep
the conditional half of the guidance-batched tensors (``[negative, positive]``: the last row of a
one-image batch, as the reference takes it) and set ``pipe._guidance_scale = 0.0``, which turns
guidance off for the remaining steps.
"""

from __future__ import annotations

import numbers

from .config import ConfigMixin


class PipelineCallback(ConfigMixin):
    """Base of the callbacks: subclasses say ``tensor_inputs`` and implement ``callback_fn``."""

    tensor_inputs: list[str] = []

    def __init__(self, cutoff_step_ratio: float | None = 1.0, cutoff_step_index: int | None = None):
        if (cutoff_step_ratio is None) == (cutoff_step_index is None):
            raise ValueError(
                f"{type(self).__name__}: pass exactly one of cutoff_step_ratio= (a fraction of the steps) and "
                "cutoff_step_index= (a step number)"
            )
        ratio = cutoff_step_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio <= 1.0
        ):
            raise ValueError(f"{type(self).__name__}: cutoff_step_ratio must be a number in [0, 1], got {ratio!r}")

    def cutoff_step(self, pipeline) -> int:
        index = self.config.cutoff_step_index
        return index if index is not None else int(pipeline.num_timesteps * self.config.cutoff_step_ratio)

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement callback_fn")

    def __call__(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        return self.callback_fn(pipeline, step_index, timestep, callback_kwargs)


class MultiPipelineCallbacks:
    """Several callbacks, called in order; each sees the tensors the ones before it returned."""

    def __init__(self, callbacks: list[PipelineCallback]):
        self.callbacks = list(callbacks)

    @property
    def tensor_inputs(self) -> list[str]:
        return list(dict.fromkeys(name for cb in self.callbacks for name in cb.tensor_inputs))

    def __call__(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        for callback in self.callbacks:
            callback_kwargs = {**callback_kwargs, **(callback(pipeline, step_index, timestep, callback_kwargs) or {})}
        return callback_kwargs


class _CFGCutoff(PipelineCallback):
    """At the cutoff: the conditional half of ``tensor_inputs`` only, and guidance off."""

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if step_index != self.cutoff_step(pipeline):
            return callback_kwargs
        pipeline._guidance_scale = 0.0
        return {**callback_kwargs, **{name: callback_kwargs[name][-1:] for name in self.tensor_inputs}}


class SDCFGCutoffCallback(_CFGCutoff):
    """Stop classifier-free guidance at the cutoff step (Stable Diffusion pipelines)."""

    tensor_inputs = ["prompt_embeds"]


class SDXLCFGCutoffCallback(_CFGCutoff):
    """Stop classifier-free guidance at the cutoff step (SDXL: also the pooled text and time ids)."""

    tensor_inputs = ["prompt_embeds", "add_text_embeds", "add_time_ids"]


class IPAdapterScaleCutoffCallback(PipelineCallback):
    """Set the IP-Adapter scale to 0 at the cutoff step: the image prompt shapes only the early steps."""

    tensor_inputs = []

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        if step_index == self.cutoff_step(pipeline):
            pipeline.set_ip_adapter_scale(0.0)
        return callback_kwargs
