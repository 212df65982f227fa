"""Stable Diffusion XL against the reference, on tiny pipelines the reference saved.

Every expected image is computed by the reference at test time from the same folder and seed; the
bound is the issue's: max abs difference <= 2/255 with output_type="np". Then the spec's "customize
a pipeline" example against the local Hub server, the full-size text encoders on the meta device,
and SDXL's own rules (VAE upcast, watermark, micro-conditioning, bad input).
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import diffpipe
from sdxl_factory import (
    WIDTH_1,
    WIDTH_2,
    an_image,
    assert_close,
    load_both,
    run_both,
    save_reference_sdxl,
    sdxl_components,
)

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-parity")
    return {
        "xl": save_reference_sdxl(root / "xl"),
        "refiner": save_reference_sdxl(root / "refiner", task="StableDiffusionXLImg2ImgPipeline", refiner=True, seed=1),
        "stats": save_reference_sdxl(root / "stats", latents_stats=True, seed=2),
    }


SCHEDULERS = [None, "HeunDiscreteScheduler"]  # Euler (the checkpoint's) and the spec's second-order Heun


# ---------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_text_to_image(folders, scheduler):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline", scheduler)
    assert_close(*run_both(ref, ours, prompt="a photo of a cat", num_inference_steps=3, **SIZE))


def test_two_prompts_negatives_and_several_images(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline", "DDIMScheduler")
    expected, got = run_both(
        ref,
        ours,
        prompt=["a photo of a cat", "a red dog"],
        prompt_2=["in a jungle", "blue"],
        negative_prompt=["blue", "jungle"],
        negative_prompt_2="a cat",
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=6.0,
        guidance_rescale=0.5,
        eta=0.3,
        generator_list=4,
        **SIZE,
    )
    assert got.shape[0] == 4
    assert_close(expected, got)
    # prompt_2 does reach the second encoder
    alone = ours(
        prompt=["a photo of a cat", "a red dog"],
        negative_prompt=["blue", "jungle"],
        negative_prompt_2="a cat",
        num_images_per_prompt=2,
        num_inference_steps=3,
        guidance_scale=6.0,
        guidance_rescale=0.5,
        eta=0.3,
        output_type="np",
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
        **SIZE,
    ).images
    assert np.abs(alone - got).max() > 1e-3


def test_force_zeros_for_empty_prompt_off_and_guidance_off(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline", force_zeros_for_empty_prompt=False)
    assert ours.config.force_zeros_for_empty_prompt is False
    assert_close(*run_both(ref, ours, prompt="a bear", num_inference_steps=2, **SIZE))
    assert_close(*run_both(ref, ours, prompt="a bear", guidance_scale=1.0, num_inference_steps=2, **SIZE))


def test_micro_conditioning_sizes_and_crops(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline")
    kwargs = dict(
        prompt="a cat",
        num_inference_steps=2,
        original_size=(64, 48),
        crops_coords_top_left=(4, 8),
        target_size=(32, 40),
        negative_original_size=(16, 16),
        negative_crops_coords_top_left=(2, 0),
        negative_target_size=(24, 24),
        **SIZE,
    )
    expected, got = run_both(ref, ours, **kwargs)
    assert_close(expected, got)
    plain = ours(
        generator=torch.Generator().manual_seed(0), output_type="np", prompt="a cat", num_inference_steps=2, **SIZE
    ).images
    assert np.abs(plain - got).max() > 1e-3  # the ids do condition the UNet


def test_given_embeddings_and_latents(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref.encode_prompt(
            "a red dog",
            prompt_2="a blue cat",
            device=torch.device("cpu"),
            num_images_per_prompt=2,
            negative_prompt="jungle",
            clip_skip=1,
        )
    got = ours.encode_prompt(
        "a red dog",
        prompt_2="a blue cat",
        device=torch.device("cpu"),
        num_images_per_prompt=2,
        negative_prompt="jungle",
        clip_skip=1,
    )
    assert len(got) == 4
    for e, g in zip(expected, got):
        assert g.shape == e.shape and torch.allclose(g, e, atol=1e-5)
    embeds, negative, pooled, negative_pooled = (t[:1] for t in got)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    assert_close(
        *run_both(
            ref,
            ours,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            latents=latents,
            num_inference_steps=2,
            **SIZE,
        )
    )


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_to_image(folders, scheduler):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLImg2ImgPipeline", scheduler)
    assert_close(
        *run_both(
            ref,
            ours,
            prompt="a red dog",
            image=an_image(),
            strength=0.6,
            num_inference_steps=4,
            crops_coords_top_left=(2, 2),
        )
    )


def test_image_to_image_batch_with_generator_list(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLImg2ImgPipeline", "DDIMScheduler")
    assert_close(
        *run_both(
            ref,
            ours,
            prompt=["a jungle", "a cat"],
            image=an_image(),
            num_images_per_prompt=2,
            strength=0.5,
            num_inference_steps=4,
            generator_list=4,
        )
    )


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_base_then_refiner_with_denoising_end_and_start(folders, scheduler):
    base_ref, base = load_both(folders["xl"], "StableDiffusionXLPipeline", scheduler)
    refiner_ref, refiner = load_both(folders["refiner"], "StableDiffusionXLImg2ImgPipeline", scheduler)
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score is True
    expected, got = run_both(
        base_ref, base, prompt="a lion", num_inference_steps=6, denoising_end=0.6, output_type="latent", **SIZE
    )
    assert (got - expected).abs().max() <= 1e-4
    assert base.num_timesteps < len(base.scheduler.timesteps)  # it stopped early
    expected, got = run_both(
        refiner_ref,
        refiner,
        prompt="a lion",
        image=got,
        num_inference_steps=6,
        denoising_start=0.6,
        aesthetic_score=7.0,
        negative_aesthetic_score=2.0,
    )
    assert_close(expected, got)


def test_refiner_alone_with_aesthetic_score(folders):
    ref, ours = load_both(folders["refiner"], "StableDiffusionXLImg2ImgPipeline")
    expected, got = run_both(ref, ours, prompt="a lion", image=an_image(), strength=0.7, num_inference_steps=4)
    assert_close(expected, got)
    other = ours(
        prompt="a lion",
        image=an_image(),
        strength=0.7,
        num_inference_steps=4,
        aesthetic_score=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert np.abs(other - got).max() > 1e-3  # the score conditions the UNet


def test_img2img_denoising_end_and_latents_input(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLImg2ImgPipeline")
    assert_close(
        *run_both(ref, ours, prompt="a cat", image=an_image(), strength=0.9, num_inference_steps=5, denoising_end=0.5)
    )
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    assert_close(*run_both(ref, ours, prompt="a cat", image=latents, strength=0.5, num_inference_steps=4))


def test_vae_with_latent_statistics(folders):
    ref, ours = load_both(folders["stats"], "StableDiffusionXLPipeline")
    assert_close(*run_both(ref, ours, prompt="a cat", num_inference_steps=2, **SIZE))
    ref, ours = load_both(folders["stats"], "StableDiffusionXLImg2ImgPipeline")
    assert_close(*run_both(ref, ours, prompt="a cat", image=an_image(), num_inference_steps=4, strength=0.5))


def test_callback_sees_and_replaces_sdxl_tensors(folders):
    ref, ours = load_both(folders["xl"], "StableDiffusionXLPipeline")
    seen = []

    def edit(pipe, i, t, tensors):
        seen.append((i, sorted(tensors), tuple(tensors["add_time_ids"].shape)))
        return {"latents": tensors["latents"] * 0.9, "add_time_ids": tensors["add_time_ids"] + 1.0}

    kwargs = dict(
        prompt="a cat",
        num_inference_steps=3,
        callback_on_step_end=edit,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"],
        **SIZE,
    )
    assert_close(*run_both(ref, ours, **kwargs))
    half = len(seen) // 2
    assert half == 3 and seen[:half] == seen[half:]
    assert seen[0] == (0, ["add_text_embeds", "add_time_ids", "latents", "prompt_embeds"], (2, 6))


def test_our_save_loads_in_the_reference_with_the_same_images(folders, tmp_path):
    import diffusers

    ours = diffpipe.StableDiffusionXLImg2ImgPipeline.from_pretrained(folders["refiner"])
    ours.save_pretrained(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "saved", add_watermarker=False)
    assert ref.config.requires_aesthetics_score is True and ref.text_encoder is None
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    assert_close(*run_both(ref, ours, prompt="a lion", image=an_image(), strength=0.5, num_inference_steps=2))


# ---------------------------------------------------------------------------------------- AutoPipeline
def test_auto_pipelines_and_from_pipe(folders):
    from diffpipe import (
        AutoPipelineForImage2Image,
        AutoPipelineForInpainting,
        AutoPipelineForText2Image,
        DiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    generic = DiffusionPipeline.from_pretrained(folders["xl"])
    assert type(generic) is StableDiffusionXLPipeline
    t2i = AutoPipelineForText2Image.from_pretrained(folders["xl"])
    assert type(t2i) is StableDiffusionXLPipeline
    i2i = AutoPipelineForImage2Image.from_pipe(t2i)
    assert type(i2i) is StableDiffusionXLImg2ImgPipeline
    assert all(i2i.components[k] is v for k, v in t2i.components.items())
    assert i2i.config.requires_aesthetics_score is False
    assert type(AutoPipelineForText2Image.from_pipe(i2i)) is StableDiffusionXLPipeline
    refiner = AutoPipelineForImage2Image.from_pretrained(folders["refiner"])
    assert type(refiner) is StableDiffusionXLImg2ImgPipeline and refiner.config.requires_aesthetics_score is True
    back = StableDiffusionXLPipeline.from_pipe(i2i, force_zeros_for_empty_prompt=False)
    assert back.unet is t2i.unet and back.config.force_zeros_for_empty_prompt is False
    inpaint = AutoPipelineForInpainting.from_pipe(t2i)  # more in test_sdxl_inpaint.py
    assert type(inpaint).__name__ == "StableDiffusionXLInpaintPipeline" and inpaint.unet is t2i.unet


# ---------------------------------------------------------------------------------------- VAE upcast
def _record_decode_dtypes(vae):
    seen = []
    real = vae.decode

    def decode(z, return_dict=True, **kwargs):
        seen.append((vae.dtype, z.dtype))
        return (torch.zeros(z.shape[0], 3, z.shape[2] * 2, z.shape[3] * 2, dtype=z.dtype),)

    vae.decode = decode
    return seen, real


@pytest.mark.parametrize("force_upcast", [True, False])
def test_vae_upcast_rule_in_float16(tmp_path, force_upcast):
    components = sdxl_components(tmp=tmp_path, force_upcast=force_upcast)
    from diffpipe import AutoencoderKL

    components["vae"].save_pretrained(tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=torch.float16)
    save_reference_sdxl(tmp_path / "xl")
    pipe = diffpipe.StableDiffusionXLPipeline.from_pretrained(tmp_path / "xl", vae=vae)
    seen, _ = _record_decode_dtypes(vae)
    pipe._decode(torch.zeros(1, 4, 16, 16, dtype=torch.float16))
    # the reference's rule: a float16 VAE whose config says force_upcast decodes in float32, then goes back
    assert seen == ([(torch.float32, torch.float32)] if force_upcast else [(torch.float16, torch.float16)])
    assert vae.dtype == torch.float16
    # encoding (img2img) follows the config too, and leaves the VAE's dtype as it found it
    encoded = []
    vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append((vae.dtype, args[0].dtype)))
    try:
        pipe._encode_image(torch.zeros(1, 3, 32, 32), torch.Generator().manual_seed(0))
    except RuntimeError:  # some float16 kernels are missing on CPU; the dtype seen on entry is what counts
        assert not force_upcast
    assert encoded[0] == ((torch.float32, torch.float32) if force_upcast else (torch.float16, torch.float16))
    assert vae.dtype == torch.float16


# ---------------------------------------------------------------------------------------- watermark
def test_watermark_is_off_without_the_package_and_named_when_asked_for(folders):
    from diffpipe.pipelines.sd_xl import watermark_available

    assert not watermark_available()  # diffpipe does not install invisible-watermark
    pipe = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"])
    assert pipe.watermark is None
    with pytest.raises(ImportError, match="pip install invisible-watermark"):
        diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], add_watermarker=True)


def test_watermark_through_an_installed_package(folders, monkeypatch):
    calls = []

    class FakeEncoder:
        def set_watermark(self, kind, bits):
            calls.append((kind, bits))

        def encode(self, bgr, method):
            calls.append((method, bgr.shape, float(bgr[0, 0, 0]), float(bgr[0, 0, 2])))
            return np.zeros_like(bgr)

    fake = types.ModuleType("imwatermark")
    fake.__spec__ = importlib.machinery.ModuleSpec("imwatermark", None)
    fake.WatermarkEncoder = FakeEncoder
    monkeypatch.setitem(sys.modules, "imwatermark", fake)
    pipe = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"])  # default: on when installed
    assert pipe.watermark is not None
    bits = calls[0][1]
    assert (
        calls[0][0] == "bits"
        and len(bits) == 48
        and int("".join(map(str, bits)), 2) == 0b101100111110110010010000011110111011000110011110
    )
    small = torch.full((1, 3, 32, 32), 0.5)
    assert pipe.watermark.apply(small) is small  # below 256 pixels: left alone
    image = torch.full((1, 3, 256, 256), -1.0)
    image[:, 0] = 1.0  # pure red
    out = pipe.watermark.apply(image)
    assert calls[1] == ("dwtDct", (256, 256, 3), 0.0, 255.0)  # BGR order: blue first, red last
    assert out.shape == image.shape and float(out.min()) == -1.0  # the encoder's output, back in [-1, 1]
    assert diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], add_watermarker=False).watermark is None


# ---------------------------------------------------------------------------------------- bad input
class _NoUNet:
    def __init__(self, pipe):
        self.handle = pipe.unet.register_forward_pre_hook(self._fail)

    @staticmethod
    def _fail(*_):
        raise AssertionError("the UNet ran before the input was rejected")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_bad_input_is_rejected_before_the_unet_runs(folders):
    pipe = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"])
    i2i = diffpipe.StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    embeds = torch.zeros(1, 77, WIDTH_1 + WIDTH_2)
    cases = [
        (pipe, dict(prompt_embeds=embeds), ValueError, "pooled_prompt_embeds"),
        (pipe, dict(prompt="a", prompt_2="b", prompt_embeds=embeds), ValueError, "prompt_2= or prompt_embeds="),
        (pipe, dict(prompt="a", prompt_2=3), TypeError, "prompt_2 must be a string"),
        (pipe, dict(prompt=["a", "b"], negative_prompt_2=["x"]), ValueError, "negative_prompt_2 has 1 entries"),
        (pipe, dict(prompt="a", denoising_end=1.5), ValueError, "denoising_end"),
        (pipe, dict(prompt="a", original_size=(32, 32, 1)), ValueError, "added embedding of width"),
        (
            pipe,
            dict(prompt="a", callback_on_step_end_tensor_inputs=["negative_prompt_embeds"]),
            ValueError,
            "callback_on_step_end_tensor_inputs",
        ),
        (i2i, dict(prompt="a"), ValueError, "needs image="),
        (
            i2i,
            dict(prompt="a", image=an_image(), denoising_start=0.7, denoising_end=0.5),
            ValueError,
            "must be below denoising_end",
        ),
        (i2i, dict(prompt="a", image=an_image(), strength=1.5), ValueError, "strength"),
    ]
    with _NoUNet(pipe):
        for target, kwargs, error, match in cases:
            with pytest.raises(error, match=match):
                target(num_inference_steps=2, **kwargs)
        # a base UNet under a refiner config: the aesthetic score makes 5 ids where the UNet wants 6
        i2i.register_to_config(requires_aesthetics_score=True)
        with pytest.raises(ValueError, match="requires_aesthetics_score=True makes 5 ids"):
            i2i(prompt="a", image=an_image(), num_inference_steps=2)


def test_a_non_sdxl_unet_or_a_missing_encoder_is_named(folders, tmp_path):
    from sd_factory import save_reference_pipeline

    sd = diffpipe.StableDiffusionPipeline.from_pretrained(
        save_reference_pipeline(tmp_path / "sd", safety_checker=False)
    )
    pipe = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], unet=sd.unet)
    with pytest.raises(ValueError, match="addition_embed_type='text_time'"):
        pipe(prompt="a", num_inference_steps=1)
    with pytest.raises(ValueError, match="each text encoder needs its tokenizer"):
        diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], tokenizer_2=None)
    no_te2 = diffpipe.StableDiffusionXLPipeline.from_pretrained(folders["xl"], text_encoder_2=None, tokenizer_2=None)
    with pytest.raises(ValueError, match="no text_encoder_2"):
        no_te2(prompt="a", num_inference_steps=1)


# ---------------------------------------------------------------------------------------- full size
SDXL_TEXT_ENCODER = {  # stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json (CLIP ViT-L/14)
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}
SDXL_TEXT_ENCODER_2 = {  # text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower, with projection)
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "torch_dtype": "float16",
    "vocab_size": 49408,
}


def _meta_text_encoder(class_name: str, config: dict, how):
    import transformers

    cfg = transformers.CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        return how(class_name)(cfg)


def test_full_size_text_encoders_and_unet_wire_up_on_the_meta_device(tmp_path):
    import diffusers
    import transformers
    from sdxl_factory import SDXL_UNET

    from diffpipe.models.unet_2d_condition import UNet2DConditionModel
    from diffpipe.io import components as loading

    ours, theirs = {}, {}
    ref_init = inspect.signature(diffusers.StableDiffusionXLPipeline.__init__).parameters
    for slot, config in (("text_encoder", SDXL_TEXT_ENCODER), ("text_encoder_2", SDXL_TEXT_ENCODER_2)):
        name = config["architectures"][0]
        # our loader's class for the model_index entry, and the class the reference's pipeline names
        ours[slot] = _meta_text_encoder(
            name, config, lambda n: loading.resolve("transformers", n, component=slot, where="test").cls
        )
        theirs[slot] = _meta_text_encoder(name, config, lambda n: ref_init[slot].annotation)
        mine = {k: tuple(v.shape) for k, v in ours[slot].state_dict().items()}
        ref = {k: tuple(v.shape) for k, v in theirs[slot].state_dict().items()}
        assert mine == ref
        assert all(p.is_meta for p in ours[slot].parameters())
    keys = {k: tuple(v.shape) for k, v in ours["text_encoder_2"].state_dict().items()}
    assert keys["text_projection.weight"] == (1280, 1280) and "text_projection.bias" not in keys
    assert sum(k.endswith("self_attn.q_proj.weight") for k in keys) == 32
    assert isinstance(ours["text_encoder_2"], transformers.CLIPTextModelWithProjection)

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        ref_unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
        vae = diffpipe.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            latent_channels=4,
            sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    # the widths that have to agree: 768 + 1280 = cross-attention 2048; 1280 + 6 x 256 = 2816
    assert SDXL_TEXT_ENCODER["hidden_size"] + SDXL_TEXT_ENCODER_2["hidden_size"] == unet.config.cross_attention_dim
    assert unet.add_embedding.linear_1.in_features == ref_unet.add_embedding.linear_1.in_features == 2816

    from sd_factory import write_tokenizer
    from transformers import CLIPTokenizer

    write_tokenizer(tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    pipe = diffpipe.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=ours["text_encoder"],
        text_encoder_2=ours["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=CLIPTokenizer.from_pretrained(tmp_path / "tok", pad_token="!"),
        unet=unet,
        scheduler=diffpipe.EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    meta = torch.device("meta")
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt("a cat", device=meta, negative_prompt="dog")
    assert tuple(embeds.shape) == tuple(negative.shape) == (1, 77, 2048)
    assert tuple(pooled.shape) == tuple(negative_pooled.shape) == (1, 1280)
    run = types.SimpleNamespace(dtype=torch.float32, pooled=pooled)
    time_ids = pipe._time_ids([1024, 1024, 0, 0, 1024, 1024], run)
    expected = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    assert torch.equal(time_ids, expected)
    with torch.no_grad():
        out = unet(
            torch.empty(1, 4, 128, 128, device=meta),
            torch.tensor([999]),
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.to(meta)},
        ).sample
    assert tuple(out.shape) == (1, 4, 128, 128)


# ---------------------------------------------------------------------------------------- the spec
REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"


@pytest.fixture(scope="module")
def spec_repos(tmp_path_factory, _hub_endpoint):
    """The SDXL base layout (fp32 and fp16 safetensors, fp32 .bin) and an fp16-safe VAE repo."""
    import diffusers

    root = tmp_path_factory.mktemp("spec-xl")
    folder = save_reference_sdxl(root / "xl-base", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
        pipe.save_pretrained(folder, safe_serialization=False)
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        vae = sdxl_components(seed=6, tmp=root, force_upcast=False)["vae"]  # the fp16-fix VAE's config
        vae.save_pretrained(root / "vae-fix")
        vae.half().save_pretrained(root / "vae-fix", variant="fp16")
    _hub_endpoint.add_repo(REPO, folder)
    _hub_endpoint.add_repo(VAE_REPO, root / "vae-fix")
    return folder


def test_spec_customize_sdxl_with_heun_and_an_fp16_vae(hub, spec_repos, hf_cache):
    from diffpipe import AutoencoderKL, HeunDiscreteScheduler, StableDiffusionXLPipeline

    scheduler = HeunDiscreteScheduler.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(
        "madebyollin/sdxl-vae-fp16-fix", torch_dtype=torch.float16, use_safetensors=True
    )
    assert vae.dtype == torch.float16 and vae.config.force_upcast is False
    hub.clear_log()
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        "stabilityai/stable-diffusion-xl-base-1.0",
        scheduler=scheduler,
        vae=vae,
        torch_dtype=torch.float16,
        variant="fp16",
        use_safetensors=True,
    )
    assert type(pipeline) is StableDiffusionXLPipeline
    assert pipeline.scheduler is scheduler and pipeline.vae is vae
    assert pipeline.config["scheduler"] == ["diffusers", "HeunDiscreteScheduler"]
    assert {pipeline.unet.dtype, pipeline.text_encoder.dtype, pipeline.text_encoder_2.dtype} == {torch.float16}
    fetched = hub.downloads(REPO)
    assert not any(f.startswith(("vae/", "scheduler/")) for f in fetched)  # overridden: never fetched
    weights = sorted(f for f in fetched if f.endswith((".safetensors", ".bin")))
    assert weights == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    # one tiny step in float32 (float16 kernels are patchy on CPU)
    pipeline.to(torch.float32).set_progress_bar_config(disable=True)
    image = pipeline(
        "an astronaut", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="np", **SIZE
    ).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
