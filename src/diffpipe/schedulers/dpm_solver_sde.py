"""DPM-Solver++ (2S) as a stochastic sampler (k-diffusion's ``sample_dpmpp_sde``; Lu et al. 2022,
arXiv:2211.01095, with the ancestral noise of Karras et al. 2022).

Work in t = -log(sigma). Each interval [sigma_i, sigma_{i+1}] costs two model calls:

1. at sigma_i: an ancestral DPM-Solver-1 step to the midpoint s = t_i + h/2 (sigma_s = sqrt(sigma_i sigma_{i+1}));
2. at sigma_s: from x_i again, a DPM-Solver-1 step to sigma_{i+1} with the midpoint's denoised estimate
   (r = 1/2, so the second-order combination keeps only that estimate).

An ancestral step from sigma to sigma' splits sigma' into a deterministic part sigma_down and fresh noise
sigma_up (eta = 1): sigma_up = min(sigma', sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2)),
sigma_down = sqrt(sigma'^2 - sigma_up^2), x' = (sigma_down / sigma) x - expm1(t - t_down) D + sigma_up z.
The noise z comes from a Brownian tree over [sigma_min, sigma_max] (``torchsde``), so it depends on the
noise levels and on ``noise_sampler_seed`` only, not on how many steps are taken. The step to sigma = 0
is a plain Euler step. ``timesteps`` interleaves the midpoints' timesteps, as the reference does.

``torchsde`` is an optional dependency (``pip install "diffpipe[sde]"``), imported when a scheduler is
built, never when diffpipe is.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np
import torch

from .base import KARRAS_COMPATIBLES, KarrasSigmaMixin, SchedulerMixin, SchedulerOutput
from .checks import check_num_inference_steps
from .prediction import ve_x0
from .schedules import TIMESTEP_SPACINGS, spaced_timesteps
from .sigmas import interpolate_sigmas, respace_sigmas, sigma_to_t


def import_torchsde(owner: str):
    """The ``torchsde`` module, or an ImportError that says how to install it."""
    try:
        import torchsde
    except ImportError as e:
        raise ImportError(
            f"{owner} needs the torchsde package for its Brownian-tree noise ({e}); install it with "
            '`pip install torchsde` (or `pip install "diffpipe[sde]"`)'
        ) from e
    return torchsde


# ------------------------------------------------------------------------------------------------
# The noise: increments of a Brownian motion indexed by sigma (k-diffusion's BrownianTreeNoiseSampler)


class BrownianTreeNoiseSampler:
    """Standard normal noise z(sigma, sigma') = (W(sigma') - W(sigma)) / sqrt(|sigma' - sigma|) from one
    Brownian motion W over [sigma_min, sigma_max] per seed, shaped like ``x``.

    The same seed gives the same W, so the noise of an interval does not depend on the schedule that
    led to it. ``seed`` may be an int (one tree for the whole batch), a list of ints (one tree per batch
    item) or ``None`` (a seed drawn from torch's global generator, as the reference does).
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None, *, owner: str = "DPMSolverSDEScheduler"):
        torchsde = import_torchsde(owner)
        t0, t1, self.sign = self._sorted(torch.as_tensor(sigma_min), torch.as_tensor(sigma_max))
        w0 = torch.zeros_like(x)
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self.batched = isinstance(seed, (list, tuple))
        if self.batched:
            if len(seed) != x.shape[0]:
                raise ValueError(f"{owner}: got {len(seed)} noise sampler seeds for a batch of {x.shape[0]}")
            w0 = w0[0]
        seeds = list(seed) if self.batched else [seed]
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in seeds]

    @staticmethod
    def _sorted(a, b):
        return (a, b, 1) if a < b else (b, a, -1)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = self._sorted(t0, t1)
        with warnings.catch_warnings():
            # a noise level rounded through exp(-(-log sigma)) can land a hair outside the tree's
            # range; torchsde warns and samples it anyway (as the reference does)
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * (self.sign * sign)
        w = w if self.batched else w[0]
        return w / (t1 - t0).abs().sqrt()


def _t_of(sigma):
    """t = -log(sigma), the DPM-Solver time (half the log-SNR's negation)."""
    return sigma.log().neg()


def _sigma_of(t):
    return t.neg().exp()


# ------------------------------------------------------------------------------------------------


class DPMSolverSDEScheduler(KarrasSigmaMixin, SchedulerMixin):
    """Stochastic DPM-Solver++ (2S): two model calls per interval, Brownian-tree noise."""

    _compatibles = KARRAS_COMPATIBLES
    order = 2

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        noise_sampler_seed: int | None = None,
        timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace",
        steps_offset: int = 0,
    ) -> None:
        import_torchsde(type(self).__name__)
        # the reference has no x_0 ("sample") prediction here: it fails at the first step; we say so now
        self._check_options(prediction_type=("epsilon", "v_prediction"), timestep_spacing=TIMESTEP_SPACINGS)
        self._sigma_respacing()
        self._init_betas()
        self.use_karras_sigmas = use_karras_sigmas
        self.noise_sampler_seed = noise_sampler_seed
        self.set_timesteps(num_train_timesteps, None, num_train_timesteps)
        self._reset_step_index()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: str | torch.device | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        """Choose ``num_inference_steps`` intervals; ``timesteps`` gets 2n - 1 entries (midpoints interleaved).

        Also forgets the noise sampler: the next run builds a new Brownian tree (from the same seed)."""
        c = self.config
        T = num_train_timesteps or c.num_train_timesteps
        n = check_num_inference_steps(type(self).__name__, num_inference_steps, T)
        self.num_inference_steps = n
        # linspace stays float64 here (the other Karras-style schedulers round it to float32), as the reference has it
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, T - 1, n)[::-1].copy()
        else:
            timesteps = spaced_timesteps(c.timestep_spacing, T, n, steps_offset=c.steps_offset, integer=False)

        train_sigmas = self._train_sigmas()
        log_sigmas = np.log(train_sigmas)
        sigmas = interpolate_sigmas(timesteps, train_sigmas)
        respacing = self._sigma_respacing()
        if respacing is not None:
            sigmas = respace_sigmas(respacing, sigmas, n, c.get("sigma_min"), c.get("sigma_max"))
            timesteps = sigma_to_t(sigmas, log_sigmas)

        # the midpoints s = t_i + h/2 of the intervals between nonzero sigmas (float64), as timesteps
        t = -np.log(sigmas)
        mid_sigmas = np.exp(-(t[:-1] + np.diff(t) * 0.5))
        mid_t = sigma_to_t(mid_sigmas, log_sigmas)

        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32)).to(device=device)
        # every interior sigma twice: the end of one interval's second call, the start of the next one's first
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]).to("cpu")

        timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.float64))
        mid_t = torch.from_numpy(np.asarray(mid_t, dtype=np.float64))
        interleaved = torch.stack((mid_t, timesteps[1:]), dim=-1).flatten()
        self.timesteps = torch.cat([timesteps[:1], interleaved]).to(device=device)

        self.sample = None
        self.mid_point_sigma = None
        self.noise_sampler = None
        self._reset_step_index()

    @property
    def state_in_first_order(self) -> bool:
        """True when the next call starts an interval, False when it evaluates the midpoint."""
        return self.sample is None

    def _model_input_sigma(self):
        return self.sigmas[self._step_index] if self.state_in_first_order else self.mid_point_sigma

    def _noise(self, sample: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        if self.noise_sampler is None:  # one tree per run, over the schedule's whole (nonzero) range
            positive = self.sigmas[self.sigmas > 0]
            self.noise_sampler = BrownianTreeNoiseSampler(
                sample, positive.min().item(), self.sigmas.max().item(), self.noise_sampler_seed
            )
        return self.noise_sampler(sigma, sigma_next)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        s_noise: float = 1.0,
        **unused,
    ) -> SchedulerOutput | tuple:
        """First call: an ancestral step to the interval's log-midpoint. Second call: from the interval's
        start, an ancestral step to its end with the midpoint's denoised estimate. ``s_noise`` scales the
        fresh noise (``generator`` is not used: the noise comes from ``noise_sampler_seed``)."""
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(timestep)
        first = self.state_in_first_order
        i = self._step_index

        # 1. the interval [sigma, sigma_next] and its midpoint in t = -log(sigma)
        if first:
            sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        else:
            sigma, sigma_next = self.sigmas[i - 1], self.sigmas[i]
        t, t_next = _t_of(sigma), _t_of(sigma_next)
        t_mid = t + (t_next - t) * 0.5

        # 2. the denoised estimate at the point the model was evaluated (start or midpoint)
        x0 = ve_x0(model_output, sample, sigma if first else _sigma_of(t_mid), self.config.prediction_type)

        if sigma_next == 0:
            # 3a. the last interval: Euler to sigma = 0
            derivative = (sample - x0) / sigma
            prev_sample = sample + derivative * (sigma_next - sigma)
        else:
            # 3b. an ancestral DPM-Solver-1 step from the interval's start to the midpoint or to its end
            start = sample if first else self.sample
            t_to = t_mid if first else t_next
            sigma_from, sigma_to = _sigma_of(t), _sigma_of(t_to)
            sigma_up = min(sigma_to, (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            t_down = _t_of(sigma_down)
            prev_sample = (_sigma_of(t_down) / _sigma_of(t)) * start - (t - t_down).expm1() * x0
            prev_sample = prev_sample + self._noise(sample, sigma_from, sigma_to) * s_noise * sigma_up
            if first:
                self.sample, self.mid_point_sigma = sample, _sigma_of(t_mid)
            else:
                self.sample, self.mid_point_sigma = None, None

        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
