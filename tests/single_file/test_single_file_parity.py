"""diffpipe's ``from_single_file`` against the reference's, on files written by the test's own
converter (tests/single_file_factory.py, judged by the reference in test_factory.py) from tiny
reference-built pipelines of every kind: the same weights as the folder, images within 2/255 of the
reference's single-file load and of the folder load, offline; and the reverse (``save_single_file``)
gives the converter's file, so folder -> single file -> folder is lossless."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from sdxl_factory import TOL, an_image, assert_close
from single_file_factory import KINDS, PIPELINES, config_folder, save_reference_kind, to_original_state_dict
from single_file_factory import write_single_file
from test_factory import assert_same_weights, load_reference, run


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """kind -> (the reference-built folder, its weightless copy for config=, the single file)."""
    root = tmp_path_factory.mktemp("single-file-parity")
    out = {}
    for i, kind in enumerate(KINDS):
        folder = save_reference_kind(kind, root / kind, seed=10 + i)
        published = dict(position_ids=kind.startswith("sd1"), logit_scale=not kind.startswith("sd1"))
        path = write_single_file(folder, root / f"{kind}.safetensors", kind, **published)
        out[kind] = (folder, config_folder(folder, root / f"{kind}-configs"), path)
    return out


def load_ours(kind, configs, path, cls=None, **kwargs):
    cls = cls or getattr(diffpipe, PIPELINES[kind])
    pipe = cls.from_single_file(path, config=str(configs), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_ours_folder(kind, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffpipe, PIPELINES[kind]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", KINDS)
def test_single_file_loads_like_the_reference_and_the_folder(kinds, kind, monkeypatch, tmp_path):
    folder, configs, path = kinds[kind]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network, no cache: config= is a local folder
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    ours = load_ours(kind, configs, path)
    from_folder = load_ours_folder(kind, folder)
    assert assert_same_weights(from_folder, ours) > 100
    reference = load_reference(kind, configs, path)
    expected = run(reference, kind)
    got = run(ours, kind)
    assert_close(expected, got, TOL)
    assert_close(run(from_folder, kind), got, TOL)
    assert ours.single_file_detection.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_diffusion_pipeline_picks_the_class_from_the_file(kinds, kind):
    folder, configs, path = kinds[kind]
    pipe = diffpipe.DiffusionPipeline.from_single_file(path, config=str(configs))
    assert type(pipe).__name__ == PIPELINES[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_save_single_file_writes_the_converter_s_file_and_round_trips(kinds, kind, tmp_path):
    """Our reverse tables give the independent converter's names and tensors (SD 2.x: without the
    tower's unused last resblock and projection, which a diffusers pipeline does not hold), and the
    file loads back to the folder's weights; saved as a folder again, nothing changed."""
    folder, configs, _ = kinds[kind]
    pipe = load_ours_folder(kind, folder)
    path = pipe.save_single_file(tmp_path / "ours.safetensors")
    ours = load_file(str(path))
    expected = {k: v for k, v in to_original_state_dict(folder, kind, open_clip_extra_layers=0).items()}
    if kind == "sd2":
        expected.pop("cond_stage_model.model.text_projection")
    assert sorted(ours) == sorted(expected)
    unequal = [k for k in expected if not torch.equal(ours[k], expected[k])]
    assert not unequal, unequal[:5]
    back = load_ours(kind, configs, path)
    back.save_pretrained(tmp_path / "folder")
    again = load_ours_folder(kind, tmp_path / "folder")
    assert_same_weights(load_ours_folder(kind, folder), again)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_lone_unet_and_vae_from_a_whole_file(kinds, kind):
    folder, configs, path = kinds[kind]
    from_folder = load_ours_folder(kind, folder)
    for cls, name in ((diffpipe.UNet2DConditionModel, "unet"), (diffpipe.AutoencoderKL, "vae")):
        model = cls.from_single_file(path, config=str(configs), subfolder=name)
        want, have = from_folder.components[name].state_dict(), model.state_dict()
        assert set(have) == set(want) and all(torch.equal(want[k], have[k]) for k in want), name


def test_torch_dtype_casts_while_reading(kinds):
    folder, configs, path = kinds["sdxl"]
    pipe = load_ours("sdxl", configs, path, torch_dtype=torch.float16)
    dtypes = {
        p.dtype
        for name in ("unet", "vae", "text_encoder", "text_encoder_2")
        for p in pipe.components[name].parameters()
    }
    assert dtypes == {torch.float16}
    want = load_ours_folder("sdxl", folder).unet.state_dict()
    have = pipe.unet.state_dict()
    assert all(torch.equal(want[k].half(), have[k]) for k in want)


def test_prediction_type_and_original_config_override_the_scheduler(kinds, tmp_path):
    _, configs, path = kinds["sd2"]
    assert load_ours("sd2", configs, path).scheduler.config.prediction_type == "v_prediction"
    assert load_ours("sd2", configs, path, prediction_type="epsilon").scheduler.config.prediction_type == "epsilon"
    yaml = tmp_path / "v2-inference.yaml"
    yaml.write_text("model:\n  params:\n    parameterization: v\n    scale_factor: 0.18215\n")
    _, configs1, path1 = kinds["sd1"]
    pipe = load_ours("sd1", configs1, path1, original_config=str(yaml))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_component_overrides_are_used_as_given(kinds):
    folder, configs, path = kinds["sd1"]
    vae = diffpipe.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    scheduler = diffpipe.DDIMScheduler()
    pipe = load_ours("sd1", configs, path, vae=vae, scheduler=scheduler)
    assert pipe.vae is vae and pipe.scheduler is scheduler


@pytest.mark.parametrize(
    ("kind", "task"),
    [
        ("sd1", "StableDiffusionImg2ImgPipeline"),
        ("sdxl", "StableDiffusionXLImg2ImgPipeline"),
        ("sd1", "StableDiffusionInpaintPipeline"),
    ],
)
def test_other_tasks_load_from_the_same_file_and_match_the_reference(kinds, kind, task):
    _, configs, path = kinds[kind]
    ours = getattr(diffpipe, task).from_single_file(path, config=str(configs))
    ours.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = getattr(diffusers, task).from_single_file(str(path), config=str(configs), local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat", image=an_image(32, 32), strength=0.6, num_inference_steps=3, output_type="np")
    if "Inpaint" in task:
        args["mask_image"] = an_image(32, 32, seed=4)
    expected = reference(generator=torch.Generator().manual_seed(0), **args).images
    got = ours(generator=torch.Generator().manual_seed(0), **args).images
    assert type(ours).__name__ == task
    assert_close(expected, got, TOL)


def test_image_size_sets_the_unet_sample_size(kinds):
    _, configs, path = kinds["sd1"]
    pipe = load_ours("sd1", configs, path, image_size=64)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
