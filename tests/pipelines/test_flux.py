"""Flux.1 pipelines against the reference, on tiny dev and schnell pipelines the reference built and
saved (tests/flux_factory.py): text-to-image, image-to-image and inpainting, with and without true CFG,
batches, latents out, from_pipe between the three, AutoPipeline and DiffusionPipeline detection, LoRA in
the diffusers/peft, kohya and BFL-original layouts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from diffpipe.pipelines.pipeline import memory_footprint
from flux_factory import save_reference_flux
from sdxl_factory import TOL, an_image, assert_close

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2
IMAGE, MASK = an_image(40, 48), an_image(40, 48, seed=3)
ARGS = dict(prompt="a blue cat", num_inference_steps=3, height=32, width=48, max_sequence_length=16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    return {
        "dev": save_reference_flux(root / "dev"),
        "schnell": save_reference_flux(root / "schnell", dev=False, seed=1),
    }


def load_both(folder, task: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
    ours = getattr(diffpipe, task).from_pretrained(folder)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    return ref, ours


def run_both(ref, ours, **kwargs):
    out = []
    for pipe in (ref, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out.append(np.asarray(pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images))
    return out


TASKS = {
    "FluxPipeline": {},
    "FluxImg2ImgPipeline": {"image": IMAGE, "strength": 0.7},
    "FluxInpaintPipeline": {"image": IMAGE, "mask_image": MASK, "strength": 0.9},
}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded-guidance", "true-cfg"])
def test_images_match_the_reference(folders, task, kind, true_cfg):
    ref, ours = load_both(folders[kind], task)
    extra = {"negative_prompt": "a red dog", "true_cfg_scale": 2.5} if true_cfg else {}
    expected, got = run_both(ref, ours, **ARGS, **TASKS[task], **extra)
    assert got.shape == (1, 32, 48, 3)
    assert_close(expected, got, TOL)


def test_batches_prompt_embeds_and_latents_out(folders):
    ref, ours = load_both(folders["dev"], "FluxPipeline")
    args = {**ARGS, "prompt": ["a blue cat", "a red dog"], "num_images_per_prompt": 2, "guidance_scale": 5.0}
    assert_close(*run_both(ref, ours, **args), TOL)
    embeds, pooled, _ = ours.encode_prompt("a blue cat", max_sequence_length=16)
    expected = ref.encode_prompt("a blue cat", prompt_2=None, max_sequence_length=16)
    torch.testing.assert_close(embeds, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected[1], atol=1e-5, rtol=0)
    args = {k: v for k, v in ARGS.items() if k != "prompt"}
    given = run_both(ref, ours, prompt_embeds=embeds, pooled_prompt_embeds=pooled, **args)
    assert_close(*given, TOL)
    latents = [
        pipe(generator=torch.Generator().manual_seed(0), output_type="latent", **ARGS).images for pipe in (ref, ours)
    ]
    assert latents[1].shape == (1, 96, 16)  # (32/4) * (48/4) tokens (VAE factor 2, 2x2 packing) of 4 x 4 channels
    torch.testing.assert_close(latents[1], latents[0], atol=1e-4, rtol=0)


def test_from_pipe_between_the_three_shares_everything(folders):
    ours = diffpipe.FluxPipeline.from_pretrained(folders["dev"])
    img2img = diffpipe.FluxImg2ImgPipeline.from_pipe(ours)
    inpaint = diffpipe.AutoPipelineForInpainting.from_pipe(img2img)
    assert type(inpaint).__name__ == "FluxInpaintPipeline"
    assert img2img.transformer is ours.transformer and inpaint.text_encoder_2 is ours.text_encoder_2
    assert memory_footprint(ours, img2img, inpaint)["total"] == memory_footprint(ours)["total"]
    assert type(diffpipe.DiffusionPipeline.from_pretrained(folders["schnell"])).__name__ == "FluxPipeline"
    assert type(diffpipe.AutoPipelineForImage2Image.from_pretrained(folders["dev"])).__name__ == "FluxImg2ImgPipeline"


def test_a_saved_pipeline_loads_in_the_reference(folders, tmp_path):
    ours = diffpipe.FluxPipeline.from_pretrained(folders["dev"])
    ours.save_pretrained(tmp_path / "flux")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.FluxPipeline.from_pretrained(tmp_path / "flux")
    ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    assert_close(*run_both(ref, ours, **ARGS), TOL)


def test_bad_input_is_refused_before_the_transformer_runs(folders, monkeypatch):
    _, ours = load_both(folders["dev"], "FluxPipeline")
    monkeypatch.setattr(ours.transformer, "forward", lambda *a, **k: pytest.fail("the transformer ran"))
    for bad, message in (
        ({"max_sequence_length": 1024}, "max_sequence_length"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 16, 32)}, "pooled_prompt_embeds"),
        ({"output_type": "jpeg"}, "output_type"),
    ):
        with pytest.raises(ValueError, match=message):
            ours(**{**ARGS, **bad})
