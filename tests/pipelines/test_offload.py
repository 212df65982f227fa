"""CPU offload hooks, exercised on the CPU (the accelerator is 'cpu' here; the group's log records
every move), before and after from_pipe."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from diffpipe import DiffusionPipeline, StableDiffusionImg2ImgPipeline
from diffpipe.pipelines.offload import group_of
from diffpipe.runtime.hooks import get_hook
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("offload") / "sd", safety_checker=True)


def run(pipe, seed=0):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images


def moves(group):
    return [(e, n) for e, n in group.log]


def one_on_device_at_a_time(log):
    active = None
    for event, name in log:
        if event == "to_device":
            assert active is None, f"{name} moved in while {active} was still on the device"
            active = name
        else:
            if active == name:
                active = None
    return active


def test_model_offload_runs_models_in_turn_and_frees_them(folder):
    plain = run(DiffusionPipeline.from_pretrained(folder))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.enable_model_cpu_offload(device="cpu")
    group = group_of(pipe.components)
    assert group is not None and pipe._execution_device == torch.device("cpu")
    images = run(pipe)
    np.testing.assert_array_equal(images, plain)
    brought = [n for e, n in group.log if e == "to_device"]
    assert brought[0] == "text_encoder" and "unet" in brought and "vae" in brought
    assert brought.index("unet") < brought.index("vae") < brought.index("safety_checker")
    assert one_on_device_at_a_time(group.log) is None  # and nothing is left there after the call
    assert group.active is None


def test_offload_survives_from_pipe_in_both_directions(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.enable_model_cpu_offload(device="cpu")
    group = group_of(pipe.components)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert group_of(img2img.components) is group and img2img._offload_device == torch.device("cpu")
    group.log.clear()
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    img2img.set_progress_bar_config(disable=True)
    img2img("a cat", image=image, strength=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [n for e, n in group.log if e == "to_device"][:2] == ["text_encoder", "vae"]  # vae encodes the image
    assert one_on_device_at_a_time(group.log) is None
    group.log.clear()
    run(pipe)  # the source's hooks still work
    assert ("to_device", "unet") in group.log and group.active is None


def test_sequential_offload_gives_the_same_images(folder):
    plain = run(DiffusionPipeline.from_pretrained(folder))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.enable_sequential_cpu_offload(device="cpu")
    leaves = [m for m in pipe.unet.modules() if get_hook(m, "offload_leaf") is not None]
    assert len(leaves) > 10
    np.testing.assert_array_equal(run(pipe), plain)
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert img2img._offload_device == torch.device("cpu")


def test_offload_without_an_accelerator_says_so(folder, monkeypatch):
    pipe = DiffusionPipeline.from_pretrained(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="none is available; pass device="):
        pipe.enable_model_cpu_offload()
