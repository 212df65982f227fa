"""Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022, arXiv:2206.00927 Algorithm 1 and
arXiv:2211.01095 Algorithm 1).

A k-th order singlestep update spends k model calls on one interval [s, t]: it starts at s, evaluates
the model at intermediate points, and lands at t. In the discrete-timestep form used here the
intermediate points are simply the next entries of ``timesteps``: ``order_list`` assigns each
position its order (e.g. 1, 2, 1, 2, ... for order 2), and every update goes from the sample stored
at the block's first point.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from .base import KARRAS_COMPATIBLES, SchedulerOutput, logger, randn
from .checks import check_num_inference_steps
from .schedules import spaced_timesteps_one_extra
from .dpm_solver import DPMSolverBase, second_order_terms, third_order_terms


class DPMSolverSinglestepScheduler(DPMSolverBase):
    """Singlestep DPM-Solver / DPM-Solver++ of order 1-3."""

    _deprecated_algorithms = "`algorithm_types=dpmsolver`"
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
        algorithm_type: Literal["dpmsolver", "dpmsolver++", "sde-dpmsolver++"] = "dpmsolver++",
        solver_type: Literal["midpoint", "heun"] = "midpoint",
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Literal["learned", "learned_range"] | None = None,
        use_dynamic_shifting: bool = False,
        time_shift_type: Literal["exponential"] = "exponential",
    ) -> None:
        self._check_dpm_config(("dpmsolver", "dpmsolver++", "sde-dpmsolver++"))
        self._init_vp_schedule()
        self.sample = None
        self.order_list = self.get_order_list(num_train_timesteps)
        self._reset_step_index()

    def get_order_list(self, num_inference_steps: int) -> list[int]:
        """The order of the update at each position: repeating blocks 1, 2, (3), with the tail
        shortened when ``lower_order_final`` and a first-order last step into a zero sigma."""
        steps, order = num_inference_steps, self.config.solver_order
        if order not in (1, 2, 3):
            raise ConfigError(f"{type(self).__name__}: solver_order must be 1, 2 or 3; got {order!r}")
        block = list(range(1, order + 1))
        if order == 1:
            orders = [1] * steps
        elif self.config.lower_order_final:
            full, rest = divmod(steps, order)
            if rest == 0:  # end on a shorter block so the last step is not of the highest order
                orders = block * (full - 1) + block[:-1] + [1]
            else:
                orders = block * full + block[:rest]
        else:
            orders = block * (steps // order)
        if self.config.final_sigmas_type == "zero":
            orders[-1] = 1
        return orders

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` linspace timesteps (clipped by ``lambda_min_clipped``) or
        explicit ``timesteps``; ``mu`` sets the flow shift for dynamic shifting."""
        name = type(self).__name__
        c = self.config
        self._apply_mu(mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(f"{name}.set_timesteps: pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
                if c.get(flag):
                    raise ValueError(f"{name}.set_timesteps: custom `timesteps` cannot be combined with {flag}=True")
            n = len(timesteps)
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            n = check_num_inference_steps(name, num_inference_steps, c.num_train_timesteps)
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped).item()
            timesteps = spaced_timesteps_one_extra(
                "linspace", c.num_train_timesteps, n, last_timestep=c.num_train_timesteps - clipped_idx
            )
        self.num_inference_steps = n
        sigmas, timesteps = self._sigmas_for(timesteps, n, always_round_karras=True)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.model_outputs = [None] * c.solver_order
        self.sample = None

        # an incomplete last block, or a zero final sigma, needs lower-order final steps
        if not c.lower_order_final and n % c.solver_order != 0:
            logger.warning(
                "%s: %d steps is not a multiple of solver_order=%d; setting lower_order_final=True",
                name,
                n,
                c.solver_order,
            )
            self.register_to_config(lower_order_final=True)
        if not self.config.lower_order_final and c.final_sigmas_type == "zero":
            logger.warning("%s: final_sigmas_type='zero' needs lower_order_final=True; setting it", name)
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(n)
        self._reset_step_index()

    # ---------------------------------------------------------------- the updates
    def singlestep_dpm_solver_second_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Order 2 over [s1, t] from the block's start s1 = sigmas[i - 1] via s0 = sigmas[i]."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i + 1)
        _, _, lambda_s0 = self._scales(i)
        alpha_s1, sigma_s1, lambda_s1 = self._scales(i - 1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s1, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m1, (1.0 / r0) * (m0 - m1)
        return second_order_terms(
            self.config.algorithm_type,
            self.config.solver_type,
            sample,
            D0,
            D1,
            alpha_t,
            sigma_t,
            alpha_s1,
            sigma_s1,
            h,
            noise,
        )

    def singlestep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        """Order 3 over [s2, t] from the block's start s2 = sigmas[i - 2] via s1 and s0."""
        i = self._step_index
        alpha_t, sigma_t, lambda_t = self._scales(i + 1)
        _, _, lambda_s0 = self._scales(i)
        _, _, lambda_s1 = self._scales(i - 1)
        alpha_s2, sigma_s2, lambda_s2 = self._scales(i - 2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s2, lambda_s0 - lambda_s2, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m2
        D1_0, D1_1 = (1.0 / r1) * (m1 - m2), (1.0 / r0) * (m0 - m2)
        algorithm = self.config.algorithm_type
        if self.config.solver_type == "midpoint":
            # only the first difference towards s0 enters, with the phi_2 weight
            return second_order_terms(
                algorithm, "heun", sample, D0, D1_1, alpha_t, sigma_t, alpha_s2, sigma_s2, h, noise
            )
        D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
        D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
        return third_order_terms(algorithm, sample, D0, D1, D2, alpha_t, sigma_t, alpha_s2, sigma_s2, h, noise)

    def singlestep_dpm_solver_update(self, model_output_list, *args, sample=None, order=None, noise=None, **kwargs):
        if order == 1:
            return self.dpm_solver_first_order_update(model_output_list[-1], sample=sample, noise=noise)
        if order == 2:
            return self.singlestep_dpm_solver_second_order_update(model_output_list, sample=sample, noise=noise)
        if order == 3:
            return self.singlestep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """Advance one position of the schedule with the order ``order_list`` gives it."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)

        # 1. the integrated quantity (x_0 or eps) joins the history
        converted = self.convert_model_output(model_output, sample=sample)
        self.model_outputs = self.model_outputs[1:] + [converted]

        # 2. noise for the SDE variant
        noise = None
        if self.config.algorithm_type == "sde-dpmsolver++":
            noise = randn(converted.shape, generator=generator, device=converted.device, dtype=converted.dtype)

        # 3. this position's order, limited by the outputs available (after a mid-schedule start)
        order = self.order_list[self._step_index]
        while self.model_outputs[-order] is None:
            order -= 1
        # 4. a block starts here: remember its starting sample
        if order == 1:
            self.sample = sample

        prev_sample = self.singlestep_dpm_solver_update(
            self.model_outputs, sample=self.sample, order=order, noise=noise
        )
        self._step_index += 1
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)
