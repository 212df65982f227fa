"""AnimateDiff: MotionAdapter, UNetMotionModel and AnimateDiffPipeline against the reference.

Tiny SD pipelines and motion adapters are built and saved by the reference (tests/sd_factory.py and
:func:`save_reference_adapter`); every expected output is the reference's, computed here with the
same seeds. Full-size adapter and motion-UNet layouts are compared on the meta device.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

import diffpipe
from diffpipe.errors import ConfigError
from diffpipe.models.motion import MotionAdapter
from diffpipe.models.unet_2d_condition import UNet2DConditionModel
from diffpipe.models.unet_motion import UNetMotionModel
from diffpipe.pipelines.pipeline import memory_footprint
from diffpipe.utils import export_to_gif, export_to_video
from sd_factory import TINY_ADAPTER, save_reference_adapter, save_reference_pipeline

TOL = 2 / 255
FRAMES = 4
SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280],
    motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
)
# The published adapters' configs (guoyww/animatediff-motion-adapter-*).
PUBLISHED = {
    "v1-4": dict(SD15, motion_max_seq_length=24, use_motion_mid_block=False),
    "v1-5": dict(SD15, motion_max_seq_length=32, use_motion_mid_block=False),
    "v1-5-2": dict(SD15, motion_max_seq_length=32, use_motion_mid_block=True),
    "v1-5-3": dict(SD15, motion_max_seq_length=32, use_motion_mid_block=False, conv_in_channels=None),
}
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("animatediff")
    return {
        "sd": save_reference_pipeline(root / "sd", safety_checker=False, seed=7),
        "adapter": save_reference_adapter(root / "adapter"),
        "adapter_mid": save_reference_adapter(root / "adapter_mid", seed=1, use_motion_mid_block=True),
    }


def reference_pipes(folders, adapter="adapter"):
    import diffusers

    sd = quiet(diffusers.StableDiffusionPipeline.from_pretrained, folders["sd"])
    motion = diffusers.MotionAdapter.from_pretrained(folders[adapter])
    return sd, quiet(diffusers.AnimateDiffPipeline.from_pipe, sd, motion_adapter=motion)


def our_pipes(folders, adapter="adapter"):
    sd = quiet(diffpipe.StableDiffusionPipeline.from_pretrained, folders["sd"])
    motion = diffpipe.MotionAdapter.from_pretrained(folders[adapter])
    return sd, diffpipe.AnimateDiffPipeline.from_pipe(sd, motion_adapter=motion)


def tiny_unet_pair(seed=0):
    """The same tiny 2-D UNet in both libraries (the reference's weights)."""
    import diffusers

    config = dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        norm_num_groups=4,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
    )
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def plain(config) -> dict:
    """A config as JSON would hold it (lists for tuples), without the private keys."""
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def storages(*modules) -> set:
    return {t.untyped_storage().data_ptr() for m in modules for t in [*m.parameters(), *m.buffers()]}


# ------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_adapter_layouts_match_reference(name):
    import diffusers

    with torch.device("meta"):
        ref = diffusers.MotionAdapter(**PUBLISHED[name])
        ours = MotionAdapter(**PUBLISHED[name])
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == expected
    assert any(k.startswith("mid_block.") for k in got) == PUBLISHED[name]["use_motion_mid_block"]
    assert (
        got["down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe"][1]
        == PUBLISHED[name]["motion_max_seq_length"]
    )


@pytest.mark.parametrize("name", ["v1-4", "v1-5-2"])
def test_full_size_motion_unet_layout_and_config_match_reference(name):
    import diffusers

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        adapter = MotionAdapter(**PUBLISHED[name])
        ours = UNetMotionModel.from_unet2d(unet, adapter)
        ref = quiet(diffusers.UNetMotionModel.from_config, dict(ours.config))
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()
    }
    assert ours.config.motion_max_seq_length == PUBLISHED[name]["motion_max_seq_length"]
    assert ours.config.use_motion_mid_block == PUBLISHED[name]["use_motion_mid_block"]


def test_positional_table_equals_reference():
    import diffusers

    ref = diffusers.MotionAdapter(**TINY_ADAPTER).state_dict()
    ours = MotionAdapter(**TINY_ADAPTER).state_dict()
    keys = [k for k in ref if k.endswith("pos_embed.pe")]
    assert len(keys) == 7  # 2 down + 1 mid + 2 x 2 up motion modules, one transformer block each
    for k in keys:
        assert torch.equal(ours[k], ref[k])


# ------------------------------------------------------------------------------------- the motion UNet
@pytest.mark.parametrize("use_motion_mid_block", [False, True])
def test_from_unet2d_shares_weights_and_matches_reference(use_motion_mid_block):
    import diffusers

    ref_unet, unet = tiny_unet_pair()
    torch.manual_seed(3)
    ref_adapter = diffusers.MotionAdapter(**TINY_ADAPTER, use_motion_mid_block=use_motion_mid_block)
    adapter = MotionAdapter(**TINY_ADAPTER, use_motion_mid_block=use_motion_mid_block)
    adapter.load_state_dict(ref_adapter.state_dict())
    ref = quiet(diffusers.UNetMotionModel.from_unet2d, ref_unet, ref_adapter)
    ours = UNetMotionModel.from_unet2d(unet, adapter)

    assert set(ours.state_dict()) == set(ref.state_dict())
    assert plain(ours.config) == plain(ref.config)
    # every tensor of the motion UNet is one of the 2-D UNet's or the adapter's: nothing was copied
    assert storages(ours) == storages(unet, adapter)
    assert ours.unet2d is unet

    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 3, 16, 16, generator=gen)
    per_video_states = torch.randn(2, 7, 32, generator=gen)
    states = per_video_states.repeat_interleave(3, dim=0)  # per frame, as the pipelines pass them
    with torch.no_grad():
        expected = ref(sample, 10, states).sample
        got = ours(sample, torch.tensor(10), states).sample
        per_video = ours(sample, 10, per_video_states).sample
        image = unet(sample[:, :, 1], 10, per_video_states).sample
    assert got.shape == expected.shape == (2, 4, 3, 16, 16)
    assert (got - expected).abs().max() < 1e-5
    assert torch.equal(per_video, got)
    assert (got[:, :, 1] - image).abs().max() > 1e-3  # the motion modules do change the frames


def test_motion_unet_save_load_both_ways(tmp_path):
    import diffusers

    ref_unet, unet = tiny_unet_pair(1)
    torch.manual_seed(4)
    ref_adapter = diffusers.MotionAdapter(**TINY_ADAPTER)
    adapter = MotionAdapter(**TINY_ADAPTER)
    adapter.load_state_dict(ref_adapter.state_dict())
    ours = UNetMotionModel.from_unet2d(unet, adapter)
    ours.save_pretrained(tmp_path / "ours")
    ref = quiet(diffusers.UNetMotionModel.from_unet2d, ref_unet, ref_adapter)
    ref.save_pretrained(tmp_path / "ref")

    loaded_by_ref = quiet(diffusers.UNetMotionModel.from_pretrained, tmp_path / "ours")
    loaded_by_us = UNetMotionModel.from_pretrained(tmp_path / "ref")
    for a, b in ((loaded_by_ref.state_dict(), ours.state_dict()), (loaded_by_us.state_dict(), ref.state_dict())):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    sample = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    states = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded_by_us(sample, 3, states).sample - ref(sample, 3, states).sample).abs().max() < 1e-5

    # the motion modules alone, as an adapter folder
    ours.save_motion_modules(tmp_path / "modules")
    back = quiet(diffusers.MotionAdapter.from_pretrained, tmp_path / "modules")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref_adapter.state_dict().items())


def test_adapter_round_trip_with_reference_both_ways(folders, tmp_path):
    import diffusers

    ref = diffusers.MotionAdapter.from_pretrained(folders["adapter_mid"])
    ours = MotionAdapter.from_pretrained(folders["adapter_mid"])
    assert dict(ours.config)["use_motion_mid_block"] is True
    assert list(ours.state_dict()) and set(ours.state_dict()) == set(ref.state_dict())
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())

    ours.save_pretrained(tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "diffusion_pytorch_model.safetensors", "pt") as f:
        written = set(f.keys())
    with safe_open(folders["adapter_mid"] / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert written == set(f.keys())
    back = diffusers.MotionAdapter.from_pretrained(tmp_path / "ours")
    assert plain(back.config) == plain(ref.config)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())


# ------------------------------------------------------------------------------------- the pipeline
@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_pipeline_matches_reference(folders, scheduler):
    import diffusers

    _, ref = reference_pipes(folders)
    _, ours = our_pipes(folders)
    # the spec's scheduler swap
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config, beta_schedule="linear")
    ours.scheduler = getattr(diffpipe, scheduler).from_config(ours.scheduler.config, beta_schedule="linear")
    kwargs = dict(
        prompt="a bear eats pizza",
        negative_prompt="blurry",
        num_frames=FRAMES,
        num_inference_steps=3,
        guidance_scale=6.0,
        height=32,
        width=32,
        output_type="np",
        decode_chunk_size=3,
    )
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    expected = quiet(ref, generator=torch.Generator().manual_seed(33), **kwargs).frames
    got = ours(generator=torch.Generator().manual_seed(33), **kwargs).frames
    assert got.shape == expected.shape == (1, FRAMES, 32, 32, 3)
    for f in range(FRAMES):
        assert np.abs(got[0, f] - expected[0, f]).max() <= TOL, f"frame {f}"
    assert np.abs(got[0, 0] - got[0, 1]).max() > 1e-3  # frames differ


def test_pipeline_with_mid_block_adapter_embeddings_and_latents_matches_reference(folders):
    _, ref = reference_pipes(folders, "adapter_mid")
    _, ours = our_pipes(folders, "adapter_mid")
    gen = torch.Generator().manual_seed(5)
    embeds, negative = torch.randn(1, 77, 32, generator=gen), torch.randn(1, 77, 32, generator=gen)
    latents = torch.randn(1, 4, 3, 16, 16, generator=gen)
    kwargs = dict(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        latents=latents,
        num_frames=3,
        num_inference_steps=2,
        output_type="pt",
    )
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    expected = quiet(ref, **kwargs).frames
    got = ours(**kwargs).frames
    assert got.shape == expected.shape == (1, 3, 3, 32, 32)
    assert (got - expected).abs().max() <= TOL
    # unlike the reference (which always makes one), num_videos_per_prompt videos per prompt
    latents = ours(
        prompt_embeds=embeds,
        num_frames=3,
        num_inference_steps=1,
        num_videos_per_prompt=2,
        output_type="latent",
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
    ).frames
    assert latents.shape == (2, 4, 3, 16, 16) and not torch.equal(latents[0], latents[1])


def test_from_pipe_adds_only_the_adapter_and_leaves_sd_unchanged(folders):
    sd, _ = our_pipes(folders)
    sd.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np")
    before = sd(generator=torch.Generator().manual_seed(0), **kwargs).images
    sd_storages = storages(*(c for c in sd.components.values() if isinstance(c, torch.nn.Module)))
    sd_bytes = memory_footprint(sd)["total"]

    adapter = diffpipe.MotionAdapter.from_pretrained(folders["adapter"])
    adapter_bytes = sum(t.numel() * t.element_size() for t in [*adapter.parameters(), *adapter.buffers()])
    anim = diffpipe.AnimateDiffPipeline.from_pipe(sd, motion_adapter=adapter)
    anim.set_progress_bar_config(disable=True)
    all_storages = storages(*(c for p in (sd, anim) for c in p.components.values() if isinstance(c, torch.nn.Module)))
    assert all_storages == sd_storages | storages(adapter)
    assert memory_footprint(sd, anim)["total"] == sd_bytes + adapter_bytes
    assert anim.unet.unet2d is sd.unet and anim.vae is sd.vae and anim.text_encoder is sd.text_encoder
    assert type(sd.unet) is UNet2DConditionModel and "motion" not in " ".join(sd.unet.state_dict())

    frames = anim(
        prompt="a cat",
        num_frames=2,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(1),
    ).frames
    assert len(frames) == 1 and len(frames[0]) == 2 and frames[0][0].size == (32, 32)
    after = sd(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.array_equal(before, after)
    # and back again: the motion pipeline from itself keeps the same motion UNet
    assert diffpipe.AnimateDiffPipeline.from_pipe(anim).unet is anim.unet
    # an SD checkpoint loaded straight into AnimateDiffPipeline (the reference's documented use)
    direct = diffpipe.AnimateDiffPipeline.from_pretrained(folders["sd"], motion_adapter=adapter)
    assert type(direct.unet) is UNetMotionModel and direct.motion_adapter is adapter


def test_saved_pipeline_loads_in_the_reference(folders, tmp_path):
    import diffusers

    _, ours = our_pipes(folders)
    ours.save_pretrained(tmp_path / "anim")
    ref = quiet(diffusers.AnimateDiffPipeline.from_pretrained, tmp_path / "anim")
    back = diffpipe.AnimateDiffPipeline.from_pretrained(tmp_path / "anim")
    assert type(back.unet) is UNetMotionModel and type(back.motion_adapter) is MotionAdapter
    kwargs = dict(prompt="a dog", num_frames=2, num_inference_steps=2, output_type="np")
    for p in (ref, back):
        p.set_progress_bar_config(disable=True)
    expected = quiet(ref, generator=torch.Generator().manual_seed(2), **kwargs).frames
    got = back(generator=torch.Generator().manual_seed(2), **kwargs).frames
    assert got.shape == expected.shape and np.abs(got - expected).max() <= TOL


def test_load_motion_modules_swaps_adapters_and_freeze_trains_only_them():
    _, unet = tiny_unet_pair()
    torch.manual_seed(0)
    first, second = MotionAdapter(**TINY_ADAPTER), MotionAdapter(**TINY_ADAPTER)
    model = UNetMotionModel.from_unet2d(unet, first)
    sample, states = torch.randn(1, 4, 2, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        before = model(sample, 5, states).sample
        model.load_motion_modules(second)
        after = model(sample, 5, states).sample
    assert storages(model) == storages(unet, second) and not torch.equal(before, after)
    with pytest.raises(ValueError, match="motion_max_seq_length 16 vs the model's 8"):
        model.load_motion_modules(MotionAdapter(**{**TINY_ADAPTER, "motion_max_seq_length": 16}))
    model.freeze_unet2d_params()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".motion_modules." in n for n in trainable)
    assert not any(p.requires_grad for p in unet.parameters())  # the shared 2-D UNet's parameters


def test_adapter_follows_the_unets_dtype():
    _, unet = tiny_unet_pair()
    unet.to(torch.float64)
    adapter = MotionAdapter(**TINY_ADAPTER)
    model = UNetMotionModel.from_unet2d(unet, adapter)
    assert adapter.dtype == torch.float64 and {p.dtype for p in model.parameters()} == {torch.float64}
    with torch.no_grad():
        out = model(
            torch.randn(1, 4, 2, 16, 16, dtype=torch.float64), 5, torch.randn(2, 7, 32, dtype=torch.float64)
        ).sample
    assert out.dtype == torch.float64


# ------------------------------------------------------------------------------------- export
def test_gif_and_mp4_written_and_read_back(folders, tmp_path):
    import imageio.v3 as iio

    _, anim = our_pipes(folders)
    anim.set_progress_bar_config(disable=True)
    frames = anim(
        prompt="a bear",
        num_frames=FRAMES,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(3),
    ).frames[0]
    gif = export_to_gif(frames, tmp_path / "out.gif", fps=5)
    with PIL.Image.open(gif) as im:
        assert im.n_frames == FRAMES and im.size == (32, 32)
        assert im.info["duration"] == 200  # ms per frame at 5 fps
    mp4 = export_to_video(frames, tmp_path / "out.mp4", fps=8)
    video = iio.imread(mp4, plugin="FFMPEG")
    assert video.shape == (FRAMES, 32, 32, 3)
    # numpy frames in [0, 1] as the pipeline gives them with output_type="np"
    array = np.stack([np.asarray(f, dtype=np.float32) / 255 for f in frames])
    assert iio.imread(export_to_video(array, tmp_path / "np.mp4"), plugin="FFMPEG").shape[0] == FRAMES


def test_export_errors(monkeypatch, tmp_path):
    frame = PIL.Image.new("RGB", (16, 16))
    with pytest.raises(TypeError, match="one video"):
        export_to_gif([[frame, frame]], tmp_path / "x.gif")
    with pytest.raises(TypeError, match="one video"):
        export_to_gif(frame, tmp_path / "x.gif")
    monkeypatch.setitem(sys.modules, "imageio", None)
    with pytest.raises(ImportError, match=r"diffpipe\[video\]"):
        export_to_video([frame], tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()


# ------------------------------------------------------------------------------------- bad input
def test_adapter_that_does_not_fit_the_unet():
    _, unet = tiny_unet_pair()
    with pytest.raises(ValueError, match=r"block_out_channels \[16, 32\] vs the UNet's \[8, 16\]"):
        UNetMotionModel.from_unet2d(unet, MotionAdapter(**{**TINY_ADAPTER, "block_out_channels": (16, 32)}))
    with pytest.raises(ValueError, match="motion_layers_per_block 2 vs the UNet's layers_per_block 1"):
        UNetMotionModel.from_unet2d(unet, MotionAdapter(**{**TINY_ADAPTER, "motion_layers_per_block": 2}))
    with pytest.raises(ValueError, match="motion_norm_num_groups 2 vs the UNet's norm_num_groups 4"):
        UNetMotionModel.from_unet2d(unet, MotionAdapter(**{**TINY_ADAPTER, "motion_norm_num_groups": 2}))
    with pytest.raises(TypeError, match="MotionAdapter"):
        UNetMotionModel.from_unet2d(unet, unet)
    with pytest.raises(ValueError, match="needs motion_adapter="):
        diffpipe.AnimateDiffPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None, scheduler=None
        )
    with pytest.raises(ConfigError, match="cannot have 3 attention heads"):
        MotionAdapter(**{**TINY_ADAPTER, "motion_num_attention_heads": 3})


def test_too_many_frames_and_bad_shapes_fail_before_compute(folders):
    _, anim = our_pipes(folders)
    calls = []
    anim.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="num_frames=9 is more than this motion adapter's motion_max_seq_length=8"):
        anim(prompt="a cat", num_frames=9, num_inference_steps=2)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="num_frames must be a positive integer"):
            anim(prompt="a cat", num_frames=bad)
    with pytest.raises(ValueError, match="decode_chunk_size"):
        anim(prompt="a cat", num_frames=2, decode_chunk_size=0)
    assert not calls
    unet = anim.unet
    with pytest.raises(ValueError, match=r"\[batch, 4, frames, height, width\]"):
        unet(torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 7, 32))
    with pytest.raises(ValueError, match="motion_max_seq_length=8"):
        unet(torch.zeros(1, 4, 9, 16, 16), 1, torch.zeros(9, 7, 32))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        unet(torch.zeros(1, 4, 2, 16, 16), 1, torch.zeros(3, 7, 32))
