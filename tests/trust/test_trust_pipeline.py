"""Trustworthy loading, pipelines (issue 11): hostile or broken ``model_index.json`` files and
component folders end in one of diffpipe's error types naming the component, the file and the cause;
no module a checkpoint names is imported, no code in it runs; NaN/Inf during generation is reported
with the stage that produced it. The pipelines are tiny Stable Diffusion folders written by the
reference (tests/sd_factory.py), built once for the module and copied per test.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import warnings

import pytest
import torch

from diffpipe import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffpipe.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DiffpipeError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsafePathError,
    UnsupportedComponentError,
)
from trust_shared import one_thread, sd_pipeline_folder


@pytest.fixture(scope="module")
def sd_folder():
    return sd_pipeline_folder()


@pytest.fixture
def sd_copy(sd_folder, tmp_path):
    target = tmp_path / "sd"
    shutil.copytree(sd_folder, target)
    return target


def edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


def load_error(folder, expected=DiffpipeError, **kwargs):
    with pytest.raises(expected) as err:
        DiffusionPipeline.from_pretrained(folder, **kwargs)
    return str(err.value)


def run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            **kwargs,
        ).images


# ------------------------------------------------------------- 10. missing or invalid files
@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"{oops", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "holds a JSON list"),
        (b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
        (b'{"_class_name": ' + b"7" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_invalid_model_index_is_a_config_error_naming_it(sd_copy, content, fragment):
    (sd_copy / "model_index.json").write_bytes(content)
    message = load_error(sd_copy, ConfigError)
    assert fragment in message and str(sd_copy) in message and "model_index.json" in message


@pytest.mark.parametrize(
    "path, content, error, fragment",
    [
        ("unet/config.json", None, ConfigError, "unet/config.json"),
        ("vae/config.json", b"{oops", ConfigError, "vae/config.json"),
        ("vae/config.json", b"[]", ConfigError, "vae/config.json"),
        ("text_encoder/config.json", None, ConfigError, "text_encoder/config.json"),
        ("text_encoder/config.json", b"{oops", CheckpointNotFoundError, "text_encoder"),
        ("scheduler/scheduler_config.json", b"\xff\xfe", ConfigError, "scheduler/scheduler_config.json"),
    ],
)
def test_missing_or_invalid_component_config_names_component_and_file(sd_copy, path, content, error, fragment):
    if content is None:
        (sd_copy / path).unlink()
    else:
        (sd_copy / path).write_bytes(content)
    message = load_error(sd_copy, error)
    assert fragment in message and str(sd_copy) in message


def test_a_file_where_a_component_folder_should_be(sd_copy):
    shutil.rmtree(sd_copy / "vae")
    (sd_copy / "vae").write_text("not a folder")
    message = load_error(sd_copy, CheckpointNotFoundError)
    assert "'vae'" in message and "vae/" in message


def test_component_weights_corrupt_names_the_component_file(sd_copy):
    path = sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    message = load_error(sd_copy, CorruptCheckpointError)
    assert "UNet2DConditionModel" in message and "subfolder 'unet'" in message and str(path) in message
    assert "truncated" in message


# ------------------------------------------------------------------ 14. the allow-list, before import
def test_a_library_outside_the_allow_list_is_never_imported(sd_copy, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "evil_component.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    edit_index(sd_copy, unet=["evil_component", "Evil"])
    message = load_error(sd_copy, UnsupportedComponentError)
    assert "'unet'" in message and "evil_component" in message and "never imports" in message
    assert not marker.exists() and "evil_component" not in sys.modules


def test_a_hub_repo_naming_a_foreign_library_is_refused_before_any_download(hub, sd_copy, hf_cache):
    edit_index(sd_copy, vae=["evil_lib", "Backdoor"])
    hub.add_repo("trust/foreign-library", sd_copy)
    message = load_error("trust/foreign-library", UnsupportedComponentError)
    assert "evil_lib" in message and "'vae'" in message
    assert hub.downloads("trust/foreign-library") == ["model_index.json"]  # nothing else was fetched


# ----------------------------------------------------------------- 15. the wrong class for a slot
@pytest.mark.parametrize(
    "slot, entry, files_from",
    [
        ("unet", ["diffusers", "AutoencoderKL"], "vae"),
        ("scheduler", ["diffusers", "UNet2DConditionModel"], "unet"),
        ("tokenizer", ["diffusers", "DDIMScheduler"], "scheduler"),
        ("safety_checker", ["transformers", "CLIPTextModel"], "text_encoder"),
        ("text_encoder", ["transformers", "CLIPTokenizer"], "tokenizer"),
    ],
)
def test_a_component_of_the_wrong_class_for_its_slot_is_refused(sd_copy, slot, entry, files_from):
    shutil.rmtree(sd_copy / slot)
    shutil.copytree(sd_copy / files_from, sd_copy / slot)  # files that load fine as that class
    edit_index(sd_copy, **{slot: entry})
    message = load_error(sd_copy, UnsupportedComponentError)
    assert f"slot {slot!r}" in message and entry[1] in message


def test_a_component_folder_holding_another_class_is_refused(sd_copy):
    shutil.rmtree(sd_copy / "unet")
    shutil.copytree(sd_copy / "vae", sd_copy / "unet")  # model_index.json still says UNet2DConditionModel
    message = load_error(sd_copy, ConfigError)
    assert str(sd_copy / "unet" / "config.json") in message
    assert "describes a AutoencoderKL, not a UNet2DConditionModel" in message


# ------------------------------------------------------------------- 16. names that are paths
@pytest.mark.parametrize(
    "change, error, shown",
    [
        ({"../evil": ["diffusers", "AutoencoderKL"]}, UnsafePathError, "'../evil'"),
        ({"/etc": ["diffusers", "AutoencoderKL"]}, UnsafePathError, "'/etc'"),
        ({"unet/../../x": ["diffusers", "UNet2DConditionModel"]}, UnsafePathError, "'unet/../../x'"),
        ({"_class_name": "../../evil"}, UnsupportedComponentError, "'../../evil'"),
        ({"_class_name": "/abs/Pipeline"}, UnsupportedComponentError, "'/abs/Pipeline'"),
        ({"vae": ["diffusers", "../AutoencoderKL"]}, UnsupportedComponentError, "../AutoencoderKL"),
        ({"vae": ["../diffusers", "AutoencoderKL"]}, UnsupportedComponentError, "'../diffusers'"),
    ],
)
def test_path_like_names_in_model_index_are_refused(sd_copy, change, error, shown):
    edit_index(sd_copy, **change)
    assert shown in load_error(sd_copy, error)


@pytest.mark.parametrize("variant", ["../fp16", "fp16/../../x", "/abs", "a\\b"])
def test_path_like_variant_is_refused_before_reading(sd_folder, variant, monkeypatch):
    import diffpipe.hub

    monkeypatch.setattr(diffpipe.hub, "fetch", lambda *a, **k: pytest.fail("fetched before the check"))
    message = load_error(sd_folder, UnsafePathError, variant=variant)
    assert repr(variant) in message


# ------------------------------------------------------------------------ 18. code never runs
@pytest.fixture
def with_code(sd_copy, tmp_path, monkeypatch):
    """The pipeline folder with Python files that would create a marker file if imported or run."""
    marker = tmp_path / "code-ran"
    payload = f"open({str(marker)!r}, 'w').close()\n"
    (sd_copy / "pipeline.py").write_text(payload + "class MyPipeline: pass\n")
    (sd_copy / "unet" / "my_unet.py").write_text(payload + "class MyUNet: pass\n")
    (sd_copy / "__init__.py").write_text(payload)
    monkeypatch.syspath_prepend(str(sd_copy))
    monkeypatch.syspath_prepend(str(sd_copy / "unet"))
    monkeypatch.chdir(sd_copy)
    return sd_copy, marker


@pytest.mark.parametrize("how", ["index class", "component", "custom_pipeline", "trust_remote_code"])
def test_python_files_in_a_checkpoint_never_run(with_code, how):
    folder, marker = with_code
    kwargs = {}
    if how == "index class":
        edit_index(folder, _class_name=["pipeline", "MyPipeline"])
        assert "custom code is not supported" in load_error(folder, UnsafeCheckpointError)
    elif how == "component":
        edit_index(folder, unet=["my_unet", "MyUNet"])
        assert "never imports" in load_error(folder, UnsupportedComponentError)
    else:
        kwargs = {"custom_pipeline": "pipeline"} if how == "custom_pipeline" else {"trust_remote_code": True}
        assert "never runs code" in load_error(folder, UnsafeCheckpointError, **kwargs)
    assert not marker.exists()
    assert "pipeline" not in sys.modules and "my_unet" not in sys.modules


def test_a_folder_with_python_files_loads_without_running_them(with_code):
    folder, marker = with_code
    assert type(DiffusionPipeline.from_pretrained(folder)) is StableDiffusionPipeline
    assert not marker.exists()


# ------------------------------------------------------- 8, 9, 11, 12 for transformers components
class WritesAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def rewrite_text_encoder(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "text_encoder" / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_text_encoder_missing_keys_are_an_error_unless_allowed(sd_copy, caplog):
    key = "encoder.layers.0.layer_norm1.weight"
    rewrite_text_encoder(sd_copy, lambda t: t.pop(key))
    message = load_error(sd_copy, StateDictMismatchError)
    assert "'text_encoder'" in message and key in message and "allow_missing_keys=True" in message
    with caplog.at_level(logging.WARNING):
        pipe = DiffusionPipeline.from_pretrained(sd_copy, allow_missing_keys=True)
    assert key in caplog.text and "randomly initialised" in caplog.text
    assert not any(p.is_meta for p in pipe.text_encoder.parameters())


def test_text_encoder_unexpected_keys_are_a_warning_listing_them(sd_copy, caplog):
    rewrite_text_encoder(sd_copy, lambda t: t.update({"extra.projection.weight": torch.zeros(2)}))
    with caplog.at_level(logging.WARNING):
        pipe = DiffusionPipeline.from_pretrained(sd_copy)
    assert pipe.text_encoder is not None
    [message] = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("diffpipe") and "extra.projection.weight" in r.getMessage()
    ]
    assert "'text_encoder'" in message and "ignoring 1 key(s)" in message


def test_text_encoder_shape_mismatch_names_parameter_and_both_shapes(sd_copy):
    key = "embeddings.position_embedding.weight"

    def grow(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])

    rewrite_text_encoder(sd_copy, grow)
    message = load_error(sd_copy, StateDictMismatchError)
    assert f"'{key}' checkpoint [78, 32] vs model [77, 32]" in message and "'text_encoder'" in message


def test_text_encoder_pickle_with_a_payload_is_refused_and_never_runs(sd_copy, tmp_path):
    marker = tmp_path / "payload-ran"
    (sd_copy / "text_encoder" / "model.safetensors").unlink()
    torch.save(
        {"embeddings.token_embedding.weight": WritesAFile(marker)}, sd_copy / "text_encoder" / "pytorch_model.bin"
    )
    message = load_error(sd_copy, UnsafeCheckpointError)
    assert "'text_encoder'" in message and "weights_only=True" in message
    assert not marker.exists()


def test_text_encoder_with_both_formats_never_opens_the_pickle(sd_copy, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save(
        {"embeddings.token_embedding.weight": WritesAFile(marker)}, sd_copy / "text_encoder" / "pytorch_model.bin"
    )
    pipe = DiffusionPipeline.from_pretrained(sd_copy)
    assert pipe.text_encoder is not None and not marker.exists()


# ------------------------------------------------------------------ 20, 21. overrides and dtypes
def test_an_override_of_the_wrong_model_class_is_refused(sd_folder):
    vae = AutoencoderKL.from_pretrained(sd_folder, subfolder="vae")
    with pytest.raises(TypeError, match="unet= must be a UNet2DConditionModel or UNetMotionModel, got AutoencoderKL"):
        DiffusionPipeline.from_pretrained(sd_folder, unet=vae)


def test_from_pipe_refuses_a_component_in_the_wrong_slot(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    unet = UNet2DConditionModel.from_pretrained(sd_folder, subfolder="unet")
    with pytest.raises(TypeError, match="vae= must be a AutoencoderKL"):
        StableDiffusionPipeline.from_pipe(pipe, vae=unet)


def test_a_dtype_dict_naming_no_component_is_an_error(sd_folder):
    with pytest.raises(TypeError, match=r"torch_dtype names \['unett'\]"):
        DiffusionPipeline.from_pretrained(sd_folder, torch_dtype={"unett": torch.float16})


# --------------------------------------------------------------- 25. NaN / Inf during generation
def stage_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.endswith("stages") and "NaN or Inf" in r.getMessage()]


def test_an_fp16_vae_overflow_warns_naming_the_vae_and_the_fix(sd_folder, caplog):
    pipe = DiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.vae.to(torch.float16)
    with torch.no_grad():  # activations past float16's 65504: the classic black-image overflow
        pipe.vae.decoder.conv_in.weight.mul_(1e4)
    with caplog.at_level(logging.WARNING):
        run(pipe)
    [message] = stage_warnings(caplog)
    assert "VAE decoding (torch.float16)" in message
    assert "upcast the VAE" in message and "fp16-safe VAE" in message


def test_nan_from_the_unet_warns_naming_the_denoising_loop_once(sd_folder, caplog):
    pipe = DiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with caplog.at_level(logging.WARNING):
        run(pipe)
    [message] = stage_warnings(caplog)  # the decode stage does not repeat it
    assert "the denoising loop (UNet and scheduler)" in message and "verify=True" in message


def test_nan_in_given_latents_is_blamed_on_the_input(sd_folder, caplog):
    pipe = DiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    latents = torch.full((1, 4, 16, 16), float("inf"))
    with caplog.at_level(logging.WARNING):
        run(pipe, latents=latents)
    [message] = stage_warnings(caplog)
    assert "the latents given to the denoising loop" in message


def test_clean_generation_warns_nothing_and_checks_once_per_stage(sd_folder, caplog, monkeypatch):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    real, calls = torch.isfinite, []

    def counting(x):
        if sys._getframe(1).f_globals.get("__name__") == "diffpipe.pipelines.stages":
            calls.append(tuple(x.shape))
        return real(x)

    monkeypatch.setattr(torch, "isfinite", counting)
    with caplog.at_level(logging.WARNING):
        images = run(pipe)
    assert stage_warnings(caplog) == [] and images.std() > 0
    assert len(calls) == 2  # the latents after the loop and the decoded images


# ------------------------------------------------------------------------------ 25. verify=True
def put_nan(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return key


@pytest.mark.parametrize(
    "component, file",
    [
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ],
)
def test_verify_refuses_nan_weights_naming_component_and_tensor(sd_copy, component, file):
    key = put_nan(sd_copy / component / file)
    DiffusionPipeline.from_pretrained(sd_copy)  # NaN is a valid float: only verify looks
    message = load_error(sd_copy, CorruptCheckpointError, verify=True)
    assert key in message and component in message and "NaN or Inf" in message


def test_verify_checks_every_hub_weight_file_against_its_sha256(hub, sd_folder, hf_cache):
    repo = "trust/verify-pipeline"
    hub.add_repo(repo, sd_folder)
    pipe = DiffusionPipeline.from_pretrained(repo, verify=True)
    assert type(pipe) is StableDiffusionPipeline
    cached = next(hf_cache.rglob("snapshots/*/unet/diffusion_pytorch_model.safetensors")).resolve()
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0x10
    cached.write_bytes(bytes(data))
    message = load_error(repo, CorruptCheckpointError, verify=True)
    assert "unet/diffusion_pytorch_model.safetensors" in message and "sha256" in message
