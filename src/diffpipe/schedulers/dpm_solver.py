"""DPM-Solver (Lu et al. 2022, arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095),
multistep variants, with their SDE counterparts (the "sde-dpmsolver++" of the second paper).

Notation of the papers: the VP scales alpha_t, sigma_t of x_t = alpha_t x_0 + sigma_t eps, the
half-log-SNR lambda_t = log(alpha_t / sigma_t), and the step size h = lambda_t - lambda_s from the
current point s to the next point t. DPM-Solver integrates the ODE in eps ("data prediction" is
x_0 for the ++ variants), re-using the model outputs of previous steps for higher orders:

* order 1 (both): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s        (++, eq. 9)
                  x_t = (alpha_t / alpha_s) x_s - sigma_t (e^{h} - 1) eps_s         (eq. 3.7)
* order 2: a first-order term D0 plus the finite difference D1 = (m0 - m1) / r0 with
  r0 = h_{prev} / h (Algorithm 2 of the ++ paper; "midpoint" or "heun" weighting of D1);
* order 3: D1 and a second difference D2 from three stored outputs (Algorithm 3).
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from .base import (
    KARRAS_COMPATIBLES,
    SchedulerMixin,
    SchedulerOutput,
    SigmaScheduleMixin,
    dynamic_threshold,
    randn,
)
from .checks import check_num_inference_steps, check_positive_int
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps_one_extra
from .prediction import PREDICTION_TYPES, eps_from_x0, flow_x0, vp_eps, vp_x0, x0_from_eps
from .sigmas import alpha_sigma_from_ve, interpolate_sigmas, lu_log_sigmas, respace_sigmas, sigma_to_t

ALGORITHM_TYPES = ("dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++")
DATA_PREDICTION = ("dpmsolver++", "sde-dpmsolver++")  # the ++ variants work with x_0 predictions


def log_snr(alpha_t, sigma_t):
    """lambda = log(alpha) - log(sigma), the half log signal-to-noise ratio."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def first_order_update(algorithm_type, sample, m, alpha_t, sigma_t, alpha_s, sigma_s, h, noise=None):
    """One DPM-Solver-1 step (= DDIM for the ODE variants) from s to t with model output m
    (x_0 for the ++ variants, eps otherwise)."""
    if algorithm_type == "dpmsolver++":
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m
    if algorithm_type == "dpmsolver":
        return (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * m
    if algorithm_type == "sde-dpmsolver++":
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * m
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    if algorithm_type == "sde-dpmsolver":
        return (
            (alpha_t / alpha_s) * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * m
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )
    raise AssertionError(algorithm_type)


def second_order_terms(algorithm_type, solver_type, sample, D0, D1, alpha_t, sigma_t, alpha_s, sigma_s, h, noise=None):
    """x_t from the zeroth (D0) and first (D1) differences of the model outputs, anchored at
    (alpha_s, sigma_s, sample); shared by the multistep and singlestep second-order updates."""
    if algorithm_type == "dpmsolver++":
        base = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        if solver_type == "midpoint":
            return base - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
        return base + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    if algorithm_type == "dpmsolver":
        base = (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
        if solver_type == "midpoint":
            return base - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
        return base - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
    if algorithm_type == "sde-dpmsolver++":
        base = (sigma_t / sigma_s * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
        if solver_type == "midpoint":
            x = base + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
        else:
            x = base + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    if algorithm_type == "sde-dpmsolver":
        base = (alpha_t / alpha_s) * sample - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
        if solver_type == "midpoint":
            x = base - (sigma_t * (torch.exp(h) - 1.0)) * D1
        else:
            x = base - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        return x + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
    raise AssertionError(algorithm_type)


def third_order_terms(algorithm_type, sample, D0, D1, D2, alpha_t, sigma_t, alpha_s, sigma_s, h, noise=None):
    """x_t from the zeroth, first and second differences (the Taylor terms phi_1, phi_2, phi_3)."""
    if algorithm_type == "dpmsolver++":
        return (
            (sigma_t / sigma_s) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "dpmsolver":
        return (
            (alpha_t / alpha_s) * sample
            - (sigma_t * (torch.exp(h) - 1.0)) * D0
            - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
        )
    if algorithm_type == "sde-dpmsolver++":
        return (
            (sigma_t / sigma_s * torch.exp(-h)) * sample
            + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    raise ConfigError(f"third-order updates are not defined for algorithm_type={algorithm_type!r}")


class DPMSolverUpdates:
    """The solver options and the first-order update, for any schedule: the host gives ``sigmas``,
    the current ``_step_index`` and ``_sigma_to_alpha_sigma_t`` (a schedule sigma -> the VP scales)."""

    _deprecated_algorithms = "`algorithm_types dpmsolver and sde-dpmsolver`"  # what the deprecation names
    _unknown_timestep_is_last = True  # a timestep not in the schedule: the last step, as the reference

    def _check_solver_config(self, algorithm_types) -> None:
        """Check the solver options, mapping the legacy names onto the implemented ones as the
        reference does (``deis`` -> ``dpmsolver++``, the UniPC/DEIS solver types -> ``midpoint``)."""
        name = type(self).__name__
        c = self.config
        if c.algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        if c.solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        self._check_options(
            algorithm_type=algorithm_types,
            solver_type=("midpoint", "heun"),
            final_sigmas_type=("zero", "sigma_min"),
        )
        check_positive_int(name, "solver_order", c.solver_order)
        if c.algorithm_type in ("dpmsolver", "sde-dpmsolver"):  # the reference's FutureWarning, in its words
            warnings.warn(
                f"{self._deprecated_algorithms} is deprecated and will be removed in version 1.0.0. algorithm_type "
                f"{c.algorithm_type} is deprecated and will be removed in a future version. Choose from "
                "`dpmsolver++` or `sde-dpmsolver++` instead",
                FutureWarning,
                stacklevel=5,
            )
        # (checked on the name as given: the reference refuses a zero final sigma for "deis" too)
        if c.algorithm_type not in DATA_PREDICTION and c.final_sigmas_type == "zero":
            raise ConfigError(
                f"{name}: final_sigmas_type='zero' is not supported with algorithm_type={c.algorithm_type!r}; "
                "use final_sigmas_type='sigma_min'"
            )

    def _scales(self, index: int):
        """(alpha, sigma, lambda) at position ``index`` of the schedule."""
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma, log_snr(alpha, sigma)

    def dpm_solver_first_order_update(self, model_output, *args, sample=None, noise=None, **kwargs):
        """Order 1 (DDIM-like) from the current point s = sigmas[i] to t = sigmas[i + 1]; the same in
        the multistep and singlestep solvers."""
        alpha_t, sigma_t, lambda_t = self._scales(self._step_index + 1)
        alpha_s, sigma_s, lambda_s = self._scales(self._step_index)
        h = lambda_t - lambda_s
        return first_order_update(
            self.config.algorithm_type, sample, model_output, alpha_t, sigma_t, alpha_s, sigma_s, h, noise
        )


class MultistepDPMSolverMixin(DPMSolverUpdates):
    """The multistep solver (one model call per step, higher orders from the stored outputs); the
    host adds ``convert_model_output`` and keeps ``model_outputs`` / ``lower_order_nums``."""

    # the dtype of the update (the sample is cast to it, the SDE noise drawn in it); None keeps the sample's own
    _update_dtype: torch.dtype | None = torch.float32

    def multistep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Order 2 from s0 = sigmas[i] to t, with the previous point s1 = sigmas[i - 1]."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._scales(i)
        _, _, lambda_s1 = self._scales(i - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        return second_order_terms(
            self.config.algorithm_type,
            self.config.solver_type,
            sample,
            D0,
            D1,
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h,
            noise,
        )

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Order 3 from s0 = sigmas[i] to t with s1, s2 = sigmas[i - 1], sigmas[i - 2]."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i + 1)
        alpha_s0, sigma_s0, lambda_s0 = self._scales(i)
        _, _, lambda_s1 = self._scales(i - 1)
        _, _, lambda_s2 = self._scales(i - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
        return third_order_terms(
            self.config.algorithm_type, sample, m0, D1, D2, alpha_t, sigma_t, alpha_s0, sigma_s0, h, noise
        )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One multistep update from timesteps[i] to the next point."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        c = self.config
        i, n = self._step_index, len(self.timesteps)

        # 1. the order this step may use: lower at the end of short schedules (stability),
        #    always 1 into a zero final sigma, and never more than the stored history allows
        last_step = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        )
        second_to_last = i == n - 2 and c.lower_order_final and n < 15

        # 2. the integrated quantity (x_0 or eps) joins the history
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        # 3. the update's dtype, and noise for the SDE variants
        dtype = self._update_dtype or sample.dtype
        sample = sample.to(dtype)
        noise = None
        if c.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn(converted.shape, generator=generator, device=converted.device, dtype=dtype)
            else:
                noise = variance_noise.to(device=converted.device, dtype=dtype)

        # 4. the update
        if c.solver_order == 1 or self.lower_order_nums < 1 or last_step:
            prev_sample = self.dpm_solver_first_order_update(converted, sample=sample, noise=noise)
        elif c.solver_order == 2 or self.lower_order_nums < 2 or second_to_last:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample=sample, noise=noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample=sample, noise=noise)

        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(converted.dtype)
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)


class DPMSolverBase(DPMSolverUpdates, SigmaScheduleMixin, SchedulerMixin):
    """What the multistep and singlestep DPM-Solvers share: the VP schedule, sigma schedules, the
    conversion of model outputs, and add_noise."""

    def _init_vp_schedule(self, *, rescale_betas_zero_snr: bool = False) -> None:
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep sigma_T finite
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).to("cpu")
        self.init_noise_sigma = 1.0
        self._mu_flow_shift = None
        # before set_timesteps: the training timesteps, descending, and no model outputs yet
        n = self.config.num_train_timesteps
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, n - 1, n, dtype=np.float32)[::-1].copy())
        self.model_outputs: list[torch.Tensor | None] = [None] * self.config.solver_order

    def _check_dpm_config(self, algorithm_types) -> None:
        """Validate, and map legacy names onto the implemented ones as the reference does."""
        name = type(self).__name__
        c = self.config
        self._check_solver_config(algorithm_types)
        self._check_options(prediction_type=(*PREDICTION_TYPES, "flow_prediction"))
        # variance_type: only "learned"/"learned_range" act; other values (a DDPM config's
        # "fixed_small") are carried along unused, as in the reference
        self._sigma_respacing()
        if c.prediction_type == "flow_prediction" and c.algorithm_type not in DATA_PREDICTION:
            raise ConfigError(f"{name}: prediction_type='flow_prediction' needs a dpmsolver++ algorithm_type")
        if c.use_flow_sigmas and self._sigma_respacing() is not None:
            raise ConfigError(f"{name}: use_flow_sigmas cannot be combined with use_{self._sigma_respacing()}_sigmas")

    # ---------------------------------------------------------------- sigma schedules
    def _flow_shift(self) -> float:
        return self._mu_flow_shift if self._mu_flow_shift is not None else self.config.flow_shift

    def _apply_mu(self, mu) -> None:
        if mu is None:
            return
        if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
            raise ValueError(
                f"{type(self).__name__}.set_timesteps: `mu` needs use_dynamic_shifting=True and "
                "time_shift_type='exponential'"
            )
        self._mu_flow_shift = float(np.exp(mu))

    def _sigmas_for(self, timesteps: np.ndarray, n: int, *, always_round_karras: bool = False):
        """(sigmas with the final one appended, timesteps) for the config's sigma schedule.

        Timesteps found from Karras sigmas (and Lu lambdas) are rounded to training steps, except
        on the cosine schedule; ``always_round_karras`` rounds those even there (the singlestep
        solver's rule)."""
        c = self.config
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        respacing = self._sigma_respacing()
        keep_fractional = c.beta_schedule == "squaredcos_cap_v2"
        if respacing is not None:
            sigmas = respace_sigmas(respacing, np.flip(train_sigmas).copy(), n, c.get("sigma_min"), c.get("sigma_max"))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if respacing == "karras" and (always_round_karras or not keep_fractional):
                timesteps = timesteps.round()
        elif c.get("use_lu_lambdas"):
            log_desc = np.flip(log_sigmas.copy())
            sigmas = np.exp(lu_log_sigmas(log_desc[-1].item(), log_desc[0].item(), n))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if not keep_fractional:
                timesteps = timesteps.round()
        elif c.use_flow_sigmas:
            shift = self._flow_shift()
            s = 1.0 - np.linspace(1, 1 / c.num_train_timesteps, n + 1)
            sigmas = np.flip(shift * s / (1 + (shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * c.num_train_timesteps).copy()
        else:
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
        last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0
        return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps

    def _sigma_to_alpha_sigma_t(self, sigma):
        """The VP scales (alpha_t, sigma_t) at a schedule sigma (rectified flow: (1 - sigma, sigma))."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        return alpha_sigma_from_ve(sigma)

    # ---------------------------------------------------------------- model outputs

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs):
        """The quantity the solver integrates: x_0 for the ++ variants, eps otherwise (with the
        config's thresholding applied to x_0)."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output: missing `sample`")
        c = self.config
        if c.prediction_type == "epsilon" and c.variance_type in ("learned", "learned_range"):
            model_output = model_output[:, :3]  # the reference keeps the first 3 (RGB) channels
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        if c.algorithm_type in DATA_PREDICTION:
            if c.prediction_type == "flow_prediction":
                x0 = flow_x0(model_output, sample, sigma)
            else:
                x0 = vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type)
            if c.thresholding:
                x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0
        eps = vp_eps(model_output, sample, alpha_t, sigma_t, c.prediction_type)
        if c.thresholding:
            x0 = x0_from_eps(sample, eps, alpha_t, sigma_t)
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = eps_from_x0(sample, x0, alpha_t, sigma_t)
        return eps

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """DPM-Solver feeds x_t to the model unscaled."""
        return sample

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at the schedule sigma of each timestep."""
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self._indexed_sigmas(original_samples, timesteps))
        return alpha_t * original_samples + sigma_t * noise


class DPMSolverMultistepScheduler(MultistepDPMSolverMixin, DPMSolverBase):
    """Multistep DPM-Solver / DPM-Solver++ of order 1-3 (one model call per step)."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: Literal["epsilon", "sample", "v_prediction", "flow_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range"] | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
    ):
        self._check_dpm_config(ALGORITHM_TYPES)
        self._check_options(timestep_spacing=TIMESTEP_SPACINGS)
        if self.config.algorithm_type == "sde-dpmsolver" and solver_order >= 3:
            raise ConfigError(
                "DPMSolverMultistepScheduler: algorithm_type='sde-dpmsolver' has no third-order update; "
                "use solver_order <= 2 or algorithm_type='sde-dpmsolver++'"
            )
        self._init_vp_schedule(rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.lower_order_nums = 0
        self._reset_step_index()

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` timesteps (config spacing and sigma schedule) or explicit
        ``timesteps``; ``mu`` sets the flow shift for dynamic shifting."""
        name = type(self).__name__
        c = self.config
        self._apply_mu(mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}.set_timesteps: pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_lu_lambdas", "use_exponential_sigmas", "use_beta_sigmas"):
                if c.get(flag):
                    raise ValueError(f"{name}.set_timesteps: custom `timesteps` cannot be combined with {flag}=True")
            timesteps = np.array(timesteps).astype(np.int64)
            n = len(timesteps)
        else:
            n = check_num_inference_steps(name, num_inference_steps, c.num_train_timesteps)
            # lambda_min_clipped: leave out the noisiest training steps (cosine schedules, for stability)
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped)
            last_timestep = int(c.num_train_timesteps - clipped_idx.item())
            timesteps = spaced_timesteps_one_extra(
                c.timestep_spacing, c.num_train_timesteps, n, steps_offset=c.steps_offset, last_timestep=last_timestep
            )
        sigmas, timesteps = self._sigmas_for(timesteps, n)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self._reset_step_index()
