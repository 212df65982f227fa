"""The EDM formulation (Karras et al. 2022, arXiv:2206.00364, "Elucidating the Design Space of
Diffusion-Based Generative Models"), and its Euler sampler.

An EDM scheduler works on a VE sigma schedule chosen directly in sigma (no training betas): the
Karras schedule (eq. 5, rho = 7) or one evenly spaced in log-sigma, between ``sigma_min`` and
``sigma_max``. The network is preconditioned as in Table 1 of the paper: it sees c_in(sigma) x and
c_noise(sigma) = log(sigma) / 4 (the ``timesteps``), and its output F becomes the denoised estimate
D(x; sigma) = c_skip(sigma) x + c_out(sigma) F, with ``sigma_data`` the standard deviation of the data.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from .base import KarrasSigmaMixin, SchedulerMixin, SchedulerOutput, reject_integer_timestep
from .checks import check_num_inference_steps
from .euler import churn, euler_update
from .prediction import EDM_PREDICTION_TYPES, edm_c_in, edm_x0
from .sigmas import exponential_sigmas_float32, karras_sigmas

SIGMA_SCHEDULES = ("karras", "exponential")


class EDMSigmaMixin(KarrasSigmaMixin):
    """What the EDM schedulers share: the config checks, the sigma schedules, the preconditioning
    (``precondition_inputs`` / ``precondition_noise`` / ``precondition_outputs``), the scaled model
    input and ``init_noise_sigma``; ``add_noise`` (x_0 + sigma eps) comes with the VE mixin."""

    # The Karras ramp in float64 (EDM Euler) or float32 (EDM DPM-Solver): the reference's choice.
    _karras_dtype = torch.float64

    def _check_edm_config(self) -> None:
        self._check_options(
            sigma_schedule=SIGMA_SCHEDULES,
            prediction_type=EDM_PREDICTION_TYPES,
            final_sigmas_type=("zero", "sigma_min"),
        )
        for key in ("sigma_min", "sigma_max", "sigma_data", "rho"):
            value = self.config[key]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                # typically a saved Euler/UniPC config carried over, whose sigma_min/sigma_max are
                # null (the reference fails on those with a TypeError)
                raise ConfigError(
                    f"{type(self).__name__}: `{key}` must be a number; got {value!r} (drop the key to use the default)"
                )

    @property
    def init_noise_sigma(self) -> float:
        """sqrt(sigma_max^2 + 1) from the config, as the reference has it (whatever the schedule)."""
        return (self.config.sigma_max**2 + 1) ** 0.5

    # ---------------------------------------------------------------- the schedule
    def _edm_sigmas(self, num_steps: int, ramp: torch.Tensor | None = None) -> torch.Tensor:
        """``num_steps`` float32 sigmas from sigma_max down to sigma_min, without the final one.

        ``ramp`` (the Karras positions in [0, 1]) defaults to ``num_steps`` evenly spaced ones; the
        exponential schedule has no positions to give and ignores it (as the reference does)."""
        c = self.config
        if c.sigma_schedule == "karras":
            if ramp is None:
                ramp = torch.linspace(0, 1, num_steps, dtype=self._karras_dtype)
            else:
                ramp = torch.as_tensor(ramp).to(self._karras_dtype)
            sigmas = karras_sigmas(c.sigma_min, c.sigma_max, len(ramp), c.rho, ramp=ramp)
        else:
            sigmas = exponential_sigmas_float32(c.sigma_min, c.sigma_max, num_steps)
        return sigmas.to(torch.float32)

    def _set_sigmas(self, sigmas: torch.Tensor, final: torch.Tensor | float, device=None) -> None:
        """``timesteps`` = c_noise of the schedule; ``sigmas`` = the schedule and then ``final``."""
        self.timesteps = self.precondition_noise(sigmas).to(device=device)
        final = torch.as_tensor(final, dtype=torch.float32).reshape(1)
        self.sigmas = torch.cat([sigmas, final]).to(device="cpu")
        self._reset_step_index()

    # ---------------------------------------------------------------- preconditioning (Table 1)
    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """c_in(sigma) x = x / sqrt(sigma^2 + sigma_data^2)."""
        return sample * edm_c_in(sigma, self.config.sigma_data)

    def precondition_noise(self, sigma) -> torch.Tensor:
        """c_noise(sigma) = log(sigma) / 4, the network's noise conditioning (a 1-element tensor for a
        plain number)."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised estimate D(x; sigma) = c_skip x + c_out F."""
        return edm_x0(model_output, sample, sigma, self.config.sigma_data, self.config.prediction_type)

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The model's input: c_in(sigma) x at the current sigma."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return self.precondition_inputs(sample, self._model_input_sigma())


class EDMEulerScheduler(EDMSigmaMixin, SchedulerMixin):
    """Euler steps of the EDM probability-flow ODE (Algorithm 2 without the second-order
    correction), with the optional churn of its stochastic form."""

    _compatibles: tuple[str, ...] = ()
    order = 1

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: Literal["karras", "exponential"] = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ):
        self._check_edm_config()
        self.num_inference_steps = None
        self.is_scale_input_called = False
        # born with a usable schedule of num_train_timesteps + 1 sigmas (the reference's count)
        sigmas = self._edm_sigmas(num_train_timesteps + 1)
        self._set_sigmas(sigmas, self._final_sigma(sigmas))

    def _final_sigma(self, sigmas: torch.Tensor):
        # sigma_min: the schedule's own last sigma repeated (the reference's rule for this class)
        return sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0.0

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: torch.Tensor | np.ndarray | list[float] | None = None,
    ) -> None:
        """Choose the sampling schedule of ``num_inference_steps`` sigmas.

        Like the reference, ``sigmas`` are not the sigmas themselves but the positions in [0, 1]
        (0 = sigma_max, 1 = sigma_min) at which the Karras schedule is evaluated; the exponential
        schedule uses only their count. ``num_inference_steps`` is then left as given (``None``).
        """
        name = type(self).__name__
        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError(f"{name}.set_timesteps: pass `num_inference_steps` or `sigmas`")
            # the EDM schedule is continuous in sigma: no training step count bounds the number of steps
            check_num_inference_steps(name, num_inference_steps, math.inf)
            schedule = self._edm_sigmas(num_inference_steps)
        else:
            ramp = torch.as_tensor(np.asarray(sigmas) if isinstance(sigmas, list) else sigmas)
            if ramp.ndim != 1 or len(ramp) == 0:
                raise ValueError(f"{name}.set_timesteps: `sigmas` must be a non-empty 1-D sequence; got {sigmas!r}")
            schedule = self._edm_sigmas(len(ramp), ramp)
        self.num_inference_steps = num_inference_steps
        self._set_sigmas(schedule, self._final_sigma(schedule), device)

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
        pred_original_sample: torch.Tensor | None = None,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One Euler step from sigma_i to sigma_{i+1}; ``pred_original_sample``, where given, is used
        as the denoised estimate instead of preconditioning ``model_output``."""
        reject_integer_timestep(type(self).__name__, timestep)
        self._warn_if_unscaled()
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self._step_index]

        sample, sigma_hat = churn(
            sample, model_output, sigma, len(self.sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, generator
        )
        # the denoised estimate at sigma_hat (the preconditioning is evaluated there, whatever the
        # prediction type)
        if pred_original_sample is None:
            pred_original_sample = self.precondition_outputs(sample, model_output, sigma_hat)
        prev_sample = euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[self._step_index + 1])
        prev_sample = prev_sample.to(model_output.dtype)

        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
