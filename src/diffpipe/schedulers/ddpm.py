"""DDPM: ancestral sampling of the learned reverse process (Ho et al. 2020, arXiv:2006.11239)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, SchedulerMixin, SchedulerOutput, clip_or_threshold, randn
from .checks import check_descending, check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import PREDICTION_TYPES, vp_x0

# None (as DPM-Solver configs carry it) behaves like "fixed_small", as in the reference
VARIANCE_TYPES = (None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(SchedulerMixin):
    """Denoising diffusion probabilistic models: x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_pred)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_options(
            prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS, variance_type=VARIANCE_TYPES
        )
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr, extra_schedules=("laplace", "sigmoid"))
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.variance_type = variance_type

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """DDPM feeds x_t to the model unscaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps to sample with: ``num_inference_steps`` spaced by the config's
        ``timestep_spacing``, or an explicit descending list ``timesteps``."""
        name = type(self).__name__
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError(f"{name}.set_timesteps: pass either `num_inference_steps` or `timesteps`, not both")
        if timesteps is not None:
            check_descending(name, timesteps, T)
            values = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError(f"{name}.set_timesteps: pass `num_inference_steps` or `timesteps`")
            self.num_inference_steps = check_num_inference_steps(name, num_inference_steps, T)
            self.custom_timesteps = False
            values = spaced_timesteps(
                self.config.timestep_spacing, T, self.num_inference_steps, steps_offset=self.config.steps_offset
            )
        self.timesteps = torch.from_numpy(values).to(device)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            matches = (self.timesteps == timestep).nonzero(as_tuple=True)[0]
            if len(matches) == 0:
                raise ValueError(
                    f"{type(self).__name__}: timestep {timestep!r} is not in the current schedule; "
                    "pass one of `scheduler.timesteps`"
                )
            index = matches[0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def _alpha_prods(self, t, prev_t):
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        return alpha_prod_t, alpha_prod_t_prev

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        """The variance of q(x_{t-1} | x_t, x_0) (eq. 7, beta-tilde) or its alternatives."""
        prev_t = self.previous_timestep(t)
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t)
        beta_t = 1 - alpha_prod_t / alpha_prod_t_prev  # the (possibly skipped-step) beta_t
        beta_tilde = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type
        if variance_type in (None, "fixed_small"):
            return beta_tilde
        if variance_type == "fixed_small_log":  # returns the standard deviation
            return torch.exp(0.5 * torch.log(beta_tilde))
        if variance_type == "fixed_large":
            return beta_t
        if variance_type == "fixed_large_log":
            return torch.log(beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":  # Nichol & Dhariwal 2021, eq. 15 (log-variance)
            frac = (predicted_variance + 1) / 2
            return frac * torch.log(beta_t) + (1 - frac) * torch.log(beta_tilde)
        raise AssertionError(variance_type)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One reverse step x_t -> x_{t-1}."""
        self._check_train_timestep(timestep)
        t = timestep
        prev_t = self.previous_timestep(t)

        # 0. a model that also predicts its variance returns [output, variance] along channels
        predicted_variance = None
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        # 1. alphabar_t, alphabar_{t-1}, and the step's own alpha_t / beta_t
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(t, prev_t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        # 2. x_0 from the model output (eq. 15 for epsilon), clipped or thresholded
        x0 = vp_x0(model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, self.config.prediction_type)
        x0 = clip_or_threshold(x0, self.config)

        # 3. the posterior mean mu~_t(x_t, x_0) (eq. 7)
        x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        xt_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + xt_coeff * sample

        # 4. add sigma_t z (no noise on the last step)
        if t > 0:
            noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
            if self.variance_type == "fixed_small_log":
                spread = self._get_variance(t, predicted_variance=predicted_variance) * noise
            elif self.variance_type == "learned_range":
                spread = torch.exp(0.5 * self._get_variance(t, predicted_variance=predicted_variance)) * noise
            else:
                spread = (self._get_variance(t, predicted_variance=predicted_variance) ** 0.5) * noise
            prev_sample = prev_sample + spread

        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) with the given noise."""
        return self._add_noise_alphas_cumprod(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        return self._velocity_alphas_cumprod(sample, noise, timesteps)
