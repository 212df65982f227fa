"""FlowMatchEulerDiscreteScheduler against the reference, for what the shared matrix in
test_schedulers.py (schedules and 10-step trajectories) does not cover: Flux's ``calculate_shift``,
``scale_noise`` (image-to-image's forward process), per-token timesteps, the schedule it is born
with, the shift helpers, dtypes and devices, the output object and the errors."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from diffpipe.errors import ConfigError
from diffpipe.registry import find_class
from diffpipe.schedulers.flow_match_euler import FlowMatchEulerDiscreteSchedulerOutput, calculate_shift

import diffusers  # the oracle (test extra): missing, the module fails to load
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as ref_calculate_shift

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")

NAME = "FlowMatchEulerDiscreteScheduler"
Ours, Ref = find_class(NAME), getattr(diffusers, NAME)
ATOL = 1e-5


def both(**config):
    return Ours(**config), Ref(**config)


def assert_close(ours, ref, what, atol=ATOL):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, what
    err = (ours.double() - ref.double()).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g}"


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Flux's mu


@pytest.mark.parametrize("seq_len", [64, 256, 1024, 2304, 4096, 6400, 16384])
def test_calculate_shift_is_flux_s(seq_len):
    assert calculate_shift(seq_len) == ref_calculate_shift(seq_len)
    custom = dict(base_seq_len=128, max_seq_len=8192, base_shift=0.3, max_shift=1.5)
    assert calculate_shift(seq_len, **custom) == ref_calculate_shift(seq_len, **custom)


@pytest.mark.parametrize("px", [256, 512, 768, 1024, 1536])
def test_flux_schedules_at_image_sizes(px):
    """As the Flux pipeline sets it up: sigmas np.linspace(1, 1/N, N), mu from the token count, 28 steps."""
    n = 28
    mu = calculate_shift((px // 16) ** 2)
    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, shift=3.0)
    ours, ref = both(**config)
    for s in (ours, ref):
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.timesteps.dtype == ours.sigmas.dtype == torch.float32
    assert ours.num_inference_steps == ref.num_inference_steps == n
    x = randn(1, (px // 16) ** 2, 64, seed=0)  # packed latents
    xs = [x, x.clone()]
    for t in ref.timesteps:
        for i, s in enumerate((ours, ref)):
            v = torch.tanh(xs[i] * 0.5 + t / 2000)
            xs[i] = s.step(v, t, xs[i]).prev_sample
    assert_close(xs[0], xs[1], f"{px}px trajectory")


# ------------------------------------------------------------------------------------------------
# scale_noise


@pytest.mark.parametrize(
    "config", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True}, {"invert_sigmas": True}], ids=repr
)
def test_scale_noise_matches_reference(config):
    ours, ref = both(**config)
    kwargs = {"mu": 0.9} if config.get("use_dynamic_shifting") else {}
    for s in (ours, ref):
        s.set_timesteps(10, **kwargs)
    x0, noise = randn(3, 4, 8, 8, seed=1), randn(3, 4, 8, 8, seed=2)
    t = ref.timesteps[[0, 4, 9]]  # one per batch item, looked up in the schedule
    assert_close(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), "scale_noise")
    # image-to-image: the pipeline sets where the run starts, then noises at that timestep
    for s in (ours, ref):
        s.set_begin_index(3)
    t = ref.timesteps[3:4].repeat(3)
    assert_close(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), "scale_noise after set_begin_index")
    assert ours.begin_index == ref.begin_index == 3
    # and after a step, at the current one
    for s in (ours, ref):
        s.step(x0, t[0], x0)
    assert ours.step_index == ref.step_index == 4
    assert_close(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), "scale_noise mid-run")


def test_scale_noise_dtype_and_a_single_timestep():
    ours, ref = both(shift=3.0)
    for s in (ours, ref):
        s.set_timesteps(8)
    x0, noise = randn(2, 16, 8, seed=3).half(), randn(2, 16, 8, seed=4).half()
    t = ref.timesteps[2:3]
    assert_close(ours.scale_noise(x0, t, noise), ref.scale_noise(x0, t, noise), "fp16 scale_noise", atol=1e-3)
    # a 0-d timestep (the reference iterates over it and fails) or a float is the same as one of them
    expected = ours.scale_noise(x0, t, noise)
    assert torch.equal(ours.scale_noise(x0, t[0], noise), expected)
    assert torch.equal(ours.scale_noise(x0, float(t[0]), noise), expected)
    with pytest.raises(ValueError, match="noise"):
        ours.scale_noise(x0, t)


def test_scale_noise_off_the_schedule_is_an_error():
    ours = Ours()
    ours.set_timesteps(10)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="not in the current schedule"):
        ours.scale_noise(x, torch.tensor([123.0]), x)


# ------------------------------------------------------------------------------------------------
# step: per-token timesteps, dtypes, the schedule it is born with


def test_per_token_timesteps_match_reference():
    ours, ref = both()
    for s in (ours, ref):
        s.set_timesteps(6)
    sample, v = randn(2, 5, 3, seed=5), randn(2, 5, 3, seed=6)
    ts = ref.timesteps
    per_token = torch.stack([ts[[0, 1, 2, 3, 4]], ts[[2, 2, 5, 0, 1]]]).float()
    per_token[1, 0] = 700.0  # off the schedule: goes to the largest schedule sigma below it
    got = ours.step(v, ts[0], sample, per_token_timesteps=per_token).prev_sample
    want = ref.step(v, ts[0], sample, per_token_timesteps=per_token).prev_sample
    assert_close(got, want, "per-token step")
    assert ours.step_index == ref.step_index == 1


@pytest.mark.parametrize("stochastic", [False, True])
def test_step_output_dtype_follows_the_model_output(stochastic):
    ours, ref = both(stochastic_sampling=stochastic)
    outs = []
    for s in (ours, ref):
        s.set_timesteps(4)
        x = randn(1, 4, 4, 4, seed=7)
        out = s.step(torch.tanh(x).half(), s.timesteps[1], x, generator=torch.Generator().manual_seed(3))
        outs.append(out.prev_sample)
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert_close(outs[0], outs[1], "fp16 step", atol=1e-3)


@pytest.mark.parametrize(
    "config", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True}, {"num_train_timesteps": 100, "shift": 2.0}], ids=repr
)
def test_schedule_at_construction_matches_reference(config):
    """Born with the training schedule (timesteps N..1, shifted unless dynamic) and stepping on it."""
    ours, ref = both(**config)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert ours.sigmas.dtype == ours.timesteps.dtype == torch.float32
    assert ours.sigma_min == ref.sigma_min and ours.sigma_max == ref.sigma_max
    assert ours.shift == ref.shift and len(ours) == len(ref)
    assert ours.step_index is ref.step_index is None and ours.begin_index is ref.begin_index is None
    x = randn(1, 4, 4, 4, seed=8)
    outs = [s.step(torch.tanh(x), s.timesteps[0], x).prev_sample for s in (ours, ref)]
    assert_close(outs[0], outs[1], "a step on the training schedule")


def test_set_timesteps_on_a_device_and_from_tensors():
    ours, ref = both()
    for s in (ours, ref):
        s.set_timesteps(5, device="meta")  # where the reference puts both (no data needed)
    assert ours.timesteps.device == ref.timesteps.device and ours.sigmas.device == ref.sigmas.device
    ours, ref = both(shift=3.0)
    for s in (ours, ref):
        s.set_timesteps(timesteps=torch.tensor([900.0, 500.0, 25.0], dtype=torch.float64))
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_shift_helpers_match_reference():
    ours, ref = both(shift=2.0, shift_terminal=0.05)
    t = torch.linspace(0.95, 0.05, 7)
    for mu in (0.5, 1.15):
        assert torch.equal(ours.time_shift(mu, 1.0, t), ref.time_shift(mu, 1.0, t))
    assert torch.equal(ours.stretch_shift_to_terminal(t), ref.stretch_shift_to_terminal(t))
    lin_ours, lin_ref = both(time_shift_type="linear")
    assert torch.equal(lin_ours.time_shift(0.8, 1.0, t), lin_ref.time_shift(0.8, 1.0, t))
    for s in (ours, ref):
        s.set_shift(3.5)
        s.set_timesteps(9)
    assert ours.shift == ref.shift == 3.5 and ours.config.shift == ref.config.shift == 2.0
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)


def test_index_for_timestep_and_step_index_bookkeeping():
    ours, ref = both()
    for s in (ours, ref):
        s.set_timesteps(10)
    for i in (0, 3, 9):
        assert ours.index_for_timestep(ref.timesteps[i]) == ref.index_for_timestep(ref.timesteps[i]) == i
    x = randn(1, 4, 4, 4, seed=9)
    for s in (ours, ref):
        s.set_begin_index(2)
        s.step(x, s.timesteps[2], x)
        s.step(x, s.timesteps[3], x)
    assert ours.step_index == ref.step_index == 4
    for s in (ours, ref):
        s.set_timesteps(10)  # a new schedule forgets where the last run was
    assert ours.step_index is ref.step_index is None and ours.begin_index is ref.begin_index is None


def test_output_object_is_the_reference_s():
    ref_output = type(Ref().step(torch.zeros(1, 1), Ref().timesteps[0], torch.zeros(1, 1)))
    assert [f.name for f in dataclasses.fields(FlowMatchEulerDiscreteSchedulerOutput)] == [
        f.name for f in dataclasses.fields(ref_output)
    ]
    ours, ref = both()
    x = randn(1, 4, 4, 4, seed=10)
    for s in (ours, ref):
        s.set_timesteps(4)
    got, want = ours.step(x, ours.timesteps[0], x), ref.step(x, ref.timesteps[0], x)
    assert list(got.keys()) == list(want.keys()) == ["prev_sample"]
    assert got[0] is got.prev_sample and got.to_tuple() == (got.prev_sample,)
    tup = ours.step(x, ours.timesteps[1], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    # the model-input conveniences diffpipe adds (the reference has none): identity and 1
    assert ours.scale_model_input(x, ours.timesteps[0]) is x and ours.init_noise_sigma == 1.0


def test_config_round_trip_with_the_reference(tmp_path):
    config = dict(use_dynamic_shifting=True, shift=3.0, base_shift=0.5, max_shift=1.15, max_image_seq_len=4096)
    ours, ref = both(**config)
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    from_ours, from_ref = Ref.from_pretrained(tmp_path / "ours"), Ours.from_pretrained(tmp_path / "ref")
    assert dict(from_ours.config) | {"_use_default_values": None} == dict(ref.config) | {"_use_default_values": None}
    for s in (from_ours, from_ref):
        s.set_timesteps(12, mu=1.0)
    assert torch.equal(from_ref.timesteps, from_ours.timesteps) and torch.equal(from_ref.sigmas, from_ours.sigmas)


# ------------------------------------------------------------------------------------------------
# errors: where the reference refuses, so do we (a ValueError, ConfigError being one)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        ({"use_dynamic_shifting": True}, {"num_inference_steps": 10}, "mu"),
        ({}, {"num_inference_steps": 3, "sigmas": [1.0, 0.5]}, "same length as num_inference_steps"),
        ({}, {"num_inference_steps": 2, "timesteps": [900.0, 500.0, 100.0]}, "same length as num_inference_steps"),
        ({}, {"sigmas": [1.0, 0.5], "timesteps": [900.0, 500.0, 100.0]}, "same length"),
    ],
)
def test_set_timesteps_errors_are_the_reference_s(config, kwargs, match):
    for cls in (Ref, Ours):
        with pytest.raises(ValueError, match=match):
            cls(**config).set_timesteps(**kwargs)


def test_config_errors():
    for cls in (Ref, Ours):
        with pytest.raises(ValueError, match="time_shift_type"):
            cls(time_shift_type="cubic")
        with pytest.raises(ValueError, match="(?i)only one of"):
            cls(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ConfigError, match=r"time_shift_type.*'exponential', 'linear'.*got 'cubic'"):
        Ours(time_shift_type="cubic")
    with pytest.raises(ConfigError, match="shift_terminal"):
        Ours(shift_terminal=1.0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        Ours().set_timesteps()


@pytest.mark.parametrize("timestep", [3, torch.tensor(3)])
def test_integer_loop_index_instead_of_a_timestep(timestep):
    x = torch.zeros(1, 4, 2, 2)
    for cls in (Ref, Ours):
        s = cls()
        s.set_timesteps(10)
        with pytest.raises(ValueError, match="integer"):
            s.step(x, timestep, x)
