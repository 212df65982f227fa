"""The memory switches on pipelines and models: each gives the plain call's images (within 2/255) and,
where the reference has the switch, the reference's images with it on. Off again, the models are as
they were."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from adapter_factory import TOL, assert_close, images, load_both
from sd_factory import save_reference_pipeline

ARGS = dict(prompt=["a cat", "a dog"], num_inference_steps=3, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("memory") / "sd", safety_checker=False, seed=41)


@pytest.fixture(scope="module")
def plain(folder):
    ref, ours = load_both(folder)
    expected, got = images(ref, ARGS), images(ours, ARGS)
    assert_close(expected, got)
    return got


# (what ours runs, what the reference runs for the same switch, or None where it has none)
SWITCHES = {
    "attention slicing auto": (lambda p: p.enable_attention_slicing(), lambda p: p.enable_attention_slicing()),
    "attention slicing max": (lambda p: p.enable_attention_slicing("max"), lambda p: p.enable_attention_slicing("max")),
    "attention slicing 2": (lambda p: p.enable_attention_slicing(2), lambda p: p.enable_attention_slicing(2)),
    "vae slicing": (lambda p: p.enable_vae_slicing(), lambda p: p.vae.enable_slicing()),
    "vae tiling": (lambda p: p.enable_vae_tiling(), lambda p: p.vae.enable_tiling()),
    "fused qkv": (lambda p: p.fuse_qkv_projections(), lambda p: p.fuse_qkv_projections()),
    "forward chunking batch": (lambda p: p.enable_forward_chunking(1, dim=0), None),
    "forward chunking sequence": (lambda p: p.enable_forward_chunking(4, dim=1), None),
    "model-level slicing and chunking": (
        lambda p: (p.unet.set_attention_slice("auto"), p.unet.enable_forward_chunking()),
        None,
    ),
}


# VAE tiling decodes tiles separately (each with its own GroupNorm statistics) and blends the seams:
# it changes the image by design, in the reference too, so it is held to the reference's tiled image.
APPROXIMATE = {"vae tiling"}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_a_switch_keeps_the_images(folder, plain, name):
    ours_on, ref_on = SWITCHES[name]
    ref, ours = load_both(folder)
    ours_on(ours)
    got = images(ours, ARGS)
    if name not in APPROXIMATE:
        assert np.abs(got - plain).max() <= TOL, f"{name}: {np.abs(got - plain).max():.5f} from the plain call"
    if ref_on is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_on(ref)
        assert_close(images(ref, ARGS), got)


def test_switches_off_leave_the_models_as_they_were(folder, plain):
    _, ours = load_both(folder)
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    processors = {k: type(v) for k, v in ours.unet.attn_processors.items()}
    ours.enable_attention_slicing()
    ours.fuse_qkv_projections()
    assert any(k.endswith("to_qkv.weight") for k in ours.unet.state_dict())  # the reference's fused names
    ours.enable_forward_chunking()
    ours.disable_attention_slicing()
    ours.unfuse_qkv_projections()
    ours.disable_forward_chunking()
    assert sorted(ours.unet.state_dict()) == sorted(before)
    assert all(torch.equal(ours.unet.state_dict()[k], v) for k, v in before.items())
    assert {k: type(v) for k, v in ours.unet.attn_processors.items()} == processors
    np.testing.assert_array_equal(images(ours, ARGS), plain)


def test_xformers_absent_is_said_as_the_reference_says_it(folder):
    import importlib.util

    assert importlib.util.find_spec("xformers") is None  # the test machine has none
    ref, ours = load_both(folder)
    with pytest.raises(ModuleNotFoundError) as expected:
        ref.enable_xformers_memory_efficient_attention()
    with pytest.raises(type(expected.value), match="xformers is not installed"):
        ours.enable_xformers_memory_efficient_attention()
    ours.disable_xformers_memory_efficient_attention()


def test_device_map_name_and_to_keywords(folder):
    ref, ours = load_both(folder)
    assert ours.hf_device_map is None and ref.hf_device_map is None
    ours.reset_device_map()
    assert ours.name_or_path == ref.name_or_path and str(ours.name_or_path) == str(folder)  # as given
    ours.to(torch_device="cpu", torch_dtype=torch.bfloat16)
    assert ours.unet.dtype == torch.bfloat16 and ours.device == torch.device("cpu")


def test_bad_switch_values_are_refused(folder):
    _, ours = load_both(folder)
    with pytest.raises(ValueError, match="slice_size must be"):
        ours.enable_attention_slicing("half")
    with pytest.raises(ValueError, match="dim must be 0"):
        ours.enable_forward_chunking(2, dim=2)
    ours.enable_forward_chunking(3, dim=0)
    with pytest.raises(ValueError, match="do not divide"):
        images(ours, ARGS)
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder, vae=None)
    with pytest.raises(ValueError, match="has no vae"):
        pipe.enable_vae_tiling()
