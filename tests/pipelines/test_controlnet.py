"""ControlNet pipelines against the reference: SD text-to-image, image-to-image and inpainting, SDXL
text-to-image, one ControlNet and several, guidance windows, guess mode; from_pipe shares everything
but the ControlNet; AutoPipeline; bad input refused before any model runs.

The ControlNets are built by the reference from the tiny UNets (``from_unet``) with their zero-initialised
output convolutions re-drawn (a fresh ControlNet adds nothing), saved, and loaded by each library."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from diffpipe.pipelines.pipeline import memory_footprint
from sd_factory import save_reference_pipeline
from sdxl_factory import TOL, an_image, assert_close, save_reference_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2
IMAGE = an_image(40, 48)


def reference_controlnet(unet, folder, seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.normal_(0.0, 0.3)
    net.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=21)
    xl = save_reference_sdxl(root / "xl", seed=4)
    sd_unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    xl_unet = diffusers.UNet2DConditionModel.from_pretrained(xl, subfolder="unet")
    return {
        "sd": sd,
        "xl": xl,
        "cn": reference_controlnet(sd_unet, root / "cn", 1),
        "cn2": reference_controlnet(sd_unet, root / "cn2", 2),
        "cn_xl": reference_controlnet(xl_unet, root / "cn_xl", 3),
    }


def pipes(folders, task: str, nets=("cn",), base="sd"):
    """(the reference's, ours): ``task`` from_pipe of the base pipeline with these ControlNets."""
    out = []
    for lib in (diffusers, diffpipe):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls = lib.StableDiffusionXLPipeline if base == "xl" else lib.StableDiffusionPipeline
            extra = {"add_watermarker": False} if base == "xl" and lib is diffusers else {}
            source = cls.from_pretrained(folders[base], **extra)
            loaded = [lib.ControlNetModel.from_pretrained(folders[n]) for n in nets]
            pipe = getattr(lib, task).from_pipe(source, controlnet=loaded[0] if len(loaded) == 1 else loaded)
        pipe.set_progress_bar_config(disable=True)
        out.append(pipe)
    return out


def run_both(ref, ours, **kwargs):
    results = []
    for pipe in (ref, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results.append(pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images)
    return results


TEXT = dict(prompt="a blue cat", num_inference_steps=3)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"guess_mode": True},
        {"control_guidance_start": 0.3, "control_guidance_end": 0.7, "controlnet_conditioning_scale": 0.6},
        {"guidance_scale": 1.0},
        {"height": 32, "width": 32},
        {"prompt": ["a blue cat", "a red dog"], "num_images_per_prompt": 2},
    ],
    ids=["plain", "guess", "window", "no-cfg", "resized", "batch"],
)
def test_sd_text_to_image(folders, options):
    ref, ours = pipes(folders, "StableDiffusionControlNetPipeline")
    expected, got = run_both(ref, ours, image=IMAGE, **{**TEXT, **options})
    assert got.shape[1:3] == ((32, 32) if "height" in options else (40, 48))
    assert_close(expected, got, TOL)


def test_sd_one_conditioning_image_per_prompt(folders):
    ref, ours = pipes(folders, "StableDiffusionControlNetPipeline")
    images = [an_image(32, 32, seed=1), an_image(32, 32, seed=2)]
    assert_close(*run_both(ref, ours, image=images, **{**TEXT, "prompt": ["a cat", "a dog"]}), TOL)


def test_multi_controlnet_with_per_net_scales_and_windows(folders):
    ref, ours = pipes(folders, "StableDiffusionControlNetPipeline", nets=("cn", "cn2"))
    assert type(ours.controlnet).__name__ == "MultiControlNetModel"
    args = dict(
        image=[IMAGE, an_image(40, 48, seed=7)],
        controlnet_conditioning_scale=[0.5, 1.2],
        control_guidance_start=[0.0, 0.4],
        control_guidance_end=[0.6, 1.0],
        **TEXT,
    )
    assert_close(*run_both(ref, ours, **args), TOL)


def test_sd_image_to_image_and_inpainting(folders):
    ref, ours = pipes(folders, "StableDiffusionControlNetImg2ImgPipeline")
    args = dict(image=IMAGE, control_image=an_image(40, 48, seed=5), strength=0.7, **TEXT)
    assert_close(*run_both(ref, ours, **args), TOL)
    ref, ours = pipes(folders, "StableDiffusionControlNetInpaintPipeline")
    mask = an_image(40, 48, seed=9)
    args = dict(image=IMAGE, mask_image=mask, control_image=an_image(40, 48, seed=5), **TEXT)
    expected, got = run_both(ref, ours, **args)
    assert got.shape[1:3] == (40, 48)
    assert_close(expected, got, TOL)


@pytest.mark.parametrize("options", [{}, {"guess_mode": True}, {"control_guidance_end": 0.5}])
def test_sdxl_text_to_image(folders, options):
    ref, ours = pipes(folders, "StableDiffusionXLControlNetPipeline", nets=("cn_xl",), base="xl")
    assert_close(*run_both(ref, ours, image=IMAGE, **TEXT, **options), TOL)


def test_sdxl_multi_controlnet(folders):
    ref, ours = pipes(folders, "StableDiffusionXLControlNetPipeline", nets=("cn_xl", "cn_xl"), base="xl")
    args = dict(image=[IMAGE, an_image(40, 48, seed=3)], controlnet_conditioning_scale=[0.7, 0.4], **TEXT)
    assert_close(*run_both(ref, ours, **args), TOL)


def test_from_pipe_adds_only_the_controlnet_s_bytes_and_leaves_the_source_as_it_was(folders):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    sd.set_progress_bar_config(disable=True)
    before = sd(**TEXT, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    net = diffpipe.ControlNetModel.from_pretrained(folders["cn"])
    cn = diffpipe.StableDiffusionControlNetPipeline.from_pipe(sd, controlnet=net)
    net_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    assert memory_footprint(sd, cn)["total"] == memory_footprint(sd)["total"] + net_bytes
    assert cn.unet is sd.unet and cn.vae is sd.vae and cn.text_encoder is sd.text_encoder
    cn.set_progress_bar_config(disable=True)
    cn(**TEXT, image=IMAGE, output_type="np")
    after = sd(**TEXT, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(before, after)


def test_auto_pipelines_pick_the_controlnet_variant(folders, tmp_path):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    net = diffpipe.ControlNetModel.from_pretrained(folders["cn"])
    text = diffpipe.AutoPipelineForText2Image.from_pipe(sd, controlnet=net)
    assert type(text).__name__ == "StableDiffusionControlNetPipeline" and text.controlnet is net
    assert (
        type(diffpipe.AutoPipelineForImage2Image.from_pipe(text)).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    )
    assert (
        type(diffpipe.AutoPipelineForInpainting.from_pipe(text)).__name__ == "StableDiffusionControlNetInpaintPipeline"
    )
    plain = diffpipe.AutoPipelineForText2Image.from_pipe(text, controlnet=None)
    assert type(plain).__name__ == "StableDiffusionPipeline"
    loaded = diffpipe.AutoPipelineForText2Image.from_pretrained(folders["sd"], controlnet=net)
    assert type(loaded).__name__ == "StableDiffusionControlNetPipeline"
    # a saved ControlNet pipeline loads in the reference, with the same images
    text.save_pretrained(tmp_path / "cn-pipe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "cn-pipe")
    ref.set_progress_bar_config(disable=True)
    text.set_progress_bar_config(disable=True)
    assert_close(*run_both(ref, text, image=IMAGE, **TEXT), TOL)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(image=[IMAGE] * 3, prompt=["a", "b"]), "3 images for 2 prompt"),
        (dict(image=None), "needs the conditioning image"),
        (dict(control_guidance_start=0.8, control_guidance_end=0.5), "control_guidance_start"),
        (dict(controlnet_conditioning_scale=[0.5, 0.5]), "2 scales for 1 ControlNet"),
    ],
)
def test_bad_input_is_refused_before_any_model_runs(folders, call, message, monkeypatch):
    _, ours = pipes(folders, "StableDiffusionControlNetPipeline")
    monkeypatch.setattr(ours.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    args = {**TEXT, "image": IMAGE, **call}
    with pytest.raises((ValueError, TypeError), match=message):
        ours(**args)


def test_multi_controlnet_needs_a_list_and_a_controlnet_of_another_family_is_refused(folders):
    _, ours = pipes(folders, "StableDiffusionControlNetPipeline", nets=("cn", "cn2"))
    with pytest.raises(TypeError, match="2 ControlNets take a list of 2"):
        ours(**TEXT, image=IMAGE)
    xl = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"])
    wrong = diffpipe.StableDiffusionXLControlNetPipeline.from_pipe(
        xl, controlnet=diffpipe.ControlNetModel.from_pretrained(folders["cn"])
    )
    with pytest.raises(ValueError, match="made for another model family"):
        wrong(**TEXT, image=IMAGE)


def test_image_to_image_with_images_of_different_sizes_says_what_to_do(folders):
    _, ours = pipes(folders, "StableDiffusionControlNetImg2ImgPipeline")
    with pytest.raises(ValueError, match="pass height= and width="):
        ours(**TEXT, image=IMAGE, control_image=an_image(32, 32))
    out = ours(**TEXT, image=IMAGE, control_image=an_image(32, 32), height=32, width=32, output_type="np")
    assert out.images.shape[1:3] == (32, 32)
