"""Stable Diffusion pipelines against the reference, on tiny pipelines the reference saved.

Every expected image is computed by the reference at test time from the same folder and seed;
the bound is the issue's: max abs difference <= 2/255 with output_type="np".
"""

from __future__ import annotations

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from sd_factory import save_reference_pipeline

TOL = 2 / 255
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-parity")
    return {
        "sd": save_reference_pipeline(root / "sd"),
        "flagged": save_reference_pipeline(root / "flagged", flag_everything=True, seed=1),
        "nosafety": save_reference_pipeline(root / "nosafety", safety_checker=False, seed=2),
        "inpaint9": save_reference_pipeline(
            root / "inpaint9", task="StableDiffusionInpaintPipeline", in_channels=9, safety_checker=False, seed=3
        ),
        "legacy": save_reference_pipeline(root / "legacy", legacy=True, seed=4),
    }


def load_both(folder, task: str, scheduler: str | None = None):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
        ours = getattr(diffpipe, task).from_pretrained(folder)
    if scheduler is not None:
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
        ours.scheduler = getattr(diffpipe, scheduler).from_config(ours.scheduler.config)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def run_both(ref, ours, seed=0, generator_list=False, **kwargs):
    def gen():
        if generator_list:
            n = kwargs.get("num_images_per_prompt", 1) * (
                len(kwargs["prompt"]) if isinstance(kwargs.get("prompt"), list) else 1
            )
            return [torch.Generator().manual_seed(seed + i) for i in range(n)]
        return torch.Generator().manual_seed(seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=gen(), output_type="np", **kwargs)
    got = ours(generator=gen(), output_type="np", **kwargs)
    return expected, got


def assert_close(expected, got):
    assert got.images.shape == expected.images.shape
    diff = np.abs(got.images - expected.images).max()
    assert diff <= TOL, f"max abs difference {diff:.5f} > 2/255"
    assert got.nsfw_content_detected == expected.nsfw_content_detected


def an_image():
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def a_mask():
    m = np.zeros((40, 48), dtype=np.uint8)
    m[8:30, 10:40] = 255
    return PIL.Image.fromarray(m)


SCHEDULERS = [None, "DDIMScheduler", "EulerAncestralDiscreteScheduler"]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd", "flagged", "nosafety"])
def test_text_to_image(folders, kind, scheduler):
    ref, ours = load_both(folders[kind], "StableDiffusionPipeline", scheduler)
    expected, got = run_both(ref, ours, prompt="a photo of a cat", num_inference_steps=3, **SIZE)
    assert_close(expected, got)
    if kind == "flagged":
        assert got.nsfw_content_detected == [True] and got.images.max() == 0
        # black against black says nothing of the denoising: compare what the checker was given
        args = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="latent", **SIZE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected_latents = ref(generator=torch.Generator().manual_seed(0), **args).images
        got_latents = ours(generator=torch.Generator().manual_seed(0), **args).images
        assert got_latents.abs().max() > 0.1
        torch.testing.assert_close(got_latents, expected_latents, rtol=0, atol=1e-4)
    if kind == "nosafety":
        assert got.nsfw_content_detected is None


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["sd", "nosafety"])
def test_image_to_image(folders, kind, scheduler):
    ref, ours = load_both(folders[kind], "StableDiffusionImg2ImgPipeline", scheduler)
    expected, got = run_both(ref, ours, prompt="a red dog", image=an_image(), strength=0.7, num_inference_steps=4)
    assert_close(expected, got)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", ["inpaint9", "sd"])
def test_inpainting(folders, kind, scheduler):
    ref, ours = load_both(folders[kind], "StableDiffusionInpaintPipeline", scheduler)
    for strength in (1.0, 0.75):
        expected, got = run_both(
            ref,
            ours,
            prompt="a blue cat",
            image=an_image(),
            mask_image=a_mask(),
            strength=strength,
            num_inference_steps=4,
            **SIZE,
        )
        assert_close(expected, got)


@pytest.mark.parametrize("kind", ["inpaint9", "sd"])
def test_inpainting_with_a_generator_list_and_a_callback_replacing_the_mask(folders, kind):
    """One image for four outputs (the reference encodes it with the first generator), and a mask a
    step-end callback replaced, which the later steps' blend (or the 9-channel input) reads."""
    ref, ours = load_both(folders[kind], "StableDiffusionInpaintPipeline", "DDIMScheduler")

    def unmask(pipe, i, t, tensors):
        return {"mask": torch.zeros_like(tensors["mask"])} if i == 0 else {}

    expected, got = run_both(
        ref,
        ours,
        generator_list=True,
        prompt=["a blue cat", "a red dog"],
        image=an_image(),
        mask_image=a_mask(),
        num_images_per_prompt=2,
        eta=0.5,
        strength=0.8,
        num_inference_steps=3,
        callback_on_step_end=unmask,
        callback_on_step_end_tensor_inputs=["latents", "mask"],
        **SIZE,
    )
    assert_close(expected, got)


def test_batch_options(folders):
    ref, ours = load_both(folders["nosafety"], "StableDiffusionPipeline", "DDIMScheduler")
    expected, got = run_both(
        ref,
        ours,
        prompt=["a photo of a cat", "a red dog"],
        negative_prompt=["blue", "jungle"],
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=5.0,
        guidance_rescale=0.7,
        eta=0.5,
        generator_list=True,
        **SIZE,
    )
    assert_close(expected, got)


def test_clip_skip_uses_an_earlier_layer_through_the_final_norm(folders):
    # The reference's clip_skip reads `text_encoder.text_model`, which transformers 5 removed, so the
    # oracle here is transformers itself: hidden state -(clip_skip + 1), then the final layer norm.
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folders["nosafety"])
    tokens = pipe.tokenizer(["a red dog"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(tokens.input_ids, output_hidden_states=True).hidden_states
        body = getattr(pipe.text_encoder, "text_model", pipe.text_encoder)
        expected = body.final_layer_norm(hidden[-2])
        got, _ = pipe.encode_prompt("a red dog", torch.device("cpu"), 1, False, clip_skip=1)
        plain, _ = pipe.encode_prompt("a red dog", torch.device("cpu"), 1, False)
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_guidance_off_and_given_embeddings_and_latents(folders):
    ref, ours = load_both(folders["nosafety"], "StableDiffusionPipeline")
    expected, got = run_both(ref, ours, prompt="a bear", guidance_scale=1.0, num_inference_steps=2, **SIZE)
    assert_close(expected, got)
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(5))
    negative = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(6))
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    expected, got = run_both(
        ref, ours, prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, num_inference_steps=2, **SIZE
    )
    assert_close(expected, got)


def test_img2img_with_generator_list_and_several_images(folders):
    ref, ours = load_both(folders["nosafety"], "StableDiffusionImg2ImgPipeline", "DDIMScheduler")
    expected, got = run_both(
        ref,
        ours,
        prompt="a jungle",
        image=an_image(),
        num_images_per_prompt=2,
        strength=0.5,
        num_inference_steps=4,
        generator_list=True,
    )
    assert_close(expected, got)


def test_legacy_layout_loads_and_matches(folders):
    ref, ours = load_both(folders["legacy"], "StableDiffusionPipeline")
    expected, got = run_both(ref, ours, prompt="a photo of a dog", num_inference_steps=3, **SIZE)
    assert_close(expected, got)


@pytest.mark.parametrize("output_type", ["pil", "pt", "latent"])
def test_output_types(folders, output_type):
    ref, ours = load_both(folders["nosafety"], "StableDiffusionPipeline")
    kwargs = dict(prompt="a cat", num_inference_steps=2, output_type=output_type, **SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=torch.Generator().manual_seed(0), **kwargs).images
    got = ours(generator=torch.Generator().manual_seed(0), **kwargs).images
    if output_type == "pil":
        assert all(isinstance(i, PIL.Image.Image) for i in got)
        diff = np.abs(np.asarray(got[0], dtype=int) - np.asarray(expected[0], dtype=int)).max()
        assert diff <= 2
    else:
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= TOL


def test_callback_on_step_end_can_replace_latents(folders):
    ref, ours = load_both(folders["nosafety"], "StableDiffusionPipeline")
    seen = []

    def halve(pipe, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"] * 0.5}

    kwargs = dict(
        prompt="a cat",
        num_inference_steps=3,
        callback_on_step_end=halve,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        **SIZE,
    )
    expected, got = run_both(ref, ours, **kwargs)
    assert_close(expected, got)
    half = len(seen) // 2  # the reference's calls, then ours: the same steps with the same tensors
    assert half >= 3 and seen[:half] == seen[half:]
    assert seen[half:][0] == (0, ["latents", "prompt_embeds"])


def test_legacy_unet_sample_size_gets_the_references_default_size(folders):
    # make_legacy marks the folder as written by diffusers 0.6 with sample_size 16 (< 64): the reference
    # rewrites it to 64, so the default image size is 64 * vae_scale_factor; we do the same.
    ref, ours = load_both(folders["legacy"], "StableDiffusionPipeline")
    assert ours.unet.config.sample_size == ref.unet.config.sample_size == 64


def test_a_unet_built_in_code_keeps_its_sample_size_as_in_the_reference(folders, caplog):
    """No version recorded (a model constructed, not loaded): the reference leaves sample_size alone,
    so the default image size follows it; a mended 64 would change every default-size image."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_loaded = diffusers.StableDiffusionPipeline.from_pretrained(folders["nosafety"])
    ours_loaded = diffpipe.StableDiffusionPipeline.from_pretrained(folders["nosafety"])
    ref_unet = diffusers.UNet2DConditionModel(
        **{k: v for k, v in ref_loaded.unet.config.items() if not k.startswith("_")}
    )
    ours_unet = diffpipe.UNet2DConditionModel(
        **{k: v for k, v in ours_loaded.unet.config.items() if not k.startswith("_")}
    )
    assert ours_unet.config.sample_size == ref_unet.config.sample_size < 64
    ref = diffusers.StableDiffusionPipeline(**{**ref_loaded.components, "unet": ref_unet})
    ours = diffpipe.StableDiffusionPipeline(**{**ours_loaded.components, "unet": ours_unet})
    assert ours.unet.config.sample_size == ref.unet.config.sample_size == ours_loaded.unet.config.sample_size
    assert "an old value" not in caplog.text


def test_bfloat16_on_cpu_end_to_end(folders):
    """bf16 on the CPU: runs end to end, stays close to our fp32 image (PSNR >= 30 dB) and to the
    reference's bf16 image."""
    import diffusers

    def generate(lib, dtype):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = lib.StableDiffusionPipeline.from_pretrained(folders["nosafety"], torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            "a photo of a cat",
            num_inference_steps=6,
            output_type="np",
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
        ).images.astype(np.float64)

    ours_bf16 = generate(diffpipe, torch.bfloat16)
    ours_fp32 = generate(diffpipe, torch.float32)
    psnr = 10 * np.log10(1.0 / np.mean((ours_bf16 - ours_fp32) ** 2))
    assert psnr >= 30, f"bf16 vs fp32 PSNR {psnr:.1f} dB"
    assert np.abs(ours_bf16 - generate(diffusers, torch.bfloat16)).max() <= TOL


def test_encode_prompt_with_only_the_text_components(folders):
    """Precomputing embeddings: unet=None, vae=None loads the text parts only (as in the reference), and
    encode_prompt gives the reference's tensors; a generating call says what is missing."""
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folders["nosafety"], unet=None, vae=None)
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folders["nosafety"], unet=None, vae=None)
    assert ours.unet is None and ours.vae is None
    for args in (("a cat", "cpu", 2, True), (["a", "b"], "cpu", 1, False)):
        expected = ref.encode_prompt(*args, negative_prompt=None)
        got = ours.encode_prompt(*args, negative_prompt=None)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert (e is None and g is None) or torch.equal(e, g)
    with pytest.raises(ValueError, match="has no unet, vae .*unet=None"):
        ours(prompt="a cat", num_inference_steps=2)
    embeds, negative = ours.encode_prompt("a cat", "cpu", 1, True)
    full = diffpipe.StableDiffusionPipeline.from_pretrained(folders["nosafety"], text_encoder=None, tokenizer=None)
    full.set_progress_bar_config(disable=True)
    image = full(
        prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="np", **SIZE
    ).images
    assert image.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="has no text_encoder, tokenizer"):
        full(prompt="a cat", num_inference_steps=2)
