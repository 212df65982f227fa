"""Euler steps of a rectified-flow ODE (Lipman et al. 2022, "Flow Matching for Generative Modeling";
Esser et al. 2024, "Scaling Rectified Flow Transformers", the SD3 paper): the scheduler of SD3 and Flux.

A flow-matching model is trained on the straight path x_sigma = (1 - sigma) x_0 + sigma eps between
data (sigma = 0) and noise (sigma = 1), and predicts its velocity v = eps - x_0. Sampling walks the
sigmas down from 1 with Euler steps x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v. The model is
conditioned on t = sigma * num_train_timesteps (the ``timesteps``).

The sigmas are spaced evenly in t and then "shifted" towards the noise end, where high resolutions
need more steps: a fixed shift s maps sigma -> s sigma / (1 + (s - 1) sigma) (SD3), a resolution-
dependent one maps sigma -> e^mu / (e^mu + (1/sigma - 1)) with mu from the image's token count
(Flux, ``calculate_shift``).

Numerics follow the reference: schedules are computed in numpy (float64 from a step count, float32
from given sigmas or timesteps) and cast to float32 torch at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from ..outputs import BaseOutput
from .base import SchedulerMixin, StepIndexMixin, _broadcast_to, randn, reject_integer_timestep
from .checks import check_choice, check_num_inference_steps, check_positive_int
from .sigmas import respace_sigmas

TIME_SHIFT_TYPES = ("exponential", "linear")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the number of image tokens, ``base_shift`` at
    ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` (a 1024 x 1024 image has 4096 tokens
    of 2 x 2 latent patches). Pass it as ``set_timesteps(..., mu=mu)``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """What ``FlowMatchEulerDiscreteScheduler.step`` returns: ``prev_sample``, the next model input
    (the reference's output has no x_0 estimate)."""

    prev_sample: torch.Tensor


class FlowMatchEulerDiscreteScheduler(StepIndexMixin, SchedulerMixin):
    """Euler sampler of a flow-matching (rectified-flow) model predicting the velocity eps - x_0.

    ``sigmas`` (one per step plus the final 0, or 1 with ``invert_sigmas``) and ``timesteps``
    (sigma * num_train_timesteps) are float32. Options: a fixed ``shift`` or, with
    ``use_dynamic_shifting``, a ``mu`` given to ``set_timesteps`` (exponential or linear
    ``time_shift_type``); ``shift_terminal`` stretches the schedule to end at that sigma; the Karras /
    exponential / beta respacings; ``stochastic_sampling`` re-noises to the next sigma from the x_0
    estimate instead of taking the Euler step.
    """

    _compatibles: tuple[str, ...] = ()
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
    ):
        name = type(self).__name__
        check_positive_int(name, "num_train_timesteps", num_train_timesteps)
        check_choice(name, "time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        chosen = [
            key
            for key, on in (
                ("use_karras_sigmas", use_karras_sigmas),
                ("use_exponential_sigmas", use_exponential_sigmas),
                ("use_beta_sigmas", use_beta_sigmas),
            )
            if on
        ]
        if len(chosen) > 1:
            raise ConfigError(f"{name}: only one of {chosen} can be true at a time")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ConfigError(f"{name}: `shift_terminal` must be in [0, 1) (the last sigma); got {shift_terminal!r}")

        # the training schedule: t = N, N-1, ..., 1 and sigma = t / N, shifted by the fixed shift
        # unless the shift is chosen per resolution at set_timesteps
        train_t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = torch.from_numpy(train_t) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = sigmas * num_train_timesteps
        self.sigmas = sigmas.to("cpu")
        # the ends of the training schedule: where set_timesteps spaces its steps
        self.sigma_min = self.sigmas[-1].item()
        self.sigma_max = self.sigmas[0].item()
        self._shift = shift
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None

    # ---------------------------------------------------------------- the shift
    @property
    def shift(self) -> float:
        """The fixed shift ``set_timesteps`` applies (the config's unless ``set_shift`` changed it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Use another fixed shift from the next ``set_timesteps`` on (the config keeps its value)."""
        self._shift = shift

    @property
    def init_noise_sigma(self) -> float:
        """The initial latents are plain standard normal noise (sigma = 1 is pure noise). The
        reference has no such attribute; diffpipe gives it for a uniform pipeline loop."""
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The model sees the sample as it is (a diffpipe convenience: the reference has no such method)."""
        return sample

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    def time_shift(self, mu: float, sigma: float, t):
        """The resolution-dependent shift of the config's ``time_shift_type``:
        exponential e^mu / (e^mu + (1/t - 1)^sigma), linear mu / (mu + (1/t - 1)^sigma)."""
        if self.config.time_shift_type == "exponential":
            return self._time_shift_exponential(mu, sigma, t)
        return self._time_shift_linear(mu, sigma, t)

    def _time_shift_exponential(self, mu: float, sigma: float, t):
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)

    def _time_shift_linear(self, mu: float, sigma: float, t):
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t):
        """Stretch a schedule so that it ends at ``shift_terminal``: 1 - t is scaled so that its last
        value becomes 1 - shift_terminal (the first sigma, 1, stays)."""
        one_minus = 1 - t
        scale = one_minus[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus / scale)

    # ---------------------------------------------------------------- the schedule
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Choose the sampling schedule: ``num_inference_steps`` steps evenly spaced in t between the
        ends of the training schedule, or the given ``sigmas`` (in [0, 1], Flux passes
        ``np.linspace(1, 1/N, N)``) and/or ``timesteps``; then the shift (``mu`` is required with
        ``use_dynamic_shifting``, and ignored without), ``shift_terminal``, the respacing and the
        final sigma (0, or 1 with ``invert_sigmas``).

        Where both ``sigmas`` and ``timesteps`` are given they are used as given (the sigmas still
        shifted); given ``timesteps`` alone set the sigmas t / N."""
        name = type(self).__name__
        c = self.config
        N = c.num_train_timesteps
        if c.use_dynamic_shifting and mu is None:
            raise ValueError(
                f"{name}.set_timesteps: `mu` is required when `use_dynamic_shifting` is true "
                "(Flux computes it from the image size: see `calculate_shift`)"
            )
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(
                f"{name}.set_timesteps: `sigmas` and `timesteps` should have the same length; got "
                f"{len(sigmas)} and {len(timesteps)}"
            )
        given = sigmas if sigmas is not None else timesteps
        if num_inference_steps is not None:
            if given is not None and len(given) != num_inference_steps:
                raise ValueError(
                    f"{name}.set_timesteps: `sigmas` and `timesteps` should have the same length as "
                    f"num_inference_steps ({num_inference_steps}) when it is given; got {len(given)}"
                )
            if given is None:
                # steps are spaced in continuous t: any positive count works
                num_inference_steps = check_num_inference_steps(name, num_inference_steps, math.inf)
        elif given is not None:
            num_inference_steps = len(given)
        else:
            raise ValueError(f"{name}.set_timesteps: pass `num_inference_steps`, `sigmas` or `timesteps`")
        if given is not None and len(given) == 0:
            raise ValueError(f"{name}.set_timesteps: got an empty `sigmas` / `timesteps`")

        timesteps_given = timesteps is not None
        if timesteps_given:
            timesteps = _as_float32_numpy(timesteps)
        if sigmas is None:
            if timesteps is None:
                timesteps = np.linspace(
                    self._sigma_to_t(self.sigma_max), self._sigma_to_t(self.sigma_min), num_inference_steps
                )
            sigmas = timesteps / N
        else:
            sigmas = _as_float32_numpy(sigmas)
            num_inference_steps = len(sigmas)

        if c.use_dynamic_shifting:
            sigmas = self.time_shift(mu, 1.0, sigmas)
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if c.shift_terminal:
            sigmas = self.stretch_shift_to_terminal(sigmas)
        kind = (
            "karras"
            if c.use_karras_sigmas
            else "exponential"
            if c.use_exponential_sigmas
            else "beta"
            if c.use_beta_sigmas
            else None
        )
        if kind is not None:
            sigmas = respace_sigmas(kind, sigmas, num_inference_steps)

        sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
        if timesteps_given:
            timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32, device=device)
        else:
            timesteps = sigmas * N
        if c.invert_sigmas:
            sigmas = 1.0 - sigmas
            timesteps = sigmas * N
            sigmas = torch.cat([sigmas, torch.ones(1, device=sigmas.device)])
        else:
            sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)])

        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps
        self.sigmas = sigmas
        self._reset_step_index()

    # ---------------------------------------------------------------- forward process
    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The flow-matching forward process at ``timestep`` (one per batch item, or one for all):
        x_sigma = sigma noise + (1 - sigma) sample. Image-to-image pipelines start from it.

        The sigmas are looked up from ``timestep`` in ``timesteps``, or, after ``set_begin_index``,
        taken at the current step (the begin index before the first step)."""
        if noise is None:
            raise ValueError(f"{type(self).__name__}.scale_noise: `noise` is required")
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, dtype=self.timesteps.dtype)
        timestep = timestep.to(sample.device).flatten()
        if self._begin_index is None:
            schedule = self.timesteps.to(sample.device)
            indices = [self.index_for_timestep(t, schedule) for t in timestep]
        else:
            start = self._step_index if self._step_index is not None else self._begin_index
            indices = [start] * timestep.shape[0]
        sigma = _broadcast_to(sigmas[indices], sample)
        return sigma * noise + (1.0 - sigma) * sample

    # ---------------------------------------------------------------- the sampler
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One step from sigma_i to sigma_{i+1} with the predicted velocity ``model_output``:
        x + (sigma_{i+1} - sigma_i) v, or with ``stochastic_sampling``
        (1 - sigma_{i+1}) x_0 + sigma_{i+1} eps where x_0 = x - sigma_i v.

        ``per_token_timesteps`` (batch, tokens) gives each token of a (batch, tokens, channels) sample
        its own current t; each goes to the largest schedule sigma below its own, and the update is
        x + (sigma_token - sigma_next) v, the sign the reference uses there. ``s_churn``,
        ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted and unused, as in the reference."""
        reject_integer_timestep(type(self).__name__, timestep)
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)

        if per_token_timesteps is not None:
            token_sigmas = per_token_timesteps / self.config.num_train_timesteps
            schedule = self.sigmas[:, None, None]
            below = schedule < token_sigmas[None] - 1e-6
            next_sigma = (below * schedule).max(dim=0).values[..., None]
            current_sigma = token_sigmas[..., None]
            # the reference's sign here: current - next (a positive dt), unlike the plain step below
            dt = current_sigma - next_sigma
        else:
            current_sigma = self.sigmas[self._step_index]
            next_sigma = self.sigmas[self._step_index + 1]
            dt = next_sigma - current_sigma

        if self.config.stochastic_sampling:
            x0 = sample - current_sigma * model_output
            noise = randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = (1.0 - next_sigma) * x0 + next_sigma * noise
        else:
            prev_sample = sample + dt * model_output

        self._step_index += 1
        if per_token_timesteps is None:
            prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _as_float32_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.array(values).astype(np.float32)
