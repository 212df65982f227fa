"""Latent consistency (LCM) against the reference: LCM-distilled UNets (``time_cond_proj_dim``, the guidance
scale given as an embedding, no classifier-free guidance) and LCM-LoRAs on ordinary UNets, with
``LCMScheduler``, in the SD, SDXL, img2img, inpainting and SAG pipelines.

Also the cause of the reported "LCM images differ from the reference": the images match when both
libraries load the same folder; they differed when each built its tiny UNet in code under the same
seed (as the reference's own LCM tests do), because diffpipe constructed a block's attentions before
its resnets and so drew different initial weights. ``test_seeded_construction_*`` pins the
reference's construction order for every model the pipelines build.

Every expected image is computed by the reference at test time; the bound is 2/255 (output_type="np").
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from adapter_factory import assert_close, images, kohya_lora, lora_pairs, peft_lora, save_lora
from sd_factory import save_reference_pipeline
from sdxl_factory import save_reference_sdxl, tiny_unet_config

LCM_UNET = {"time_cond_proj_dim": 32}
SIZE = dict(height=32, width=32)
# What the published LCM-LoRAs train: attention, feed-forward, resnet convs (3x3), shortcuts, samplers.
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def _load(folder, task, *, lcm_scheduler=True):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
    ours = getattr(diffpipe, task).from_pretrained(folder)
    if lcm_scheduler:
        ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
        ours.scheduler = diffpipe.LCMScheduler.from_config(ours.scheduler.config)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def _both(ref, ours, **kwargs):
    kwargs = {"output_type": "np", **kwargs}
    expected, got = images(ref, kwargs), images(ours, kwargs)
    assert_close(expected, got)
    return got


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    return {
        "sd": save_reference_pipeline(
            root / "sd", safety_checker=False, seed=11, scheduler="DDIMScheduler", unet_kwargs=LCM_UNET
        ),
        "sd_base": save_reference_pipeline(root / "sd_base", safety_checker=False, seed=12),
        "xl": save_reference_sdxl(root / "xl", seed=13, scheduler="LCMScheduler", unet_kwargs=LCM_UNET),
        "xl_base": save_reference_sdxl(root / "xl_base", seed=14),
    }


def an_image(size=32):
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def a_mask(size=32):
    m = np.zeros((size, size), dtype=np.uint8)
    m[4 : size // 2, 6 : size - 4] = 255
    return PIL.Image.fromarray(m)


# ------------------------------------------------------------------------------ LCM-distilled UNets
@pytest.mark.parametrize("guidance_scale", [1.0, 8.0])
@pytest.mark.parametrize("steps", [1, 4])
def test_sd_with_an_lcm_unet(folders, guidance_scale, steps):
    ref, ours = _load(folders["sd"], "StableDiffusionPipeline")
    got = _both(
        ref,
        ours,
        prompt=["a squirrel", "a burger"],
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=2,
        **SIZE,
    )
    assert got.shape == (4, 32, 32, 3)


def test_sd_lcm_guidance_reaches_the_unet_as_an_embedding(folders):
    """CFG is off for a distilled UNet, so the scale acts only through ``timestep_cond``: two scales give
    two images (both equal to the reference's), and a negative prompt changes nothing."""
    ref, ours = _load(folders["sd"], "StableDiffusionPipeline")
    low = _both(ref, ours, prompt="a squirrel", num_inference_steps=2, guidance_scale=2.0, **SIZE)
    high = _both(ref, ours, prompt="a squirrel", num_inference_steps=2, guidance_scale=9.0, **SIZE)
    assert np.abs(low - high).max() > 1e-3
    negative = _both(
        ref, ours, prompt="a squirrel", negative_prompt="blurry", num_inference_steps=2, guidance_scale=9.0, **SIZE
    )
    np.testing.assert_array_equal(negative, high)


def test_sd_lcm_custom_timesteps_and_generator_list(folders):
    ref, ours = _load(folders["sd"], "StableDiffusionPipeline")
    _both(ref, ours, prompt="a squirrel", timesteps=[999, 499], guidance_scale=6.0, **SIZE)
    kwargs = dict(prompt=["a", "b"], num_inference_steps=4, guidance_scale=6.0, output_type="np", **SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    got = ours(generator=[torch.Generator().manual_seed(i) for i in range(2)], **kwargs).images
    assert_close(expected, got)


def test_guidance_scale_embedding_matches_the_reference(folders):
    ref, ours = _load(folders["sd"], "StableDiffusionPipeline", lcm_scheduler=False)
    w = torch.tensor([0.0, 1.5, 7.0])
    for dim in (32, 33, 256):
        torch.testing.assert_close(
            ours.get_guidance_scale_embedding(w, embedding_dim=dim),
            ref.get_guidance_scale_embedding(w, embedding_dim=dim),
            rtol=0,
            atol=0,
        )


def test_img2img_and_inpaint_with_an_lcm_unet(folders):
    ref, ours = _load(folders["sd"], "StableDiffusionPipeline")
    for task, extra in (
        ("StableDiffusionImg2ImgPipeline", dict(strength=0.6)),
        ("StableDiffusionInpaintPipeline", dict(mask_image=a_mask(), **SIZE)),
    ):
        import diffusers

        r = getattr(diffusers, task).from_pipe(ref)
        o = getattr(diffpipe, task).from_pipe(ours)
        for p in (r, o):
            p.set_progress_bar_config(disable=True)
        _both(r, o, prompt="a squirrel", image=an_image(), num_inference_steps=4, guidance_scale=6.0, **extra)


def test_sag_with_an_lcm_unet_runs_cfg_without_the_embedding(folders):
    """The reference's SAG pipeline guides every UNet with CFG and passes no guidance embedding."""
    import diffusers

    ref, ours = _load(folders["sd"], "StableDiffusionPipeline")
    r = diffusers.StableDiffusionSAGPipeline.from_pipe(ref)
    o = diffpipe.StableDiffusionSAGPipeline.from_pipe(ours)
    r.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    o.scheduler = diffpipe.DDIMScheduler.from_config(ours.scheduler.config)
    for p in (r, o):
        p.set_progress_bar_config(disable=True)
    _both(r, o, prompt="a squirrel", num_inference_steps=2, guidance_scale=6.0, sag_scale=0.75, **SIZE)


@pytest.mark.parametrize("guidance_scale", [1.0, 8.0])
def test_sdxl_with_an_lcm_unet(folders, guidance_scale):
    ref, ours = _load(folders["xl"], "StableDiffusionXLPipeline")
    _both(
        ref,
        ours,
        prompt="a squirrel",
        prompt_2="oil painting",
        num_inference_steps=4,
        guidance_scale=guidance_scale,
        num_images_per_prompt=2,
        **SIZE,
    )


def test_sdxl_img2img_with_an_lcm_unet(folders):
    import diffusers

    ref, ours = _load(folders["xl"], "StableDiffusionXLPipeline")
    r = diffusers.StableDiffusionXLImg2ImgPipeline.from_pipe(ref)
    o = diffpipe.StableDiffusionXLImg2ImgPipeline.from_pipe(ours)
    for p in (r, o):
        p.set_progress_bar_config(disable=True)
    _both(r, o, prompt="a squirrel", image=an_image(), strength=0.7, num_inference_steps=4, guidance_scale=5.0)


# ------------------------------------------------------------------------------ LCM-LoRA
def _lcm_lora_pairs(folder, seed):
    """Random LoRA pairs on the LCM-LoRA targets of the reference's own UNet (rank 4, LoCon convs)."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    return lora_pairs(unet, LCM_LORA_TARGETS, 4, torch.Generator().manual_seed(seed), std=0.2, conv_too=True)


@pytest.mark.parametrize("fuse", [False, True])
def test_sd_lcm_lora_kohya_layout(folders, tmp_path, fuse):
    """lcm-lora-sdv1-5 style: kohya keys with alphas over attention, feed-forward and resnet convs."""
    pairs = _lcm_lora_pairs(folders["sd_base"], seed=1)
    path = save_lora(tmp_path, kohya_lora({"unet": pairs}, {"unet": 8.0}), name="lcm_lora.safetensors")
    ref, ours = _load(folders["sd_base"], "StableDiffusionPipeline")
    without = images(
        ours, dict(prompt="a squirrel", num_inference_steps=4, guidance_scale=1.0, output_type="np", **SIZE)
    )
    for p in (ref, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.load_lora_weights(str(path), adapter_name="lcm")
            if fuse:
                p.fuse_lora()
    for gs in (1.0, 1.5):  # LCM-LoRA is run with guidance 1-2 (CFG on above 1: the base UNet is not distilled)
        got = _both(ref, ours, prompt="a squirrel", num_inference_steps=4, guidance_scale=gs, **SIZE)
    assert np.abs(got - without).max() > 0.02  # the LoRA took part


def test_sdxl_lcm_lora_peft_layout(folders):
    """lcm-lora-sdxl style: diffusers/peft keys on the UNet."""
    pairs = _lcm_lora_pairs(folders["xl_base"], seed=2)
    tensors, metadata = peft_lora({"unet": pairs}, alpha_by_component={"unet": 8})
    ref, ours = _load(folders["xl_base"], "StableDiffusionXLPipeline")
    for p in (ref, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.load_lora_weights(dict(tensors), adapter_name="lcm")
    _both(ref, ours, prompt="a squirrel", num_inference_steps=4, guidance_scale=1.0, **SIZE)


# ------------------------------------------------------------------------------ seeded construction
UNET_CONFIGS = {
    "sd": dict(
        block_out_channels=(4, 8),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
        time_cond_proj_dim=256,
    ),
    "sd3blocks": dict(
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=9,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        class_embed_type="timestep",
    ),
    "sdxl": {**tiny_unet_config(), "layers_per_block": 2, "time_cond_proj_dim": 32},
}
OTHER_MODELS = {
    "AutoencoderKL": dict(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=2,
        sample_size=32,
    ),
    "MotionAdapter": dict(
        block_out_channels=(8, 16),
        motion_layers_per_block=2,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=8,
    ),
}


def _seeded_states(cls_name, config):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        expected = getattr(diffusers, cls_name)(**config).state_dict()
    torch.manual_seed(0)
    got = getattr(diffpipe, cls_name)(**config).state_dict()
    return expected, got


def _assert_same_state(expected, got):
    assert list(got) == list(expected)  # names and registration order
    differing = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differing, f"{len(differing)} tensors differ from the reference's, first {differing[:3]}"


@pytest.mark.parametrize("config", sorted(UNET_CONFIGS))
def test_seeded_construction_gives_the_reference_unet(config):
    _assert_same_state(*_seeded_states("UNet2DConditionModel", UNET_CONFIGS[config]))


@pytest.mark.parametrize("cls_name", sorted(OTHER_MODELS))
def test_seeded_construction_gives_the_reference_model(cls_name):
    _assert_same_state(*_seeded_states(cls_name, OTHER_MODELS[cls_name]))


def test_lcm_pipeline_built_in_code_matches_the_reference():
    """The reference's own LCM fast test, end to end: both libraries build the tiny components in code
    under one seed (no folder), swap in LCMScheduler, and must draw the same image."""
    import diffusers
    from sd_factory import reference_components

    def build(lib):
        components = reference_components(seed=3, safety_checker=False, scheduler="DDIMScheduler")
        torch.manual_seed(0)
        components["unet"] = getattr(lib, "UNet2DConditionModel")(**UNET_CONFIGS["sd"])
        torch.manual_seed(0)
        components["vae"] = getattr(lib, "AutoencoderKL")(**OTHER_MODELS["AutoencoderKL"])
        components["scheduler"] = getattr(lib, "LCMScheduler").from_config(components["scheduler"].config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = getattr(lib, "StableDiffusionPipeline")(**components, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    _both(
        build(diffusers),
        build(diffpipe),
        prompt="A painting of a squirrel eating a burger",
        num_inference_steps=2,
        guidance_scale=6.0,
        **SIZE,
    )
