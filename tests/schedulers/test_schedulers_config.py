"""Scheduler configs against the reference: defaults, ``compatibles``, ``from_config`` across every
compatible pair (with overrides), ``scheduler_config.json`` written by either library loading in
the other, legacy configs from the wild, and loading from a Hub repo."""

from __future__ import annotations

import copy
import functools
import json
import logging

import pytest
import torch

from diffpipe.errors import ConfigError
from diffpipe.registry import find_class
from diffpipe.schedulers import SCHEDULERS

import diffusers  # the oracle (test extra): missing, the module fails to load

logging.getLogger("diffusers").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore")  # the reference's deprecation chatter

NAMES = list(SCHEDULERS)
OWN_KEYS = ("_diffusers_version", "_use_default_values")

# a non-default (but valid) configuration of each class, to carry into other classes
SOURCE_CONFIGS = {
    "DDPMScheduler": dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        variance_type="fixed_large",
        clip_sample=False,
    ),
    "DDIMScheduler": dict(
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
    ),
    "PNDMScheduler": dict(beta_schedule="scaled_linear", beta_start=0.00085, skip_prk_steps=True, steps_offset=1),
    "EulerDiscreteScheduler": dict(beta_schedule="scaled_linear", use_karras_sigmas=True, timestep_spacing="leading"),
    "EulerAncestralDiscreteScheduler": dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing"),
    "HeunDiscreteScheduler": dict(use_exponential_sigmas=True, clip_sample=True, beta_end=0.02),
    "LMSDiscreteScheduler": dict(use_karras_sigmas=True, prediction_type="v_prediction"),
    "DPMSolverMultistepScheduler": dict(
        algorithm_type="sde-dpmsolver++",
        solver_order=3,
        use_karras_sigmas=True,
        lambda_min_clipped=-5.0,
        euler_at_final=True,
    ),
    "DPMSolverSinglestepScheduler": dict(solver_order=3, lower_order_final=True, solver_type="heun"),
    "KDPM2DiscreteScheduler": dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1),
    "KDPM2AncestralDiscreteScheduler": dict(use_exponential_sigmas=True, timestep_spacing="trailing"),
    "DEISMultistepScheduler": dict(solver_order=3, use_karras_sigmas=True, lower_order_final=False),
    "UniPCMultistepScheduler": dict(
        solver_type="bh1", disable_corrector=[1], use_exponential_sigmas=True, final_sigmas_type="sigma_min"
    ),
    "LCMScheduler": dict(original_inference_steps=40, timestep_scaling=5.0, clip_sample=True),
    "TCDScheduler": dict(original_inference_steps=40, prediction_type="v_prediction"),
    "EDMEulerScheduler": dict(sigma_schedule="exponential", sigma_data=0.7, rho=5.0, final_sigmas_type="sigma_min"),
    "EDMDPMSolverMultistepScheduler": dict(
        algorithm_type="sde-dpmsolver++", solver_type="heun", sigma_min=0.01, sigma_max=20.0, euler_at_final=True
    ),
    "DPMSolverSDEScheduler": dict(use_karras_sigmas=True, noise_sampler_seed=1234, beta_schedule="scaled_linear"),
    "FlowMatchEulerDiscreteScheduler": dict(shift=3.0, shift_terminal=0.05, use_exponential_sigmas=True),
}
OVERRIDES = dict(prediction_type="v_prediction", beta_end=0.015, steps_offset=1)


def normalized(config) -> dict:
    """A config for comparison: without the version keys; ``_use_default_values`` as a set."""
    out = {k: v for k, v in dict(config).items() if k not in OWN_KEYS}
    out["_use_default_values"] = set(config.get("_use_default_values", ()))
    return out


def describe_difference(ours: dict, ref: dict) -> dict:
    return {
        k: (ours.get(k, "<missing>"), ref.get(k, "<missing>"))
        for k in set(ours) | set(ref)
        if ours.get(k) != ref.get(k)
    }


def assert_same_config(ours, ref):
    a, b = normalized(ours.config), normalized(ref.config)
    assert a == b, f"config differs (ours, reference): {describe_difference(a, b)}"


def assert_same_timesteps(ours, ref, steps: int = 10):
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=1e-9)
    if hasattr(ref, "sigmas"):
        torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)


def steps_for(name: str) -> int:
    return 4 if name in ("LCMScheduler", "TCDScheduler") else 10


def ref_class(name):
    return getattr(diffusers, name)


@functools.lru_cache(maxsize=None)
def source_scheduler(lib: str, name: str):
    """The SOURCE_CONFIGS scheduler of a class, built once (the reference's KDPM2 takes ~0.5 s);
    only its config is read."""
    return (ref_class(name) if lib == "ref" else find_class(name))(**SOURCE_CONFIGS[name])


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_default_config_matches_reference(name):
    ours, ref = find_class(name)(), ref_class(name)()
    assert_same_config(ours, ref)
    assert type(ours).config_name == "scheduler_config.json"


@pytest.mark.parametrize("name", NAMES)
def test_compatibles_are_the_references(name):
    ours, ref = find_class(name)(), ref_class(name)()
    assert sorted(ours._compatibles) == sorted(ref._compatibles)
    want = sorted(c.__name__ for c in ref.compatibles if c.__name__ in SCHEDULERS)
    assert sorted(c.__name__ for c in ours.compatibles) == want
    assert all(c.__module__.startswith("diffpipe.") for c in ours.compatibles)


def _pairs():
    for source in NAMES:
        for target in sorted(set(ref_class(source)._compatibles) & set(SCHEDULERS)):
            yield pytest.param(source, target, id=f"{source}->{target}")


@pytest.mark.parametrize("from_file", [False, True], ids=["live-config", "saved-config"])
@pytest.mark.parametrize(("source", "target"), list(_pairs()))
def test_from_config_across_compatible_classes_matches_reference(source, target, from_file):
    """``saved-config`` carries every key explicitly (as a pipeline does after loading a folder),
    ``live-config`` only the non-default ones (the rest are left to the target's defaults)."""
    src_ours, src_ref = source_scheduler("ours", source), source_scheduler("ref", source)
    overrides = {k: v for k, v in OVERRIDES.items() if k in find_class(target).init_keys()}
    if from_file:
        # (a copy: the reference's to_json_string adds _class_name to the object's own config)
        ours_config = json.loads(src_ours.to_json_string())
        ref_config = json.loads(copy.deepcopy(src_ref).to_json_string())
    else:
        ours_config, ref_config = src_ours.config, src_ref.config
    if target.startswith("EDM") and from_file and ref_config.get("sigma_min", 0.0) is None:
        # a saved Euler/UniPC config writes sigma_min/sigma_max as null; the reference's EDM
        # schedulers fail on that with a TypeError, ours say which key is wrong
        with pytest.raises(TypeError):
            ref_class(target).from_config(ref_config, **overrides)
        with pytest.raises(ConfigError, match="sigma_min.*None"):
            find_class(target).from_config(ours_config, **overrides)
        return
    try:
        ref = ref_class(target).from_config(ref_config, **overrides)
    except (ValueError, NotImplementedError):
        # a combination the reference refuses (an SDE algorithm_type carried into DEIS, a saved
        # "deis" config with the zero final sigma into DPM-Solver): ours refuses it too
        with pytest.raises(ConfigError):
            find_class(target).from_config(ours_config, **overrides)
        return
    ours = find_class(target).from_config(ours_config, **overrides)
    assert type(ours).__name__ == target
    assert_same_config(ours, ref)
    assert ours.config["prediction_type"] == "v_prediction"
    assert_same_timesteps(ours, ref)


@pytest.mark.parametrize("name", NAMES)
def test_from_config_of_own_class_and_unused_kwargs(name):
    config = SOURCE_CONFIGS[name]
    ours = find_class(name).from_config(find_class(name)(**config).config, num_train_timesteps=1000)
    ref = ref_class(name).from_config(ref_class(name)(**config).config, num_train_timesteps=1000)
    assert_same_config(ours, ref)
    assert_same_timesteps(ours, ref, steps_for(name))


@pytest.mark.parametrize("name", NAMES)
def test_reference_json_loads_in_ours(name, tmp_path):
    ref = ref_class(name)(**SOURCE_CONFIGS[name])
    ref.save_pretrained(tmp_path / "scheduler")
    ours = find_class(name).from_pretrained(tmp_path, subfolder="scheduler")
    again = ref_class(name).from_pretrained(tmp_path, subfolder="scheduler")
    assert_same_config(ours, again)
    assert_same_timesteps(ours, again, steps_for(name))


@pytest.mark.parametrize("name", NAMES)
def test_our_json_loads_in_the_reference(name, tmp_path):
    ours = find_class(name)(**SOURCE_CONFIGS[name])
    ours.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == name
    assert data["_diffusers_version"] == "0.42.1"
    ref = ref_class(name).from_pretrained(tmp_path)
    reloaded = find_class(name).from_pretrained(tmp_path)
    assert_same_config(reloaded, ref)
    assert_same_timesteps(reloaded, ref, steps_for(name))
    for key, value in SOURCE_CONFIGS[name].items():
        assert ref.config[key] == value


# ------------------------------------------------------------------------------------------------
# configs as they exist in the wild (older library versions wrote fewer keys)

LEGACY = {
    # CompVis/stable-diffusion-v1-4 as first published: no steps_offset, no set_alpha_to_one
    "sd14-pndm-original": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.2.2",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "skip_prk_steps": True,
    },
    # runwayml/stable-diffusion-v1-5: keys of other classes mixed in (clip_sample on a PNDM config)
    "sd15-pndm": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    # stabilityai/stable-diffusion-2: a DDIM config without timestep_spacing, with a PNDM key
    "sd2-ddim-v": {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.8.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
    # google/ddpm-cifar10-32 era: the old clip_sample default, long-gone keys
    "ddpm-old": {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.1.1",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "clip_sample": True,
        "num_train_timesteps": 1000,
        "trained_betas": None,
        "variance_type": "fixed_small",
        "tensor_format": "pt",
        "timestep_values": None,
    },
    # stabilityai/stable-diffusion-xl-base-1.0
    "sdxl-euler": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    # latent-consistency/lcm-lora-sdxl
    "lcm": {
        "_class_name": "LCMScheduler",
        "_diffusers_version": "0.22.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "original_inference_steps": 50,
        "prediction_type": "epsilon",
        "rescale_betas_zero_snr": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 1,
        "thresholding": False,
        "timestep_spacing": "leading",
        "trained_betas": None,
    },
    # a DPM-Solver config from before final_sigmas_type / euler_at_final / use_lu_lambdas existed
    "dpm-old": {
        "_class_name": "DPMSolverMultistepScheduler",
        "_diffusers_version": "0.12.0",
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "solver_order": 2,
        "solver_type": "midpoint",
        "thresholding": False,
        "trained_betas": None,
    },
}
SWAP_TARGETS = ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DDIMScheduler"]


@pytest.mark.parametrize("label", list(LEGACY))
def test_legacy_config_loads_like_the_reference(label, tmp_path):
    data = LEGACY[label]
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(data))
    name = data["_class_name"]
    ours = find_class(name).from_pretrained(tmp_path, subfolder="scheduler")
    ref = ref_class(name).from_pretrained(tmp_path, subfolder="scheduler")
    assert_same_config(ours, ref)
    assert_same_timesteps(ours, ref, steps_for(name))
    # missing keys take the reference's defaults
    defaults = ref_class(name)().config
    for key in set(defaults) - set(data) - {"_use_default_values"}:
        assert ours.config[key] == defaults[key], key
    # and the usual scheduler swap of a pipeline works the same
    if name in ("PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"):
        for target in SWAP_TARGETS:
            a = find_class(target).from_config(ours.config)
            b = ref_class(target).from_config(ref.config)
            assert_same_config(a, b)
            assert_same_timesteps(a, b)


def test_loading_from_a_hub_repo_with_subfolder(hub, hf_cache, tmp_path):
    ref = diffusers.DPMSolverMultistepScheduler(**SOURCE_CONFIGS["DPMSolverMultistepScheduler"])
    ref.save_pretrained(tmp_path / "scheduler")
    hub.add_repo(
        "tester/tiny-pipe",
        {"scheduler/scheduler_config.json": (tmp_path / "scheduler" / "scheduler_config.json").read_bytes()},
    )
    ours = find_class("DPMSolverMultistepScheduler").from_pretrained("tester/tiny-pipe", subfolder="scheduler")
    ref = diffusers.DPMSolverMultistepScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert_same_config(ours, ref)
    assert_same_timesteps(ours, ref)
    # a second load is served from the cache
    again = find_class("DPMSolverMultistepScheduler").from_pretrained(
        "tester/tiny-pipe", subfolder="scheduler", local_files_only=True
    )
    assert_same_config(again, ref)


def test_from_pretrained_overrides_config_values(tmp_path):
    diffusers.EulerDiscreteScheduler(**SOURCE_CONFIGS["EulerDiscreteScheduler"]).save_pretrained(tmp_path)
    ours = find_class("EulerDiscreteScheduler").from_pretrained(tmp_path, timestep_spacing="trailing")
    ref = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path, timestep_spacing="trailing")
    assert ours.config.timestep_spacing == "trailing"
    assert_same_config(ours, ref)
    assert_same_timesteps(ours, ref)


def test_config_is_read_only_and_public_attributes_exist():
    s = find_class("EulerDiscreteScheduler")()
    with pytest.raises(TypeError):
        s.config["prediction_type"] = "sample"
    assert s.config.num_train_timesteps == 1000
    for name in NAMES:
        ours, ref = find_class(name)(), ref_class(name)()
        for attr in ("timesteps", "order", "init_noise_sigma", "num_inference_steps", "config", "compatibles"):
            assert hasattr(ours, attr), f"{name} lacks {attr}"
        for attr in ("sigmas", "begin_index", "step_index", "set_begin_index", "alphas_cumprod", "betas"):
            assert hasattr(ours, attr) == hasattr(ref, attr), f"{name}: {attr} present in one library only"


def test_schedulers_load_through_the_package_namespace():
    import diffpipe

    for name in NAMES:
        cls = getattr(diffpipe, name)
        assert cls.__name__ == name and cls is find_class(name)


@pytest.mark.parametrize("source", ["PNDMScheduler", "DDIMScheduler"])
def test_from_config_with_keys_the_class_does_not_take_is_the_reference(source, caplog):
    """Configs and overrides moving between scheduler classes: keys the target does not take are
    ignored (not an error), warned about, returned as unused, and the schedule is the reference's."""
    caplog.set_level(logging.WARNING)
    config = getattr(diffusers, source)(**SOURCE_CONFIGS.get(source, {})).config
    extra = dict(skip_prk_steps=True, foo=1, timestep_spacing="trailing")
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "LCMScheduler"):
        ref, ref_unused = getattr(diffusers, name).from_config(config, return_unused_kwargs=True, **extra)
        ours, unused = find_class(name).from_config(dict(config), return_unused_kwargs=True, **extra)
        assert ours.config.timestep_spacing == "trailing" and "foo" not in ours.config
        assert unused["foo"] == ref_unused["foo"] == 1
        assert_same_timesteps(ours, ref)
    assert "were passed to" in caplog.text and "'foo': 1" in caplog.text
