"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021, arXiv:2010.02502)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, SchedulerMixin, SchedulerOutput, clip_or_threshold, randn
from .checks import check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import PREDICTION_TYPES, eps_from_x0, vp_x0_eps


class DDIMScheduler(SchedulerMixin):
    """The generalised (non-Markovian) sampler of DDIM; ``eta=0`` is deterministic, ``eta=1`` is DDPM."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._check_options(prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr)
        # alphabar "before" the first training step: 1 (a clean sample) or alphabar_0
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """DDIM feeds x_t to the model unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps, spaced by the config's ``timestep_spacing``."""
        T = self.config.num_train_timesteps
        self.num_inference_steps = check_num_inference_steps(type(self).__name__, num_inference_steps, T)
        values = spaced_timesteps(
            self.config.timestep_spacing, T, self.num_inference_steps, steps_offset=self.config.steps_offset
        )
        self.timesteps = torch.from_numpy(values).to(device)

    def _alpha_prod(self, t):
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep, prev_timestep):
        """sigma_t^2 / eta^2 of eq. 16: (1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1})."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prod(timestep), self._alpha_prod(prev_timestep)
        return ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t-1} (eq. 12). ``eta`` scales the noise (eq. 16)."""
        self._require_timesteps()
        self._check_train_timestep(timestep)

        # 1. the previous timestep: one stride of the leading spacing below t
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps

        # 2. alphabar_t and alphabar_{t-1} (the paper's alpha_t, alpha_{t-1})
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prod(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t

        # 3. "predicted x_0" and the noise it implies (eq. 12, first term; eq. 9)
        x0, eps = vp_x0_eps(model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, self.config.prediction_type)

        # 4. clip or threshold x_0
        x0 = clip_or_threshold(x0, self.config)

        # 5. sigma_t(eta) (eq. 16)
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance**0.5

        # 6. re-derive eps from the clipped x_0 when asked (as in Glide)
        if use_clipped_model_output:
            eps = eps_from_x0(sample, x0, alpha_prod_t**0.5, beta_prod_t**0.5)

        # 7. "direction pointing to x_t" (eq. 12, second term)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps

        # 8. x_{t-1} without the random noise (eq. 12)
        prev_sample = alpha_prod_t_prev**0.5 * x0 + direction

        # 9. the random noise sigma_t z (eq. 12, third term)
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("DDIMScheduler.step: pass either `generator` or `variance_noise`, not both")
            if variance_noise is None:
                variance_noise = randn(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

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
