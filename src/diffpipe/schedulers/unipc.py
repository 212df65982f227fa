"""UniPC: a unified predictor-corrector framework (Zhao et al. 2023, arXiv:2302.04867).

Notation of the paper: VP scales alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t), the step
h = lambda_t - lambda_s0, and the model outputs m_i (x_0 predictions for ``predict_x0``, else eps).

* UniP-p (predictor, eq. 9 / Algorithm 2): x_t = (sigma_t / sigma_s0) x_s0 - alpha_t h phi_1 m0
  - alpha_t B(h) sum_k rho_k D1_k, with D1_k = (m_k - m0) / r_k and r_k = (lambda_k - lambda_s0) / h;
  the rho_k solve R rho = b (R_ij = r_j^(i-1), b_i = phi_{i+1}(h) i! / B(h)).
* UniC-p (corrector, eq. 8 / Algorithm 1): after the model is evaluated at the predicted x_t, the
  same update is redone from x_s0 including the new output's difference D1_t = m_t - m0.

``solver_type`` picks B(h): "bh1" is B(h) = h, "bh2" is B(h) = e^h - 1.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from .base import KARRAS_COMPATIBLES, SchedulerMixin, SchedulerOutput, SigmaScheduleMixin, dynamic_threshold
from .checks import check_num_inference_steps, check_positive_int
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps_one_extra
from .prediction import PREDICTION_TYPES, flow_x0, vp_eps, vp_x0
from .sigmas import alpha_sigma_from_ve, interpolate_sigmas, respace_sigmas, sigma_to_t


class UniPCMultistepScheduler(SigmaScheduleMixin, SchedulerMixin):
    """UniPC multistep predictor-corrector of order 1-3 (one model call per step)."""

    _unknown_timestep_is_last = True  # a timestep not in the schedule: the last step, as the reference
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
        predict_x0: bool = True,
        solver_type: Literal["bh1", "bh2"] = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list[int] = [],  # noqa: B006  (the reference's default, recorded in configs)
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
        sigma_min: float | None = None,
        sigma_max: bool | None = None,
        shift_terminal: bool | None = None,
    ) -> None:
        name = type(self).__name__
        if solver_type in ("midpoint", "heun", "logrho"):  # DPM-Solver names map to bh2, as in the reference
            self.register_to_config(solver_type="bh2")
        self._check_options(
            solver_type=("bh1", "bh2"),
            prediction_type=(*PREDICTION_TYPES, "flow_prediction"),
            timestep_spacing=TIMESTEP_SPACINGS,
            final_sigmas_type=("zero", "sigma_min"),
        )
        check_positive_int(name, "solver_order", solver_order)
        if use_dynamic_shifting:
            self._check_options(time_shift_type=("exponential", "linear"))
        self._sigma_respacing()
        if prediction_type == "flow_prediction" and not predict_x0:
            raise ConfigError(f"{name}: prediction_type='flow_prediction' needs predict_x0=True")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ConfigError(f"{name}: `shift_terminal` is only supported with use_flow_sigmas=True")
        self._init_betas(rescale_betas_zero_snr=rescale_betas_zero_snr)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keep sigma_T finite
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).to("cpu")
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.num_inference_steps = None
        descending = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.timesteps = torch.from_numpy(descending)
        self.model_outputs: list[torch.Tensor | None] = [None] * solver_order
        self.timestep_list: list = [None] * solver_order
        self.lower_order_nums = 0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self.last_sample = None
        self._reset_step_index()

    # ---------------------------------------------------------------- schedule
    def _time_shift(self, mu: float, t):
        """Resolution-dependent shift of flow timesteps (SD3-style dynamic shifting)."""
        if self.config.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        return mu / (mu + (1 / t - 1))

    def _stretch_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Stretch shifted flow sigmas so the last one is exactly 1 - shift_terminal's complement."""
        one_minus = 1 - t
        scale = one_minus[-1] / (1 - self.config.shift_terminal)
        return 1 - (one_minus / scale)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` timesteps (config spacing and sigma schedule), or explicit
        flow ``sigmas``; ``mu`` is the dynamic shift."""
        name = type(self).__name__
        c = self.config
        T = c.num_train_timesteps
        if c.use_dynamic_shifting and mu is None:
            raise ValueError(f"{name}.set_timesteps: `mu` is required when use_dynamic_shifting=True")
        if sigmas is not None:
            if not c.use_flow_sigmas:
                raise ValueError(f"{name}.set_timesteps: custom `sigmas` need use_flow_sigmas=True")
            num_inference_steps = len(sigmas)
            sigmas = np.array(sigmas, dtype=np.float64)
        else:
            num_inference_steps = check_num_inference_steps(name, num_inference_steps, T)
        n = num_inference_steps
        timesteps = spaced_timesteps_one_extra(c.timestep_spacing, T, n, steps_offset=c.steps_offset)

        respacing = self._sigma_respacing()
        if respacing is not None:
            base = sigmas if sigmas is not None else self._train_sigmas()
            log_sigmas = np.log(base)
            sigmas = respace_sigmas(respacing, np.flip(base).copy(), n, c.sigma_min, c.sigma_max)
            if respacing == "karras" and c.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)
                timesteps = (sigmas * T).copy()
            else:
                timesteps = sigma_to_t(sigmas, log_sigmas)
                if respacing == "karras":
                    timesteps = timesteps.round()
            last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0
        elif c.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / T, n + 1)[:-1]
            if c.use_dynamic_shifting:
                sigmas = self._time_shift(mu, sigmas)
            else:
                sigmas = c.flow_shift * sigmas / (1 + (c.flow_shift - 1) * sigmas)
            if c.shift_terminal:
                sigmas = self._stretch_to_terminal(sigmas)
            if np.fabs(sigmas[0] - 1) < 1e-6:  # sigma = 1 would make alpha_t = 0
                sigmas[0] -= 1e-6
            timesteps = (sigmas * T).copy()
            last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0
        else:
            train_sigmas = self._train_sigmas()
            sigmas = interpolate_sigmas(timesteps, train_sigmas)
            last = train_sigmas[0] if c.final_sigmas_type == "sigma_min" else 0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)

        self.sigmas = torch.from_numpy(sigmas).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * c.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)
        self._reset_step_index()

    def _sigma_to_alpha_sigma_t(self, sigma):
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        return alpha_sigma_from_ve(sigma)

    def _scales(self, index: int, device=None):
        sigma = self.sigmas[index] if device is None else self.sigmas[index].to(device)
        alpha, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)

    # ---------------------------------------------------------------- model outputs
    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor | None = None, **kwargs):
        """m = x_0 (``predict_x0``, thresholded if configured) or eps, from the raw model output."""
        if sample is None:
            if len(args) > 1:
                sample = args[1]
            else:
                raise ValueError("convert_model_output: missing `sample`")
        c = self.config
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma)
        if self.predict_x0:
            if c.prediction_type == "flow_prediction":
                x0 = flow_x0(model_output, sample, sigma)
            else:
                x0 = vp_x0(model_output, sample, alpha_t, sigma_t, c.prediction_type)
            if c.thresholding:
                x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            return x0
        return vp_eps(model_output, sample, alpha_t, sigma_t, c.prediction_type)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """UniPC feeds x_t to the model unscaled."""
        return sample

    # ---------------------------------------------------------------- the shared UniPC algebra
    def _coefficients(self, h, rks: list, order: int, device):
        """hh (= -h for x_0 prediction), h phi_1(hh), B(hh), and the system R rho = b."""
        rks = torch.stack(rks + [torch.ones((), device=device)])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
        h_phi_k = h_phi_1 / hh - 1  # phi_2(h) h ... built up recursively: phi_{k+1} = (phi_k - 1/k!) / h
        factorial = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for k in range(1, order + 1):
            R.append(torch.pow(rks, k - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return hh, h_phi_1, B_h, torch.stack(R), torch.stack(b)

    def _base_update(self, x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1):
        """The first-order part of either update (exponential integrator with m0 frozen)."""
        if self.predict_x0:
            return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        """UniP: predict x at the next point from x at s0 = sigmas[i] and ``order`` stored outputs."""
        if self.solver_p:  # a different solver may be plugged in as the predictor
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        x, m0, device = sample, self.model_outputs[-1], sample.device
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i + 1, device)
        alpha_s0, sigma_s0, lambda_s0 = self._scales(i, device)
        h = lambda_t - lambda_s0

        # 1. the ratios r_k and the scaled differences D1_k of the previous outputs
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._scales(i - k, device)
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)

        # 2. the coefficients rho_p (order 2 uses the closed form 1/2)
        hh, h_phi_1, B_h, R, b = self._coefficients(h, rks, order, device)
        if D1s:
            D1s = torch.stack(D1s, dim=1)
            if order == 2:
                rhos_p = torch.ones(1, dtype=x.dtype, device=device) * 0.5
            else:
                rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype)
            pred_res = torch.einsum("k,bkc...->bc...", rhos_p, D1s)
        else:
            pred_res = 0

        # 3. x_t = base - (alpha_t or sigma_t) B(h) sum_k rho_k D1_k
        x_t = self._base_update(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        scale = alpha_t if self.predict_x0 else sigma_t
        return (x_t - scale * B_h * pred_res).to(x.dtype)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        """UniC: correct the sample at t = sigmas[i] using its fresh model output, redoing the step
        from s0 = sigmas[i - 1] (``last_sample``)."""
        x, m0, model_t, device = last_sample, self.model_outputs[-1], this_model_output, this_sample.device
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i, device)
        alpha_s0, sigma_s0, lambda_s0 = self._scales(i - 1, device)
        h = lambda_t - lambda_s0

        # 1. ratios and differences of the outputs before s0
        rks, D1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = self._scales(i - (k + 1), device)
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(k + 1)] - m0) / rk)

        # 2. the coefficients rho_c (order 1 uses the closed form 1/2), including the new point's
        hh, h_phi_1, B_h, R, b = self._coefficients(h, rks, order, device)
        if order == 1:
            rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
        else:
            rhos_c = torch.linalg.solve(R, b).to(device).to(x.dtype)
        corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], torch.stack(D1s, dim=1)) if D1s else 0

        # 3. x_t = base - (alpha_t or sigma_t) B(h) (sum_k rho_k D1_k + rho_t D1_t)
        D1_t = model_t - m0
        x_t = self._base_update(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1)
        scale = alpha_t if self.predict_x0 else sigma_t
        return (x_t - scale * B_h * (corr_res + rhos_c[-1] * D1_t)).to(x.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """Correct the current sample (UniC) with this output, then predict the next one (UniP)."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        c, i = self.config, self._step_index

        # 1. UniC on the sample the previous predictor produced
        use_corrector = i > 0 and (i - 1) not in self.disable_corrector and self.last_sample is not None
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(
                this_model_output=converted, last_sample=self.last_sample, this_sample=sample, order=self.this_order
            )

        # 2. the history
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        # 3. this step's order: warm-up from 1, lower at the very end when lower_order_final
        this_order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(this_order, self.lower_order_nums + 1)
        self.last_sample = sample

        # 4. UniP to the next point
        prev_sample = self.multistep_uni_p_bh_update(model_output=model_output, sample=sample, order=self.this_order)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps at the schedule sigma of each timestep."""
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(self._indexed_sigmas(original_samples, timesteps))
        return alpha_t * original_samples + sigma_t * noise
