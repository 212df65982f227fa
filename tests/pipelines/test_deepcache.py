"""DeepCache (pipe.enable_deepcache) against the DeepCache package's DeepCacheSDHelper on the reference's
pipelines, on tiny pipelines with three down/up blocks so that the branch id matters.

The expected images come from the reference pipeline with ``DeepCacheSDHelper`` at the same interval
and branch; the bound is 2/255 (max abs difference, output_type="np"). SAG is the exception: the
helper fails on the reference's SAG pipeline (it keeps one cache for SAG's two UNet calls per step,
of different batch sizes), so there the tests check that interval 1 is the plain image and that at
interval 3 the deep blocks run on every third step only.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from sd_factory import reference_components, save_reference_adapter
from sdxl_factory import an_image, assert_close, save_reference_sdxl, tiny_unet_config

SIZE = dict(height=32, width=32)
THREE_BLOCKS = dict(
    block_out_channels=(8, 16, 16),
    layers_per_block=1,
    sample_size=16,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=4,
    attention_head_dim=4,
)


def save_sd(folder, *, task="StableDiffusionPipeline", in_channels=4, seed=0):
    """A tiny SD pipeline of the reference (PNDM, whose repeated timestep DeepCache counts once) with
    a three-block UNet."""
    import diffusers

    components = reference_components(seed=seed, safety_checker=False, tmp=folder.parent)
    torch.manual_seed(seed + 100)
    components["unet"] = diffusers.UNet2DConditionModel(in_channels=in_channels, **THREE_BLOCKS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(diffusers, task)(**components, requires_safety_checker=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepcache")
    xl_unet = dict(  # two layers a block: a skip step may start at an up block's second or third layer
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 1, 1),
    )
    assert set(xl_unet) <= set(tiny_unet_config())
    return {
        "sd": save_sd(root / "sd", seed=61),
        "inpaint": save_sd(root / "inpaint", task="StableDiffusionInpaintPipeline", in_channels=9, seed=62),
        "xl": save_reference_sdxl(root / "xl", seed=63, unet_kwargs=xl_unet),
        "adapter": save_reference_adapter(root / "adapter", seed=64, block_out_channels=(8, 16, 16)),
    }


def load_both(folder, task):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
    ours = getattr(diffpipe, task).from_pretrained(folder)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    return ref, ours


def run(pipe, args, attribute="images"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(getattr(pipe(generator=torch.Generator().manual_seed(0), **args), attribute))


def reference_with_deepcache(ref, args, interval, branch, attribute="images"):
    """The reference's output with the DeepCache package's helper on (a missing package fails the test)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        return run(ref, args, attribute)
    finally:
        helper.disable()


def check_parity(ref, ours, args, interval, branch, attribute="images"):
    """Ours with DeepCache against the reference with the helper; returns (ours cached, ours plain)."""
    plain = run(ours, args, attribute)
    ours.enable_deepcache(cache_interval=interval, cache_branch_id=branch)
    got = run(ours, args, attribute)
    assert_close(reference_with_deepcache(ref, args, interval, branch, attribute), got)
    assert np.abs(got - plain).max() > 1e-3  # the cache changed the image: the parity says something
    return got, plain


@pytest.mark.parametrize("interval, branch", [(3, 0), (2, 1), (2, 3), (3, 7)])
def test_text_to_image_matches_the_helper(folders, interval, branch):
    ref, ours = load_both(folders["sd"], "StableDiffusionPipeline")
    args = dict(prompt="a cat", num_inference_steps=7, output_type="np", **SIZE)
    got, plain = check_parity(ref, ours, args, interval, branch)
    np.testing.assert_array_equal(run(ours, args), got)  # the step count starts again at each call
    ours.disable_deepcache()
    np.testing.assert_array_equal(run(ours, args), plain)
    assert all("_diffpipe_hooks" not in m.__dict__ for m in ours.unet.modules())


def test_img2img_starting_past_step_zero_matches_the_helper(folders):
    ref, ours = load_both(folders["sd"], "StableDiffusionImg2ImgPipeline")
    args = dict(prompt="a dog", image=an_image(32, 32), strength=0.5, num_inference_steps=10, output_type="np")
    check_parity(ref, ours, args, 3, 1)
    # the next call counts from its own first step, not from the first call's
    args["strength"] = 0.7
    assert_close(reference_with_deepcache(ref, args, 3, 1), run(ours, args))


def test_inpaint_matches_the_helper(folders):
    ref, ours = load_both(folders["inpaint"], "StableDiffusionInpaintPipeline")
    mask = an_image(32, 32, seed=1).convert("L")
    args = dict(prompt="a dog", image=an_image(32, 32), mask_image=mask, num_inference_steps=5, output_type="np")
    check_parity(ref, ours, args, 3, 3)


@pytest.mark.parametrize("branch", [0, 1])
def test_sdxl_matches_the_helper(folders, branch):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline")
    args = dict(prompt="a cat", num_inference_steps=5, output_type="np", **SIZE)
    check_parity(ref, ours, args, 2, branch)


def test_animatediff_matches_the_helper(folders):
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
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat", num_frames=2, num_inference_steps=4, output_type="np", **SIZE)
    check_parity(ref, ours, args, 3, 3, attribute="frames")


def count_full_steps(pipe, args):
    """Per step of the loop: how often the mid block ran, and how often the UNet did."""
    runs, steps = [], []
    handles = [
        pipe.unet.mid_block.register_forward_pre_hook(lambda m, a: runs.append("mid")),
        pipe.unet.register_forward_pre_hook(lambda m, a: runs.append("unet")),
    ]

    def at_step_end(pipe, i, t, tensors):
        steps.append((runs.count("mid"), runs.count("unet")))
        runs.clear()
        return {}

    try:
        image = run(pipe, {**args, "callback_on_step_end": at_step_end})
    finally:
        for handle in handles:
            handle.remove()
    return steps, image


def test_sag_interval_one_is_plain_and_deep_blocks_run_every_third_step(folders):
    sag = diffpipe.StableDiffusionSAGPipeline.from_pipe(diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"]))
    sag.scheduler = diffpipe.DDIMScheduler.from_config(sag.scheduler.config)
    sag.set_progress_bar_config(disable=True)
    args = dict(prompt="a cat", num_inference_steps=7, sag_scale=0.75, output_type="np", **SIZE)
    steps, plain = count_full_steps(sag, args)
    assert steps == [(2, 2)] * 7  # SAG: two UNet calls per step (its own and the degraded latents')
    sag.enable_deepcache(cache_interval=1, cache_branch_id=0)
    np.testing.assert_array_equal(run(sag, args), plain)
    sag.enable_deepcache(cache_interval=3, cache_branch_id=0)
    steps, cached = count_full_steps(sag, args)
    assert steps == [(2 if i % 3 == 0 else 0, 2) for i in range(7)]
    # runs (the helper fails here), and skip steps hand SAG the attention map of the last full step's own
    # prediction: without it the map is the degraded prediction's, of another batch size, and SAG fails
    assert np.isfinite(cached).all() and np.abs(cached - plain).max() > 1e-3
    sag.disable_deepcache()
    np.testing.assert_array_equal(run(sag, args), plain)


def test_bad_settings_are_refused_clearly(folders):
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    for interval in (0, -1, 1.5):
        with pytest.raises(ValueError, match="cache_interval must be an integer >= 1"):
            pipe.enable_deepcache(cache_interval=interval)
    for branch in (-1, 9):
        with pytest.raises(ValueError, match=r"cache_branch_id must be an integer in 0\.\.8 .*3 down blocks"):
            pipe.enable_deepcache(cache_interval=3, cache_branch_id=branch)
    assert all("_diffpipe_hooks" not in m.__dict__ for m in pipe.unet.modules())
