"""Linear multistep (Adams-Bashforth style) sampler of the probability-flow ODE in sigma
(k-diffusion's ``sample_lms``; Karras et al. 2022 use it as a baseline).

The ODE dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma is integrated from sigma_i to
sigma_{i+1} by replacing d with its Lagrange interpolant through the last ``order`` slopes:

    x_{i+1} = x_i + sum_j c_j d_{i-j},   c_j = integral_{sigma_i}^{sigma_{i+1}} l_j(tau) dtau,

l_j being the Lagrange basis polynomial of node sigma_{i-j}. The integrand is a polynomial of
degree < order <= 4, so the 21-point Gauss-Kronrod rule (exact to degree 31) integrates it exactly.

Precision note: the coefficients can be large with alternating signs (|c_j| ~ 100 on Karras
schedules), so their last bits show in x. The reference evaluates l_j in float32 (its sigmas are
float32 tensors) at exactly these 21 nodes (QUADPACK's QK21, which its adaptive quadrature accepts
at the first pass for a polynomial); evaluating l_j the same way reproduces its coefficients to
~1e-16 instead of differing from them by ~1e-7 relative.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, KarrasSigmaMixin, SchedulerMixin, SchedulerOutput
from .checks import check_num_inference_steps
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .prediction import PREDICTION_TYPES, ve_x0
from .sigmas import interpolate_sigmas, karras_sigmas, respace_sigmas, sigma_to_t

# The 21-point Gauss-Kronrod rule on [-1, 1] (Piessens et al., QUADPACK): the positive abscissae
# (the 10-point Gauss nodes are the odd entries) and 0, with their weights.
_GK21_NODES = np.array([
    0.995657163025808080735527280689003, 0.973906528517171720077964012084452,
    0.930157491355708226001207180059508, 0.865063366688984510732096688423493,
    0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
    0.562757134668604683339000099272694, 0.433395394129247190799265943165784,
    0.294392862701460198131126603103866, 0.148874338981631210884826001129720,
    0.0,
])  # fmt: skip
_GK21_WEIGHTS = np.array([
    0.011694638867371874278064396062192, 0.032558162307964727478818972459390,
    0.054755896574351996031381300244580, 0.075039674810919952767043140916190,
    0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
    0.123491976262065851077208980223048, 0.134709217311473325928054001771707,
    0.142775938577060080797094273138717, 0.147739104901338491374841515972068,
    0.149445554002916905664936468389821,
])  # fmt: skip


def lagrange_basis_integral(nodes: list[float], j: int, lower: float, upper: float) -> float:
    """The integral over [lower, upper] of the Lagrange basis polynomial that is 1 at nodes[j] and
    0 at the other nodes; the polynomial is evaluated in float32 (see the module note)."""
    nodes32 = np.asarray(nodes, dtype=np.float32)
    half, mid = 0.5 * (upper - lower), 0.5 * (upper + lower)
    offsets = half * _GK21_NODES
    tau = np.concatenate([mid - offsets[:-1], mid + offsets[:-1], [mid]]).astype(np.float32)
    basis = np.ones_like(tau)
    for k, node in enumerate(nodes32):
        if k != j:
            basis = basis * ((tau - node) / (nodes32[j] - node))
    basis = basis.astype(np.float64)
    weights = _GK21_WEIGHTS
    total = weights[-1] * basis[-1] + np.dot(weights[:-1], basis[:10] + basis[10:20])
    return float(total * half)


class LMSDiscreteScheduler(KarrasSigmaMixin, SchedulerMixin):
    """Linear multistep steps in sigma, using up to ``order`` (default 4) previous slopes."""

    _compatibles = KARRAS_COMPATIBLES
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
    ):
        self._check_options(prediction_type=PREDICTION_TYPES, timestep_spacing=TIMESTEP_SPACINGS)
        self._sigma_respacing()
        self._init_betas()
        train_sigmas = self._train_sigmas()
        self.sigmas = torch.from_numpy(np.concatenate([train_sigmas[::-1], [0.0]]).astype(np.float32))
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None)
        self.derivatives: list[torch.Tensor] = []
        self.is_scale_input_called = False
        self._reset_step_index()

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps (config spacing) and their sigmas."""
        c = self.config
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, c.num_train_timesteps)
        self.num_inference_steps = n
        timesteps = spaced_timesteps(
            c.timestep_spacing, c.num_train_timesteps, n, steps_offset=c.steps_offset, integer=False
        )
        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        respacing = self._sigma_respacing()
        if respacing == "karras":  # this scheduler's Karras range is always the schedule's own
            sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), n)
        elif respacing is not None:
            sigmas = respace_sigmas(respacing, sigmas, n, c.get("sigma_min"), c.get("sigma_max"))
        if respacing is not None:
            timesteps = sigma_to_t(sigmas, log_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self.derivatives = []
        self._reset_step_index()

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """c_j for j = ``current_order`` at position ``t`` with ``order`` nodes sigma_t, ..., sigma_{t-order+1}."""
        nodes = [float(self.sigmas[t - k]) for k in range(order)]
        return lagrange_basis_integral(nodes, current_order, float(self.sigmas[t]), float(self.sigmas[t + 1]))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
        **unused,
    ) -> SchedulerOutput | tuple:
        """One linear multistep step from sigma_i to sigma_{i+1}."""
        self._require_timesteps()
        self._warn_if_unscaled()
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        sigma = self.sigmas[i]

        # 1. the denoised estimate and the ODE slope d_i = (x_i - D(x_i; sigma_i)) / sigma_i
        x0 = ve_x0(model_output, sample, sigma, self.config.prediction_type)
        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)

        # 2. the method's order grows with the history: 1, 2, ... up to `order`
        order = min(i + 1, order)
        coefficients = [self.get_lms_coefficient(order, i, j) for j in range(order)]

        # 3. x_{i+1} = x_i + sum_j c_j d_{i-j}
        increment = 0
        for coefficient, derivative in zip(coefficients, reversed(self.derivatives)):
            increment = increment + coefficient * derivative
        prev_sample = sample + increment

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
