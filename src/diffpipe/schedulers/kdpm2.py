"""DPM-Solver-2 in Karras's form (k-diffusion's ``sample_dpm_2``; Karras et al. 2022 and Lu et al. 2022).

A second-order midpoint method in sigma: from sigma_i, an Euler step reaches the geometric midpoint
sigma_mid = sqrt(sigma_i sigma_{i+1}); the slope evaluated there carries x_i all the way to sigma_{i+1}.
Each interval costs two model calls, so ``timesteps`` interleaves the midpoints' timesteps.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, KarrasSigmaMixin, SchedulerMixin, SchedulerOutput
from .checks import check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import ve_x0
from .sigmas import interpolate_sigmas, respace_sigmas, sigma_to_t


class KDPM2DiscreteScheduler(KarrasSigmaMixin, SchedulerMixin):
    """DPM-Solver-2 (midpoint in log-sigma) on a Karras-style sigma schedule."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        # the reference has no x_0 ("sample") prediction for this sampler either
        self._check_options(prediction_type=("epsilon", "v_prediction"), timestep_spacing=TIMESTEP_SPACINGS)
        self._sigma_respacing()
        self._init_betas()
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self._reset_step_index()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` intervals; ``timesteps`` gets 2n - 1 entries (midpoints interleaved)."""
        c = self.config
        T = num_train_timesteps or c.num_train_timesteps
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, T)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(c.timestep_spacing, T, n, steps_offset=c.steps_offset, integer=False)

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        respacing = self._sigma_respacing()
        if respacing is not None:
            sigmas = respace_sigmas(respacing, sigmas, n, c.get("sigma_min"), c.get("sigma_max"))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if respacing == "karras":
                timesteps = timesteps.round()
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device=device)

        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        # midpoints in log-sigma between each sigma and the one before it
        sigmas_interpol = sigmas.log().lerp(sigmas.roll(1).log(), 0.5).exp()
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2), sigmas[-1:]]).to("cpu")
        self.sigmas_interpol = torch.cat(
            [sigmas_interpol[:1], sigmas_interpol[1:].repeat_interleave(2), sigmas_interpol[-1:]]
        )

        # the midpoints' timesteps (float32 arithmetic, as the reference does it), interleaved
        timesteps = torch.from_numpy(timesteps).to(device)
        mid_t = sigma_to_t(sigmas_interpol.cpu().numpy(), log_sigmas, float32_index=True)
        mid_t = torch.from_numpy(np.asarray(mid_t)).to(device, dtype=timesteps.dtype)
        interleaved = torch.stack((mid_t[1:-1, None], timesteps[1:, None]), dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], interleaved])

        self.sample = None
        self._reset_step_index()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call starts an interval, False when it evaluates the midpoint."""
        return self.sample is None

    def _model_input_sigma(self):
        index = self._step_index
        return self.sigmas[index] if self.state_in_first_order else self.sigmas_interpol[index]

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """First call: Euler to the midpoint. Second call: the midpoint slope over the whole interval."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self._step_index

        # 1. the interval [sigma, sigma_next] and its log-midpoint
        if first:
            sigma, sigma_mid, sigma_next = self.sigmas[i], self.sigmas_interpol[i + 1], self.sigmas[i + 1]
        else:
            sigma, sigma_mid, sigma_next = self.sigmas[i - 1], self.sigmas_interpol[i], self.sigmas[i]
        sigma_hat = sigma  # no churn (gamma = 0)

        # 2. the denoised estimate at the point the model was evaluated (start or midpoint)
        x0 = ve_x0(model_output, sample, sigma_hat if first else sigma_mid, self.config.prediction_type)

        if first:
            # 3a. d = (x - D) / sigma; Euler to the midpoint
            derivative = (sample - x0) / sigma_hat
            dt = sigma_mid - sigma_hat
            self.sample = sample
        else:
            # 3b. the slope at the midpoint, applied from the interval's start over the full interval
            derivative = (sample - x0) / sigma_mid
            dt = sigma_next - sigma_hat
            sample = self.sample
            self.sample = None

        self._step_index += 1
        prev_sample = sample + derivative * dt
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
