"""UNet2DModel with DDPMPipeline and DDIMPipeline against the reference, on tiny folders the reference
saved (and one rewritten with the old attention names of the google/ddpm-* checkpoints)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import diffpipe
from adapter_factory import TOL

UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
)


def save_reference(folder, task: str, **unet):
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DModel(**{**UNET, **unet})
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    getattr(diffusers, task)(unet=model, scheduler=scheduler).save_pretrained(folder)
    return folder


def make_legacy(folder):
    """The attention projections as google/ddpm-* name them: query/key/value/proj_attn (Linear shapes)."""
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in load_file(path).items():
        for new, name in old.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{name}.")
        state[key] = value.contiguous()
    save_file(state, path, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("unconditional")
    return {
        "ddpm": save_reference(root / "ddpm", "DDPMPipeline"),
        "ddim": save_reference(root / "ddim", "DDIMPipeline", center_input_sample=True, attention_head_dim=None),
        "legacy": make_legacy(save_reference(root / "legacy", "DDPMPipeline")),
    }


def both(folder, task, **call):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
    ours = getattr(diffpipe, task).from_pretrained(folder)
    for pipe in (ref, ours):
        pipe.set_progress_bar_config(disable=True)

    def generators():
        n = call.get("batch_size", 1)
        return [torch.Generator().manual_seed(i) for i in range(n)] if n > 1 else torch.Generator().manual_seed(0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=generators(), output_type="np", **call).images
    got = ours(generator=generators(), output_type="np", **call).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= TOL, np.abs(got - expected).max()
    return ours, got


def test_ddpm(folders):
    _, got = both(folders["ddpm"], "DDPMPipeline", num_inference_steps=5, batch_size=2)
    assert got.shape == (2, 16, 16, 3) and got.std() > 0.01


@pytest.mark.parametrize("call", [dict(eta=0.0), dict(eta=1.0, use_clipped_model_output=True)])
def test_ddim(folders, call):
    both(folders["ddim"], "DDIMPipeline", num_inference_steps=4, **call)


def test_old_attention_names_load(folders):
    both(folders["legacy"], "DDPMPipeline", num_inference_steps=3)


def test_detected_saved_and_read_back_by_the_reference(folders, tmp_path):
    import diffusers

    pipe = diffpipe.DiffusionPipeline.from_pretrained(folders["ddim"])
    assert type(pipe).__name__ == "DDIMPipeline" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DDIMPipeline.from_pretrained(tmp_path / "saved")
    theirs, ours = ref.unet.state_dict(), pipe.unet.state_dict()
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_seeded_construction_and_forward_are_the_reference_s():
    import diffusers

    for config in (UNET, {**UNET, "layers_per_block": 2, "attention_head_dim": None, "center_input_sample": True}):
        torch.manual_seed(0)
        ref = diffusers.UNet2DModel(**config)
        torch.manual_seed(0)
        ours = diffpipe.UNet2DModel(**config)
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            for t in (10, torch.tensor(500), torch.tensor([3, 900])):
                torch.testing.assert_close(ours(x, t).sample, ref(x, t).sample, rtol=0, atol=1e-5)


def test_refusals():
    with pytest.raises(NotImplementedError, match="class-conditional"):
        diffpipe.UNet2DModel(**UNET, num_class_embeds=10)
    with pytest.raises(NotImplementedError, match="'SkipDownBlock2D' is not implemented"):
        diffpipe.UNet2DModel(**{**UNET, "down_block_types": ("SkipDownBlock2D", "AttnDownBlock2D")})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        diffpipe.DDPMPipeline(diffpipe.UNet2DModel(**UNET), diffpipe.DDPMScheduler())(batch_size=0)
