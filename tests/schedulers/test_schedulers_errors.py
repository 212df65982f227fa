"""Bad input to schedulers gets a clear error: the documented type, and a message that says what
was expected and what was found."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

from diffpipe.errors import CheckpointNotFoundError, ConfigError
from diffpipe.registry import find_class
from diffpipe.schedulers import SCHEDULERS

import diffusers  # the oracle (test extra): missing, the module fails to load

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")

NAMES = list(SCHEDULERS)
WITH_SPACING = [n for n in NAMES if "timestep_spacing" in find_class(n).init_keys()]
# schedulers built on a discrete training schedule (the EDM ones choose sigmas directly: no betas,
# and any number of inference steps)
WITH_BETAS = [n for n in NAMES if "beta_schedule" in find_class(n).init_keys()]
SHAPE = (1, 4, 4, 4)


def steps_for(name: str) -> int:
    return 4 if name in ("LCMScheduler", "TCDScheduler") else 10


@pytest.mark.parametrize("name", WITH_BETAS)
def test_unknown_beta_schedule(name):
    with pytest.raises(ConfigError) as e:
        find_class(name)(beta_schedule="cosine-ish")
    message = str(e.value)
    assert "beta_schedule" in message and "'cosine-ish'" in message and "'scaled_linear'" in message
    assert name in message


@pytest.mark.parametrize("name", [n for n in NAMES if "prediction_type" in find_class(n).init_keys()])
def test_unknown_prediction_type(name):
    with pytest.raises(ConfigError, match=r"prediction_type.*'epsilon'.*got 'noise'"):
        find_class(name)(prediction_type="noise")


@pytest.mark.parametrize("name", ["EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "PNDMScheduler"])
def test_prediction_type_the_algorithm_does_not_support(name):
    # the reference accepts these at construction and fails at the first step; we say so up front
    with pytest.raises(ConfigError, match=r"prediction_type.*'v_prediction'.*got 'sample'"):
        find_class(name)(prediction_type="sample")


@pytest.mark.parametrize("name", WITH_SPACING)
def test_unknown_timestep_spacing(name):
    with pytest.raises(ConfigError, match=r"timestep_spacing.*'linspace', 'leading', 'trailing'.*got 'uniform'"):
        find_class(name)(timestep_spacing="uniform")


@pytest.mark.parametrize("name", WITH_BETAS)
def test_more_inference_steps_than_training_steps(name):
    s = find_class(name)()
    with pytest.raises(ValueError, match=r"1001.*1000"):
        s.set_timesteps(1001)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("LCMScheduler", "TCDScheduler")])
def test_non_positive_or_non_integer_step_counts(name):
    s = find_class(name)()
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_consistency_models_cannot_take_more_steps_than_distilled(name):
    s = find_class(name)()
    with pytest.raises(ValueError, match=r"\(50 x 1.0\) is smaller than num_inference_steps \(51\)"):
        s.set_timesteps(51)
    if name == "TCDScheduler":  # an explicit original_inference_steps draws from all training steps
        with pytest.raises(ValueError, match=r"num_inference_steps.*\(12\).*original_inference_steps.*\(10\)"):
            s.set_timesteps(12, original_inference_steps=10)
    with pytest.raises(ValueError, match=r"strength"):
        s.set_timesteps(30, strength=0.5)


STEP_NEEDS_SET_TIMESTEPS = [
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
]


@pytest.mark.parametrize("name", STEP_NEEDS_SET_TIMESTEPS)
def test_step_before_set_timesteps(name):
    s = find_class(name)()
    x = torch.zeros(SHAPE)
    t = s.timesteps[0] if s.timesteps is not None else 999
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, t, x)


@pytest.mark.parametrize(
    "name", ["DDPMScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler"]
)
def test_schedulers_born_with_the_training_schedule_step_like_the_reference(name):
    """These have a usable schedule right after construction (the reference's behaviour); stepping
    without set_timesteps follows it exactly."""
    ours, ref = find_class(name)(), getattr(diffusers, name)()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    outs = []
    for s in (ours, ref):
        t = s.timesteps[0]
        kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "DDPMScheduler" else {}
        y = s.scale_model_input(x, t)
        outs.append(s.step(torch.tanh(y), t, x, **kwargs).prev_sample)
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


NOT_IN_SCHEDULE = {
    "DDPMScheduler": 998,
    "EulerDiscreteScheduler": 998.5,
    "EulerAncestralDiscreteScheduler": 998.5,
    "HeunDiscreteScheduler": 998.5,
    "LMSDiscreteScheduler": 998.5,
    "KDPM2DiscreteScheduler": 998.5,
    "LCMScheduler": 998,
    "TCDScheduler": 998,
}


@pytest.mark.parametrize("name", list(NOT_IN_SCHEDULE))
def test_timestep_not_in_the_schedule(name):
    s = find_class(name)()
    s.set_timesteps(steps_for(name))
    t = torch.tensor(NOT_IN_SCHEDULE[name])
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"not in the current schedule"):
        if hasattr(s, "set_begin_index"):
            s.scale_model_input(x, t)  # the first call that looks the timestep up
        s.step(x, t, x)


def _step_off_schedule(cls, name: str, t):
    """(outcome, prev_sample): one scale_model_input + step at a timestep not in the schedule."""
    scheduler = cls(**({"noise_sampler_seed": 0} if name == "DPMSolverSDEScheduler" else {}))
    scheduler.set_timesteps(steps_for(name))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(t, dtype=scheduler.timesteps.dtype)
    seeded = "generator" in inspect.signature(scheduler.step).parameters
    try:
        sample = scheduler.scale_model_input(x, t)
        kwargs = {"generator": torch.Generator().manual_seed(1)} if seeded else {}
        return "ok", scheduler.step(x * 0.1, t, sample, **kwargs).prev_sample
    except Exception as e:  # the kind of failure is compared
        return "error", e


@pytest.mark.parametrize("name", NAMES)
def test_a_timestep_off_the_schedule_is_handled_as_the_reference(name, caplog):
    """Where the reference accepts it (the DPM-Solver family and UniPC take it as the last step, DDIM
    and DDPM compute from it) ours gives the same sample, with a warning where the reference is silent
    about a guess; where the reference fails, ours fails with a ValueError that says why."""
    for t in (501, 0, 500.5):
        expected, expected_value = _step_off_schedule(getattr(diffusers, name), name, t)
        got, got_value = _step_off_schedule(find_class(name), name, t)
        if expected == "ok":
            assert got == "ok", f"{name} at {t}: {got_value}"
            torch.testing.assert_close(got_value, expected_value, atol=1e-5, rtol=1e-5)
        else:
            assert got == "error" and isinstance(got_value, ValueError), (name, t, got_value)
    if getattr(find_class(name), "_unknown_timestep_is_last", False):
        assert "it is taken as the last step, as the reference does" in caplog.text


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
def test_timestep_outside_the_training_range(name):
    s = find_class(name)()
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    for bad in (1000, -1):
        with pytest.raises(ValueError, match=r"outside the training range \[0, 999\]"):
            s.step(x, bad, x)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_integer_loop_index_instead_of_a_timestep(name):
    s = find_class(name)()
    s.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="integer timestep"):
        s.step(x, 3, x)


@pytest.mark.parametrize(
    "name",
    [
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
    ],
)
def test_only_one_sigma_schedule_at_a_time(name):
    with pytest.raises(ConfigError, match=r"only one of .*\['karras', 'exponential'\]"):
        find_class(name)(use_karras_sigmas=True, use_exponential_sigmas=True)


def test_dpm_solver_specific_config_errors():
    dpm = find_class("DPMSolverMultistepScheduler")
    with pytest.raises(ConfigError, match=r"final_sigmas_type='zero'.*'dpmsolver'.*sigma_min"):
        dpm(algorithm_type="dpmsolver")
    with pytest.raises(ConfigError, match=r"algorithm_type.*got 'dpmsolver\+\+\+'"):
        dpm(algorithm_type="dpmsolver+++")
    with pytest.raises(ConfigError, match=r"solver_type.*got 'rk4'"):
        dpm(solver_type="rk4")
    with pytest.raises(ConfigError, match=r"solver_order.*positive int.*got 0"):
        dpm(solver_order=0)
    with pytest.raises(ConfigError, match=r"no third-order update"):
        dpm(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=3)
    with pytest.raises(ConfigError, match=r"solver_order must be 1, 2 or 3; got 4"):
        find_class("DPMSolverSinglestepScheduler")(solver_order=4)
    with pytest.raises(ConfigError, match=r"algorithm_type.*got 'sde-dpmsolver'"):
        find_class("DPMSolverSinglestepScheduler")(algorithm_type="sde-dpmsolver")
    s = dpm(use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        s.set_timesteps(timesteps=[999, 500, 10])
    with pytest.raises(ValueError, match="exactly one"):
        dpm().set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        dpm().set_timesteps(10, mu=0.5)


def test_custom_timestep_errors():
    for name in ("DDPMScheduler", "HeunDiscreteScheduler", "LCMScheduler", "TCDScheduler"):
        s = find_class(name)()
        with pytest.raises(ValueError, match=r"descending.*500.*after 100"):
            s.set_timesteps(timesteps=[999, 100, 500])
        with pytest.raises(ValueError, match=r"start below num_train_timesteps \(1000\); got 1000"):
            s.set_timesteps(timesteps=[1000, 500])
    with pytest.raises(ValueError, match="not both"):
        find_class("DDPMScheduler")().set_timesteps(10, timesteps=[999, 500])
    with pytest.raises(ValueError, match="exactly one"):
        find_class("EulerDiscreteScheduler")().set_timesteps(10, sigmas=[3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        find_class("EulerDiscreteScheduler")(use_karras_sigmas=True).set_timesteps(timesteps=[999.0, 500.0])


def test_step_argument_errors():
    ddim = find_class("DDIMScheduler")()
    ddim.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="either `generator` or `variance_noise`"):
        ddim.step(x, ddim.timesteps[0], x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    tcd = find_class("TCDScheduler")()
    tcd.set_timesteps(4)
    with pytest.raises(ValueError, match=r"eta.*\[0, 1\].*1.5"):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)


def test_bad_values_for_other_options():
    with pytest.raises(ConfigError, match="trained_betas"):
        find_class("DDIMScheduler")(trained_betas=[[0.1, 0.2]])
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        find_class("DDIMScheduler")(num_train_timesteps=0)
    with pytest.raises(ConfigError, match=r"variance_type.*got 'huge'"):
        find_class("DDPMScheduler")(variance_type="huge")
    with pytest.raises(ConfigError, match=r"interpolation_type.*got 'cubic'"):
        find_class("EulerDiscreteScheduler")(interpolation_type="cubic")
    with pytest.raises(ConfigError, match=r"final_sigmas_type.*got 'one'"):
        find_class("EulerDiscreteScheduler")(final_sigmas_type="one")
    with pytest.raises(ConfigError, match="shift_terminal"):
        find_class("UniPCMultistepScheduler")(shift_terminal=0.1)
    with pytest.raises(ValueError, match="warm-up needs num_inference_steps >= 4"):
        find_class("PNDMScheduler")().set_timesteps(3)
    with pytest.raises(ValueError, match="`mu` is required"):
        find_class("UniPCMultistepScheduler")(use_flow_sigmas=True, use_dynamic_shifting=True).set_timesteps(10)


def test_missing_config_file_names_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"no scheduler_config\.json.*subfolder 'scheduler'"):
        find_class("DDIMScheduler").from_pretrained(tmp_path, subfolder="scheduler")
    with pytest.raises(CheckpointNotFoundError):
        find_class("DDIMScheduler").from_pretrained(tmp_path / "does-not-exist")
