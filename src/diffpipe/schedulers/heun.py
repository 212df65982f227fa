"""Heun's second-order sampler of the probability-flow ODE (Karras et al. 2022, Algorithm 1).

Each interval [sigma_i, sigma_{i+1}] costs two model calls: an Euler predictor to sigma_{i+1}, then a
trapezoidal corrector that averages the slopes at both ends. ``timesteps`` and ``sigmas`` list every
interior point twice so the pipeline loop makes both calls.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, KarrasSigmaMixin, SchedulerMixin, SchedulerOutput
from .checks import check_descending, check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import PREDICTION_TYPES, ve_x0
from .sigmas import interpolate_sigmas, respace_sigmas, sigma_to_t


class HeunDiscreteScheduler(KarrasSigmaMixin, SchedulerMixin):
    """Heun (trapezoidal) predictor-corrector steps on a Karras-style sigma schedule."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
    ) -> None:
        self._check_options(prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)
        self._sigma_respacing()
        self._init_betas(extra_schedules=("exp",))
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self.use_karras_sigmas = use_karras_sigmas
        self._reset_step_index()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` intervals (config spacing) or explicit descending ``timesteps``."""
        name = type(self).__name__
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}.set_timesteps: pass exactly one of `num_inference_steps` or `timesteps`")
        respacing = self._sigma_respacing()
        if timesteps is not None and respacing is not None:
            raise ValueError(f"{name}.set_timesteps: custom `timesteps` cannot be combined with use_{respacing}_sigmas")
        T = num_train_timesteps or c.num_train_timesteps
        if timesteps is not None:
            check_descending(name, timesteps, c.num_train_timesteps)
            n = len(timesteps)
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            n = check_num_inference_steps(name, num_inference_steps, T)
            timesteps = spaced_timesteps(c.timestep_spacing, T, n, steps_offset=c.steps_offset, integer=False)
        self.num_inference_steps = n

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        if respacing is not None:
            sigmas = respace_sigmas(respacing, sigmas, n, c.get("sigma_min"), c.get("sigma_max"))
            timesteps = sigma_to_t(sigmas, log_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)

        # every interior point twice: once as the corrector's end, once as the next predictor's start
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).to("cpu")
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)

        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._reset_step_index()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call is a predictor (Euler) stage, False for a corrector stage."""
        return self.dt is None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """A predictor stage (x_i -> Euler estimate at sigma_{i+1}) or a corrector stage (x_i -> x_{i+1})."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order

        # 1. the interval: the predictor starts at sigmas[i]; the corrector evaluates at its end point
        if first:
            sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self._step_index - 1], self.sigmas[self._step_index]
        sigma_hat = sigma  # no churn (gamma = 0)

        # 2. the denoised estimate D at the point the model was evaluated
        x0 = ve_x0(model_output, sample, sigma_hat if first else sigma_next, self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if first:
            # 3a. predictor: d_i = (x_i - D(x_i; sigma_i)) / sigma_i, Euler to sigma_{i+1} (Algorithm 1, lines 4-5)
            derivative = (sample - x0) / sigma_hat
            dt = sigma_next - sigma_hat
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            # 3b. corrector: d' at sigma_{i+1}, x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d_i + d') / 2 (lines 6-8)
            derivative = (sample - x0) / sigma_next
            derivative = (self.prev_derivative + derivative) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None

        prev_sample = sample + derivative * dt
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
