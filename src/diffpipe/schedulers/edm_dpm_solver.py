"""Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) on the EDM sigma schedule and
preconditioning (Karras et al. 2022; see ``edm_euler.py``).

In the EDM parameterisation x = x_0 + sigma eps the solver's scales are alpha_t = 1 and
sigma_t = sigma, so lambda = -log(sigma) and the data-prediction updates of ``dpm_solver.py`` apply
unchanged, with the model's x_0 being the preconditioned denoiser D(x; sigma).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import ConfigError
from .base import SchedulerMixin, dynamic_threshold
from .checks import check_num_inference_steps
from .dpm_solver import DATA_PREDICTION, MultistepDPMSolverMixin
from .edm_euler import EDMSigmaMixin


class EDMDPMSolverMultistepScheduler(MultistepDPMSolverMixin, EDMSigmaMixin, SchedulerMixin):
    """DPM-Solver++ of order 1-3 (and its SDE variant of order 1-2), one model call per step, on
    an EDM schedule."""

    _compatibles: tuple[str, ...] = ()
    order = 1
    _karras_dtype = torch.float32  # the reference evaluates this class's Karras schedule in float32
    _update_dtype = None  # and updates in the sample's own dtype (no float32 upcast)

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: Literal["karras", "exponential"] = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
    ):
        self._check_edm_config()
        self._check_solver_config(DATA_PREDICTION)
        if self.config.algorithm_type == "sde-dpmsolver++" and self.config.solver_order >= 3:
            # the reference accepts this and fails at the first third-order step
            raise ConfigError(
                f"{type(self).__name__}: algorithm_type='sde-dpmsolver++' has no third-order update here; "
                "use solver_order <= 2 or algorithm_type='dpmsolver++'"
            )
        self.num_inference_steps = None
        # born with num_train_timesteps sigmas and a zero final sigma, whatever final_sigmas_type says
        self._set_sigmas(self._edm_sigmas(num_train_timesteps), 0.0)
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` sigmas of the configured schedule."""
        c = self.config
        # the EDM schedule is continuous in sigma: no training step count bounds the number of steps
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, math.inf)
        final = torch.tensor(c.sigma_min, dtype=torch.float32) if c.final_sigmas_type == "sigma_min" else 0.0
        self._set_sigmas(self._edm_sigmas(n), final, device)
        self.num_inference_steps = n
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0

    def _sigma_to_alpha_sigma_t(self, sigma):
        """The solver's scales of x = x_0 + sigma eps: (1, sigma)."""
        return torch.ones_like(sigma), sigma

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor | None = None, **kwargs):
        """x_0 = D(x; sigma) at the current sigma, with the config's thresholding."""
        if sample is None:
            raise ValueError(f"{type(self).__name__}.convert_model_output: missing `sample`")
        c = self.config
        x0 = self.precondition_outputs(sample, model_output, self.sigmas[self._step_index])
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return x0
