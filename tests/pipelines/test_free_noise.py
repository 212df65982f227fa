"""FreeNoise in AnimateDiff against the reference: context windows and their weighting schemes, noise
rescheduling, per-frame prompt schedules (interpolated by default or by a callback), split inference;
videos longer than the motion adapter's ``motion_max_seq_length``; the errors, earlier and clearer where
the reference fails late."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from diffpipe.nn.context_windows import ContextWindows, frame_weights
from diffpipe.pipelines.free_noise import reschedule_noise
from sd_factory import TINY_ADAPTER, save_reference_adapter, save_reference_pipeline

TOL = 2 / 255
ARGS = dict(num_inference_steps=2, height=32, width=32, output_type="np", guidance_scale=7.0)
LONGEST = TINY_ADAPTER["motion_max_seq_length"]
CASES = [
    # (call, enable_free_noise)
    (dict(prompt="a cat", num_frames=6), dict(context_length=4, context_stride=2)),
    (dict(prompt="a cat", num_frames=7), dict(context_length=4, context_stride=2)),
    # the last window adds two frames: the reference's way of counting them is what is pinned
    (dict(prompt="a cat", num_frames=9), dict(context_length=4, context_stride=3)),
    (dict(prompt="a cat", num_frames=9), dict(context_length=4, context_stride=3, weighting_scheme="flat")),
    (
        dict(prompt="a cat", num_frames=10),
        dict(context_length=4, context_stride=2, weighting_scheme="delayed_reverse_sawtooth"),
    ),
    (dict(prompt="a cat", num_frames=LONGEST + 4), dict(context_length=LONGEST, context_stride=4)),
    (dict(prompt="a cat", num_frames=11), dict(context_length=4, context_stride=2, noise_type="random")),
    (dict(prompt="a cat", num_frames=11), dict(context_length=4, context_stride=2, noise_type="repeat_context")),
    (dict(prompt="a cat", num_frames=4), dict(context_length=4, context_stride=2)),
    (
        dict(prompt={0: "a cat", 5: "a dog"}, negative_prompt={0: "blurry", 3: "dark"}, num_frames=9),
        dict(context_length=4, context_stride=2),
    ),
    (dict(prompt={0: "a cat", 2: "a dog", 4: "a cow"}, negative_prompt="blurry", num_frames=6), dict(context_length=4)),
]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("free-noise")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=91)
    adapter = save_reference_adapter(root / "a")
    ref = quiet(
        diffusers.AnimateDiffPipeline.from_pipe,
        quiet(diffusers.StableDiffusionPipeline.from_pretrained, sd),
        motion_adapter=diffusers.MotionAdapter.from_pretrained(adapter),
    )
    ours = diffpipe.AnimateDiffPipeline.from_pipe(
        quiet(diffpipe.StableDiffusionPipeline.from_pretrained, sd),
        motion_adapter=diffpipe.MotionAdapter.from_pretrained(adapter),
    )
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)
    yield ref, ours
    for pipe in (ref, ours):
        pipe.disable_free_noise()


def video(pipe, **kwargs):
    return quiet(pipe, generator=torch.Generator().manual_seed(0), **{**ARGS, **kwargs}).frames


def enable(pipes, **settings):
    for pipe in pipes:
        pipe.disable_free_noise()
        quiet(pipe.enable_free_noise, **settings)


@pytest.mark.parametrize("call,settings", CASES, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v if k != "prompt"))
def test_free_noise_video_is_the_reference_s(pipes, call, settings):
    ref, ours = pipes
    enable(pipes, **settings)
    expected, got = video(ref, **call), video(ours, **call)
    assert got.shape == expected.shape == (1, call["num_frames"], 32, 32, 3)
    assert np.abs(got - expected).max() <= TOL


def test_weights_and_windows_are_the_reference_s(pipes):
    ref, _ = pipes
    enable([ref], context_length=4, context_stride=2)
    block = ref.unet.down_blocks[0].motion_modules[0].transformer_blocks[0]
    for scheme in ("flat", "pyramid", "delayed_reverse_sawtooth"):
        for length in range(1, 17):
            if scheme == "delayed_reverse_sawtooth" and length % 2:
                with pytest.raises(ValueError, match="even context_length"):  # the reference's weights don't fit
                    frame_weights(length, scheme)
                continue
            assert frame_weights(length, scheme) == list(block._get_frame_weights(length, scheme))
    for length, stride in [(4, 2), (4, 3), (4, 4), (8, 4), (16, 4)]:
        block.context_length, block.context_stride = length, stride
        for frames in range(length, 40):
            assert ContextWindows(length, stride).windows(frames) == block._get_frame_indices(frames)


@pytest.mark.parametrize("frames,length,stride", [(11, 4, 2), (12, 4, 2), (13, 5, 3), (30, 16, 4), (4, 4, 2)])
def test_noise_rescheduling_is_the_reference_s(pipes, frames, length, stride):
    ref, _ = pipes
    enable([ref], context_length=length, context_stride=stride)
    seeded = torch.Generator().manual_seed(3)
    expected = ref._prepare_latents_free_noise(2, 4, frames, 16, 16, torch.float32, "cpu", seeded)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, frames, 8, 8, generator=gen)
    got = reschedule_noise(noise, ContextWindows(length, stride), gen)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if frames > length:
        repeats = [any(torch.equal(got[:, :, f], got[:, :, g]) for g in range(length)) for f in range(length, frames)]
        assert all(repeats)


def test_prompt_interpolation_callback_is_used_as_the_reference_uses_it(pipes):
    ref, ours = pipes
    calls = []

    def step(start, end, start_embeds, end_embeds):  # hold the start prompt, switch at the end
        calls.append((start, end))
        out = start_embeds.repeat(end - start + 1, 1, 1)
        out[-1] = end_embeds[0]
        return out

    enable(pipes, context_length=4, context_stride=2, prompt_interpolation_callback=step)
    call = dict(prompt={0: "a cat", 3: "a dog"}, num_frames=6)
    expected = video(ref, **call)
    reference_calls, calls[:] = list(calls), []
    assert np.abs(video(ours, **call) - expected).max() <= TOL
    assert calls == reference_calls == [(0, 3), (3, 5), (0, 5)]  # the prompt's keyframes, then the negative's

    def wrong(start, end, start_embeds, end_embeds):
        return start_embeds

    enable([ours], context_length=4, prompt_interpolation_callback=wrong)
    with pytest.raises(ValueError, match=r"prompt_interpolation_callback returned .* for frames 0..3"):
        video(ours, **call)


def test_split_inference_is_the_same_video(pipes):
    ref, ours = pipes
    enable(pipes, context_length=4, context_stride=2)
    plain = video(ours, prompt="a cat", num_frames=11)
    keys = list(ours.unet.state_dict())
    for pipe in pipes:
        pipe.enable_free_noise_split_inference(spatial_split_size=3, temporal_split_size=2)
    try:
        got = video(ours, prompt="a cat", num_frames=11)
        assert np.abs(got - video(ref, prompt="a cat", num_frames=11)).max() <= TOL
        assert np.abs(got - plain).max() <= 1e-5
        assert list(ours.unet.state_dict()) == keys  # nothing renamed or wrapped
    finally:
        ours.unet.set_split_inference(None)
    np.testing.assert_array_equal(video(ours, prompt="a cat", num_frames=11), plain)


def test_disable_gives_the_plain_video_back_and_only_free_noise_goes_past_the_adapter(pipes):
    _, ours = pipes
    ours.disable_free_noise()
    plain = video(ours, prompt="a cat", num_frames=4)
    assert not ours.free_noise_enabled
    with pytest.raises(ValueError, match="enable FreeNoise"):
        video(ours, prompt="a cat", num_frames=LONGEST + 1)
    with pytest.raises(ValueError, match="needs FreeNoise"):
        video(ours, prompt={0: "a cat"}, num_frames=4)
    ours.enable_free_noise(context_length=4, context_stride=2)
    assert ours.free_noise_enabled
    assert video(ours, prompt="a cat", num_frames=LONGEST + 3).shape[1] == LONGEST + 3
    ours.disable_free_noise()
    np.testing.assert_array_equal(video(ours, prompt="a cat", num_frames=4), plain)


def test_what_the_reference_fails_on_works_here(pipes):
    """Fewer frames than a window (the reference raises IndexError), and prompt_embeds= (it demands a
    prompt): one window is plain attention, so both give the plain video."""
    _, ours = pipes
    ours.disable_free_noise()
    plain = video(ours, prompt="a cat", num_frames=3)
    embeds = ours.encode_prompt("a cat", "cpu", 1, False)[0]
    ours.enable_free_noise(context_length=4, context_stride=2)
    assert np.abs(video(ours, prompt="a cat", num_frames=3) - plain).max() <= 1e-5
    assert (
        np.abs(
            video(ours, prompt_embeds=embeds, num_frames=3, guidance_scale=1.0)
            - video(ours, prompt="a cat", num_frames=3, guidance_scale=1.0)
        ).max()
        <= 1e-5
    )
    # a schedule read from JSON has string keys
    got = video(ours, prompt={"0": "a cat", "2": "a dog"}, num_frames=4)
    np.testing.assert_array_equal(got, video(ours, prompt={0: "a cat", 2: "a dog"}, num_frames=4))
    ours.disable_free_noise()


def test_errors_are_the_reference_s_types_and_say_what_to_do(pipes):
    ref, ours = pipes
    for settings in (dict(weighting_scheme="box"), dict(noise_type="static")):
        with pytest.raises(ValueError):
            quiet(ref.enable_free_noise, **settings)
        with pytest.raises(ValueError, match="must be one of"):
            ours.enable_free_noise(**settings)
    with pytest.raises(ValueError, match="even context_length"):  # the reference fails at the first step
        ours.enable_free_noise(context_length=5, weighting_scheme="delayed_reverse_sawtooth")
    with pytest.raises(ValueError, match="would be left out"):  # the reference zeroes the skipped frames
        ours.enable_free_noise(context_length=4, context_stride=5)
    with pytest.raises(ValueError, match="positive integer"):
        ours.enable_free_noise(context_length=4, context_stride=0)
    assert not ours.free_noise_enabled
    ours.enable_free_noise(context_length=4, context_stride=2)
    try:
        for prompt, message in [
            ({1: "a cat"}, "must start at frame 0"),
            ({0: "a cat", 9: "a dog"}, r"frames 0..5"),
            ({0: 3}, "maps frame numbers"),
            (["a cat", "a dog"], "one prompt"),
        ]:
            with pytest.raises(ValueError, match=message):
                video(ours, prompt=prompt, num_frames=6)
        for pipe in pipes:  # the reference raises ValueError on these too
            with pytest.raises(ValueError):
                quiet(pipe, prompt={1: "a cat"}, num_frames=6, **ARGS)
        ours.enable_free_noise(context_length=LONGEST + 4)  # warns, as the reference does
        with pytest.raises(ValueError, match="more than this motion adapter's motion_max_seq_length"):
            video(ours, prompt="a cat", num_frames=LONGEST + 4)
    finally:
        ours.disable_free_noise()
