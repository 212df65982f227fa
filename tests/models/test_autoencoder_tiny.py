"""AutoencoderTiny (TAESD / TAESDXL) against the reference (diffusers) as an oracle: construction,
parameter names, config, encode/decode/forward numerics (plain, sliced, tiled) and folders both ways."""

from __future__ import annotations

import inspect
import json
import logging

import diffusers
import pytest
import torch

import diffpipe
from diffpipe.models.autoencoder_tiny import AutoencoderTiny

Reference = diffusers.AutoencoderTiny
ATOL = 1e-4

# name -> (config, image size). Four stages: the reference's tiling assumes an 8x VAE.
CONFIGS = {
    "two_stages": (
        dict(
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            num_encoder_blocks=(1, 2),
            num_decoder_blocks=(2, 1),
        ),
        24,
    ),
    "four_stages_silu_bilinear": (
        dict(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(12, 12, 12, 12),
            num_encoder_blocks=(1, 2, 1, 1),
            num_decoder_blocks=(1, 1, 2, 1),
            act_fn="silu",
            upsample_fn="bilinear",
            latent_channels=6,
            latent_magnitude=4,
            latent_shift=0.4,
            scaling_factor=1.5,
            shift_factor=0.1,
        ),
        32,
    ),
    "rgba": (
        dict(
            in_channels=4,
            out_channels=4,
            encoder_block_out_channels=(8, 8, 8),
            decoder_block_out_channels=(8, 8, 8),
            num_encoder_blocks=(1, 1, 1),
            num_decoder_blocks=(1, 1, 1),
        ),
        16,
    ),
}
TILED = CONFIGS["four_stages_silu_bilinear"][0]

# The published layouts, as their config.json files read (built on the meta device: no weights).
TAESD = {
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}
TAESDXL = dict(TAESD)  # the same network; only the weights differ
TAESD3 = {**TAESD, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609}


def _seeded(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls(**config).eval()


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _as_lists(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def _pair(name):
    """(reference, ours) of config ``name`` with the same random (non-initial) weights."""
    config, size = CONFIGS[name]
    ref = _seeded(Reference, config)
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    ours = AutoencoderTiny(**config).eval()
    ours.load_state_dict(state)
    return ref, ours, config, size


def _image(config, size, batch=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.get("in_channels", 3), size, size, generator=gen) * 2 - 1


def _close(got, expected, atol=ATOL):
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    diff = (got - expected).abs().max().item()
    assert diff <= atol, f"max abs difference {diff}"


# ----------------------------------------------------------------------------------------- construction
def test_signature_matches_reference():
    ours = inspect.signature(AutoencoderTiny.__init__).parameters
    ref = inspect.signature(Reference.__init__).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in ref.items()}
    for method in ("encode", "decode", "forward", "scale_latents", "unscale_latents"):
        ours_m = inspect.signature(getattr(AutoencoderTiny, method)).parameters
        ref_m = inspect.signature(getattr(Reference, method)).parameters
        assert list(ours_m) == list(ref_m), method
        assert [p.default for p in ours_m.values()] == [p.default for p in ref_m.values()], method


def test_exported_and_registered():
    assert diffpipe.AutoencoderTiny is AutoencoderTiny
    from diffpipe.registry import find_class

    assert find_class("AutoencoderTiny") is AutoencoderTiny


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seeded_construction_matches_reference(name):
    config, _ = CONFIGS[name]
    ref = _seeded(Reference, config).state_dict()
    ours = _seeded(AutoencoderTiny, config).state_dict()
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("layout", [{}, TAESD, TAESDXL, TAESD3], ids=["defaults", "taesd", "taesdxl", "taesd3"])
def test_full_size_layouts_on_meta_device_match_reference(layout):
    with torch.device("meta"):
        ref = Reference(**layout)
        ours = AutoencoderTiny(**layout)
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
    assert len(ours.state_dict()) == 134
    assert _public(ours.config) == _public(ref.config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_and_attributes_match_reference(name):
    config, _ = CONFIGS[name]
    ref, ours = Reference(**config), AutoencoderTiny(**config)
    assert _public(ours.config) == _public(ref.config)
    assert set(ours.config.get("_use_default_values", ())) == set(ref.config.get("_use_default_values", ()))
    assert ours.config["block_out_channels"] == tuple(config["decoder_block_out_channels"])
    for attr in (
        "latent_magnitude",
        "latent_shift",
        "scaling_factor",
        "spatial_scale_factor",
        "tile_overlap_factor",
        "tile_sample_min_size",
        "tile_latent_min_size",
        "use_slicing",
        "use_tiling",
    ):
        assert getattr(ours, attr) == getattr(ref, attr), attr


def test_config_mismatch_raises():
    with pytest.raises(ValueError, match="num_encoder_blocks"):  # the reference raises ValueError too
        AutoencoderTiny(encoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="num_decoder_blocks"):
        AutoencoderTiny(decoder_block_out_channels=(8,), num_decoder_blocks=(1, 1))


# ----------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_encode_decode_forward_match_reference(name):
    ref, ours, config, size = _pair(name)
    image = _image(config, size)
    out = ours.encode(image)
    assert type(out).__name__ == "AutoencoderTinyOutput"
    _close(out.latents, ref.encode(image).latents)
    as_tuple = ours.encode(image, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    _close(as_tuple[0], out.latents)

    z = torch.randn(out.latents.shape, generator=torch.Generator().manual_seed(4)) * 2
    decoded = ours.decode(z)
    assert type(decoded).__name__ == "DecoderOutput"
    _close(decoded.sample, ref.decode(z).sample)
    _close(ours.decode(z, return_dict=False)[0], decoded.sample)

    _close(ours(image).sample, ref(image).sample)
    _close(ours(image, return_dict=False)[0], ref(image, return_dict=False)[0])


@torch.no_grad()
def test_scale_and_unscale_latents_match_reference():
    ref, ours, _, _ = _pair("four_stages_silu_bilinear")
    z = torch.linspace(-12, 12, 97).view(1, 1, 1, 97)
    _close(ours.scale_latents(z), ref.scale_latents(z))
    u = torch.linspace(-0.5, 1.5, 33)
    _close(ours.unscale_latents(u), ref.unscale_latents(u))


@torch.no_grad()
def test_sliced_and_tiled_match_reference():
    ref, ours, config, _ = _pair("four_stages_silu_bilinear")
    for model in (ref, ours):  # smaller tiles than the default 512 / 64, so a small input spans several
        model.tile_sample_min_size = 128
        model.tile_latent_min_size = 16
    image = torch.rand(3, 3, 200, 248, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z = torch.randn(3, config["latent_channels"], 30, 40, generator=torch.Generator().manual_seed(6))
    for slicing, tiling in ((True, False), (False, True), (True, True)):
        for model in (ref, ours):
            model.disable_slicing()
            model.disable_tiling()
            if slicing:
                model.enable_slicing()
            if tiling:
                model.enable_tiling()
        assert (ours.use_slicing, ours.use_tiling) == (ref.use_slicing, ref.use_tiling)
        _close(ours.decode(z).sample, ref.decode(z).sample)
        if config["latent_channels"] == 4 or not tiling:  # the reference's tiled encode writes 4 channels
            _close(ours.encode(image).latents, ref.encode(image).latents)


@torch.no_grad()
def test_tiled_encode_of_a_four_channel_vae_matches_reference():
    config = dict(TILED, latent_channels=4)
    ref = _seeded(Reference, config)
    ours = AutoencoderTiny(**config).eval()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):
        model.tile_sample_min_size = 128
        model.enable_tiling()
    image = torch.rand(2, 3, 200, 248, generator=torch.Generator().manual_seed(7)) * 2 - 1
    _close(ours.encode(image).latents, ref.encode(image).latents)
    plain = AutoencoderTiny(**config).eval()
    plain.load_state_dict(ref.state_dict())
    assert (plain.encode(image).latents - ours.encode(image).latents).abs().max() > 1e-3  # tiling did tile


def test_wrong_channel_counts_raise():
    ours = AutoencoderTiny(**CONFIGS["two_stages"][0])
    with pytest.raises(ValueError, match="in_channels"):
        ours.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="latent_channels"):
        ours.decode(torch.zeros(1, 3, 4, 4))


# ----------------------------------------------------------------------------------------- folders
@torch.no_grad()
def test_reference_folder_loads_in_ours(tmp_path, caplog):
    ref, _, config, size = _pair("four_stages_silu_bilinear")
    ref.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffpipe"):
        ours = AutoencoderTiny.from_pretrained(tmp_path).eval()
    assert "does not use config key" not in caplog.text  # block_out_channels is a derived key
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert _as_lists(_public(ours.config)) == _as_lists(_public(ref.config))
    image = _image(config, size)
    _close(ours.encode(image).latents, ref.encode(image).latents)
    _close(ours(image).sample, ref(image).sample)


@torch.no_grad()
def test_our_folder_loads_in_reference(tmp_path):
    config, size = CONFIGS["two_stages"]
    ours = _seeded(AutoencoderTiny, config)
    for p in ours.parameters():  # move off the seeded init so the load itself is checked
        p.add_(torch.randn_like(p) * 0.05)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderTiny"
    ref = Reference.from_pretrained(tmp_path).eval()
    assert _as_lists(_public(ref.config)) == _as_lists(_public(Reference(**config).config))
    assert _as_lists(_public(ref.config)) == _as_lists(_public(ours.config))
    for key, value in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    image = _image(config, size)
    _close(ref.encode(image).latents, ours.encode(image).latents)
    _close(ref(image).sample, ours(image).sample)


@torch.no_grad()
def test_legacy_config_without_newer_keys_loads_like_the_reference(tmp_path):
    ref, _, config, size = _pair("two_stages")
    ref.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    legacy = json.loads(path.read_text())
    for key in ("force_upcast", "shift_factor", "upsample_fn", "scaling_factor", "block_out_channels"):
        legacy.pop(key, None)
    legacy["_diffusers_version"] = "0.20.0"
    path.write_text(json.dumps(legacy))
    ours = AutoencoderTiny.from_pretrained(tmp_path).eval()
    reloaded = Reference.from_pretrained(tmp_path).eval()
    assert _as_lists(_public(ours.config)) == _as_lists(_public(reloaded.config))
    assert ours.config.scaling_factor == 1.0 and ours.config.force_upcast is False
    image = _image(config, size)
    _close(ours(image).sample, reloaded(image).sample)


def test_partial_config_loads_with_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": 4}))
    with torch.device("meta"):
        ref = Reference.from_config(Reference.load_config(tmp_path))
    ours = AutoencoderTiny.from_config(AutoencoderTiny.load_config(tmp_path))
    assert _as_lists(_public(ours.config)) == _as_lists(_public(ref.config))
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
