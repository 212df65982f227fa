"""The training noise schedule (betas) and the timestep spacings every scheduler draws from.

The schedule is the sequence ``beta_1 .. beta_T`` of the forward process
``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)`` (Ho et al. 2020); ``alphas_cumprod`` and
everything else derive from it. Built in float32 torch (schedules) and numpy (spacings), as the
reference does, so its trajectories are reproduced exactly.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .checks import check_choice

# ------------------------------------------------------------------------------------------------
# The training noise schedule (betas)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _alpha_bar(kind: str) -> Callable[[float], float]:
    """alphabar as a function of t in [0, 1] for the schedules defined through it."""
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17 with s = 0.008
        s = 0.008
        return lambda t: math.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    if kind == "exp":
        return lambda t: math.exp(-12.0 * t)
    if kind == "laplace":  # log-SNR following a Laplace distribution, centred at t = 0.5

        def laplace(t: float) -> float:
            log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(log_snr)
            return math.sqrt(snr / (1 + snr))

        return laplace
    raise ConfigError(f"unknown alpha-bar transform {kind!r}; expected 'cosine', 'exp' or 'laplace'")


def betas_from_alpha_bar(num_train_timesteps: int, kind: str = "cosine", max_beta: float = 0.999) -> torch.Tensor:
    """beta_i = 1 - alphabar((i+1)/T) / alphabar(i/T), capped at ``max_beta`` (float32)."""
    alpha_bar = _alpha_bar(kind)
    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphabar) so the last step has SNR 0."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    owner: str,
    *,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    extra_schedules: Sequence[str] = (),
) -> torch.Tensor:
    """The float32 betas of a config (``trained_betas`` wins over ``beta_schedule``)."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) == 0:
            raise ConfigError(f"{owner}: `trained_betas` must be a non-empty 1-d list; got shape {tuple(betas.shape)}")
        return betas
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ConfigError(f"{owner}: `num_train_timesteps` must be a positive int; got {num_train_timesteps!r}")
    check_choice(owner, "beta_schedule", beta_schedule, (*BETA_SCHEDULES, *extra_schedules))
    n = num_train_timesteps
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta): the Stable Diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_from_alpha_bar(n, "cosine")
    if beta_schedule == "exp":
        return betas_from_alpha_bar(n, "exp")
    if beta_schedule == "laplace":
        return betas_from_alpha_bar(n, "laplace")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
    raise AssertionError(beta_schedule)  # check_choice covers every name


# ------------------------------------------------------------------------------------------------
# Timestep spacing (Lin et al. 2023, Table 2: "linspace", "leading", "trailing")

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    *,
    steps_offset: int = 0,
    integer: bool = True,
) -> np.ndarray:
    """``num_inference_steps`` training timesteps in descending order.

    ``integer=True`` gives int64 values (linspace rounded); ``integer=False`` gives float32 values
    and leaves linspace unrounded, as the sigma-based (Karras-style) schedulers use them.
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        values = np.linspace(0, T - 1, n)
        values = values.round().astype(np.int64) if integer else values.astype(np.float32)
        return values[::-1].copy()
    if spacing == "leading":
        values = (np.arange(0, n) * (T // n))[::-1].copy()
        values = values.astype(np.int64 if integer else np.float32)
        return values + np.asarray(steps_offset, dtype=values.dtype)
    if spacing == "trailing":
        values = np.round(np.arange(T, 0, -T / n)).astype(np.int64 if integer else np.float32)
        return values - np.asarray(1, dtype=values.dtype)
    raise ConfigError(f"`timestep_spacing` must be one of {', '.join(map(repr, TIMESTEP_SPACINGS))}; got {spacing!r}")


def spaced_timesteps_one_extra(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    *,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """The multistep solvers' spacing: ``n + 1`` points over ``[0, last_timestep)`` with the lowest
    dropped (int64, descending). ``last_timestep`` below ``num_train_timesteps`` clips the noisiest end."""
    T, n = num_train_timesteps, num_inference_steps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        values = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].copy().astype(np.int64)
        return values + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    raise ConfigError(f"`timestep_spacing` must be one of {', '.join(map(repr, TIMESTEP_SPACINGS))}; got {spacing!r}")
