"""ControlNets in the original layout (``control_model.*``, as lllyasviel's files): a tiny ControlNet
built and saved by the reference is written to one file by a converter written here from the layout's
facts (the UNet encoder's names from the test factory; ``input_hint_block`` a Sequential of convolutions
with SiLUs between them; ``zero_convs.N.0``; ``middle_block_out.0``); diffpipe and the reference load it
with the folder's weights; without ``config=`` the config comes from the shipped UNet configs."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from safetensors.torch import save_file

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from sd_factory import save_reference_pipeline
from single_file_factory import unet_key_map


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    encoder = [k for k in state if not k.startswith(("controlnet_", "controlnet_cond_embedding"))]
    names = unet_key_map(encoder)
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)", k)))
    hint = {"conv_in": 0, **{f"blocks.{k}": 2 * k + 2 for k in range(blocks)}, "conv_out": 2 * blocks + 2}
    out = {}
    for key, value in state.items():
        if key in names:
            out["control_model." + names[key]] = value
        elif m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.\d+)\.(weight|bias)", key):
            out[f"control_model.input_hint_block.{hint[m.group(1)]}.{m.group(2)}"] = value
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
            out[f"control_model.zero_convs.{m.group(1)}.0.{m.group(2)}"] = value
        elif m := re.match(r"controlnet_mid_block\.(weight|bias)", key):
            out[f"control_model.middle_block_out.0.{m.group(1)}"] = value
        else:
            raise KeyError(key)
    return out


@pytest.fixture(scope="module")
def controlnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("cn-single-file")
    sd = save_reference_pipeline(root / "sd", safety_checker=False, seed=8)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the published hint block's widths: the reference's converter knows only those positions
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    net.save_pretrained(root / "cn")
    path = root / "control_sd15_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(net.state_dict()).items()}, str(path))
    return root / "cn", path, net.state_dict()


def test_an_original_controlnet_file_loads_like_the_folder_in_both_libraries(controlnet):
    folder, path, want = controlnet
    ours = diffpipe.ControlNetModel.from_single_file(path, config=str(folder)).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.ControlNetModel.from_single_file(
            str(path), config=str(folder), local_files_only=True
        ).state_dict()
    for got in (ours, ref):
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_detection_and_a_clear_error_when_given_to_a_pipeline(controlnet):
    from safetensors import safe_open

    from diffpipe.single_file import detect

    _, path, _ = controlnet
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    found = detect(shapes, str(path))
    assert (found.kind, found.family, found.parts) == ("controlnet", "sd1", ["controlnet"])
    with pytest.raises(ValueError, match=r"only a ControlNet.*ControlNetModel.from_single_file"):
        diffpipe.StableDiffusionPipeline.from_single_file(path)


def test_without_config_the_shipped_unet_config_gives_the_architecture(controlnet):
    """Offline, no config=: the SD 1.x UNet's shipped config (full size) does not fit a tiny file, and
    the error says where the config came from; the hint block's widths come from the file itself."""
    from diffpipe.errors import StateDictMismatchError

    _, path, _ = controlnet
    with pytest.raises(StateDictMismatchError, match="shipped"):
        diffpipe.ControlNetModel.from_single_file(path)


def test_a_hint_block_of_another_depth_loads_too(tmp_path):
    """The reference's converter knows the published hint block's eight convolutions only; ours reads the
    depth from the config (here two widths: four convolutions)."""
    sd = save_reference_pipeline(tmp_path / "sd", safety_checker=False, seed=9)
    unet = diffusers.UNet2DConditionModel.from_pretrained(sd, subfolder="unet")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8))
    net.save_pretrained(tmp_path / "cn")
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in to_original(net.state_dict()).items()}, str(path))
    got = diffpipe.ControlNetModel.from_single_file(path, config=str(tmp_path / "cn")).state_dict()
    want = net.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
