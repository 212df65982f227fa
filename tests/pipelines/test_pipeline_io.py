"""DiffusionPipeline loading rules, saving, from_pipe, AutoPipeline and bad input."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from diffpipe import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffpipe.errors import CheckpointNotFoundError, ConfigError, UnsafeCheckpointError, UnsupportedComponentError
from sd_factory import save_reference_pipeline

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("io") / "sd")


@pytest.fixture
def sd_copy(sd_folder, tmp_path):
    target = tmp_path / "sd"
    shutil.copytree(sd_folder, target)
    return target


def images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(
            "a photo of a cat",
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **SIZE,
            **kwargs,
        ).images


def edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


# ------------------------------------------------------------------------------------- saving
def test_a_pipeline_we_save_loads_in_the_reference_with_the_same_images(sd_folder, tmp_path):
    import diffusers

    ours = StableDiffusionPipeline.from_pretrained(sd_folder)
    ours.save_pretrained(tmp_path / "ours")
    ours.save_pretrained(tmp_path / "ours", variant="fp16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours")
        ref_fp16 = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", variant="fp16")
    assert type(ref.safety_checker).__name__ == "StableDiffusionSafetyChecker"
    assert ref_fp16.unet.dtype == torch.float32  # the reference's rule for a variant without torch_dtype
    np.testing.assert_allclose(images(ref), images(ours), atol=2 / 255)
    again = DiffusionPipeline.from_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(images(again), images(ours))


def test_save_is_atomic_when_a_component_fails(sd_copy, monkeypatch):
    pipe = StableDiffusionPipeline.from_pretrained(sd_copy)
    before = {p.relative_to(sd_copy): p.read_bytes() for p in sd_copy.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(pipe.text_encoder), "save_pretrained", fail)
    with pytest.raises(OSError, match="No space"):
        pipe.save_pretrained(sd_copy)
    after = {p.relative_to(sd_copy): p.read_bytes() for p in sd_copy.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in sd_copy.parent.iterdir() if "staging" in p.name]


def test_optional_component_set_to_none_survives_save_and_load(sd_folder, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(
        sd_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    again = DiffusionPipeline.from_pretrained(tmp_path / "p")
    assert again.safety_checker is None and again.config.requires_safety_checker is False


def test_a_required_component_passed_as_none_loads_and_a_call_says_it_is_missing(sd_folder):
    # the reference accepts unet=None (people load the text parts to precompute embeddings), so
    # loading does too; the error comes when a call needs the component
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, unet=None)
    assert pipe.unet is None
    with pytest.raises(ValueError, match="has no unet .*unet=None"):
        pipe("a cat", num_inference_steps=1)


# ------------------------------------------------------------------------------------- loading rules
def test_null_entry_means_absent(sd_copy):
    edit_index(sd_copy, safety_checker=[None, None], feature_extractor=[None, None])
    pipe = DiffusionPipeline.from_pretrained(sd_copy)
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_missing_required_component_is_clear(sd_copy):
    index = json.loads((sd_copy / "model_index.json").read_text())
    del index["unet"]
    (sd_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointNotFoundError, match="needs the component 'unet'"):
        DiffusionPipeline.from_pretrained(sd_copy)


def test_component_folder_missing_is_clear(sd_copy):
    shutil.rmtree(sd_copy / "vae")
    with pytest.raises(CheckpointNotFoundError, match="no files under vae/"):
        DiffusionPipeline.from_pretrained(sd_copy)


@pytest.mark.parametrize(
    "entry, error",
    [
        (["os", "system"], UnsupportedComponentError),
        (["transformers", "AutoModel"], UnsupportedComponentError),
        (["diffusers", "NotAClass"], UnsupportedComponentError),
        (["diffusers"], ConfigError),
    ],
)
def test_model_index_outside_the_allow_list_is_refused(sd_copy, entry, error):
    edit_index(sd_copy, vae=entry)
    with pytest.raises(error) as err:
        DiffusionPipeline.from_pretrained(sd_copy)
    assert "vae" in str(err.value)


def test_unknown_pipeline_class_is_refused(sd_copy):
    edit_index(sd_copy, _class_name="MyEvilPipeline")
    with pytest.raises(UnsupportedComponentError, match="MyEvilPipeline"):
        DiffusionPipeline.from_pretrained(sd_copy)


def test_custom_code_is_never_run(sd_copy):
    (sd_copy / "pipeline.py").write_text("raise SystemExit('ran')\n")
    with pytest.raises(UnsafeCheckpointError, match="never runs code"):
        DiffusionPipeline.from_pretrained(sd_copy, custom_pipeline=str(sd_copy / "pipeline.py"))
    assert type(DiffusionPipeline.from_pretrained(sd_copy)) is StableDiffusionPipeline


def test_no_model_index_is_clear(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="no model_index.json"):
        DiffusionPipeline.from_pretrained(tmp_path / "x")


def test_unknown_keyword_is_an_error(sd_folder):
    with pytest.raises(TypeError, match="text_encoder_3"):
        DiffusionPipeline.from_pretrained(sd_folder, text_encoder_3=None)


def test_torch_dtype_dict_per_component(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder, torch_dtype={"unet": torch.bfloat16, "default": torch.float16})
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    with pytest.raises(TypeError, match="not both"):
        DiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16, dtype=torch.float16)


def test_an_fp16_variant_saved_beside_the_original_keeps_the_configs_of_the_original(sd_folder, tmp_path):
    """transformers writes the saved dtype into config.json; the reference loads transformers models
    with dtype "auto", so a config saying float16 beside fp32 weights would give it an fp16 text
    encoder next to an fp32 UNet. The original's config stays."""
    import diffusers

    out = tmp_path / "both"
    StableDiffusionPipeline.from_pretrained(sd_folder).save_pretrained(out)
    before = (out / "text_encoder" / "config.json").read_bytes()
    StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16).save_pretrained(out, variant="fp16")
    assert (out / "text_encoder" / "model.fp16.safetensors").is_file()
    assert (out / "text_encoder" / "config.json").read_bytes() == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(out)
        ref_fp16 = diffusers.StableDiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert ref.text_encoder.dtype == ref.unet.dtype == torch.float32
    assert ref_fp16.text_encoder.dtype == torch.float16
    np.testing.assert_allclose(images(ref), images(StableDiffusionPipeline.from_pretrained(sd_folder)), atol=2 / 255)

    alone = tmp_path / "fp16-only"  # a variant saved on its own: its config is the only one, it stays
    StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16).save_pretrained(alone, variant="fp16")
    assert "float16" in (alone / "text_encoder" / "config.json").read_text()


def test_partial_variant_falls_back_per_component(sd_copy, caplog):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.UNet2DConditionModel.from_pretrained(sd_copy / "unet").half().save_pretrained(
            sd_copy / "unet", variant="fp16"
        )
    caplog.set_level(logging.WARNING)
    pipe = DiffusionPipeline.from_pretrained(sd_copy, variant="fp16")
    assert pipe.loading_report.files["unet"][-1].endswith("diffusion_pytorch_model.fp16.safetensors")
    assert sorted(pipe.loading_report.variant_fallbacks) == ["safety_checker", "text_encoder", "vae"]
    assert "has no 'fp16' variant" in caplog.text
    with pytest.raises(CheckpointNotFoundError, match="no component has weights of the variant 'bf16'"):
        DiffusionPipeline.from_pretrained(sd_copy, variant="bf16")


def test_half_loaded_tokenizer_is_detected(sd_copy):
    for p in (sd_copy / "tokenizer").iterdir():
        if p.name != "tokenizer_config.json":
            p.unlink()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer .* loaded with only"):
        DiffusionPipeline.from_pretrained(sd_copy)


# ------------------------------------------------------------------------------------- to / device / dtype
def test_to_dtype_device_and_properties(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.to(torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_assigning_a_scheduler_updates_the_config(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    pipe.scheduler = diffpipe.DDIMScheduler.from_config(pipe.scheduler.config)
    assert pipe.config["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert diffpipe.DDIMScheduler in pipe.scheduler.compatibles


# ------------------------------------------------------------------------------------- from_pipe / auto
def test_from_pipe_takes_overrides_and_keeps_dtype(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16)
    ddim = diffpipe.DDIMScheduler.from_config(pipe.scheduler.config)
    other = StableDiffusionInpaintPipeline.from_pipe(pipe, scheduler=ddim, safety_checker=None)
    assert other.scheduler is ddim and other.safety_checker is None and other.unet is pipe.unet
    assert other.unet.dtype == torch.float16
    assert pipe.safety_checker is not None  # the source keeps its own components
    with pytest.raises(TypeError, match="motion_adapter"):
        StableDiffusionPipeline.from_pipe(pipe, motion_adapter=None)


def test_from_pipe_images_equal_a_fresh_load(sd_folder):
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    via_pipe = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    fresh = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    kwargs = dict(image=image, strength=0.6)
    a, b = (
        p.set_progress_bar_config(disable=True)
        or p(
            "a cat", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(3), **kwargs
        ).images
        for p in (via_pipe, fresh)
    )
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "auto, cls",
    [
        (AutoPipelineForText2Image, StableDiffusionPipeline),
        (AutoPipelineForImage2Image, StableDiffusionImg2ImgPipeline),
        (AutoPipelineForInpainting, StableDiffusionInpaintPipeline),
    ],
)
def test_auto_pipelines(sd_folder, auto, cls):
    assert type(auto.from_pretrained(sd_folder)) is cls
    base = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    switched = auto.from_pipe(base)
    assert type(switched) is cls and switched.unet is base.unet
    with pytest.raises(TypeError, match="from_pretrained"):
        auto()


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt="a", height=31, width=32), "divisible by 2"),
        (dict(prompt="a", prompt_embeds=torch.zeros(1, 77, 32)), "either prompt= or prompt_embeds="),
        (dict(), "pass prompt="),
        (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 entries"),
        (dict(prompt="a", generator=[torch.Generator()] * 2), "2 generators for 1 images"),
        (dict(prompt="a", output_type="jpeg"), "output_type"),
        (dict(prompt=3), "prompt must be a string"),
        (dict(prompt="a", num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt="a", callback_on_step_end_tensor_inputs=["unet"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_text_to_image_input_fails_before_any_model_runs(sd_folder, kwargs, message, monkeypatch):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=1.5), "strength must be between 0 and 1"),
        (dict(strength=-0.1), "strength must be between 0 and 1"),
        (dict(image="not an image"), "must be a PIL.Image"),
        (dict(image=None), "needs image="),
    ],
)
def test_bad_image_to_image_input(sd_folder, kwargs, message, monkeypatch):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    args = dict(prompt="a", image=PIL.Image.new("RGB", (32, 32)))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(**args)


def test_load_image_errors(tmp_path):
    from diffpipe.images import ImageLoadError, load_image

    with pytest.raises(ImageLoadError, match="no image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ImageLoadError, match="could not download"):
        load_image("http://127.0.0.1:9/nothing.png", timeout=2)
    PIL.Image.new("RGBA", (4, 4)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").mode == "RGB"


def test_saving_logs_where_each_component_went(tmp_path, caplog):
    """As the reference's saves do (at INFO): every config and weight file, at its final path."""
    import logging

    import diffpipe
    from sd_factory import save_reference_pipeline

    folder = save_reference_pipeline(tmp_path / "sd", safety_checker=False, seed=9)
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    caplog.set_level(logging.INFO, logger="diffpipe")
    out = tmp_path / "out"
    pipe.save_pretrained(out, variant="fp16")
    text = caplog.text
    for rel in ("unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"):
        assert f"Model weights saved in {out / rel}" in text
    for rel in ("unet/config.json", "scheduler/scheduler_config.json", "model_index.json"):
        assert f"Configuration saved in {out / rel}" in text
    assert f"{out / 'text_encoder'}" in text and ".staging" not in text
