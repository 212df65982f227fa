"""What the network predicts -> the clean sample x_0 and the noise eps. Written once, used by all.

Two coordinate systems appear in the schedulers:

* variance preserving (VP): ``x_t = alpha_t x_0 + sigma_t eps`` with ``alpha_t^2 + sigma_t^2 = 1``
  (DDPM/DDIM use ``alpha_t = sqrt(alphabar_t)``, the DPM-Solver family derives both from a
  Karras sigma). The three parameterisations are:

  - ``epsilon``: the network predicts eps            -> x_0 = (x_t - sigma_t eps) / alpha_t
  - ``sample``: the network predicts x_0             -> eps = (x_t - alpha_t x_0) / sigma_t
  - ``v_prediction``: v = alpha_t eps - sigma_t x_0  -> x_0 = alpha_t x_t - sigma_t v,
    eps = alpha_t v + sigma_t x_t  (Salimans & Ho 2022, section 4)

* rectified flow: ``x_t = (1 - sigma) x_0 + sigma eps``; a ``flow_prediction`` model predicts the
  velocity eps - x_0, so x_0 = x_t - sigma v.

* variance exploding (VE, Karras et al. 2022): ``x = x_0 + sigma eps`` with
  ``sigma = sigma_t / alpha_t``. The network still sees the VP input ``x / sqrt(sigma^2 + 1)``, so
  a v-prediction maps back through the VP formula written in sigma.

* EDM (Karras et al. 2022, Table 1): the same VE ``x``, but the network is preconditioned with
  sigma_data: it sees c_in x and its output F gives x_0 = c_skip x + c_out F (``edm_x0``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def _unknown(prediction_type: str, allowed=PREDICTION_TYPES) -> ConfigError:
    return ConfigError(f"`prediction_type` must be one of {', '.join(map(repr, allowed))}; got {prediction_type!r}")


def vp_x0(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t, prediction_type: str) -> torch.Tensor:
    """x_0 from a VP model output at a point with signal scale ``alpha_t`` and noise scale ``sigma_t``."""
    if prediction_type == "epsilon":
        return (sample - sigma_t * model_output) / alpha_t
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_t * sample - sigma_t * model_output
    raise _unknown(prediction_type)


def vp_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_t, sigma_t, prediction_type: str) -> torch.Tensor:
    """eps from a VP model output."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise _unknown(prediction_type)


def vp_x0_eps(model_output, sample, alpha_t, sigma_t, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) from a VP model output; eps of an x_0 prediction is derived from that x_0."""
    if prediction_type == "sample":
        x0 = model_output
        return x0, (sample - alpha_t * x0) / sigma_t
    return (
        vp_x0(model_output, sample, alpha_t, sigma_t, prediction_type),
        vp_eps(model_output, sample, alpha_t, sigma_t, prediction_type),
    )


def eps_from_x0(sample: torch.Tensor, x0: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """The eps consistent with a given x_0 at x_t (used after x_0 was clipped or thresholded)."""
    return (sample - alpha_t * x0) / sigma_t


def x0_from_eps(sample: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    return (sample - sigma_t * eps) / alpha_t


def ve_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma, prediction_type: str) -> torch.Tensor:
    """x_0 from a model output at VE noise level ``sigma`` (``sample = x_0 + sigma eps``).

    For ``v_prediction`` the VP scales are alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma alpha, and
    the VP input is ``sample * alpha``; x_0 = alpha * (alpha sample) - sigma_vp v.
    """
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    raise _unknown(prediction_type)


EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def edm_c_in(sigma, sigma_data: float):
    """The EDM input scale (Karras et al. 2022, Table 1): c_in = 1 / sqrt(sigma^2 + sigma_data^2)."""
    return 1 / ((sigma**2 + sigma_data**2) ** 0.5)


def edm_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma, sigma_data: float, prediction_type: str):
    """The EDM denoiser D(x; sigma) = c_skip x + c_out F(c_in x) (Karras et al. 2022, Table 1), with
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    negated for ``v_prediction`` (whose network predicts the opposite direction)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    if prediction_type == "epsilon":
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    elif prediction_type == "v_prediction":
        c_out = -sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    else:
        raise _unknown(prediction_type, EDM_PREDICTION_TYPES)
    return c_skip * sample + c_out * model_output


def flow_x0(model_output: torch.Tensor, sample: torch.Tensor, sigma) -> torch.Tensor:
    """x_0 from a rectified-flow velocity prediction at flow time ``sigma``."""
    return sample - sigma * model_output
