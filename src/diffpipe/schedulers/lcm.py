"""Latent consistency models' multistep sampler (Luo et al. 2023, arXiv:2310.04378, Algorithm 1).

A consistency model maps x_t straight to an estimate of x_0 through the boundary-condition
parameterisation f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) (Song et al. 2023, eq. 5); the
multistep sampler then re-noises that estimate to the next timestep with fresh noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import BaseOutput, SchedulerMixin, StepIndexMixin, clip_or_threshold, logger, randn
from .checks import check_descending
from .schedules import TIMESTEP_SPACINGS
from .prediction import PREDICTION_TYPES, vp_x0


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """``prev_sample`` (the next model input) and ``denoised`` (the consistency function's x_0)."""

    prev_sample: torch.Tensor
    denoised: torch.Tensor | None = None


class ConsistencyScheduleMixin(StepIndexMixin):
    """What LCM and TCD share: the DDPM training schedule and timesteps drawn from the
    distillation schedule of ``original_inference_steps`` points."""

    def _init_consistency(self) -> None:
        c = self.config
        self._check_options(prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)
        self._init_betas(rescale_betas_zero_snr=c.rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, c.num_train_timesteps)[::-1].copy().astype(np.int64))
        self.custom_timesteps = False
        self._reset_step_index()

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """Consistency models take x_t unscaled."""
        return sample

    def _choose_timesteps(
        self,
        origin: np.ndarray,
        original_steps: int,
        num_inference_steps: int | None,
        timesteps: list[int] | None,
        strength: float,
    ) -> np.ndarray:
        """Pick the sampling timesteps from the distillation schedule ``origin`` (ascending): evenly
        by index for ``num_inference_steps``, or check and use custom descending ``timesteps``."""
        name = type(self).__name__
        T = self.config.num_train_timesteps
        if timesteps is not None:
            check_descending(name, timesteps, T)
            known = set(origin.tolist())
            off_schedule = [t for t in timesteps[1:] if t not in known]
            if strength == 1.0 and timesteps[0] != T - 1:
                logger.warning("%s: custom schedule starts at %s, not at %s", name, timesteps[0], T - 1)
            if off_schedule:
                logger.warning("%s: custom timesteps %s are not on the distillation schedule", name, off_schedule)
            if len(timesteps) > original_steps:
                logger.warning(
                    "%s: %d custom timesteps exceed the %d of the distillation schedule",
                    name,
                    len(timesteps),
                    original_steps,
                )
            values = np.array(timesteps, dtype=np.int64)
            self.num_inference_steps = len(values)
            self.custom_timesteps = True
            keep = min(int(self.num_inference_steps * strength), self.num_inference_steps)
            start = max(self.num_inference_steps - keep, 0)
            return values[start * self.order :]
        if num_inference_steps > T:
            raise ValueError(
                f"{name}.set_timesteps: `num_inference_steps` ({num_inference_steps}) cannot be larger than "
                f"`num_train_timesteps` ({T})"
            )
        if len(origin) // num_inference_steps < 1:
            raise ValueError(
                f"{name}.set_timesteps: original_inference_steps x strength ({original_steps} x {strength}) is smaller "
                f"than num_inference_steps ({num_inference_steps}); use at most {int(original_steps * strength)} steps "
                f"or a strength of at least {float(num_inference_steps / original_steps)}"
            )
        if num_inference_steps > original_steps:
            raise ValueError(
                f"{name}.set_timesteps: `num_inference_steps` ({num_inference_steps}) cannot be larger than "
                f"`original_inference_steps` ({original_steps}): the schedule is a subset of the distillation schedule"
            )
        self.num_inference_steps = num_inference_steps
        self.custom_timesteps = False
        descending = origin[::-1].copy()
        picks = np.floor(np.linspace(0, len(descending), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return descending[picks]

    @staticmethod
    def _distillation_schedule(num_train_timesteps: int, original_steps: int, strength: float) -> np.ndarray:
        """The ``original_steps`` evenly spaced timesteps k-1, 2k-1, ... (k = T // original_steps),
        cut to ``strength`` of them."""
        k = num_train_timesteps // original_steps
        return np.asarray(list(range(1, int(original_steps * strength) + 1))) * k - 1

    def _check_original_steps(self, original_steps: int) -> None:
        T = self.config.num_train_timesteps
        if original_steps > T:
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: original_inference_steps ({original_steps}) cannot be larger "
                f"than num_train_timesteps ({T})"
            )

    def _require_exactly_one(self, num_inference_steps, timesteps) -> None:
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: pass exactly one of `num_inference_steps` or `timesteps`"
            )

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 after the last one)."""
        if self.custom_timesteps or self.num_inference_steps:
            index = self.index_for_timestep(timestep)
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) with the given noise."""
        return self._add_noise_alphas_cumprod(original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        return self._velocity_alphas_cumprod(sample, noise, timesteps)


class LCMScheduler(ConsistencyScheduleMixin, SchedulerMixin):
    """Multistep consistency sampling: denoise with the consistency function, re-noise, repeat."""

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
    ):
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
        descending ``timesteps``); ``strength`` < 1 keeps only the lower part (image-to-image)."""
        self._require_exactly_one(num_inference_steps, timesteps)
        original_steps = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        self._check_original_steps(original_steps)
        origin = self._distillation_schedule(self.config.num_train_timesteps, original_steps, strength)
        values = self._choose_timesteps(origin, original_steps, num_inference_steps, timesteps, strength)
        self.timesteps = torch.from_numpy(values).to(device=device, dtype=torch.long)
        self._reset_step_index()

    def get_scalings_for_boundary_condition_discrete(self, timestep):
        """c_skip = sigma_data^2 / (s^2 + sigma_data^2), c_out = s / sqrt(s^2 + sigma_data^2) with
        s = timestep * timestep_scaling and sigma_data = 0.5 (so c_skip -> 1, c_out -> 0 as t -> 0)."""
        self.sigma_data = 0.5
        scaled = timestep * self.config.timestep_scaling
        c_skip = self.sigma_data**2 / (scaled**2 + self.sigma_data**2)
        c_out = scaled / (scaled**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> LCMSchedulerOutput | tuple:
        """One multistep consistency step (Algorithm 1, lines 4-6)."""
        self._require_timesteps()
        self._check_train_timestep(timestep)
        if self._step_index is None:
            self._init_step_index(timestep)

        # 1. the next timestep (the last step stays put)
        next_index = self._step_index + 1
        prev_timestep = self.timesteps[next_index] if next_index < len(self.timesteps) else timestep

        # 2. alphabar at both
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev

        # 3. the boundary-condition scalings
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)

        # 4. x_0 from the model output, clipped or thresholded
        x0 = vp_x0(model_output, sample, alpha_prod_t.sqrt(), beta_prod_t.sqrt(), self.config.prediction_type)
        x0 = clip_or_threshold(x0, self.config)

        # 5. the consistency function f(x_t, t) = c_skip x_t + c_out x0
        denoised = c_out * x0 + c_skip * sample

        # 6. re-noise to the next timestep (not after the last step)
        if self._step_index != self.num_inference_steps - 1:
            noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=denoised.dtype)
            prev_sample = alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise
        else:
            prev_sample = denoised

        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)
