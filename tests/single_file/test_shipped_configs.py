"""The component configs shipped in diffpipe for offline single-file loading (src/diffpipe/single_file/
configs/<type>.json), judged by the reference: each one builds the reference's class (diffusers or
transformers) at full size on the meta device without an "unexpected config attributes" message, the
config the reference records holds every value the file gives, and diffpipe's classes built from the same
file have the reference's exact state-dict layout (names and shapes) and scheduler configs."""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
import transformers
from diffpipe.registry import find_class

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2

CONFIG_DIR = Path(diffpipe.__file__).parent / "single_file" / "configs"
TOP_KEYS = ["type", "description", "source_repo", "pipeline", "settings", "components", "tokenizers"]
SD = {"unet", "vae", "text_encoder", "scheduler"}
SDXL = SD | {"text_encoder_2"}
# type -> (source repo, pipeline class, the components it ships)
EXPECTED = {
    "sd1": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "StableDiffusionPipeline", SD),
    "sd1-inpaint": ("stable-diffusion-v1-5/stable-diffusion-inpainting", "StableDiffusionInpaintPipeline", SD),
    "sd2": ("stabilityai/stable-diffusion-2-1", "StableDiffusionPipeline", SD),
    "sd2-base": ("stabilityai/stable-diffusion-2-1-base", "StableDiffusionPipeline", SD),
    "sd2-inpaint": ("stabilityai/stable-diffusion-2-inpainting", "StableDiffusionInpaintPipeline", SD),
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", SDXL),
    "sdxl-refiner": (
        "stabilityai/stable-diffusion-xl-refiner-1.0",
        "StableDiffusionXLImg2ImgPipeline",
        {"unet", "vae", "text_encoder_2", "scheduler"},
    ),
    "sdxl-inpaint": (
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
        "StableDiffusionXLInpaintPipeline",
        SDXL,
    ),
}
TYPES = sorted(EXPECTED)
# keys a published config carries that are provenance, not configuration: never shipped
PROVENANCE = {"_diffusers_version", "_name_or_path", "torch_dtype", "dtype", "transformers_version"}
TEXT_ENCODERS = {"CLIPTextModel", "CLIPTextModelWithProjection"}


@functools.cache
def shipped(kind: str) -> dict:
    return json.loads((CONFIG_DIR / f"{kind}.json").read_text())


def _plain(value):
    """JSON-normal form (tuples become lists) so recorded configs compare with the file's values."""
    return json.loads(json.dumps(value))


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


COMPONENTS = [(kind, name) for kind in TYPES for name in sorted(EXPECTED[kind][2])]
MODELS = [(kind, name) for kind, name in COMPONENTS if name in ("unet", "vae")]
SCHEDULERS = [(kind, "scheduler") for kind in TYPES]


@contextlib.contextmanager
def logged(*names: str):
    """Everything the named loggers say (INFO and up) while the block runs, joined into ``out[0]``."""
    stream, out = io.StringIO(), []
    handler = logging.StreamHandler(stream)
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield out
    finally:
        for logger, level in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
        out.append(stream.getvalue())


def _layout(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@functools.cache
def reference_build(kind: str, name: str):
    """(recorded config, state-dict layout or None, log text) of the reference's class built from the file."""
    config = shipped(kind)["components"][name]
    cls_name = config["_class_name"]
    # models on the meta device (full size, no memory); schedulers hold real tensors, so not there
    device = torch.device("cpu" if name == "scheduler" else "meta")
    with logged("diffusers", "transformers") as log, device:
        if config.get("_library") == "transformers":
            text_config = transformers.CLIPTextConfig(**_public(config))
            model = getattr(transformers, cls_name)(text_config)
            recorded, layout = text_config.to_dict(), _layout(model)
        else:
            obj = getattr(diffusers, cls_name).from_config(_public(config))
            recorded = dict(obj.config)
            layout = _layout(obj) if isinstance(obj, torch.nn.Module) else None
    return recorded, layout, log[0]


# ---------------------------------------------------------------------------------------- the files
def test_the_shipped_types_are_exactly_the_known_eight():
    assert sorted(p.name for p in CONFIG_DIR.iterdir()) == sorted(f"{kind}.json" for kind in TYPES)


@pytest.mark.parametrize("kind", TYPES)
def test_file_format(kind):
    data = shipped(kind)
    assert list(data) == TOP_KEYS
    repo, pipeline, components = EXPECTED[kind]
    assert data["type"] == kind
    assert isinstance(data["description"], str) and data["description"]
    assert (data["source_repo"], data["pipeline"]) == (repo, pipeline)
    assert find_class(pipeline) is not None, "diffpipe implements the pipeline"
    # settings: model_index.json values the reference's pipeline constructor takes
    accepted = inspect.signature(getattr(diffusers, pipeline).__init__).parameters
    assert set(data["settings"]) <= set(accepted) - set(components)
    assert data["settings"].get("requires_safety_checker", False) is False
    # the single file has no safety checker: only the model and scheduler components are shipped
    assert set(data["components"]) == components
    for name, config in data["components"].items():
        assert isinstance(config["_class_name"], str), name
        assert not PROVENANCE & set(config), name
        if config["_class_name"] in TEXT_ENCODERS:
            assert config["_library"] == "transformers"
            assert config["model_type"] == "clip_text_model"
            assert config["architectures"] == [config["_class_name"]]
        else:
            assert "_library" not in config
            assert find_class(config["_class_name"]) is not None, name
        assert set(config) - {"_class_name", "_library"} == set(_public(config)), name
    # one tokenizer per text encoder, fetched from the source repo (the single file holds none)
    wanted = {name.replace("text_encoder", "tokenizer") for name in components if name.startswith("text_encoder")}
    assert data["tokenizers"] == {t: {"repo": repo, "subfolder": t} for t in sorted(wanted)}


# ---------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_the_reference_builds_it_as_written(kind, name):
    config = shipped(kind)["components"][name]
    recorded, layout, log = reference_build(kind, name)
    assert "not expected" not in log and "were passed to" not in log, log
    assert "_class_name" in config
    for key, value in _public(config).items():
        assert key in recorded, key
        assert _plain(recorded[key]) == value, key
    if name != "scheduler":
        assert layout, "a model with weights"


# ---------------------------------------------------------------------------------------- diffpipe
@pytest.mark.parametrize(("kind", "name"), MODELS)
def test_diffpipe_models_have_the_reference_s_full_size_layout(kind, name):
    config = shipped(kind)["components"][name]
    cls = getattr(diffpipe, config["_class_name"])
    with logged("diffpipe") as log, torch.device("meta"):
        ours = cls.from_config(_public(config))
    assert "not expected" not in log[0], log[0]
    assert next(ours.parameters()).device.type == "meta"
    reference_layout = reference_build(kind, name)[1]
    assert _layout(ours) == reference_layout
    for key, value in _public(config).items():
        assert _plain(ours.config[key]) == value, key


@pytest.mark.parametrize(("kind", "name"), SCHEDULERS)
def test_diffpipe_schedulers_record_the_reference_s_config(kind, name):
    config = shipped(kind)["components"][name]
    with logged("diffpipe") as log:
        ours = find_class(config["_class_name"]).from_config(_public(config))
    assert "not expected" not in log[0], log[0]
    recorded = reference_build(kind, name)[0]
    assert _plain(_public(dict(ours.config))) == _plain(_public(recorded))
    defaulted = "_use_default_values"  # the keys left to defaults (a set, listed in no set order)
    assert sorted(ours.config.get(defaulted, [])) == sorted(recorded.get(defaulted, []))


# ---------------------------------------------------------------------------------------- spot facts
def _recorded(kind, name, key):
    return reference_build(kind, name)[0][key]


def test_spot_facts():
    assert _recorded("sd1", "unet", "cross_attention_dim") == 768
    assert _recorded("sd1", "unet", "in_channels") == 4
    assert _recorded("sd1-inpaint", "unet", "in_channels") == 9
    assert _recorded("sd2-inpaint", "unet", "in_channels") == 9
    assert _recorded("sdxl-inpaint", "unet", "in_channels") == 9
    assert _recorded("sd1", "scheduler", "skip_prk_steps") is True
    assert _recorded("sd1", "scheduler", "steps_offset") == 1
    assert shipped("sd1")["components"]["scheduler"]["_class_name"] == "PNDMScheduler"
    assert _recorded("sd2", "unet", "cross_attention_dim") == 1024
    assert shipped("sd2")["components"]["scheduler"]["_class_name"] == "DDIMScheduler"
    assert _recorded("sd2", "scheduler", "prediction_type") == "v_prediction"
    assert _recorded("sd2-base", "scheduler", "prediction_type") == "epsilon"
    assert _recorded("sd2-inpaint", "scheduler", "prediction_type") == "epsilon"
    assert _recorded("sd2", "text_encoder", "hidden_size") == 1024
    assert _recorded("sdxl", "unet", "cross_attention_dim") == 2048
    assert _recorded("sdxl", "unet", "projection_class_embeddings_input_dim") == 2816
    assert shipped("sdxl")["components"]["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert _recorded("sdxl-refiner", "unet", "cross_attention_dim") == 1280
    assert _recorded("sdxl-refiner", "unet", "projection_class_embeddings_input_dim") == 2560
    assert shipped("sdxl-refiner")["settings"]["requires_aesthetics_score"] is True
    assert _recorded("sdxl-refiner", "text_encoder_2", "projection_dim") == 1280
    for kind in ("sdxl", "sdxl-refiner", "sdxl-inpaint"):
        assert _recorded(kind, "vae", "scaling_factor") == 0.13025, kind
    for kind in ("sd1", "sd1-inpaint", "sd2", "sd2-base", "sd2-inpaint"):
        assert _recorded(kind, "vae", "scaling_factor") == 0.18215, kind
