"""The reference's deprecated ``callback=`` / ``callback_steps=`` (taken through its pipelines'
``**kwargs``): called at the same steps with the same values and the same FutureWarning as the
reference's; any other unknown argument is refused by name (the reference drops it silently)."""

from __future__ import annotations

import warnings

import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from sd_factory import save_reference_adapter, save_reference_pipeline
from sdxl_factory import an_image, save_reference_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2
IMAGE, MASK = an_image(32, 32), an_image(32, 32, seed=1)
TASKS = {  # pipeline -> (base folder, extra call arguments)
    "StableDiffusionPipeline": ("sd", {}),
    "StableDiffusionImg2ImgPipeline": ("sd", {"image": IMAGE, "strength": 0.7}),
    "StableDiffusionInpaintPipeline": ("sd", {"image": IMAGE, "mask_image": MASK, "strength": 0.7}),
    "StableDiffusionXLPipeline": ("sdxl", {}),
    "StableDiffusionXLImg2ImgPipeline": ("sdxl", {"image": IMAGE, "strength": 0.7}),
    "StableDiffusionXLInpaintPipeline": ("sdxl", {"image": IMAGE, "mask_image": MASK, "strength": 0.7}),
    "AnimateDiffPipeline": ("sd", {"num_frames": 2}),
    "StableDiffusionSAGPipeline": ("sd", {}),  # callback= is a named argument of the reference's SAG
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy_callback")
    return {
        "sd": save_reference_pipeline(root / "sd", safety_checker=False, seed=3),
        "sdxl": save_reference_sdxl(root / "sdxl"),
        "adapter": save_reference_adapter(root / "adapter"),
    }


def pipeline(lib, name: str, folders):
    base_name, _ = TASKS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if base_name == "sd":
            base = lib.StableDiffusionPipeline.from_pretrained(folders["sd"])
        else:
            extra = {"add_watermarker": False} if lib is diffusers else {}
            base = lib.StableDiffusionXLPipeline.from_pretrained(folders["sdxl"], **extra)
        if name == "AnimateDiffPipeline":
            adapter = lib.MotionAdapter.from_pretrained(folders["adapter"])
            pipe = lib.AnimateDiffPipeline.from_pipe(base, motion_adapter=adapter)
        else:
            pipe = getattr(lib, name).from_pipe(base) if type(base).__name__ != name else base
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, name, **kwargs):
    """(the calls the pipeline made, in order, and the FutureWarnings it gave)."""
    calls = []

    def legacy(step, t, latents):
        calls.append(("callback", step, int(t), latents.clone()))

    def on_step_end(pipe, i, t, tensors):  # changes the latents: the legacy callback must see the change
        calls.append(("callback_on_step_end", i, int(t), None))
        return {"latents": tensors["latents"] * 0.9}

    if name != "StableDiffusionSAGPipeline":  # the reference's SAG has no callback_on_step_end
        kwargs["callback_on_step_end"] = on_step_end
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(
            "a cat",
            num_inference_steps=3,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            callback=legacy,
            **TASKS[name][1],
            **kwargs,
        )
    return calls, sorted(str(w.message) for w in caught if w.category is FutureWarning)


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("every", [1, 2])
def test_legacy_callback_runs_as_the_reference_s(folders, name, every):
    expected, expected_warnings = run(pipeline(diffusers, name, folders), name, callback_steps=every)
    got, got_warnings = run(pipeline(diffpipe, name, folders), name, callback_steps=every)
    assert [c[:3] for c in got] == [c[:3] for c in expected]
    assert any(c[0] == "callback" for c in got)
    for ours, ref in zip(got, expected):
        if ours[3] is not None:
            torch.testing.assert_close(ours[3], ref[3], atol=1e-4, rtol=0)
    # the first sentence, which log filters match (the rest varies in the reference: "consider use")
    assert [w.split(".")[0] for w in got_warnings] == [w.split(".")[0] for w in expected_warnings]
    assert all("`callback_on_step_end`" in w for w in expected_warnings + got_warnings)
    if name != "StableDiffusionSAGPipeline":
        assert len(got_warnings) == 2 and "consider using `callback_on_step_end`" in got_warnings[0]


def test_callback_without_callback_steps_runs_every_step(folders):
    """The reference crashes (``i % None``) when callback= comes without callback_steps=; the old
    signature's default was 1, which is what such code expects."""
    name = "StableDiffusionPipeline"
    expected, _ = run(pipeline(diffusers, name, folders), name, callback_steps=1)
    got, _ = run(pipeline(diffpipe, name, folders), name)
    assert [c[:3] for c in got] == [c[:3] for c in expected]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_callback_steps_refused_before_any_step(folders, bad):
    pipe = pipeline(diffpipe, "StableDiffusionPipeline", folders)
    with pytest.raises(ValueError, match="callback_steps must be a positive integer"):
        run(pipe, "StableDiffusionPipeline", callback_steps=bad)


@pytest.mark.parametrize("name", ["StableDiffusionPipeline", "StableDiffusionXLPipeline", "AnimateDiffPipeline"])
def test_unknown_argument_is_refused_by_name(folders, name):
    pipe = pipeline(diffpipe, name, folders)
    with pytest.raises(TypeError, match="unexpected keyword argument 'guidance_scal'; did you mean 'guidance_scale'"):
        pipe("a cat", num_inference_steps=1, guidance_scal=3.0)
    with pytest.raises(TypeError, match=rf"{name}.__call__\(\) got an unexpected keyword argument 'zzz'"):
        pipe("a cat", num_inference_steps=1, zzz=1)


def test_legacy_callback_through_the_text_pipeline_s_image_route(folders):
    """StableDiffusionPipeline given image= runs image-to-image; the legacy callback goes along."""
    routed, _ = run(pipeline(diffpipe, "StableDiffusionPipeline", folders), "StableDiffusionImg2ImgPipeline")
    direct, _ = run(pipeline(diffpipe, "StableDiffusionImg2ImgPipeline", folders), "StableDiffusionImg2ImgPipeline")
    assert [c[:3] for c in routed] == [c[:3] for c in direct]
    for a, b in zip(routed, direct):
        if a[3] is not None:
            torch.testing.assert_close(a[3], b[3], atol=0, rtol=0)
