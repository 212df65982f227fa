"""Euler sampler of the probability-flow ODE (Karras et al. 2022, arXiv:2206.00364, Algorithm 2),
with optional churn (the stochastic part of Algorithm 2)."""

from __future__ import annotations

from typing import Literal

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
from .prediction import PREDICTION_TYPES, ve_x0
from .sigmas import interpolate_sigmas, respace_sigmas, sigma_to_t, vp_to_ve_sigmas


def churn(sample, model_output, sigma, num_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """The stochastic part of Algorithm 2 (lines 4-7): inside [S_tmin, S_tmax],
    gamma = min(S_churn / N, sqrt(2) - 1), sigma_hat = (1 + gamma) sigma and
    x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps with eps ~ N(0, S_noise^2 I), the noise shaped like
    ``model_output`` (drawn only when gamma > 0). Returns (x_hat, sigma_hat)."""
    gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = randn(model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype)
        sample = sample + (noise * s_noise) * (sigma_hat**2 - sigma**2) ** 0.5
    return sample, sigma_hat


def euler_update(sample, x0, sigma_hat, sigma_next):
    """Algorithm 2, lines 8-9: d = (x_hat - D) / sigma_hat, x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d."""
    derivative = (sample - x0) / sigma_hat
    return sample + derivative * (sigma_next - sigma_hat)


class EulerDiscreteScheduler(KarrasSigmaMixin, SchedulerMixin):
    """First-order ODE steps x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i, d_i = (x_i - D(x_i)) / sigma_i."""

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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool | None = False,
        use_exponential_sigmas: bool | None = False,
        use_beta_sigmas: bool | None = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        timestep_type: Literal["discrete", "continuous"] = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ):
        self._check_options(
            prediction_type=(*PREDICTION_TYPES, "original_sample"),
            interpolation_type=("linear", "log_linear"),
            timestep_spacing=TIMESTEP_SPACINGS,
            timestep_type=("discrete", "continuous"),
            final_sigmas_type=("zero", "sigma_min"),
        )
        self._sigma_respacing()
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            # alphabar_T = 0 would make sigma_T infinite; use the smallest positive float32 step instead
            self.alphas_cumprod[-1] = 2**-24

        sigmas = vp_to_ve_sigmas(self.alphas_cumprod).flip(0)
        self.num_inference_steps = None
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas])
        else:
            descending = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
            self.timesteps = torch.from_numpy(descending).to(dtype=torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)]).to("cpu")
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._reset_step_index()

    def _continuous_v(self) -> bool:
        """EDM-style v-prediction models are conditioned on c_noise = log(sigma) / 4 instead of t."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[float] | None = None,
        sigmas: list[float] | None = None,
    ) -> None:
        """Choose the sampling schedule: ``num_inference_steps`` (spaced by the config), or explicit
        descending ``timesteps``, or explicit ``sigmas`` (including the final one)."""
        name = type(self).__name__
        c = self.config
        choices = (("num_inference_steps", num_inference_steps), ("timesteps", timesteps), ("sigmas", sigmas))
        given = [k for k, v in choices if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"{name}.set_timesteps: pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`; "
                f"got {given or 'none'}"
            )
        respacing = self._sigma_respacing()
        if timesteps is not None and respacing is not None:
            raise ValueError(f"{name}.set_timesteps: custom `timesteps` cannot be combined with use_{respacing}_sigmas")
        if timesteps is not None and self._continuous_v():
            raise ValueError(
                f"{name}.set_timesteps: custom `timesteps` cannot be combined with timestep_type='continuous' "
                "and prediction_type='v_prediction'"
            )
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        else:
            num_inference_steps = check_num_inference_steps(name, num_inference_steps, c.num_train_timesteps)
        self.num_inference_steps = num_inference_steps

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = sigma_to_t(sigmas[:-1], log_sigmas)
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = spaced_timesteps(
                    c.timestep_spacing,
                    c.num_train_timesteps,
                    num_inference_steps,
                    steps_offset=c.steps_offset,
                    integer=False,
                )
            if c.interpolation_type == "linear":
                sigmas = interpolate_sigmas(timesteps, train_sigmas)
            else:
                # log_linear: num_inference_steps + 1 sigmas evenly spaced in log-sigma over the whole
                # training range (the reference's choice: one more sigma than timesteps)
                log_hi, log_lo = np.log(train_sigmas[-1]), np.log(train_sigmas[0])
                sigmas = torch.linspace(log_hi, log_lo, num_inference_steps + 1).exp().numpy()
            if respacing is not None:
                sigmas = respace_sigmas(respacing, sigmas, num_inference_steps, c.get("sigma_min"), c.get("sigma_max"))
                timesteps = sigma_to_t(sigmas, log_sigmas)
            last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0
            sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas.to("cpu")
        self._reset_step_index()

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
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1} (Algorithm 2, lines 4-8, without the correction)."""
        name = type(self).__name__
        reject_integer_timestep(name, timestep)
        self._require_timesteps()
        self._warn_if_unscaled()
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]

        # 1.-3. churn: x_hat at sigma_hat = (1 + gamma) sigma  (lines 4-7)
        sample, sigma_hat = churn(
            sample, model_output, sigma, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator
        )

        # 4. the denoised estimate D(x_hat; sigma_hat)
        prediction_type = "sample" if self.config.prediction_type == "original_sample" else self.config.prediction_type
        if prediction_type == "epsilon":
            x0 = ve_x0(model_output, sample, sigma_hat, prediction_type)
        else:  # v and x_0 predictions were made at sigma (the model never saw sigma_hat)
            x0 = ve_x0(model_output, sample, sigma, prediction_type)

        # 5.-6. the Euler step to sigma_{i+1}  (lines 8-9)
        prev_sample = euler_update(sample, x0, sigma_hat, self.sigmas[self._step_index + 1]).to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alphabar) eps - sqrt(1 - alphabar) x. Like the reference, alphabar is indexed by each
        timestep's position in the sampling schedule (not by the training step)."""
        reject_integer_timestep(type(self).__name__, timesteps)
        indices = [self.index_for_timestep(t, self.timesteps.to(sample.device)) for t in timesteps.to(sample.device)]
        alphas_cumprod = self.alphas_cumprod.to(sample)
        signal = alphas_cumprod[indices] ** 0.5
        noise_scale = (1 - alphas_cumprod[indices]) ** 0.5
        shape = (-1,) + (1,) * (sample.ndim - 1)
        return signal.flatten().reshape(shape) * noise - noise_scale.flatten().reshape(shape) * sample
