"""Every UNet pipeline with an AutoencoderTiny (TAESD) as its VAE, against the reference.

A tiny AutoencoderTiny (two stages: a 2x VAE, as the tiny UNets expect; 4 latent channels) is built and
saved by the reference and loaded by both libraries, so both hold the same weights. It goes into each
pipeline every way a user puts it there: ``vae=`` to ``from_pretrained``, the constructor, ``from_pipe``
and ``pipe.vae = ...``. Each expected image is the reference's, from the same folder and seed; the bound is
max abs difference <= 2/255 with output_type="np". Decoding divides by the VAE's ``scaling_factor`` (1.0);
encoding (image-to-image, inpainting) takes the encoder's ``latents`` (there is no distribution).
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from sd_factory import save_reference_adapter, save_reference_pipeline
from sdxl_factory import TOL, an_image, save_reference_sdxl

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the reference on numpy 2

TINY_VAE = dict(
    encoder_block_out_channels=(8, 8),
    decoder_block_out_channels=(8, 8),
    num_encoder_blocks=(1, 1),
    num_decoder_blocks=(1, 1),
    latent_channels=4,
)
TEXT = dict(prompt="a blue cat", num_inference_steps=3, height=32, width=32, output_type="np")
IMAGE = an_image(32, 32, seed=1)


def a_mask():
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255
    return PIL.Image.fromarray(mask)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("tiny_vae")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=11)
    torch.manual_seed(3)
    vae = diffusers.AutoencoderTiny(**TINY_VAE)
    with torch.no_grad():  # livelier than the initial weights, so the VAE visibly shapes the images
        for p in vae.parameters():
            p.mul_(1.5)
    vae.save_pretrained(root / "taesd")
    torch.manual_seed(4)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    net = quiet(diffusers.ControlNetModel.from_unet, unet, conditioning_embedding_out_channels=(4, 8))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(
                ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            ):
                p.normal_(0.0, 0.3)
    net.save_pretrained(root / "cn")
    return {
        "sd": sd,
        "sd9": save_reference_pipeline(
            root / "sd9", task="StableDiffusionInpaintPipeline", safety_checker=False, in_channels=9, seed=12
        ),
        "xl": save_reference_sdxl(root / "xl", seed=4),
        "taesd": root / "taesd",
        "cn": root / "cn",
        "adapter": save_reference_adapter(root / "adapter"),
    }


def vaes(folders):
    """(the reference's AutoencoderTiny, ours), the same weights."""
    import diffusers

    return diffusers.AutoencoderTiny.from_pretrained(folders["taesd"]), diffpipe.AutoencoderTiny.from_pretrained(
        folders["taesd"]
    )


def run(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    out = quiet(pipe, generator=torch.Generator().manual_seed(seed), **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


def compare(ref, ours, **kwargs) -> float:
    assert type(ours.vae).__name__ == "AutoencoderTiny" and type(ref.vae).__name__ == "AutoencoderTiny"
    assert ours.vae_scale_factor == ref.vae_scale_factor == 2
    expected, got = run(ref, **kwargs), run(ours, **kwargs)
    expected, got = np.asarray(expected), np.asarray(got)
    assert got.shape == expected.shape
    assert float(got.std()) > 0.01  # a real image, not a flat one
    diff = float(np.abs(got - expected).max())
    assert diff <= TOL, f"max abs difference {diff:.5f} > 2/255"
    return diff


def test_text_to_image_with_vae_given_to_from_pretrained(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained, folders["sd"], vae=ref_vae)
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"], vae=our_vae)
    assert ours.vae is our_vae
    compare(ref, ours, **TEXT)
    ours.enable_vae_slicing()  # our pipeline switch reaches the tiny VAE (the reference has only the VAE's)
    ref_vae.enable_slicing()
    assert our_vae.use_slicing
    compare(ref, ours, **TEXT, num_images_per_prompt=2)


def test_image_to_image_built_with_the_constructor(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    pipes = []
    for lib, vae in ((diffusers, ref_vae), (diffpipe, our_vae)):
        source = quiet(lib.StableDiffusionPipeline.from_pretrained, folders["sd"])
        parts = {**source.components, "vae": vae}
        pipes.append(quiet(lib.StableDiffusionImg2ImgPipeline, **parts, requires_safety_checker=False))
    compare(*pipes, **{**TEXT, "image": IMAGE, "strength": 0.7})


@pytest.mark.parametrize("folder", ["sd9", "sd"], ids=["inpaint-unet", "plain-unet"])
def test_inpainting_with_the_vae_set_as_an_attribute(folders, folder):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref = quiet(diffusers.StableDiffusionInpaintPipeline.from_pretrained, folders[folder])
    ours = diffpipe.StableDiffusionInpaintPipeline.from_pretrained(folders[folder])
    ref.vae, ours.vae = ref_vae, our_vae
    assert ours.config["vae"][1] == "AutoencoderTiny"
    compare(ref, ours, **{**TEXT, "image": IMAGE, "mask_image": a_mask(), "strength": 0.9})


def test_sdxl_text_image_and_inpainting(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref = quiet(diffusers.StableDiffusionXLPipeline.from_pretrained, folders["xl"], vae=ref_vae, add_watermarker=False)
    ours = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], vae=our_vae)
    compare(ref, ours, **TEXT)
    for task, extra in (
        ("StableDiffusionXLImg2ImgPipeline", {"image": IMAGE, "strength": 0.7}),
        ("StableDiffusionXLInpaintPipeline", {"image": IMAGE, "mask_image": a_mask(), "strength": 0.9}),
    ):
        # the reference's from_pipe keeps only a VAE of the type it expects: hand it over again
        ref_task = quiet(getattr(diffusers, task).from_pipe, ref, vae=ref_vae)
        ours_task = getattr(diffpipe, task).from_pipe(ours, vae=our_vae)
        compare(ref_task, ours_task, **TEXT, **extra)


def test_self_attention_guidance(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref_sd = quiet(diffusers.StableDiffusionPipeline.from_pretrained, folders["sd"])
    our_sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    ref = quiet(diffusers.StableDiffusionSAGPipeline.from_pipe, ref_sd, vae=ref_vae)
    ours = diffpipe.StableDiffusionSAGPipeline.from_pipe(our_sd, vae=our_vae)
    assert type(our_sd.vae).__name__ == "AutoencoderKL"  # the source pipeline keeps its own VAE
    compare(ref, ours, **TEXT, sag_scale=0.75)


def test_animatediff(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref_sd = quiet(diffusers.StableDiffusionPipeline.from_pretrained, folders["sd"])
    our_sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    ref_adapter = diffusers.MotionAdapter.from_pretrained(folders["adapter"])
    our_adapter = diffpipe.MotionAdapter.from_pretrained(folders["adapter"])
    ref = quiet(diffusers.AnimateDiffPipeline.from_pipe, ref_sd, motion_adapter=ref_adapter, vae=ref_vae)
    ours = diffpipe.AnimateDiffPipeline.from_pipe(our_sd, motion_adapter=our_adapter, vae=our_vae)
    compare(ref, ours, **TEXT, num_frames=3)


def test_controlnet(folders):
    import diffusers

    ref_vae, our_vae = vaes(folders)
    ref_sd = quiet(diffusers.StableDiffusionPipeline.from_pretrained, folders["sd"])
    our_sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    ref_net = diffusers.ControlNetModel.from_pretrained(folders["cn"])
    our_net = diffpipe.ControlNetModel.from_pretrained(folders["cn"])
    ref = quiet(diffusers.StableDiffusionControlNetPipeline.from_pipe, ref_sd, controlnet=ref_net)
    ours = diffpipe.StableDiffusionControlNetPipeline.from_pipe(our_sd, controlnet=our_net)
    ref.vae, ours.vae = ref_vae, our_vae
    compare(ref, ours, **TEXT, image=IMAGE)
