"""Configs as the reference's users and tools see them: the messages about unexpected and missing
config keys (in the reference's words: its test suite and users' log filters look for them), and
what a load-then-save round trip writes (exactly the reference's keys and values), for every
exported scheduler, model and for whole pipelines. The reference is the oracle throughout."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from diffpipe.registry import find_class
from diffpipe.schedulers import SCHEDULERS
from factories import TINY_MODELS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2

EXPORTED_MODELS = sorted(
    n
    for n in dir(diffpipe)
    if isinstance(getattr(diffpipe, n), type) and issubclass(getattr(diffpipe, n), diffpipe.ModelMixin)
)
EXPORTED_MODELS.remove("ModelMixin")
EXPORTED_MODELS.remove("MultiControlNetModel")  # a list of ControlNets, without a config of its own
UNEXPECTED = re.compile(
    r"The config attributes (\{.*?\}) were passed to (\w+), but are not expected and will be ignored\. "
    r"Please verify your ([\w.]+) configuration file\."
)
MISSING = re.compile(r"(\{.*?\}|set\(\)) was not found in config\. Values will be initialized to default values\.")


@contextlib.contextmanager
def config_messages():
    """What the two libraries log while the block runs: {library: text} (INFO and up)."""
    streams = {}
    saved = []
    for name in ("diffusers", "diffpipe"):
        logger, stream = logging.getLogger(name), io.StringIO()
        handler = logging.StreamHandler(stream)
        saved.append((logger, logger.level, handler))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        streams[name] = stream
    texts: dict[str, str] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield texts
    finally:
        for logger, level, handler in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
        texts.update({name: stream.getvalue() for name, stream in streams.items()})


def messages(text: str) -> dict:
    """The reference's two config messages found in a log: unexpected keys (with their values, the
    class and the file name) and the set of keys left to defaults."""
    return {
        "unexpected": [(ast.literal_eval(a), b, c) for a, b, c in UNEXPECTED.findall(text)],
        "missing": [ast.literal_eval(m) if m != "set()" else set() for m in MISSING.findall(text)],
    }


def test_every_exported_model_has_a_tiny_config_here():
    assert sorted(TINY_MODELS) == EXPORTED_MODELS


def _edited_config(folder: Path, config_name: str, drop: str) -> dict:
    """The saved config with one unknown key added and one constructor key removed."""
    path = folder / config_name
    data = json.loads(path.read_text())
    data["mystery_key"] = [1, 2]
    del data[drop]
    path.write_text(json.dumps(data))
    return data


def _a_defaulted_key(config: dict, given: dict) -> str:
    return sorted(k for k in config if not k.startswith("_") and k not in given)[0]


@pytest.mark.parametrize("name", EXPORTED_MODELS)
def test_model_config_messages_and_round_trip_are_the_reference_s(name, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(diffusers, name)(**TINY_MODELS[name])
    reference.save_pretrained(tmp_path / "src")
    _edited_config(tmp_path / "src", "config.json", _a_defaulted_key(reference.config, TINY_MODELS[name]))
    with config_messages() as logs:
        ref = getattr(diffusers, name).from_pretrained(tmp_path / "src")
    with config_messages() as our_logs:
        ours = getattr(diffpipe, name).from_pretrained(tmp_path / "src")
    expected, got = messages(logs["diffusers"]), messages(our_logs["diffpipe"])
    # the reference writes keys its constructor derives, then calls them unexpected on every load of its
    # own folders; ours does not cry wolf (the keys are kept all the same: see the round trip)
    derived = {
        "AsymmetricAutoencoderKL": ("block_out_channels", "force_upcast"),
        "AutoencoderTiny": ("block_out_channels",),
    }
    for key in derived.get(name, ()):
        del expected["unexpected"][0][0][key]
    assert expected["unexpected"] == [({"mystery_key": [1, 2]}, name, "config.json")]
    assert got == expected
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours/config.json").read_text()) == json.loads(
        (tmp_path / "ref/config.json").read_text()
    )


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_config_messages_and_round_trip_are_the_reference_s(name, tmp_path):
    reference = getattr(diffusers, name)()
    reference.save_pretrained(tmp_path / "src")
    _edited_config(tmp_path / "src", "scheduler_config.json", _a_defaulted_key(reference.config, {}))
    with config_messages() as logs:
        ref = getattr(diffusers, name).from_pretrained(tmp_path / "src")
    with config_messages() as our_logs:
        ours = find_class(name).from_pretrained(tmp_path / "src")
    expected, got = messages(logs["diffusers"]), messages(our_logs["diffpipe"])
    assert expected["unexpected"] == [({"mystery_key": [1, 2]}, name, "scheduler_config.json")]
    assert got == expected
    ref.save_pretrained(tmp_path / "ref")
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours/scheduler_config.json").read_text())
    assert written == json.loads((tmp_path / "ref/scheduler_config.json").read_text())


@pytest.mark.parametrize("source", ["DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"])
def test_configs_moving_between_compatible_schedulers_say_what_the_reference_says(source):
    """A live config (keys the source only defaulted are dropped) and a compatible class's keys are no
    surprise to the target (not reported); a key no class takes is."""
    for target in sorted(set(getattr(diffusers, source)._compatibles) & set(SCHEDULERS)):
        config = dict(getattr(diffusers, source)(prediction_type="v_prediction").config)
        with config_messages() as logs:
            getattr(diffusers, target).from_config({**config, "mystery_key": 1})
        with config_messages() as our_logs:
            find_class(target).from_config({**config, "mystery_key": 1})
        assert messages(our_logs["diffpipe"]) == messages(logs["diffusers"]), target


@pytest.fixture(scope="module")
def reference_folders(tmp_path_factory):
    from sd_factory import make_legacy, save_reference_pipeline
    from sdxl_factory import save_reference_sdxl

    root = tmp_path_factory.mktemp("conformance_configs")
    legacy = save_reference_pipeline(root / "sd_legacy", safety_checker=False, seed=2)
    make_legacy(legacy)
    return {
        "sd": save_reference_pipeline(root / "sd", safety_checker=True, seed=1),
        "sd_legacy": legacy,
        "sdxl": save_reference_sdxl(root / "sdxl"),
    }


@pytest.mark.parametrize("which", ["sd", "sd_legacy", "sdxl"])
def test_pipeline_load_then_save_writes_the_reference_s_files(reference_folders, which, tmp_path):
    """Every JSON file a pipeline round trip writes (model_index.json, each component's config, the
    tokenizers') has the keys and values the reference writes for the same folder."""
    folder = reference_folders[which]
    task = "StableDiffusionXLPipeline" if which == "sdxl" else "StableDiffusionPipeline"
    extra = {"add_watermarker": False} if which == "sdxl" else {}
    with config_messages():
        getattr(diffusers, task).from_pretrained(folder, **extra).save_pretrained(tmp_path / "ref")
        getattr(diffpipe, task).from_pretrained(folder).save_pretrained(tmp_path / "ours")
    ref_files = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.json"))
    our_files = sorted(p.relative_to(tmp_path / "ours") for p in (tmp_path / "ours").rglob("*.json"))
    assert our_files == ref_files
    for rel in ref_files:
        assert json.loads((tmp_path / "ours" / rel).read_text()) == json.loads((tmp_path / "ref" / rel).read_text()), (
            rel
        )


def test_old_sd_configs_are_mended_with_the_reference_s_future_warnings(tmp_path):
    """steps_offset 0, clip_sample true and a pre-0.9 sample_size < 64: each mended in place with a
    FutureWarning that opens with the reference's words (warnings filters and log readers match them)."""
    from sd_factory import make_legacy, save_reference_pipeline

    folder = save_reference_pipeline(tmp_path / "sd", safety_checker=False, seed=2)
    make_legacy(folder)
    path = folder / "scheduler/scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "steps_offset": 0, "clip_sample": True}))

    def load(lib):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = lib.StableDiffusionPipeline.from_pretrained(folder)
        said = sorted(str(w.message) for w in caught if w.category is FutureWarning)
        config = pipe.scheduler.config
        return said, (config.steps_offset, config.clip_sample, pipe.unet.config.sample_size)

    (expected, ref_values), (got, our_values) = load(diffusers), load(diffpipe)
    assert our_values == ref_values == (1, False, 64)
    openings = ("The configuration file of this scheduler: PNDMScheduler", "The configuration file of the unet has set")
    for words in (openings[0], openings[0], openings[1]):
        assert sum(m.startswith(words) for m in expected) == sum(m.startswith(words) for m in got) >= 1, words
    assert any("`steps_offset` should be set to 1 instead of 0" in m for m in got)
    assert any("`clip_sample`" in m for m in got) and any("`clip_sample`" in m for m in expected)


# Every string option the SD-family schedulers take (and some they do not): the ones the reference
# deprecates must warn here as there, the others must not.
OPTIONS = (
    "dpmsolver", "sde-dpmsolver", "dpmsolver++", "sde-dpmsolver++", "deis", "midpoint", "heun", "logrho", "bh1",
    "bh2", "zero", "sigma_min", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
    "learned_range",
)  # fmt: skip


def _future_warnings(cls, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cls(**kwargs)
        except (ValueError, NotImplementedError):
            pass  # refused (ours: ConfigError, a ValueError): only what was said before matters here
    return [str(w.message).split(". ")[0] for w in caught if w.category is FutureWarning]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_deprecated_scheduler_options_warn_as_the_reference(name):
    ref_cls, ours = getattr(diffusers, name), find_class(name)
    params = {"algorithm_type", "solver_type", "final_sigmas_type", "variance_type"} & ours.init_keys()
    seen = 0
    for param in sorted(params):
        for value in OPTIONS:
            dpm = param == "algorithm_type" and "final_sigmas_type" in params
            for extra in ({}, {"final_sigmas_type": "sigma_min"} if dpm else {}):
                expected = _future_warnings(ref_cls, **{param: value}, **extra)
                assert _future_warnings(ours, **{param: value}, **extra) == expected, (param, value, extra)
                seen += bool(expected)
    if name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"):
        assert seen  # the sweep reaches the reference's deprecations (dpmsolver, sde-dpmsolver)
