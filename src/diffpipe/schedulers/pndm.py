"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022, arXiv:2202.09778).

The sampler treats DDIM's update as a "transfer" phi(x_t, eps, t, t') (eq. 11) and feeds it with
higher-order estimates of eps: three pseudo Runge-Kutta steps (PRK, four model calls each, at
t, t - delta/2, t - delta/2, t - delta) warm up a pseudo linear multistep method (PLMS,
Adams-Bashforth of order 4 on the stored eps history). ``skip_prk_steps=True`` replaces the
warm-up with the cheaper start of the PLMS paper's Algorithm 2 (one Euler step corrected Heun-like).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, SchedulerMixin, SchedulerOutput
from .checks import check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import vp_eps

# Runge-Kutta 4 weights of the four model calls
_RK4_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class PNDMScheduler(SchedulerMixin):
    """Pseudo numerical methods: PRK warm-up + PLMS, or PLMS alone with ``skip_prk_steps``."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "leading",
        steps_offset: int = 0,
    ):
        self._check_options(prediction_type=("epsilon", "v_prediction"), timestep_spacing=TIMESTEP_SPACINGS)
        self._init_betas()
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4  # the order of the linear multistep method
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._reset_history()

    def _reset_history(self) -> None:
        self.counter = 0  # model calls consumed since set_timesteps
        self.ets: list[torch.Tensor] = []  # eps history for the multistep method
        self.cur_model_output = 0  # running Runge-Kutta sum
        self.cur_sample = None  # the sample a multi-call step started from

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PNDM feeds x_t to the model unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the PRK and PLMS timesteps for ``num_inference_steps`` (the model is called more often
        than that: ``len(scheduler.timesteps)`` times)."""
        name = type(self).__name__
        T = self.config.num_train_timesteps
        n = check_num_inference_steps(name, num_inference_steps, T)
        if not self.config.skip_prk_steps and n < self.pndm_order:
            raise ValueError(
                f"{name}.set_timesteps: the Runge-Kutta warm-up needs num_inference_steps >= {self.pndm_order}; "
                f"got {n}. Use more steps or `skip_prk_steps=True`."
            )
        self.num_inference_steps = n
        # ascending training timesteps
        ascending = spaced_timesteps(self.config.timestep_spacing, T, n, steps_offset=self.config.steps_offset)[::-1]
        self._timesteps = ascending.copy()

        if self.config.skip_prk_steps:
            # PLMS from the top; the second-highest timestep appears twice (predict, then correct)
            self.prk_timesteps = np.array([])
            descending = ascending[::-1]
            self.plms_timesteps = np.concatenate([descending[:1], descending[1:2], descending[1:]]).copy()
        else:
            # three RK steps over the top four timesteps: evaluate at t, t - delta/2 (twice), t - delta
            half = T // n // 2
            top = ascending[-self.pndm_order :][::-1]  # the four highest, descending
            prk = []
            for hi, lo in zip(top[:-1], top[1:]):
                prk += [hi, lo + half, lo + half, lo]
            self.prk_timesteps = np.array(prk)
            self.plms_timesteps = ascending[:-3][::-1].copy()

        values = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(values).to(device)
        self._reset_history()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One model call's worth of progress: a PRK stage during warm-up, else a PLMS step."""
        if (
            self.counter < len(self.prk_timesteps if self.prk_timesteps is not None else ())
            and not self.config.skip_prk_steps
        ):
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def step_prk(self, model_output, timestep, sample, return_dict: bool = True) -> SchedulerOutput | tuple:
        """A stage of the pseudo Runge-Kutta method (eq. 13)."""
        self._require_timesteps()
        self._check_train_timestep(timestep)
        stage = self.counter % 4
        half = self.config.num_train_timesteps // self.num_inference_steps // 2

        # 1. where this stage lands: the midpoint for the first two stages' targets, else the full step
        prev_timestep = timestep - (0 if self.counter % 2 else half)
        # 2. every stage is a transfer from the step's starting point
        start_timestep = self.prk_timesteps[self.counter // 4 * 4]

        # 3. accumulate eps with the RK4 weights; the fourth stage completes the estimate
        if stage == 0:
            self.cur_model_output += _RK4_WEIGHTS[0] * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += _RK4_WEIGHTS[stage] * model_output
        else:
            model_output = self.cur_model_output + _RK4_WEIGHTS[3] * model_output
            self.cur_model_output = 0

        # 4. the transfer from the step's starting sample
        start_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(start_sample, start_timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def step_plms(self, model_output, timestep, sample, return_dict: bool = True) -> SchedulerOutput | tuple:
        """A step of the pseudo linear multistep method (eq. 12 with Adams-Bashforth weights)."""
        self._require_timesteps()
        self._check_train_timestep(timestep)
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                f"{type(self).__name__}: the linear multistep steps need the Runge-Kutta warm-up first "
                "(12 calls after set_timesteps); step through `scheduler.timesteps` in order"
            )
        stride = self.config.num_train_timesteps // self.num_inference_steps

        # 1. the step's end points; the second call of the skip-PRK start re-does the first step
        prev_timestep = timestep - stride
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + stride

        # 2. the eps estimate from the history: Euler, Heun-like correction, then Adams-Bashforth 2/3/4
        e = self.ets
        if len(e) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(e) == 1 and self.counter == 1:
            model_output = (model_output + e[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(e) == 2:
            model_output = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            model_output = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])

        # 3. the transfer
        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output):
        """The transfer phi (eq. 11): x_{t'} from x_t and an eps estimate, t' < t.

        x_{t'} = sqrt(a_{t'}/a_t) x_t - (a_{t'} - a_t) eps / (a_t sqrt(1 - a_{t'}) + sqrt((1 - a_t) a_t a_{t'}))
        """
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        eps = vp_eps(model_output, sample, alpha_prod_t**0.5, beta_prod_t**0.5, self.config.prediction_type)
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) with the given noise."""
        return self._add_noise_alphas_cumprod(original_samples, noise, timesteps)
