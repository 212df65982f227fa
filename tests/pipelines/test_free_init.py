"""FreeInit in AnimateDiff against the reference: each filter, fast sampling, other stop frequencies;
disable_free_init gives the plain video back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from sd_factory import save_reference_adapter, save_reference_pipeline

ARGS = dict(prompt="a cat", num_frames=4, num_inference_steps=5, height=32, width=32, output_type="np")
SETTINGS = [
    dict(num_iters=2),
    dict(num_iters=3, use_fast_sampling=True),
    dict(num_iters=3, use_fast_sampling=True, method="gaussian"),
    dict(num_iters=2, method="ideal"),
    dict(num_iters=2, spatial_stop_frequency=0.4, temporal_stop_frequency=0.1, order=2),
]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("free-init")
    sd, adapter = (
        save_reference_pipeline(root / "sd", safety_checker=False, seed=91),
        save_reference_adapter(root / "a"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.AnimateDiffPipeline.from_pipe(
            diffusers.StableDiffusionPipeline.from_pretrained(sd),
            motion_adapter=diffusers.MotionAdapter.from_pretrained(adapter),
        )
        ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ours = diffpipe.AnimateDiffPipeline.from_pipe(
        diffpipe.StableDiffusionPipeline.from_pretrained(sd),
        motion_adapter=diffpipe.MotionAdapter.from_pretrained(adapter),
    )
    ours.scheduler = diffpipe.DDIMScheduler.from_config(ours.scheduler.config)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    return ref, ours


def frames(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(pipe(generator=torch.Generator().manual_seed(0), **ARGS).frames)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_free_init_is_the_reference_s(pipes, settings):
    ref, ours = pipes
    plain = frames(ours)
    for pipe in (ref, ours):
        pipe.enable_free_init(**settings)
    try:
        got = frames(ours)
        assert np.abs(got - frames(ref)).max() <= 2 / 255
        assert np.abs(got - plain).max() > 1e-3 and ours.free_init_enabled
    finally:
        for pipe in (ref, ours):
            pipe.disable_free_init()
    np.testing.assert_array_equal(frames(ours), plain)


def test_free_init_says_what_it_cannot_do(pipes):
    _, ours = pipes
    with pytest.raises(ValueError, match="method must be one of"):
        ours.enable_free_init(method="box")
    before = ours.scheduler
    ours.scheduler = diffpipe.DPMSolverMultistepScheduler.from_config(before.config)
    ours.enable_free_init(num_iters=2)
    try:
        with pytest.raises(ValueError, match="FreeInit noises each result back"):
            frames(ours)
    finally:
        ours.disable_free_init()
        ours.scheduler = before
