"""AsymmetricAutoencoderKL against the reference (diffusers) as an oracle: construction, weights, config,
encode/decode numerics (with and without the masked-image condition) and folders both ways."""

from __future__ import annotations

import inspect
import logging

import diffusers
import pytest
import torch

from diffpipe.models.autoencoder_asym import AsymmetricAutoencoderKL

Reference = diffusers.AsymmetricAutoencoderKL
ATOL = 1e-5

# name -> (config, image size). Each config's decoder upsamples its latents back to the image size.
CONFIGS = {
    "two_blocks": (
        dict(
            down_block_types=("DownEncoderBlock2D",) * 2,
            down_block_out_channels=(8, 16),
            layers_per_down_block=1,
            up_block_types=("UpDecoderBlock2D",) * 2,
            up_block_out_channels=(8, 16),
            layers_per_up_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        ),
        32,
    ),
    "three_blocks_wider_decoder": (
        dict(
            down_block_types=("DownEncoderBlock2D",) * 3,
            down_block_out_channels=(8, 16, 16),
            layers_per_down_block=2,
            up_block_types=("UpDecoderBlock2D",) * 3,
            up_block_out_channels=(8, 16, 32),
            layers_per_up_block=2,
            latent_channels=3,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.5,
        ),
        32,
    ),
    # One block: two condition features share a shape (the later one is the one used).
    "one_block": (
        dict(
            down_block_out_channels=(16,),
            up_block_out_channels=(16,),
            layers_per_up_block=2,
            norm_num_groups=8,
            in_channels=4,
            out_channels=4,
        ),
        16,
    ),
}

# The layout of cross-attention/asymmetric-autoencoder-kl-x-1-5 (built on the meta device: no weights).
LARGE_CONFIG = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    down_block_out_channels=(128, 256, 512, 512),
    layers_per_down_block=2,
    up_block_types=("UpDecoderBlock2D",) * 4,
    up_block_out_channels=(192, 384, 768, 768),
    layers_per_up_block=3,
    norm_num_groups=32,
    sample_size=256,
)


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(**config).eval()


def _pair(name):
    """(reference, ours with the reference's weights, config, image size)."""
    config, size = CONFIGS[name]
    ref = _seeded(Reference, config)
    ours = AsymmetricAutoencoderKL(**config).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours, config, size


def _inputs(config, size, batch=2):
    g = torch.Generator().manual_seed(1)
    channels = config.get("in_channels", 3)
    image = torch.rand(batch, channels, size, size, generator=g) * 2 - 1
    mask = torch.rand(batch, 1, size, size, generator=g)  # soft: checks the interpolation and the blend
    binary = (torch.rand(batch, 1, size, size, generator=g) > 0.5).float()
    factor = 2 ** (len(config["up_block_out_channels"]) - 1)
    z = torch.randn(batch, config.get("latent_channels", 4), size // factor, size // factor, generator=g)
    return image, mask, binary, z


def _close(a, b):
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _as_lists(config):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ----------------------------------------------------------------------------------------- construction
def test_signature_matches_reference():
    ours = inspect.signature(AsymmetricAutoencoderKL.__init__).parameters
    ref = inspect.signature(Reference.__init__).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in ref.items()}
    for method in ("encode", "decode", "forward"):
        ours_m = inspect.signature(getattr(AsymmetricAutoencoderKL, method)).parameters
        ref_m = inspect.signature(getattr(Reference, method)).parameters
        assert list(ours_m) == list(ref_m), method
        assert [p.default for p in ours_m.values()] == [p.default for p in ref_m.values()], method


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seeded_construction_matches_reference(name):
    config, _ = CONFIGS[name]
    ref = _seeded(Reference, config).state_dict()
    ours = _seeded(AsymmetricAutoencoderKL, config).state_dict()
    assert list(ours) == list(ref)
    for key, value in ref.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


def test_default_and_checkpoint_layouts_match_reference():
    for config in ({}, LARGE_CONFIG):
        with torch.device("meta"):
            ref = Reference(**config).state_dict()
            ours = AsymmetricAutoencoderKL(**config).state_dict()
        assert [(k, tuple(v.shape)) for k, v in ours.items()] == [(k, tuple(v.shape)) for k, v in ref.items()]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_matches_reference(name):
    config, _ = CONFIGS[name]
    ref = Reference(**config).config
    ours = AsymmetricAutoencoderKL(**config).config
    assert _public(ours) == _public(ref)
    assert set(ours.get("_use_default_values", ())) == set(ref.get("_use_default_values", ()))
    assert ours["block_out_channels"] == tuple(config["up_block_out_channels"])
    assert ours["force_upcast"] is False


def test_config_mismatch_raises():
    with pytest.raises(Exception, match="up_block_types"):
        AsymmetricAutoencoderKL(up_block_types=("UpDecoderBlock2D",) * 2, up_block_out_channels=(64,))


def test_slicing_and_tiling_are_unsupported_like_the_reference():
    ours = AsymmetricAutoencoderKL(**CONFIGS["one_block"][0])
    ref = Reference(**CONFIGS["one_block"][0])
    for model in (ours, ref):
        with pytest.raises(NotImplementedError):
            model.enable_slicing()
        with pytest.raises(NotImplementedError):
            model.enable_tiling()
        model.disable_slicing()
        model.disable_tiling()
        assert model.use_slicing is False and model.use_tiling is False


# ----------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_encode_matches_reference(name):
    ref, ours, config, size = _pair(name)
    image, _, _, _ = _inputs(config, size)
    a, b = ref.encode(image).latent_dist, ours.encode(image).latent_dist
    _close(b.mean, a.mean)
    _close(b.std, a.std)
    _close(b.logvar, a.logvar)
    (tup,) = ours.encode(image, return_dict=False)
    _close(tup.mean, a.mean)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_decode_matches_reference(name):
    ref, ours, config, size = _pair(name)
    image, mask, binary, z = _inputs(config, size)
    plain = ours.decode(z).sample
    _close(plain, ref.decode(z).sample)
    for kwargs in (dict(image=image), dict(mask=mask), dict(image=image, mask=mask), dict(image=image, mask=binary)):
        expected = ref.decode(z, **kwargs).sample
        got = ours.decode(z, **kwargs).sample
        _close(got, expected)
        if len(kwargs) == 1:  # either alone: no conditioning
            _close(got, plain)
    (tup,) = ours.decode(z, None, image, mask, False)
    _close(tup, ref.decode(z, image=image, mask=mask).sample)
    # mask == 1 everywhere: the decoder paints everything, as without a condition
    _close(ours.decode(z, image=image, mask=torch.ones_like(mask)).sample, plain)


@torch.no_grad()
def test_binary_mask_keeps_the_condition_outside_the_mask():
    """Where the mask is 0 the conditioned decode differs from the plain one (the image is used)."""
    _, ours, config, size = _pair("two_blocks")
    image, _, binary, z = _inputs(config, size)
    assert not torch.allclose(ours.decode(z, image=image, mask=binary).sample, ours.decode(z).sample)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_forward_matches_reference(name):
    ref, ours, config, size = _pair(name)
    image, mask, _, _ = _inputs(config, size)
    # forward needs the encoder and the decoder to share the scale factor
    assert len(config["down_block_out_channels"]) == len(config["up_block_out_channels"])
    _close(ours(image).sample, ref(image).sample)
    _close(ours(image, mask).sample, ref(image, mask).sample)
    (tup,) = ours(image, mask=mask, return_dict=False)
    _close(tup, ref(image, mask=mask).sample)
    sampled = ours(image, mask=mask, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    expected = ref(image, mask=mask, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
    _close(sampled, expected)


@torch.no_grad()
def test_shape_mismatch_raises_key_error_like_the_reference():
    ref, ours, config, size = _pair("two_blocks")
    image, mask, _, z = _inputs(config, size)
    small = image[:, :, : size // 2, : size // 2]
    small_mask = mask[:, :, : size // 2, : size // 2]
    for model in (ref, ours):
        with pytest.raises(KeyError):
            model.decode(z, image=small, mask=small_mask)


def test_bad_latent_channels_raise():
    _, ours, config, size = _pair("two_blocks")
    with pytest.raises(ValueError, match="latent_channels"):
        ours.decode(torch.zeros(1, 7, 4, 4))


# ----------------------------------------------------------------------------------------- folders
@torch.no_grad()
def test_reference_folder_loads_in_ours(tmp_path, caplog):
    ref, _, config, size = _pair("three_blocks_wider_decoder")
    ref.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffpipe"):
        ours = AsymmetricAutoencoderKL.from_pretrained(tmp_path).eval()
    assert "does not use config key" not in caplog.text  # block_out_channels/force_upcast are derived keys
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert _as_lists(_public(ours.config)) == _as_lists(_public(ref.config))
    image, mask, _, z = _inputs(config, size)
    _close(ours.decode(z, image=image, mask=mask).sample, ref.decode(z, image=image, mask=mask).sample)
    _close(ours.encode(image).latent_dist.mean, ref.encode(image).latent_dist.mean)


@torch.no_grad()
def test_our_folder_loads_in_reference(tmp_path):
    config, size = CONFIGS["two_blocks"]
    ours = _seeded(AsymmetricAutoencoderKL, config)
    with torch.no_grad():
        for p in ours.parameters():  # move off the seeded init so the load itself is checked
            p.add_(torch.randn_like(p) * 0.01)
    ours.save_pretrained(tmp_path)
    ref = Reference.from_pretrained(tmp_path).eval()
    assert _as_lists(_public(ref.config)) == _as_lists(_public(Reference(**config).config))
    for key, value in ours.state_dict().items():
        assert torch.equal(ref.state_dict()[key], value), key
    image, mask, _, z = _inputs(config, size)
    _close(ref.decode(z, image=image, mask=mask).sample, ours.decode(z, image=image, mask=mask).sample)
    _close(ref(image, mask).sample, ours(image, mask).sample)
