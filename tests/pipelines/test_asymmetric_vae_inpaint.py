"""Inpainting with an AsymmetricAutoencoderKL as the VAE (its decoder keeps the unmasked pixels from the
input image) against the reference: a folder the reference saved, and the VAE passed as an override."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from adapter_factory import assert_close, images
from sd_factory import reference_components

ASYM = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    down_block_out_channels=(8, 16),
    layers_per_down_block=1,
    up_block_types=("UpDecoderBlock2D",) * 2,
    up_block_out_channels=(8, 16),
    layers_per_up_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("asym")
    components = reference_components(seed=5, safety_checker=False, in_channels=9, tmp=root)
    torch.manual_seed(1)
    components["vae"] = diffusers.AsymmetricAutoencoderKL(**ASYM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.StableDiffusionInpaintPipeline(**components, requires_safety_checker=False).save_pretrained(
            root / "sd"
        )
    return root / "sd"


def scene():
    rng = np.random.default_rng(2)
    image = PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    return image, PIL.Image.fromarray(mask)


def test_inpainting_with_the_asymmetric_vae_is_the_reference_s(folder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder)
    ours = diffpipe.StableDiffusionInpaintPipeline.from_pretrained(folder)
    assert type(ours.vae).__name__ == "AsymmetricAutoencoderKL" and ours.vae_scale_factor == 2
    image, mask = scene()
    args = dict(prompt="a cat", image=image, mask_image=mask, num_inference_steps=3, output_type="np")
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    got = images(ours, args)
    assert_close(images(ref, args), got)
    # the masked decoder matters: a plain decode of the same latents differs outside the mask
    latents = images(ours, {**args, "output_type": "latent"})
    with torch.no_grad():
        plain = ours.vae.decode(latents / ours.vae.config.scaling_factor).sample
    plain = (plain / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(plain - got).max() > 0.01


def test_the_asymmetric_vae_as_an_override(folder):
    vae = diffpipe.AsymmetricAutoencoderKL.from_pretrained(folder, subfolder="vae")
    pipe = diffpipe.StableDiffusionInpaintPipeline.from_pretrained(folder, vae=vae)
    assert pipe.vae is vae
    pipe.set_progress_bar_config(disable=True)
    image, mask = scene()
    out = pipe(prompt="a cat", image=image, mask_image=mask, num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 32, 32, 3)
