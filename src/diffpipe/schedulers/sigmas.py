"""Noise levels as pure functions: VE sigmas of a training schedule, the Karras / exponential /
beta sigma schedules, and the map from a sigma back to a (fractional) training timestep.

All of these work in numpy float64 unless their inputs say otherwise, matching the reference so
that schedules agree to the last bit after the final float32 cast.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def vp_to_ve_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alphabar_t) / alphabar_t): the VE noise level of each training step."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def alpha_sigma_from_ve(sigma):
    """The VP scales (alpha_t, sigma_t) of a VE noise level: alpha = 1/sqrt(sigma^2+1), sigma_t = sigma alpha."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def interpolate_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Piecewise-linear sigma at (possibly fractional) timesteps, training step i having train_sigmas[i]."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray, *, float32_index: bool = False) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation in log-sigma between the two
    training steps that bracket each sigma (clamped to the training range).

    ``log_sigmas`` are the training log-sigmas (ascending in t). Arithmetic follows the dtypes
    given; ``float32_index=True`` keeps the final interpolation in float32 too.
    """
    sigmas = np.asarray(sigmas)
    shape = sigmas.shape
    log_sigma = np.log(np.maximum(sigmas.reshape(-1), 1e-10))
    n = log_sigmas.shape[0]
    # lower bracket: the last training step whose log-sigma is <= log_sigma (0 if there is none)
    at_or_below = log_sigmas[:, None] <= log_sigma[None, :]
    last_from_end = np.argmax(at_or_below[::-1], axis=0)
    low_idx = np.where(at_or_below.any(axis=0), n - 1 - last_from_end, 0)
    low_idx = np.minimum(low_idx, n - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    if float32_index:
        low_idx, high_idx = low_idx.astype(np.float32), high_idx.astype(np.float32)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(shape)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0, *, ramp=None):
    """Karras et al. 2022, eq. 5:
    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.

    ``ramp`` replaces the positions i/(N-1) (float64 numpy by default); an array or tensor given
    there sets the type and dtype the formula is evaluated in."""
    if ramp is None:
        ramp = np.linspace(0, 1, num_steps)
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> np.ndarray:
    """Sigmas evenly spaced in log-sigma from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_steps))


def exponential_sigmas_float32(sigma_min: float, sigma_max: float, num_steps: int) -> torch.Tensor:
    """The exponential schedule as the EDM schedulers build it: a float32 torch ramp in log-sigma
    from sigma_min up to sigma_max, then reversed (so it differs from ``exponential_sigmas`` in the
    last bits)."""
    return torch.linspace(math.log(sigma_min), math.log(sigma_max), num_steps).exp().flip(0)


def lu_log_sigmas(log_sigma_min: float, log_sigma_max: float, num_steps: int) -> np.ndarray:
    """Lu et al. (DPM-Solver): steps uniform in the log-SNR, here written in log-sigma (descending)."""
    ramp = np.linspace(0, 1, num_steps)
    return log_sigma_max + ramp * (log_sigma_min - log_sigma_max)


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """ "Beta Sampling is All You Need" (Lee et al. 2024): sigma_min + ppf(1 - i/(N-1)) (sigma_max - sigma_min),
    ppf being the quantile function of the Beta(alpha, beta) distribution."""
    q = 1 - np.linspace(0, 1, num_steps)
    ppf = beta_ppf(q, alpha, beta)
    return np.array([sigma_min + (p * (sigma_max - sigma_min)) for p in ppf])


# ------------------------------------------------------------------------------------------------
# The Beta quantile function, without scipy: bisection on the regularised incomplete beta function,
# which is evaluated with its continued fraction (modified Lentz method).

_TINY = 1e-300


def _incomplete_beta_cf(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """The continued fraction of I_x(a, b) (converges fast for x < (a+1)/(a+b+2))."""
    c = np.ones_like(x)
    d = 1 - (a + b) * x / (a + 1)
    d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
    h = d.copy()
    for m in range(1, 1000):
        for coeff in (
            m * (b - m) * x / ((a - 1 + 2 * m) * (a + 2 * m)),  # even term d_{2m}
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 1 + 2 * m)),  # odd term d_{2m+1}
        ):
            d = 1 + coeff * d
            d = 1 / np.where(np.abs(d) < _TINY, _TINY, d)
            c = 1 + coeff / c
            c = np.where(np.abs(c) < _TINY, _TINY, c)
            delta = c * d
            h = h * delta
        if np.all(np.abs(delta - 1) < 4e-16):
            break
    return h


def regularized_incomplete_beta(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the Beta(a, b) distribution function, for x in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    out = np.where(x >= 1, 1.0, 0.0)
    inside = (x > 0) & (x < 1)
    if not inside.any():
        return out
    xs = x[inside]
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    direct = xs < (a + 1) / (a + b + 2)
    result = np.empty_like(xs)
    if direct.any():
        xd = xs[direct]
        front = np.exp(a * np.log(xd) + b * np.log1p(-xd) - log_beta) / a
        result[direct] = front * _incomplete_beta_cf(a, b, xd)
    if (~direct).any():  # symmetry: I_x(a, b) = 1 - I_{1-x}(b, a)
        xr = 1 - xs[~direct]
        front = np.exp(b * np.log(xr) + a * np.log1p(-xr) - log_beta) / b
        result[~direct] = 1 - front * _incomplete_beta_cf(b, a, xr)
    out[inside] = result
    return out


def _bisect_quantile(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The x with I_x(a, b) = q by bisection (I_x is increasing in x); 64 halvings of [0, 1] leave an
    absolute error of about 1e-19."""
    lo = np.zeros_like(q)
    hi = np.ones_like(q)
    for _ in range(64):
        mid = (lo + hi) / 2
        below = regularized_incomplete_beta(mid, a, b) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return (lo + hi) / 2


def beta_ppf(q: np.ndarray, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) quantile: the x with I_x(a, b) = q.

    Above the median the quantile is found from the other tail, 1 - x solving I_{1-x}(b, a) = 1 - q:
    1 - q is exact there, whereas near q = 1 a q rounded to float64 leaves the distribution function
    too flat to pin x down (at q = 1 - 1e-16, Beta(1, 2) would otherwise be off by 2e-9)."""
    q = np.asarray(q, dtype=np.float64)
    upper = q > 0.5
    x = np.where(
        upper, 1 - _bisect_quantile(np.where(upper, 1 - q, 0.5), b, a), _bisect_quantile(np.where(upper, 0.5, q), a, b)
    )
    x = np.where(q <= 0, 0.0, x)
    return np.where(q >= 1, 1.0, x)


SIGMA_RESPACINGS = ("karras", "exponential", "beta")


def respace_sigmas(
    kind: str, sigmas: np.ndarray, num_steps: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> np.ndarray:
    """Replace a descending sigma schedule by ``num_steps`` sigmas of another shape over the same
    range (or over [sigma_min, sigma_max] where given)."""
    lo = float(sigmas[-1]) if sigma_min is None else sigma_min
    hi = float(sigmas[0]) if sigma_max is None else sigma_max
    if kind == "karras":
        return karras_sigmas(lo, hi, num_steps)
    if kind == "exponential":
        return exponential_sigmas(lo, hi, num_steps)
    if kind == "beta":
        return beta_sigmas(lo, hi, num_steps)
    raise ValueError(f"unknown sigma schedule {kind!r}; expected one of {SIGMA_RESPACINGS}")
