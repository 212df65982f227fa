"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; Karras et al. 2022 discuss it
as the stochastic counterpart of the Euler ODE step)."""

from __future__ import annotations

import numpy as np
import torch

from .base import (
    KARRAS_COMPATIBLES,
    KarrasSigmaMixin,
    SchedulerMixin,
    SchedulerOutput,
    randn,
    reject_integer_timestep,
)
from .checks import check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import ve_x0
from .sigmas import interpolate_sigmas


class EulerAncestralDiscreteScheduler(KarrasSigmaMixin, SchedulerMixin):
    """Each step goes deterministically down to sigma_down, then adds fresh noise of size sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma_next^2 (the ancestral split of the DDPM posterior)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        # the reference has no x_0 ("sample") prediction for this sampler either
        self._check_options(prediction_type=("epsilon", "v_prediction"), timestep_spacing=TIMESTEP_SPACINGS)
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep sigma_T finite
        train_sigmas = self._train_sigmas()
        self.sigmas = torch.from_numpy(np.concatenate([train_sigmas[::-1], [0.0]]).astype(np.float32))
        self.num_inference_steps = None
        descending = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self.timesteps = torch.from_numpy(descending)
        self.is_scale_input_called = False
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps (config spacing) and their interpolated sigmas."""
        c = self.config
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, c.num_train_timesteps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(
            c.timestep_spacing, c.num_train_timesteps, n, steps_offset=c.steps_offset, integer=False
        )
        sigmas = interpolate_sigmas(timesteps, self._train_sigmas())
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One ancestral step from sigma_i to sigma_{i+1}."""
        reject_integer_timestep(type(self).__name__, timestep)
        self._require_timesteps()
        self._warn_if_unscaled()
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        sample = sample.to(torch.float32)

        # 1. the denoised estimate D(x; sigma)
        x0 = ve_x0(model_output, sample, sigma, self.config.prediction_type)

        # 2. split the move to sigma_next into a deterministic part (to sigma_down) and noise (sigma_up)
        sigma_from, sigma_to = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5

        # 3. Euler step of the ODE down to sigma_down: d = (x - D) / sigma
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)

        # 4. add fresh noise of standard deviation sigma_up (drawn on every step, even the last)
        noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
