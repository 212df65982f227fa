"""DEIS: the Diffusion Exponential Integrator Sampler (Zhang & Chen 2022, arXiv:2204.13902),
multistep "log-rho" variant of order 1-3.

In the VE coordinate rho = sigma_t / alpha_t the probability-flow ODE of x_t = alpha_t x_0 + sigma_t eps
is exact in ``x / alpha``: d(x / alpha) / d rho = eps(x, rho). DEIS integrates it from the current
point s0 to the next point t with eps replaced by the polynomial through the last stored outputs
m0, m1, m2 (at rho_s0, rho_s1, rho_s2), a polynomial in log rho (the paper's "log-rho" fit):

    x_t / alpha_t = x_s0 / alpha_s0 + sum_k m_k int_{rho_s0}^{rho_t} L_k(log rho) d rho,

L_k being the Lagrange basis polynomials; the integrals have closed forms (``_lagrange_integral_*``).
Order 1 is the DDIM step (the same as DPM-Solver-1 in eps).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from .base import KARRAS_COMPATIBLES, SchedulerOutput, dynamic_threshold
from .checks import check_num_inference_steps, check_positive_int
from .dpm_solver import DPMSolverBase, first_order_update
from .prediction import PREDICTION_TYPES, eps_from_x0, flow_x0, vp_x0
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps_one_extra
from .sigmas import interpolate_sigmas, respace_sigmas, sigma_to_t

# names of other multistep solvers that a config may carry over; the reference maps them onto DEIS's
LEGACY_ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++")
LEGACY_SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2")


def _log(x: torch.Tensor) -> torch.Tensor:
    """log in numpy's float32 arithmetic, as the reference takes it: torch's float32 log can differ
    in the last bit, and the cancellation in the coefficients below magnifies that (to ~1e-4 over a
    run)."""
    return torch.as_tensor(np.log(x.cpu().numpy()))


def _lagrange_integral_2(t, b, c):
    """An antiderivative in rho = t of the linear Lagrange basis polynomial in log rho that is 1 at
    rho = b and 0 at rho = c: int (log t - log c) / (log b - log c) dt."""
    return t * (-_log(c) + _log(t) - 1) / (_log(b) - _log(c))


def _lagrange_integral_3(t, b, c, d):
    """An antiderivative of the quadratic Lagrange basis polynomial in log rho that is 1 at b and 0
    at c and d: int (log t - log c)(log t - log d) / ((log b - log c)(log b - log d)) dt."""
    log_t, log_c, log_d = _log(t), _log(c), _log(d)
    numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
    denominator = (_log(b) - log_c) * (_log(b) - log_d)
    return numerator / denominator


class DEISMultistepScheduler(DPMSolverBase):
    """Multistep DEIS (log-rho) of order 1-3 (one model call per step)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["deis"] = "deis",
        solver_type: Literal["logrho"] = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
    ) -> None:
        name = type(self).__name__
        if algorithm_type in LEGACY_ALGORITHM_TYPES:
            self.register_to_config(algorithm_type="deis")
        if solver_type in LEGACY_SOLVER_TYPES:
            self.register_to_config(solver_type="logrho")
        self._check_options(
            algorithm_type=("deis",),
            solver_type=("logrho",),
            prediction_type=(*PREDICTION_TYPES, "flow_prediction"),
            timestep_spacing=TIMESTEP_SPACINGS,
        )
        check_positive_int(name, "solver_order", solver_order)
        respacing = self._sigma_respacing()
        if use_flow_sigmas and respacing is not None:
            raise ConfigError(f"{name}: use_flow_sigmas cannot be combined with use_{respacing}_sigmas")
        self._init_vp_schedule()
        self.lower_order_nums = 0
        self._reset_step_index()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` timesteps (config spacing and sigma schedule); ``mu`` sets
        the flow shift for dynamic shifting (and, as in the reference, records it as the config's
        ``flow_shift``)."""
        c = self.config
        self._apply_mu(mu)
        if mu is not None:
            self.register_to_config(flow_shift=self._mu_flow_shift)
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, c.num_train_timesteps)
        timesteps = spaced_timesteps_one_extra(
            c.timestep_spacing, c.num_train_timesteps, n, steps_offset=c.steps_offset
        )

        train_sigmas = self._train_sigmas()
        respacing = self._sigma_respacing()
        last = train_sigmas[0]  # the run ends at the smallest training sigma, never at 0
        if respacing is not None:
            sigmas = respace_sigmas(respacing, np.flip(train_sigmas).copy(), n)
            timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
            if respacing == "karras":
                timesteps = timesteps.round()
        elif c.use_flow_sigmas:
            shift = self._flow_shift()
            s = 1.0 - np.linspace(1, 1 / c.num_train_timesteps, n + 1)
            sigmas = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * c.num_train_timesteps).copy()
            last = sigmas[-1]  # the reference repeats the last flow sigma (a final step of size 0)
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._reset_step_index()

    # ---------------------------------------------------------------- model outputs
    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs):
        """eps, the quantity DEIS integrates, always found through x_0 (so that thresholding, when
        configured, acts on x_0)."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output: missing `sample`")
        c = self.config
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        if c.prediction_type == "flow_prediction":
            # a velocity: x_0 = x - sigma v at the schedule sigma, which also divides below (that is
            # sigma_t on flow sigmas; on VE sigmas it is the reference's choice, matched)
            sigma_t = sigma
            x0 = flow_x0(model_output, sample, sigma)
        else:
            x0 = vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        return eps_from_x0(sample, x0, alpha_t, sigma_t)

    # ---------------------------------------------------------------- the updates
    def _rho(self, index: int):
        """(alpha, rho = sigma / alpha) at position ``index`` of the schedule."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma / alpha

    def deis_first_order_update(self, model_output, *args, sample=None, **kwargs):
        """Order 1 from s = sigmas[i] to t = sigmas[i + 1]: x_t = (alpha_t / alpha_s) x_s - sigma_t (e^h - 1) eps."""
        alpha_t, sigma_t, lambda_t = self._scales(self._step_index + 1)
        alpha_s, sigma_s, lambda_s = self._scales(self._step_index)
        h = lambda_t - lambda_s
        return first_order_update("dpmsolver", sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s, h)

    dpm_solver_first_order_update = deis_first_order_update

    def multistep_deis_second_order_update(self, model_output_list, *args, sample=None, **kwargs):
        """Order 2: eps linear in log rho through (rho_s1, m1) and (rho_s0, m0)."""
        i = self._step_index
        alpha_t, rho_t = self._rho(i + 1)
        alpha_s0, rho_s0 = self._rho(i)
        _, rho_s1 = self._rho(i - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        coef1 = _lagrange_integral_2(rho_t, rho_s0, rho_s1) - _lagrange_integral_2(rho_s0, rho_s0, rho_s1)
        coef2 = _lagrange_integral_2(rho_t, rho_s1, rho_s0) - _lagrange_integral_2(rho_s0, rho_s1, rho_s0)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1)

    def multistep_deis_third_order_update(self, model_output_list, *args, sample=None, **kwargs):
        """Order 3: eps quadratic in log rho through the last three outputs."""
        i = self._step_index
        alpha_t, rho_t = self._rho(i + 1)
        alpha_s0, rho_s0 = self._rho(i)
        _, rho_s1 = self._rho(i - 1)
        _, rho_s2 = self._rho(i - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        f = _lagrange_integral_3
        coef1 = f(rho_t, rho_s0, rho_s1, rho_s2) - f(rho_s0, rho_s0, rho_s1, rho_s2)
        coef2 = f(rho_t, rho_s1, rho_s2, rho_s0) - f(rho_s0, rho_s1, rho_s2, rho_s0)
        coef3 = f(rho_t, rho_s2, rho_s0, rho_s1) - f(rho_s0, rho_s2, rho_s0, rho_s1)
        return alpha_t * (sample / alpha_s0 + coef1 * m0 + coef2 * m1 + coef3 * m2)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One multistep update from timesteps[i] to the next point."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)

        # 1. the order this step may use: lower at the end of short schedules (stability), and never
        #    more than the stored history allows
        last_step = i == n - 1 and c.lower_order_final and n < 15
        second_to_last = i == n - 2 and c.lower_order_final and n < 15

        # 2. eps joins the history
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        # 3. the update
        if c.solver_order == 1 or self.lower_order_nums < 1 or last_step:
            prev_sample = self.deis_first_order_update(converted, sample=sample)
        elif c.solver_order == 2 or self.lower_order_nums < 2 or second_to_last:
            prev_sample = self.multistep_deis_second_order_update(self.model_outputs, sample=sample)
        else:
            prev_sample = self.multistep_deis_third_order_update(self.model_outputs, sample=sample)

        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
