"""Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024,
arXiv:2402.19159, section 4.3 / Algorithm 4).

From x_t the model's x_0 and eps give a point on the trajectory at an intermediate time
s = floor((1 - gamma) t_prev) (gamma = ``eta``); the sample then moves forward from s to t_prev with
fresh noise. gamma = 0 is deterministic DDIM-like sampling, gamma = 1 is LCM-like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import BaseOutput, SchedulerMixin, randn
from .lcm import ConsistencyScheduleMixin
from .prediction import vp_x0_eps


@dataclass
class TCDSchedulerOutput(BaseOutput):
    """``prev_sample`` (the next model input) and ``pred_noised_sample`` (the point at time s)."""

    prev_sample: torch.Tensor
    pred_noised_sample: torch.Tensor | None = None


class TCDScheduler(ConsistencyScheduleMixin, SchedulerMixin):
    """Strategic stochastic sampling for trajectory-consistency-distilled models."""

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ) -> None:
        self._init_consistency()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        original_inference_steps: int | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Choose ``num_inference_steps`` timesteps from the distillation schedule (or custom
        ``timesteps``). Passing ``original_inference_steps`` explicitly draws from all training
        timesteps instead, as the reference does."""
        self._require_exactly_one(num_inference_steps, timesteps)
        T = self.config.num_train_timesteps
        if original_inference_steps is None:
            original_steps = self.config.original_inference_steps
            self._check_original_steps(original_steps)
            origin = self._distillation_schedule(T, original_steps, strength)
        else:
            original_steps = original_inference_steps
            origin = np.asarray(list(range(0, int(T * strength))))
        values = self._choose_timesteps(origin, original_steps, num_inference_steps, timesteps, strength)
        self.timesteps = torch.from_numpy(values).to(device=device, dtype=torch.long)
        self._reset_step_index()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.3,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> TCDSchedulerOutput | tuple:
        """One strategic stochastic sampling step; ``eta`` is the paper's gamma in [0, 1]."""
        self._require_timesteps()
        self._check_train_timestep(timestep)
        if not 0 <= eta <= 1.0:
            raise ValueError(f"TCDScheduler.step: `eta` (gamma) must be in [0, 1]; got {eta}")
        if self._step_index is None:
            self._init_step_index(timestep)

        # 1. the next timestep t_prev (0 after the last) and the intermediate s = floor((1 - gamma) t_prev)
        next_index = self._step_index + 1
        prev_timestep = self.timesteps[next_index] if next_index < len(self.timesteps) else torch.tensor(0)
        timestep_s = torch.floor((1 - eta) * prev_timestep).to(dtype=torch.long)

        # 2. alphabar at t, t_prev and s
        alpha_prod_t = self.alphas_cumprod[timestep]
        beta_prod_t = 1 - alpha_prod_t
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        alpha_prod_s = self.alphas_cumprod[timestep_s]
        beta_prod_s = 1 - alpha_prod_s

        # 3. x_0 and eps, and the trajectory point at s (a DDIM jump from t to s)
        x0, eps = vp_x0_eps(model_output, sample, alpha_prod_t.sqrt(), beta_prod_t.sqrt(), self.config.prediction_type)
        pred_noised_sample = alpha_prod_s.sqrt() * x0 + beta_prod_s.sqrt() * eps

        # 4. forward diffusion from s to t_prev with fresh noise (none after the last step or for gamma = 0)
        if eta > 0 and self._step_index != self.num_inference_steps - 1:
            noise = randn(
                model_output.shape, generator=generator, device=model_output.device, dtype=pred_noised_sample.dtype
            )
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_sample = ratio.sqrt() * pred_noised_sample + (1 - ratio).sqrt() * noise
        else:
            prev_sample = pred_noised_sample

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_noised_sample)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised_sample)
