"""Self-attention guidance (StableDiffusionSAGPipeline) against the reference, on a tiny pipeline the
reference saved (its UNet's mid block has a transformer, so there is a self-attention map to read).

Every expected image is computed by the reference at test time from the same folder and seed; the
bound is max abs difference <= 2/255 with output_type="np".
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from diffpipe.pipelines import sag
from sd_factory import save_reference_pipeline

TOL = 2 / 255
ARGS = dict(prompt="a photo of a cat", num_inference_steps=4, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("sag") / "sd")


@pytest.fixture(scope="module")
def pipes(folder):
    """(reference SD, reference SAG from_pipe, our SD, our SAG from_pipe), as the spec builds them."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_sd = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        ref_sag = diffusers.StableDiffusionSAGPipeline.from_pipe(ref_sd)
    sd = diffpipe.DiffusionPipeline.from_pretrained(folder)
    ours = diffpipe.StableDiffusionSAGPipeline.from_pipe(sd)
    for p in (ref_sd, ref_sag, sd, ours):
        p.set_progress_bar_config(disable=True)
    return ref_sd, ref_sag, sd, ours


def seeded():
    return torch.Generator().manual_seed(0)


def storages(*pipes) -> dict[int, int]:
    """data pointer -> bytes of every storage behind the pipelines' parameters and buffers."""
    seen = {}
    for pipe in pipes:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for t in [*component.parameters(), *component.buffers()]:
                    s = t.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
    return seen


def processors(unet) -> dict[str, int]:
    return {k: id(v) for k, v in unet.attn_processors.items()}


@pytest.mark.parametrize(
    "scheduler, guidance_scale, config",
    [
        ("DDIMScheduler", 7.5, {}),
        ("DDIMScheduler", 1.0, {}),
        ("PNDMScheduler", 7.5, {}),
        ("PNDMScheduler", 1.0, {}),
        ("DPMSolverMultistepScheduler", 7.5, {}),
        ("DDIMScheduler", 5.0, {"prediction_type": "v_prediction"}),
    ],
)
def test_parity_with_the_reference(pipes, scheduler, guidance_scale, config, monkeypatch):
    import diffusers

    _, ref, _, ours = pipes
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, **config)
    ours.scheduler = getattr(diffpipe, scheduler).from_config(ours.scheduler.config, **config)
    masks = []
    real_mask = sag.saliency_mask
    monkeypatch.setattr(sag, "saliency_mask", lambda *a: masks.append(real_mask(*a)) or masks[-1])
    calls = {"ref": [], "ours": []}

    def recorder(who):
        return lambda step, t, latents: calls[who].append((step, int(t), latents.clone()))

    kwargs = dict(ARGS, guidance_scale=guidance_scale, sag_scale=0.75, callback_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=seeded(), callback=recorder("ref"), **kwargs)
    got = ours(generator=seeded(), callback=recorder("ours"), **kwargs)
    diff = np.abs(got.images - expected.images).max()
    assert diff <= TOL, f"max abs difference {diff:.5f} > 2/255"
    assert got.nsfw_content_detected == expected.nsfw_content_detected
    # the blur was applied to part of the latents only (the map picks some positions, not all or none)
    assert len(masks) == ours.num_timesteps and any(0 < float(m.mean()) < 1 for m in masks)
    assert [c[:2] for c in calls["ours"]] == [c[:2] for c in calls["ref"]] and len(calls["ours"]) >= 2
    for (_, _, a), (_, _, b) in zip(calls["ours"], calls["ref"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # SAG changes the image (otherwise the parity above would say nothing about it)
    plain = ours(generator=seeded(), **dict(kwargs, sag_scale=0.0))
    assert np.abs(plain.images - got.images).max() > 0.01


def test_from_pipe_shares_weights_and_leaves_the_sd_pipeline_unchanged(folder):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    sd.set_progress_bar_config(disable=True)
    before_images = sd(generator=seeded(), **ARGS).images
    before_processors = processors(sd.unet)
    own = storages(sd)

    pipe = diffpipe.StableDiffusionSAGPipeline.from_pipe(sd)
    assert storages(sd, pipe) == own  # zero added parameter bytes
    assert sum(own.values()) > 0
    seen = []
    pipe(
        generator=seeded(),
        guidance_scale=1.0,
        sag_scale=0.75,
        **ARGS,
        callback_on_step_end=lambda p, i, t, k: (
            seen.append(
                isinstance(
                    p.unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor, sag.AttentionMapCapture
                )
            )
            or {}
        ),
    )
    assert seen and all(seen)  # the capture ran during the call ...
    assert processors(sd.unet) == before_processors  # ... and is gone afterwards
    assert not sd.unet.mid_block.attentions[0]._forward_pre_hooks
    after_images = sd(generator=seeded(), **ARGS).images
    assert np.array_equal(before_images, after_images)


def test_processors_are_restored_after_an_exception(pipes):
    *_, ours = pipes
    ours.scheduler = diffpipe.DDIMScheduler.from_config(ours.scheduler.config)
    before = processors(ours.unet)

    def boom(pipe, i, t, tensors):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        ours(generator=seeded(), callback_on_step_end=boom, **ARGS)
    assert processors(ours.unet) == before
    assert not ours.unet.mid_block.attentions[0]._forward_pre_hooks


def test_sag_scale_zero_is_the_sd_pipeline(pipes):
    _, _, sd, ours = pipes
    ours.scheduler = diffpipe.DDIMScheduler.from_config(ours.scheduler.config)
    sd.scheduler = ours.scheduler
    expected = sd(generator=seeded(), **ARGS).images
    assert np.array_equal(ours(generator=seeded(), sag_scale=0.0, **ARGS).images, expected)


def test_blur_and_mask_match_the_reference_helpers():
    from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag as ref

    x = torch.randn(2, 4, 12, 10, generator=seeded())
    torch.testing.assert_close(sag.gaussian_blur(x), ref.gaussian_blur_2d(x, kernel_size=9, sigma=1.0))
    probs = torch.rand(2 * 3, 6, 6, generator=seeded()).softmax(-1)
    mask = sag.saliency_mask(probs, 3, (2, 3), (4, 6))
    expected = (probs.reshape(2, 3, 6, 6).mean(1).sum(1) > 1.0).float().reshape(2, 1, 2, 3)
    assert mask.shape == (2, 1, 4, 6)
    assert torch.equal(mask, expected.repeat_interleave(2, -1).repeat_interleave(2, -2))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "LMSDiscreteScheduler"])
def test_schedulers_without_integer_timesteps_are_refused_before_any_model_runs(folder, scheduler, monkeypatch):
    pipe = diffpipe.StableDiffusionSAGPipeline.from_pretrained(folder)
    pipe.scheduler = getattr(diffpipe, scheduler).from_config(pipe.scheduler.config)
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(ValueError, match=f"integer timesteps.*DDIMScheduler.*got {scheduler}"):
        pipe(**ARGS)


def test_unet_without_mid_block_attention_is_refused(folder):
    base = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    unet = diffpipe.UNet2DConditionModel(**{**base.unet.config, "mid_block_type": None})
    pipe = diffpipe.StableDiffusionSAGPipeline.from_pipe(base, unet=unet)
    with pytest.raises(ValueError, match="mid_block_type='UNetMidBlock2DCrossAttn'"):
        pipe(**ARGS)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(ip_adapter_image=np.zeros((8, 8, 3))), ValueError, "needs an IP-Adapter, and none is loaded"),
        (dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 4)]), ValueError, "needs an IP-Adapter, and none is loaded"),
        (dict(sag_scale="high"), TypeError, "sag_scale must be a number"),
        (dict(callback=print, callback_steps=0), ValueError, "callback_steps"),
        (dict(height=31), ValueError, "divisible"),
    ],
)
def test_bad_input_fails_before_any_model_runs(pipes, kwargs, error, message, monkeypatch):
    *_, ours = pipes
    monkeypatch.setattr(ours.unet, "forward", lambda *a, **k: pytest.fail("the UNet ran"))
    monkeypatch.setattr(ours.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(error, match=message):
        ours(**{**ARGS, **kwargs})
