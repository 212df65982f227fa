"""FreeU against the reference in SD, SDXL and AnimateDiff; disable_freeu gives the plain images back
and leaves the UNet as it was."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from adapter_factory import assert_close, images, load_both
from sd_factory import save_reference_adapter, save_reference_pipeline
from sdxl_factory import save_reference_sdxl

FREEU = dict(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
ARGS = dict(prompt="a cat", num_inference_steps=3, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeu")
    return {
        "sd": save_reference_pipeline(root / "sd", safety_checker=False, seed=51),
        "xl": save_reference_sdxl(root / "xl", seed=52),
        "adapter": save_reference_adapter(root / "adapter", seed=53),
    }


@pytest.mark.parametrize("task", ["StableDiffusionPipeline", "StableDiffusionXLPipeline"])
def test_freeu_is_the_reference_s_and_comes_off_again(folders, task):
    ref, ours = load_both(folders["sd" if task == "StableDiffusionPipeline" else "xl"], task)
    plain = images(ours, ARGS)
    processors = {k: type(v) for k, v in ours.unet.attn_processors.items()}
    for pipe in (ref, ours):
        pipe.enable_freeu(**FREEU)
    got = images(ours, ARGS)
    assert_close(images(ref, ARGS), got)
    assert np.abs(got - plain).max() > 0.01  # FreeU changed the image
    ours.disable_freeu()
    np.testing.assert_array_equal(images(ours, ARGS), plain)
    assert all("_diffpipe_hooks" not in m.__dict__ for m in ours.unet.modules())
    assert {k: type(v) for k, v in ours.unet.attn_processors.items()} == processors


def test_freeu_in_animatediff(folders):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd"])
        ref = diffusers.AnimateDiffPipeline.from_pipe(
            sd, motion_adapter=diffusers.MotionAdapter.from_pretrained(folders["adapter"])
        )
    ours = diffpipe.AnimateDiffPipeline.from_pipe(
        diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"]),
        motion_adapter=diffpipe.MotionAdapter.from_pretrained(folders["adapter"]),
    )
    args = dict(prompt="a cat", num_frames=2, num_inference_steps=2, height=32, width=32, output_type="np")
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_freeu(**FREEU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=torch.Generator().manual_seed(0), **args).frames
    got = ours(generator=torch.Generator().manual_seed(0), **args).frames
    assert np.abs(np.asarray(got) - np.asarray(expected)).max() <= 2 / 255


def test_fourier_filter_scales_only_the_centre_of_the_spectrum(folders):
    from diffpipe.models.freeu import fourier_filter

    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fourier_filter(x, threshold=1, scale=1.0), x, rtol=0, atol=1e-5)
    constant = torch.ones(1, 1, 8, 8)  # all of its energy is at the zero frequency, the centre after the shift
    torch.testing.assert_close(fourier_filter(constant, threshold=1, scale=0.5), constant * 0.5, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="s1 must be a number"):
        unet = diffpipe.UNet2DConditionModel.from_pretrained(folders["sd"], subfolder="unet")
        unet.enable_freeu(s1="x", s2=0.2, b1=1.0, b2=1.0)
