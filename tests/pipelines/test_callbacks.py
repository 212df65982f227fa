"""diffpipe.callbacks against the reference's: the CFG cutoffs (SD, SDXL), the IP-Adapter scale cutoff,
several callbacks at once, a callback of one's own; and each pipeline's ``_callback_tensor_inputs``.
Expected images are the reference's, computed here (bound 2/255)."""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
import diffpipe.callbacks as ours_cb
from adapter_factory import assert_close, images, ip_adapter_state, load_both, tiny_image_encoder, write_ip_repo
from sd_factory import save_reference_pipeline
from sdxl_factory import save_reference_sdxl

ARGS = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=5, height=32, width=32, output_type="np")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("callbacks")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=31)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet")
    repo = write_ip_repo(root / "ip", {"ip.bin": ip_adapter_state(unet, seed=2)}, tiny_image_encoder())
    return {"sd": sd, "xl": save_reference_sdxl(root / "xl", seed=32), "ip": repo}


def both(folder, task="StableDiffusionPipeline"):
    return load_both(folder, task)


def callbacks(name, **kwargs):
    import diffusers.callbacks as ref_cb

    return getattr(ref_cb, name)(**kwargs), getattr(ours_cb, name)(**kwargs)


@pytest.mark.parametrize("cutoff", [dict(cutoff_step_ratio=0.4), dict(cutoff_step_ratio=None, cutoff_step_index=1)])
def test_sd_cfg_cutoff(folders, cutoff):
    ref, ours = both(folders["sd"])
    ref_cb, our_cb = callbacks("SDCFGCutoffCallback", **cutoff)
    expected = images(ref, {**ARGS, "callback_on_step_end": ref_cb})
    got = images(ours, {**ARGS, "callback_on_step_end": our_cb})
    assert_close(expected, got)
    latent = {**ARGS, "output_type": "latent"}  # guidance really stopped (the tiny VAE hides small changes)
    cut = images(ours, {**latent, "callback_on_step_end": our_cb})
    assert (cut - images(ours, latent)).abs().max() > 0.01
    assert ours.guidance_scale is None and not ours.do_classifier_free_guidance  # nothing left after the call


def test_sdxl_cfg_cutoff(folders):
    ref, ours = both(folders["xl"], "StableDiffusionXLPipeline")
    ref_cb, our_cb = callbacks("SDXLCFGCutoffCallback", cutoff_step_ratio=0.5)
    args = {**ARGS, "guidance_scale": 6.0}
    assert_close(
        images(ref, {**args, "callback_on_step_end": ref_cb}), images(ours, {**args, "callback_on_step_end": our_cb})
    )


def test_ip_adapter_scale_cutoff_and_several_callbacks_at_once(folders):
    import diffusers.callbacks as ref_module

    ref, ours = both(folders["sd"])
    for pipe in (ref, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_ip_adapter(str(folders["ip"]), subfolder="models", weight_name="ip.bin")
    face = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    args = {**ARGS, "ip_adapter_image": face}
    ref_ip, our_ip = callbacks("IPAdapterScaleCutoffCallback", cutoff_step_ratio=None, cutoff_step_index=2)
    assert_close(
        images(ref, {**args, "callback_on_step_end": ref_ip}), images(ours, {**args, "callback_on_step_end": our_ip})
    )
    for pipe in (ref, ours):
        pipe.set_ip_adapter_scale(1.0)
    ref_cfg, our_cfg = callbacks("SDCFGCutoffCallback", cutoff_step_ratio=0.8)
    ref_ip, our_ip = callbacks("IPAdapterScaleCutoffCallback", cutoff_step_ratio=0.4)
    ref_multi = ref_module.MultiPipelineCallbacks([ref_ip, ref_cfg])
    our_multi = ours_cb.MultiPipelineCallbacks([our_ip, our_cfg])
    assert our_multi.tensor_inputs == ref_multi.tensor_inputs == ["prompt_embeds"]
    # at the last step guidance is off, so the doubled IP-Adapter embeddings are not read any more
    args = {**args, "num_inference_steps": 5}
    assert_close(
        images(ref, {**args, "callback_on_step_end": ref_multi}),
        images(ours, {**args, "callback_on_step_end": our_multi}),
    )


class Halve(ours_cb.PipelineCallback):
    """A callback of one's own: halves the latents at every step and records what it saw."""

    tensor_inputs = ["latents"]

    def __init__(self, cutoff_step_ratio=1.0, cutoff_step_index=None):
        super().__init__(cutoff_step_ratio, cutoff_step_index)
        self.seen = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        self.seen.append((step_index, pipeline.num_timesteps, pipeline.guidance_scale))
        return {"latents": callback_kwargs["latents"] * 0.5}


def test_a_callback_of_one_s_own_checks_its_cutoff_arguments():
    cb = Halve(cutoff_step_ratio=None, cutoff_step_index=0)
    assert cb.config.cutoff_step_index == 0 and cb.tensor_inputs == ["latents"]
    with pytest.raises(ValueError, match="exactly one of"):
        Halve(cutoff_step_ratio=0.5, cutoff_step_index=1)
    with pytest.raises(ValueError, match="cutoff_step_ratio must be a number in"):
        Halve(cutoff_step_ratio=1.5)


def test_an_own_callback_runs_with_its_tensor_inputs(folders):
    cb = Halve()
    _, ours = both(folders["sd"])
    plain = images(ours, ARGS)
    halved = images(ours, {**ARGS, "callback_on_step_end": cb})
    assert cb.seen == [(i, ours.num_timesteps, 7.5) for i in range(ours.num_timesteps)]  # PNDM: 6 for 5 steps
    assert np.abs(halved - plain).max() > 0.01


@pytest.mark.parametrize(
    "name",
    [
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
        "AnimateDiffPipeline",
    ],
)
def test_callback_tensor_inputs_are_the_reference_s(name):
    import diffusers

    assert getattr(diffpipe, name)._callback_tensor_inputs == getattr(diffusers, name)._callback_tensor_inputs


def test_guidance_scale_can_only_be_changed_during_a_call(folders):
    _, ours = both(folders["sd"])
    with pytest.raises(RuntimeError, match="during a pipeline call"):
        ours._guidance_scale = 0.0
    assert torch.is_grad_enabled()
