"""Stable Diffusion XL inpainting against the reference, on tiny pipelines the reference saved.

Every expected image is computed by the reference at test time from the same folder and seed; the
bound is the issue's: max abs difference <= 2/255 with output_type="np" (PIL images, where the
reference allows only those, scaled to [0, 1]). Then AutoPipeline and from_pipe, and bad input.
The signature is checked with every exported pipeline's in tests/test_conformance.py.
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from sdxl_factory import an_image, assert_close, load_both, run_both, save_reference_sdxl

TASK = "StableDiffusionXLInpaintPipeline"
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-inpaint")
    return {
        "xl": save_reference_sdxl(root / "xl"),  # a base SDXL (4-channel UNet), as inpainting often uses
        "inpaint9": save_reference_sdxl(root / "inpaint9", task=TASK, unet_kwargs={"in_channels": 9}, seed=3),
        "refiner": save_reference_sdxl(root / "refiner", task=TASK, refiner=True, seed=1),
        "stats": save_reference_sdxl(root / "stats", latents_stats=True, seed=2),
    }


def a_mask(h=40, w=48):
    m = np.zeros((h, w), dtype=np.uint8)
    m[8:30, 10:40] = 255
    return PIL.Image.fromarray(m)


def inpaint(**kwargs) -> dict:
    return {"prompt": "a blue cat", "image": an_image(), "mask_image": a_mask(), "num_inference_steps": 3, **kwargs}


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("kind", ["xl", "inpaint9"])
def test_inpainting(folders, kind, strength):
    """A plain SDXL UNet (blended back outside the mask after every step) and a 9-channel inpainting
    UNet; full strength starts from pure noise, 0.6 from the image noised to the step it leaves."""
    ref, ours = load_both(folders[kind], TASK)
    assert_close(*run_both(ref, ours, **inpaint(strength=strength, **SIZE)))


@pytest.mark.parametrize("kind", ["xl", "inpaint9"])
def test_batch_with_a_generator_list_and_a_stochastic_scheduler(folders, kind):
    """Two prompts, two images each, one generator per image, DDIM with eta: the reference encodes the
    one image with the first generator, and every later draw must match too. The default strength."""
    ref, ours = load_both(folders[kind], TASK, "DDIMScheduler")
    args = inpaint(prompt=["a blue cat", "a red dog"], num_images_per_prompt=2, eta=0.5, **SIZE)
    expected, got = run_both(ref, ours, generator_list=4, **args)
    assert got.shape[0] == 4
    assert_close(expected, got)


@pytest.mark.parametrize("base", ["xl", "inpaint9"])
def test_base_with_denoising_end_then_refiner_with_denoising_start(folders, base):
    base_ref, base_ours = load_both(folders[base], TASK)
    expected, got = run_both(
        base_ref, base_ours, output_type="latent", **inpaint(num_inference_steps=4, denoising_end=0.6)
    )
    assert (got - expected).abs().max() <= 1e-4
    # the default strength (0.9999) leaves 3 of the 4 steps, denoising_end=0.6 the one above t=400
    assert base_ours.num_timesteps == base_ref.num_timesteps == 1
    refiner_ref, refiner = load_both(folders["refiner"], TASK)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score is True
    args = inpaint(image=got, num_inference_steps=4, denoising_start=0.6, aesthetic_score=7.0)
    assert_close(*run_both(refiner_ref, refiner, **args))


def test_denoising_start_and_end_on_an_image(folders):
    ref, ours = load_both(folders["xl"], TASK, "HeunDiscreteScheduler")
    # denoising_start: the encoded image as it is, whatever the strength
    assert_close(*run_both(ref, ours, **inpaint(num_inference_steps=4, denoising_start=0.5, strength=0.3)))
    ref, ours = load_both(folders["xl"], TASK)
    # denoising_end: the blend of the last step kept puts the clean image back
    assert_close(*run_both(ref, ours, **inpaint(num_inference_steps=4, denoising_end=0.5, strength=1.0)))


@pytest.mark.parametrize("kind", ["xl", "inpaint9"])
def test_padding_mask_crop(folders, kind):
    """Repaint the mask's padded box at the output size and paste it back (the reference allows PIL
    output only here)."""
    ref, ours = load_both(folders[kind], TASK)
    expected, got = run_both(ref, ours, output_type="pil", **inpaint(padding_mask_crop=4, **SIZE))
    assert got[0].size == (48, 40)  # the input image's size
    assert_close(expected, got)


# (what ours runs, what the reference runs for the same switch, or None where it has none here)
SWITCHES = {
    "attention slicing auto": (lambda p: p.enable_attention_slicing(), lambda p: p.enable_attention_slicing()),
    "attention slicing max": (lambda p: p.enable_attention_slicing("max"), lambda p: p.enable_attention_slicing("max")),
    "vae slicing": (lambda p: p.enable_vae_slicing(), lambda p: p.vae.enable_slicing()),
    "vae tiling": (lambda p: p.enable_vae_tiling(), lambda p: p.vae.enable_tiling()),
    "fused qkv": (lambda p: p.fuse_qkv_projections(), lambda p: p.fuse_qkv_projections()),
    "model cpu offload": (lambda p: p.enable_model_cpu_offload(device="cpu"), None),
    "sequential cpu offload": (lambda p: p.enable_sequential_cpu_offload(device="cpu"), None),
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_memory_switches_keep_the_images(folders, name):
    """Each switch gives the plain call's images within 2/255 (VAE tiling, which changes images by
    design, is held to the reference's tiled images instead), and the reference's with it on."""
    args = inpaint(prompt=["a blue cat", "a red dog"], strength=0.7, **SIZE)
    ref, ours = load_both(folders["xl"], TASK)
    plain = run_both(ref, ours, **args)[1]
    ours_on, ref_on = SWITCHES[name]
    ours_on(ours)
    if ref_on is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_on(ref)
    expected, got = run_both(ref, ours, **args)
    if name != "vae tiling":
        assert_close(plain, got)
    if ref_on is not None:
        assert_close(expected, got)


def test_latent_output_given_latents_and_masked_image_latents(folders):
    ref, ours = load_both(folders["xl"], TASK)
    expected, got = run_both(ref, ours, output_type="latent", **inpaint(strength=0.6, **SIZE))
    assert got.shape == (1, 4, 16, 16) and (got - expected).abs().max() <= 1e-4
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    masked = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    ref, ours = load_both(folders["inpaint9"], TASK)
    assert_close(*run_both(ref, ours, **inpaint(latents=latents, masked_image_latents=masked, **SIZE)))


def test_micro_conditioning_and_the_aesthetic_score(folders):
    ref, ours = load_both(folders["xl"], TASK)
    sizes = dict(
        crops_coords_top_left=(2, 4),
        negative_crops_coords_top_left=(6, 8),  # the reference's base row ignores it
        original_size=(40, 48),
        negative_original_size=(20, 24),
        target_size=(24, 32),
    )
    assert_close(*run_both(ref, ours, **inpaint(height=48, width=64, **sizes)))
    ref, ours = load_both(folders["refiner"], TASK)
    args = inpaint(aesthetic_score=7.5, negative_aesthetic_score=1.0, **sizes, **SIZE)
    assert_close(*run_both(ref, ours, **args))


def test_vae_latent_statistics_as_the_reference(folders):
    """The reference's inpainting encodes without the VAE's latents_mean / latents_std (its decoding and
    its image-to-image use them); diffpipe gives the same numbers."""
    ref, ours = load_both(folders["stats"], TASK)
    assert_close(*run_both(ref, ours, **inpaint(strength=0.7, **SIZE)))


def test_a_callback_may_replace_the_mask(folders):
    """As in the reference, a replaced mask steers the later steps' blend (and the 9-channel input)."""

    def unmask(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        return {"mask": torch.zeros_like(tensors["mask"])} if i == 0 else {}

    for kind in ("xl", "inpaint9"):
        ref, ours = load_both(folders[kind], TASK)
        seen = []
        names = ["latents", "mask", "masked_image_latents", "add_time_ids"]
        args = inpaint(callback_on_step_end=unmask, callback_on_step_end_tensor_inputs=names, **SIZE)
        assert_close(*run_both(ref, ours, **args))
        assert seen[0] == seen[-1] == sorted(names)


# ---------------------------------------------------------------------------------------- AutoPipeline
def test_auto_pipeline_and_from_pipe(folders):
    from diffpipe import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        DiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    assert type(AutoPipelineForInpainting.from_pretrained(folders["xl"])) is StableDiffusionXLInpaintPipeline
    assert type(DiffusionPipeline.from_pretrained(folders["inpaint9"])) is StableDiffusionXLInpaintPipeline
    refiner = AutoPipelineForInpainting.from_pretrained(folders["refiner"])
    assert type(refiner) is StableDiffusionXLInpaintPipeline and refiner.config.requires_aesthetics_score is True

    t2i = StableDiffusionXLPipeline.from_pretrained(folders["xl"])
    inpainting = AutoPipelineForInpainting.from_pipe(t2i)
    assert type(inpainting) is StableDiffusionXLInpaintPipeline
    assert inpainting.components.keys() == t2i.components.keys()
    assert all(inpainting.components[k] is v for k, v in t2i.components.items())
    assert inpainting.config.requires_aesthetics_score is False
    i2i = AutoPipelineForImage2Image.from_pipe(inpainting)
    back = AutoPipelineForText2Image.from_pipe(i2i)
    assert type(i2i) is StableDiffusionXLImg2ImgPipeline and type(back) is StableDiffusionXLPipeline
    assert back.unet is inpainting.unet is i2i.unet is t2i.unet
    assert type(AutoPipelineForInpainting.from_pipe(i2i)) is StableDiffusionXLInpaintPipeline

    # the pipeline made by from_pipe draws the reference's images
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.AutoPipelineForInpainting.from_pretrained(folders["xl"], add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref).__name__ == TASK
    assert_close(*run_both(ref, inpainting, **inpaint(num_inference_steps=2, **SIZE)))
    out = inpainting(**inpaint(num_inference_steps=1, strength=1.0, output_type="np", return_dict=False, **SIZE))
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 32, 32, 3)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_like_the_reference(folders):
    ref, ours = load_both(folders["xl"], TASK)
    cases = [
        dict(mask_image=None),
        dict(image=None),
        dict(strength=1.5),
        dict(strength=-0.1),
        dict(padding_mask_crop=4, output_type="np"),
        dict(denoising_start=0.6, denoising_end=0.5),
    ]
    ran = []
    handle = ours.unet.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        for case in cases:
            args = {**inpaint(num_inference_steps=2, output_type="np", **SIZE), **case}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with pytest.raises(ValueError):
                    ref(**args)
            with pytest.raises(ValueError):
                ours(**args)
    finally:
        handle.remove()
    assert not ran  # rejected before the UNet ran
    with pytest.raises(ValueError, match="needs image= and mask_image="):
        ours(**inpaint(mask_image=None))
    with pytest.raises(ValueError, match="strength must be between 0 and 1"):
        ours(**inpaint(strength=1.5))
    # latents as the image of a 9-channel UNet: nothing to make the masked image's latents from (the
    # reference fails deep inside with an AttributeError)
    nine = diffpipe.StableDiffusionXLInpaintPipeline.from_pretrained(folders["inpaint9"])
    with pytest.raises(ValueError, match="masked_image_latents="):
        nine(**inpaint(image=torch.zeros(1, 4, 16, 16), denoising_start=0.5, **SIZE))
