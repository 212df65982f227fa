"""The shared scheduler math (base.py, schedules.py, sigmas.py, prediction.py, the LMS quadrature) against the
reference's own helpers and scipy, including property-based checks over many inputs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffpipe.registry import find_class
from diffpipe.schedulers import base, prediction, schedules, sigmas
from diffpipe.schedulers.lms import lagrange_basis_integral

import diffusers  # the oracles (test extra): missing, the module fails to load
import scipy.special as scipy_special
import scipy.stats as scipy_stats
from diffusers.schedulers import scheduling_ddpm  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------------------------------------
# beta schedules


@pytest.mark.parametrize("kind", ["cosine", "exp", "laplace"])
@pytest.mark.parametrize("n", [1000, 37])
def test_alpha_bar_betas_equal_the_references(kind, n):
    ours = schedules.betas_from_alpha_bar(n, kind)
    ref = scheduling_ddpm.betas_for_alpha_bar(n, alpha_transform_type=kind)
    assert ours.dtype == ref.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_rescale_zero_terminal_snr_equals_the_references(schedule):
    betas = schedules.make_betas(
        "t", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=schedule
    )
    ours = schedules.rescale_zero_terminal_snr(betas)
    ref = scheduling_ddpm.rescale_zero_terminal_snr(betas.clone())
    assert torch.equal(ours, ref)
    assert torch.cumprod(1 - ours, 0)[-1].abs() < 1e-6  # the point: alphabar_T = 0 (zero terminal SNR)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"])
def test_ddpm_betas_equal_the_references(schedule):
    ours, ref = find_class("DDPMScheduler")(beta_schedule=schedule), diffusers.DDPMScheduler(beta_schedule=schedule)
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


# ------------------------------------------------------------------------------------------------
# timestep spacing over many step counts


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=1000),
    spacing=st.sampled_from(["linspace", "leading", "trailing"]),
    offset=st.sampled_from([0, 1]),
    name=st.sampled_from(
        [
            "DDIMScheduler",
            "DDPMScheduler",
            "EulerDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler",
        ]
    ),
)
def test_spacing_matches_the_reference_for_any_step_count(n, spacing, offset, name):
    ours = find_class(name)(timestep_spacing=spacing, steps_offset=offset)
    ref = getattr(diffusers, name)(timestep_spacing=spacing, steps_offset=offset)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ours.sigmas, ref.sigmas)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=4, max_value=200), spacing=st.sampled_from(["linspace", "leading", "trailing"]))
def test_pndm_schedules_match_for_any_step_count(n, spacing):
    for skip in (False, True):
        ours = find_class("PNDMScheduler")(timestep_spacing=spacing, skip_prk_steps=skip)
        ref = diffusers.PNDMScheduler(timestep_spacing=spacing, skip_prk_steps=skip)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps)
        assert np.array_equal(ours.prk_timesteps, ref.prk_timesteps)
        assert np.array_equal(ours.plms_timesteps, ref.plms_timesteps)


# ------------------------------------------------------------------------------------------------
# sigmas


@pytest.fixture(scope="module")
def log_sigmas():
    ref = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return ref, np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(min_value=1e-6, max_value=500.0), min_size=1, max_size=12), as32=st.booleans())
def test_sigma_to_t_equals_the_references(log_sigmas, values, as32):
    ref, logs = log_sigmas
    s = np.array(values, dtype=np.float32 if as32 else np.float64)
    ours = sigmas.sigma_to_t(s, logs)
    want = np.array([ref._sigma_to_t(v, logs) for v in s])
    assert ours.dtype == want.dtype
    assert np.array_equal(ours, want)


def test_sigma_respacings_equal_the_references(log_sigmas):
    ref, _ = log_sigmas
    desc = np.exp(np.linspace(np.log(14.6), np.log(0.03), 25))
    assert np.array_equal(sigmas.respace_sigmas("karras", desc, 12), ref._convert_to_karras(desc, 12))
    assert np.array_equal(sigmas.respace_sigmas("exponential", desc, 12), ref._convert_to_exponential(desc, 12))
    ours_beta, ref_beta = sigmas.respace_sigmas("beta", desc, 12), ref._convert_to_beta(desc, 12)
    np.testing.assert_allclose(ours_beta, ref_beta, rtol=1e-13, atol=0)
    assert np.array_equal(ours_beta.astype(np.float32), ref_beta.astype(np.float32))


@settings(max_examples=30, deadline=None)
@given(
    # (absolute resolution ~1e-19: the schedules use q >= 1 / (num_inference_steps - 1))
    q=st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(min_value=1e-9, max_value=1.0)), min_size=1, max_size=8),
    a=st.floats(min_value=0.2, max_value=5.0),
    b=st.floats(min_value=0.2, max_value=5.0),
)
def test_beta_quantile_without_scipy(q, a, b):
    q = np.array(q)
    ours = sigmas.beta_ppf(q, a, b)
    np.testing.assert_allclose(ours, scipy_stats.beta.ppf(q, a, b), rtol=1e-9, atol=1e-12)
    x = np.linspace(0, 1, 41)
    np.testing.assert_allclose(sigmas.regularized_incomplete_beta(x, a, b), scipy_special.betainc(a, b, x), atol=1e-12)


def test_lms_coefficients_equal_the_references():
    for config in ({}, {"use_karras_sigmas": True}, {"use_beta_sigmas": True}):
        ref = diffusers.LMSDiscreteScheduler(**config)
        ref.set_timesteps(12)
        s = ref.sigmas.numpy()
        for t in range(12):
            order = min(t + 1, 4)
            nodes = [s[t - k] for k in range(order)]
            for j in range(order):
                want = ref.get_lms_coefficient(order, t, j)
                got = lagrange_basis_integral(nodes, j, float(s[t]), float(s[t + 1]))
                assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (config, t, j, got, want)


def test_lagrange_basis_integral_is_exact_for_its_polynomials():
    nodes = [3.0, 2.0, 1.2, 0.7]
    # the basis polynomials sum to 1, so their integrals sum to the interval's length
    total = sum(lagrange_basis_integral(nodes, j, 3.0, 2.0) for j in range(4))
    assert abs(total - (2.0 - 3.0)) < 1e-6  # float32 evaluation of the basis


# ------------------------------------------------------------------------------------------------
# noise, thresholding, predictions, outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randn_reproduces_the_reference_seeding(dtype):
    shape = (3, 2, 4, 4)
    single = base.randn(shape, generator=torch.Generator().manual_seed(5), dtype=dtype)
    assert torch.equal(single, randn_tensor(shape, generator=torch.Generator().manual_seed(5), dtype=dtype))
    per_item = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    ours = base.randn(shape, generator=per_item, dtype=dtype)
    want = randn_tensor(shape, generator=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], dtype=dtype)
    assert torch.equal(ours, want)
    one = base.randn(shape, generator=[torch.Generator().manual_seed(9)], dtype=dtype)
    assert torch.equal(one, randn_tensor(shape, generator=[torch.Generator().manual_seed(9)], dtype=dtype))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        base.randn(shape, generator=per_item[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dynamic_threshold_equals_the_references(dtype):
    x = (torch.randn((2, 3, 5, 5), generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    ref = diffusers.DDPMScheduler(thresholding=True, sample_max_value=1.7, dynamic_thresholding_ratio=0.9)
    ours = base.dynamic_threshold(x, 0.9, 1.7)
    want = ref._threshold_sample(x)
    assert ours.dtype == dtype and torch.equal(ours, want)


def test_prediction_conversions_are_consistent():
    """x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0: every parameterisation gives back x0 and eps."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn((2, 3), generator=g, dtype=torch.float64),
        torch.randn((2, 3), generator=g, dtype=torch.float64),
    )
    alpha = torch.tensor(0.6, dtype=torch.float64)
    sigma = (1 - alpha**2) ** 0.5
    xt = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    for kind, output in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        got_x0, got_eps = prediction.vp_x0_eps(output, xt, alpha, sigma, kind)
        torch.testing.assert_close(got_x0, x0)
        torch.testing.assert_close(got_eps, eps)
    # the VE form: x = x0 + s eps with s = sigma / alpha, the model seeing x * alpha
    s = sigma / alpha
    x = x0 + s * eps
    for kind, output in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        torch.testing.assert_close(prediction.ve_x0(output, x, s, kind), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        prediction.vp_x0(eps, xt, alpha, sigma, "flow")


def test_step_outputs_read_as_tuples():
    a, b = torch.zeros(1), torch.ones(1)
    out = base.SchedulerOutput(prev_sample=a, pred_original_sample=b)
    assert out[0] is a and out[1] is b and out["pred_original_sample"] is b
    assert out.to_tuple() == (a, b) and len(out) == 2
    prev, x0 = out.to_tuple()
    assert prev is a and x0 is b
    assert list(out) == ["prev_sample", "pred_original_sample"]  # a dict: iteration gives the names
    only = base.SchedulerOutput(prev_sample=a)
    assert only.to_tuple() == (a,) and list(only.keys()) == ["prev_sample"]
    with pytest.raises(KeyError):
        only["pred_original_sample"]
