"""IP-Adapter against the reference, on tiny pipelines and adapters with random weights in the
published formats (plain, plus, full-face; ``.bin`` and ``.safetensors``).

Every expected image is computed by the reference at test time from the same folders and seeds; the
bound is max abs difference <= 2/255 with output_type="np".
"""

from __future__ import annotations


import numpy as np
import PIL.Image
import pytest
import torch

import diffpipe
from adapter_factory import assert_close, images, ip_adapter_state, load_both, tiny_image_encoder, write_ip_repo
from diffpipe.errors import StateDictMismatchError, UnsafeCheckpointError
from sd_factory import save_reference_pipeline

ARGS = dict(
    prompt="bear eats pizza",
    negative_prompt="wrong white balance, dark",
    num_inference_steps=3,
    height=32,
    width=32,
    output_type="np",
)


def an_image(seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import diffusers

    root = tmp_path_factory.mktemp("ip-adapter")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=3)
    with_checker = save_reference_pipeline(root / "sd-checker", seed=4)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd / "unet")  # layer order and widths: the oracle's
    states = {
        f"ip-{kind}.bin": ip_adapter_state(unet, kind, seed=i) for i, kind in enumerate(("plain", "plus", "full"))
    }
    states["ip-plain.safetensors"] = ip_adapter_state(unet, "plain", seed=7)
    repo = write_ip_repo(root / "IP-Adapter", states, tiny_image_encoder())
    return {"sd": sd, "checker": with_checker, "repo": repo, "states": states}


def run(pipe, seed=0, **kwargs):
    return images(pipe, {**ARGS, **kwargs}, seed)


@pytest.mark.parametrize("weight_name", ["ip-plain.bin", "ip-plus.bin", "ip-full.bin", "ip-plain.safetensors"])
def test_parity_per_format(folders, weight_name):
    ref, ours = load_both(folders["sd"])
    for pipe in (ref, ours):
        pipe.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name=weight_name)
        pipe.set_ip_adapter_scale(0.6)
    assert type(ours.image_encoder).__name__ == "CLIPVisionModelWithProjection"
    assert ours.config["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert ours.feature_extractor is not None  # made for the encoder, as the reference does
    expected, got = run(ref, ip_adapter_image=an_image()), run(ours, ip_adapter_image=an_image())
    assert_close(expected, got)
    # the adapter matters: without the image prompt (scale 0) the image is clearly different
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(run(ours, ip_adapter_image=an_image()) - got).max() > 0.02
    # the UNet's state dict is the reference's, key for key and value for value
    theirs, mine = ref.unet.state_dict(), ours.unet.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_two_adapters_with_per_block_scales(folders):
    ref, ours = load_both(folders["sd"])
    names = ["ip-plain.bin", "ip-plus.bin"]
    scales = [0.5, {"down": {"block_1": 0.3}, "up": {"block_0": [0.0, 1.0]}}]
    for pipe in (ref, ours):
        pipe.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name=names)
        pipe.set_ip_adapter_scale(scales)
    images = [an_image(1), an_image(2)]
    assert_close(run(ref, ip_adapter_image=images), run(ours, ip_adapter_image=images))
    procs = ours.unet.attn_processors
    assert procs["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"].scale == [0.5, 0.0]
    assert procs["up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"].scale == [0.5, 1.0]
    assert procs["mid_block.attentions.0.transformer_blocks.0.attn2.processor"].scale == [0.5, 0.0]
    with pytest.raises(ValueError, match="3 scale configs for 2 loaded IP-Adapters"):
        ours.set_ip_adapter_scale([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="has 2 transformers; got 3 scales"):
        ours.set_ip_adapter_scale({"up": {"block_0": [1.0, 1.0, 1.0]}})
    with pytest.raises(ValueError, match=r"no attention block\(s\) \['block_0'\]"):
        ours.set_ip_adapter_scale({"down": {"block_0": 1.0}})


def test_precomputed_image_embeds(folders):
    ref, ours = load_both(folders["sd"])
    for pipe in (ref, ours):
        pipe.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plus.bin")
    embeds = ours.prepare_ip_adapter_image_embeds(an_image(), None, torch.device("cpu"), 1, True)
    assert len(embeds) == 1 and embeds[0].shape[:2] == (2, 1)  # [negative, positive] x 1 image
    from_image = run(ours, ip_adapter_image=an_image())
    from_embeds = run(ours, ip_adapter_image_embeds=embeds)
    assert np.array_equal(from_image, from_embeds)
    assert_close(run(ref, ip_adapter_image_embeds=embeds), from_embeds)


def test_sag_with_ip_adapter(folders):
    """The spec's call (no classifier-free guidance, sag_scale=0.75) against the reference; with
    guidance, the reference's SAG gives the UNet only the positive image prompt for a batch holding
    both halves (its IP processor then splits one image's tokens across them), so there the check is
    that SAG without its term equals Stable Diffusion with the image prompt."""
    import diffusers

    ref_sd, sd = load_both(folders["checker"])
    for pipe in (ref_sd, sd):
        pipe.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
        pipe.set_ip_adapter_scale(0.6)
    ref = diffusers.StableDiffusionSAGPipeline.from_pipe(ref_sd)
    ours = diffpipe.StableDiffusionSAGPipeline.from_pipe(sd)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    spec = dict(ip_adapter_image=an_image(), guidance_scale=1.0, sag_scale=0.75)
    got = run(ours, seed=33, **spec)
    assert_close(run(ref, seed=33, **spec), got)
    assert np.abs(run(ours, seed=33, **{**spec, "sag_scale": 0.0}) - got).max() > 1e-3  # SAG acts
    plain = run(ours, ip_adapter_image=an_image(), sag_scale=0.0)
    assert_close(run(ref_sd, ip_adapter_image=an_image()), plain)
    guided = run(ours, ip_adapter_image=an_image(), sag_scale=0.75)
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3


def test_sdxl_parity(tmp_path):
    from sdxl_factory import save_reference_sdxl

    folder = save_reference_sdxl(tmp_path / "sdxl")
    ref, ours = load_both(folder, "StableDiffusionXLPipeline")
    state = ip_adapter_state(ref.unet, "plain", seed=1)
    repo = write_ip_repo(
        tmp_path / "ip", {"ip-adapter_sdxl.safetensors": state}, tiny_image_encoder(), subfolder="sdxl_models"
    )
    for pipe in (ref, ours):
        pipe.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name="ip-adapter_sdxl.safetensors")
        pipe.set_ip_adapter_scale(0.7)
    kwargs = dict(negative_prompt=None, ip_adapter_image=an_image())
    assert_close(run(ref, **kwargs), run(ours, **kwargs))


def test_unload_through_a_shared_pipeline(folders):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["checker"])
    sd.set_progress_bar_config(disable=True)
    base_state = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    before = run(sd)
    sd.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
    sag = diffpipe.StableDiffusionSAGPipeline.from_pipe(sd)
    assert sag.image_encoder is sd.image_encoder
    with pytest.raises(ValueError, match="IP-Adapter loaded: pass ip_adapter_image="):
        run(sd)
    sag.unload_ip_adapter()
    assert sag.image_encoder is None and sag.config["image_encoder"] == [None, None]
    assert sag.feature_extractor is not None  # the safety checker still needs it
    with pytest.raises(ValueError, match="IP-Adapter of this pipeline's UNet was unloaded"):
        run(sd, ip_adapter_image=an_image())
    state = sd.unet.state_dict()
    assert sorted(state) == sorted(base_state) and all(torch.equal(state[k], base_state[k]) for k in state)
    assert sd.unet.config.encoder_hid_dim_type is None and sd.unet.encoder_hid_proj is None
    assert {type(p).__name__ for p in sd.unet.attn_processors.values()} == {"AttnProcessor"}
    assert np.array_equal(run(sd), before)
    # loading again works, with the image encoder the SD pipeline still holds
    sd.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
    assert run(sd, ip_adapter_image=an_image()).shape == (1, 32, 32, 3)


def _broken(states, **changes):
    state = {part: dict(values) for part, values in states["ip-plain.bin"].items()}
    for part, edit in changes.items():
        state[part] = edit(state[part])
    return state


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda s: {"ip_adapter": s["ip-plain.bin"]["ip_adapter"]},
            StateDictMismatchError,
            "expected the keys 'image_proj' and 'ip_adapter'",
        ),
        (
            lambda s: _broken(s, image_proj=lambda p: {"weird.weight": torch.zeros(2, 2)}),
            StateDictMismatchError,
            "unknown IP-Adapter image projection layout.*weird.weight",
        ),
        (
            lambda s: _broken(s, image_proj=lambda p: {"perceiver_resampler.proj_in.weight": torch.zeros(2, 2)}),
            NotImplementedError,
            "FaceID",
        ),
        (
            lambda s: _broken(s, ip_adapter=lambda p: {k: v for k, v in p.items() if not k.startswith("1.")}),
            StateDictMismatchError,
            "key/value weights for 3 cross-attention layers.*this UNet has 4",
        ),
        (
            lambda s: _broken(s, ip_adapter=lambda p: {**p, "1.to_k_ip.weight": torch.zeros(3, 32)}),
            StateDictMismatchError,
            r"layer 1 .*to_k_ip.0.weight \(3, 32\) \(expected \(16, 32\)\)",
        ),
    ],
)
def test_bad_adapters_are_refused_and_change_nothing(folders, make, error, message):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    procs = sd.unet.attn_processors
    with pytest.raises(error, match=message):
        sd.load_ip_adapter(make(folders["states"]), subfolder=None, weight_name=None, image_encoder_folder=None)
    assert sd.unet.attn_processors == procs and sd.unet.encoder_hid_proj is None


def test_bad_calls_fail_before_any_model_runs(folders, monkeypatch, tmp_path):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    with pytest.raises(ValueError, match="needs an IP-Adapter, and none is loaded"):
        run(sd, ip_adapter_image=an_image())
    sd.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
    for name in ("unet", "text_encoder", "image_encoder"):
        monkeypatch.setattr(getattr(sd, name), "forward", lambda *a, **k: pytest.fail("a model ran"))
    with pytest.raises(ValueError, match="either ip_adapter_image= or ip_adapter_image_embeds="):
        run(sd, ip_adapter_image=an_image(), ip_adapter_image_embeds=[torch.zeros(2, 1, 24)])
    with pytest.raises(ValueError, match="has 2 entries but 1 IP-Adapters are loaded"):
        run(sd, ip_adapter_image=[an_image(), an_image()])
    with pytest.raises(ValueError, match="list of 3-d or 4-d tensors"):
        run(sd, ip_adapter_image_embeds=torch.zeros(2, 1, 24))
    with pytest.raises(ValueError, match="batch must be even"):
        run(sd, ip_adapter_image_embeds=[torch.zeros(3, 1, 24)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        sd.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="missing.bin")
    # a pickle that needs more than tensors is refused, never run
    evil = tmp_path / "evil" / "models"
    evil.mkdir(parents=True)
    torch.save({"image_proj": {"x": torch.nn.Linear(1, 1)}, "ip_adapter": {}}, evil / "ip.bin")
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        sd.load_ip_adapter(str(tmp_path / "evil"), subfolder="models", weight_name="ip.bin")


def test_without_an_image_encoder_embeds_are_needed(folders):
    sd = diffpipe.StableDiffusionPipeline.from_pretrained(folders["sd"])
    sd.set_progress_bar_config(disable=True)
    sd.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin", image_encoder_folder=None)
    assert sd.image_encoder is None
    with pytest.raises(ValueError, match="pass ip_adapter_image_embeds= instead"):
        run(sd, ip_adapter_image=an_image())
    embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(0))]
    assert run(sd, ip_adapter_image_embeds=embeds).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("task", ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"])
def test_image_to_image_and_inpainting(folders, task):
    ref, ours = load_both(folders["sd"], task)
    for pipe in (ref, ours):
        pipe.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
        pipe.set_ip_adapter_scale(0.8)
    mask = PIL.Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 32 > 12).astype(np.uint8) * 255)
    image = an_image(5).resize((32, 32))
    kwargs = dict(
        image=image, strength=0.8, ip_adapter_image=an_image(), **({"mask_image": mask} if "Inpaint" in task else {})
    )
    args = {k: v for k, v in ARGS.items() if k not in ("height", "width")}
    assert_close(images(ref, {**args, **kwargs}), images(ours, {**args, **kwargs}))


def test_regional_masks_per_image_are_the_reference_s(folders):
    """Two images for one adapter, each confined to its half of the picture by ip_adapter_masks, with
    per-image scales (the reference's documented recipe)."""
    import diffusers.image_processor

    from diffpipe.image_processor import IPAdapterMaskProcessor

    left, right = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    left[:, :16], right[:, 16:] = 255, 255
    masks = [PIL.Image.fromarray(left), PIL.Image.fromarray(right)]
    theirs = diffusers.image_processor.IPAdapterMaskProcessor().preprocess(masks, height=32, width=32)
    ours = IPAdapterMaskProcessor().preprocess(masks, height=32, width=32)
    assert torch.equal(ours, theirs)
    ref, pipe = load_both(folders["sd"])
    for p in (ref, pipe):
        p.load_ip_adapter(str(folders["repo"]), subfolder="models", weight_name="ip-plain.bin")
        p.set_ip_adapter_scale([[0.7, 0.5]])
    regional = [ours.reshape(1, ours.shape[0], ours.shape[2], ours.shape[3])]
    args = dict(ip_adapter_image=[[an_image(1), an_image(2)]], cross_attention_kwargs={"ip_adapter_masks": regional})
    expected, got = run(ref, **args), run(pipe, **args)
    assert_close(expected, got)
    # a mask per image matters: without the second image's region the picture changes
    pipe.set_ip_adapter_scale([[0.7, 0.0]])
    assert np.abs(run(pipe, **args) - got).max() > 0.01
    with pytest.raises(ValueError, match="pass one mask per image"):
        run(
            pipe,
            ip_adapter_image=[[an_image(1), an_image(2)]],
            cross_attention_kwargs={"ip_adapter_masks": [regional[0][:, :1]]},
        )
    pipe.set_ip_adapter_scale([[0.7, 0.5]])
    with pytest.raises(ValueError, match="per-image IP-Adapter scales"):
        run(pipe, ip_adapter_image=[[an_image(1), an_image(2)]])
