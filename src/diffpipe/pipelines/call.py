"""The call path every pipeline shares: ``_generate`` (the one template) and what the reference's
pipelines expose during a call (``num_timesteps``, ``guidance_scale``, ``interrupt``, ...).

Mixed into :class:`~diffpipe.pipelines.pipeline.DiffusionPipeline`; see ``request.py`` for the
requests and the call state, and ``docs/architecture.md`` for the path as a whole.
"""

from __future__ import annotations

import contextlib

import torch

from ..runtime.cpu_kernels import float32_kernels_for


class CallPathMixin:
    # ------------------------------------------------------------------ the call path
    # A task pipeline declares the type of its request and the stages its call runs; its ``__call__``
    # (the reference's public signature) hands its arguments to ``_generate`` and nothing else.
    request_type: type | None = None
    call_stages: tuple = ()

    def _generate(self, arguments: dict):
        """The one call path of every pipeline: the request built from the call's arguments and checked
        (every input rule, before any model runs), then each stage in order inside :meth:`_call_context`;
        the last stage leaves the call's result in ``state.output``."""
        request = self.request_type.of_call(arguments)
        request.check(self)
        with self._call_context(request) as state:
            for stage in self.call_stages:
                state = stage(self, request, state)
            return state.output

    @contextlib.contextmanager
    def _call_context(self, request):
        """What holds for the whole of a call, entered in this order and left in reverse:

        1. no autograd;
        2. bf16/fp16 components on a CPU without instructions for them run their heavy kernels in fp32
           (``nn/cpu_kernels.py``);
        3. every LoRA scaled by ``cross_attention_kwargs["scale"]`` if the call gives one;
        4. under CPU offload, the model left on the accelerator goes back to the CPU at the end;
        5. the call's state: ``num_timesteps`` and ``interrupt`` read it, and a step-end callback may
           set ``pipe._interrupt = True`` to skip the remaining steps.
        """
        from .request import CallState

        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(float32_kernels_for(*self.components.values()))
            if hasattr(self, "lora_scale_for_call"):
                stack.enter_context(self.lora_scale_for_call(request.lora_scale))
            stack.callback(self.maybe_free_model_hooks)
            state = CallState(device=self._execution_device)
            object.__setattr__(self, "_interrupt", False)
            object.__setattr__(self, "_call_state", state)
            object.__setattr__(self, "_call_request", request)  # kept after the call, as the reference's attributes
            stack.callback(self._end_call, state)
            yield state

    def _end_call(self, state) -> None:
        """Keep what the pipeline's properties report after a call, not the call's tensors."""
        object.__setattr__(self, "_call_state", None)
        object.__setattr__(self, "_last_num_timesteps", 0 if state.timesteps is None else len(state.timesteps))

    @property
    def _execution_device(self) -> torch.device:
        device = getattr(self, "_offload_device", None)
        return device if device is not None else self.device

    @property
    def num_timesteps(self) -> int:
        """Timesteps of the current (or last) call's denoising loop."""
        state = getattr(self, "_call_state", None)
        if state is None:
            return getattr(self, "_last_num_timesteps", 0)
        return 0 if state.timesteps is None else len(state.timesteps)

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    # What the reference's pipelines expose during a call (step-end callbacks read and set them).
    @property
    def guidance_scale(self) -> float | None:
        state = getattr(self, "_call_state", None)
        return None if state is None else state.guidance_scale

    @property
    def _guidance_scale(self) -> float | None:
        return self.guidance_scale

    @_guidance_scale.setter
    def _guidance_scale(self, value: float) -> None:
        """A step-end callback setting ``pipe._guidance_scale`` (the reference's protocol) changes the
        guidance of the remaining steps; ``0.0`` turns classifier-free guidance off."""
        state = getattr(self, "_call_state", None)
        if state is None or state.guidance is None:
            raise RuntimeError("_guidance_scale can only be changed during a pipeline call (from a callback)")
        state.guidance_scale = value
        state.guidance = self._guidance_for(value, state.guidance.rescale)

    def _guidance_for(self, scale: float, rescale: float = 0.0):
        """Classifier-free guidance at ``scale`` (a family whose UNet embeds the scale overrides this)."""
        from .stages import Guidance

        return Guidance(scale=scale, rescale=rescale)

    def _request_value(self, name: str):
        return getattr(self.__dict__.get("_call_request"), name, None)

    # the call's arguments, as the reference's pipelines keep them (None before the first call)
    cross_attention_kwargs = property(lambda self: self._request_value("cross_attention_kwargs"))
    clip_skip = property(lambda self: self._request_value("clip_skip"))
    guidance_rescale = property(lambda self: self._request_value("guidance_rescale"))
    denoising_start = property(lambda self: self._request_value("denoising_start"))
    denoising_end = property(lambda self: self._request_value("denoising_end"))
    lora_scale = property(lambda self: self._request_value("lora_scale"))

    @property
    def do_classifier_free_guidance(self) -> bool:
        state = getattr(self, "_call_state", None)
        return bool(state is not None and state.guidance is not None and state.guidance.active)
