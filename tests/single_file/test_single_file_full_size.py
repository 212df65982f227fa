"""The published full-size checkpoints' layouts, on the meta device (names and shapes, no data): the
original-layout keys of each published architecture (made by the test's own converter from the
reference's modules) are detected as their type, and diffpipe's key maps carry every one of them onto
exactly the parameters of the modules diffpipe builds from its shipped configs, shape for shape. And
the shipped-config path end to end, offline with an empty Hub cache, on a full-size VAE file."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file

import diffpipe
from diffpipe.nn.construction import empty_modules
from diffpipe.single_file import detect, keymap
from diffpipe.single_file.build import _text_state
from diffpipe.single_file.source import part
from single_file_factory import KINDS, original_layout_full_size


def shipped(kind: str) -> dict:
    return json.loads(resources.files("diffpipe.single_file").joinpath("configs", f"{kind}.json").read_text())


def meta_tensors(shapes: dict[str, tuple]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def our_module(name: str, config: dict):
    config = dict(config)
    class_name, library = config.pop("_class_name"), config.pop("_library", None)
    with empty_modules():
        if library == "transformers":
            import transformers

            settings = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
            return getattr(transformers, class_name)(transformers.CLIPTextConfig(**settings))
        return getattr(diffpipe, class_name).from_config(config)


def assert_fits(state: dict[str, torch.Tensor], module, what: str) -> None:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert sorted(set(want) - set(got))[:5] == [] and sorted(set(got) - set(want))[:5] == [], what
    wrong = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    assert not wrong, f"{what}: {wrong[:5]}"


@pytest.mark.parametrize("kind", KINDS)
def test_published_layouts_are_detected_and_map_onto_the_shipped_architectures(kind):
    shapes = original_layout_full_size(kind)
    found = detect(shapes, f"full-size {kind}")
    assert found.kind == kind
    configs = shipped(kind)
    tensors = meta_tensors(shapes)
    components = configs["components"]
    state, unmapped = keymap.unet_to_ours(part(tensors, keymap.UNET_PREFIX), components["unet"])
    assert not unmapped
    assert_fits(state, our_module("unet", components["unet"]), f"{kind} unet")
    state, unmapped = keymap.vae_to_ours(part(tensors, keymap.VAE_PREFIX), components["vae"])
    assert not unmapped
    assert_fits(state, our_module("vae", components["vae"]), f"{kind} vae")
    for name, prefix in keymap.TEXT_PREFIXES[found.family].items():
        config = components[name]
        module = our_module(name, config)
        state, unmapped = _text_state(part(tensors, prefix), config)
        assert [k for k in unmapped if not k.endswith(("logit_scale", "position_ids"))] == [], name
        state = keymap.fit_text_model_keys(state, module.state_dict().keys())
        if config["_class_name"] == "CLIPTextModel":
            state = {k: v for k, v in state.items() if not k.startswith("text_projection")}
        assert_fits(state, module, f"{kind} {name}")
    # and back: every parameter of the shipped architecture has its place in the original layout
    unet = our_module("unet", components["unet"])
    back = dict(keymap.unet_to_original(unet.state_dict(), unet.config))
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: v for k, v in shapes.items() if k.startswith(keymap.UNET_PREFIX)
    }


def test_a_full_size_vae_file_loads_offline_from_the_shipped_config(tmp_path, monkeypatch):
    """No network, an empty cache, no config=: the standalone-VAE type's shipped config (the SD VAE, as
    the ft-MSE VAE files people download) builds it, and the weights land where they belong."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    config = shipped("sd1")["components"]["vae"]
    module = our_module("vae", config)
    generator = torch.Generator().manual_seed(0)
    weights = {
        k: torch.randn(v.shape, generator=generator, dtype=torch.float16) * 0.02 for k, v in module.state_dict().items()
    }
    original = dict(keymap.vae_to_original(weights, module.config, prefix=""))
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file({k: v.contiguous() for k, v in original.items()}, str(path))
    vae = diffpipe.AutoencoderKL.from_single_file(path, torch_dtype=torch.float16)
    assert vae.config.scaling_factor == 0.18215 and vae.dtype == torch.float16
    loaded = vae.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
