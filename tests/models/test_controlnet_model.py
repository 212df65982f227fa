"""ControlNetModel and MultiControlNetModel against the reference (diffusers, test oracle only).

Tiny configs run on CPU in float32 with every weight perturbed (the zero-initialised output
convolutions included, so the residuals are not trivially zero); the full-size published configs are
built on the meta device only, to compare state-dict layouts and configs.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import diffusers  # the oracle (test extra): missing, the module fails to load
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel as RefMulti

import diffpipe
from diffpipe.errors import ConfigError
from diffpipe.models.controlnet import ControlNetModel
from diffpipe.models.multicontrolnet import MultiControlNetModel
from diffpipe.models.outputs import ControlNetOutput
from diffpipe.models.unet_2d_condition import UNet2DConditionModel

RefControlNet = diffusers.ControlNetModel

# ------------------------------------------------------------------------------------ configs
TINY = {
    # SD 1.x style, with a four-step conditioning embedding: the image is 8x the latent.
    "sd": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        layers_per_block=2,
        norm_num_groups=16,
        conditioning_embedding_out_channels=(8, 8, 16, 16),
    ),
    # SDXL style: text_time added embeddings, per-block heads and transformer depth, linear projections.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=[2, 4, 8],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        layers_per_block=2,
        norm_num_groups=16,
        conditioning_embedding_out_channels=(8, 16),
    ),
    # BGR conditioning, pooled residuals (the "shuffle" ControlNets), class labels, a 1-channel image.
    "pooled_bgr": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=2,
        layers_per_block=1,
        norm_num_groups=16,
        conditioning_channels=1,
        controlnet_conditioning_channel_order="bgr",
        global_pool_conditions=True,
        num_class_embeds=10,
        conditioning_embedding_out_channels=(8, 16),
    ),
    # Less common options: resnet-only mid block, timestep class embeddings, scale-shift resnets,
    # num_attention_heads, only_cross_attention, an (unused) encoder_hid_proj.
    "options": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=24,
        num_attention_heads=[2, 4],
        only_cross_attention=[True, False],
        class_embed_type="timestep",
        resnet_time_scale_shift="scale_shift",
        encoder_hid_dim=12,
        upcast_attention=True,
        layers_per_block=1,
        norm_num_groups=16,
        conditioning_embedding_out_channels=(8, 16),
    ),
}

# The published configs (lllyasviel/sd-controlnet-canny, diffusers/controlnet-canny-sdxl-1.0), as written.
SD15_CANNY = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.14.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}
SDXL_CANNY = {
    "_class_name": "ControlNetModel",
    "_diffusers_version": "0.20.0.dev0",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "class_embed_type": None,
    "conditioning_channels": 3,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_time_scale_shift": "default",
    "transformer_layers_per_block": [1, 2, 10],
    "upcast_attention": None,
    "use_linear_projection": True,
}

CALLS = {
    "plain": {},
    "guess_mode": {"guess_mode": True},
    "scale_0.5": {"conditioning_scale": 0.5},
    "guess_mode_scale_0.5": {"guess_mode": True, "conditioning_scale": 0.5},
}


def _factor(cfg: dict) -> int:
    return 2 ** (len(cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)


def _inputs(cfg: dict, batch: int = 2, size: int = 8, seed: int = 1) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.get("in_channels", 4), size, size, generator=g)
    states = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    side = size * _factor(cfg)
    cond = torch.rand(batch, cfg.get("conditioning_channels", 3), side, side, generator=g)
    kwargs: dict = {}
    if cfg.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=g),
            "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0]] * batch),
        }
    if cfg.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([1, 7][:batch])
    if cfg.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([3.0, 250.0][:batch])
    return (sample, torch.tensor([501, 20][:batch]), states, cond), kwargs


def _perturbed_reference(cfg: dict, seed: int = 0) -> RefControlNet:
    torch.manual_seed(seed)
    ref = RefControlNet(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _layout(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _config(model) -> dict:
    """A config as saved (JSON values), with the list of defaulted keys as a set."""
    cfg = json.loads(json.dumps({k: v for k, v in model.config.items() if k != "_name_or_path"}))
    cfg["_use_default_values"] = set(cfg.get("_use_default_values", ()))
    return cfg


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= tol * max(1.0, b.abs().max().item()), f"max abs diff {diff}"


def _same_residuals(ours, ref) -> None:
    down_o, mid_o = ours
    down_r, mid_r = ref
    assert len(down_o) == len(down_r)
    for a, b in zip(down_o, down_r):
        _close(a, b)
    _close(mid_o, mid_r)


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request, tmp_path_factory):
    """(name, config, reference, ours loaded from the reference's saved folder, the folder)."""
    name = request.param
    cfg = TINY[name]
    ref = _perturbed_reference(cfg)
    folder = tmp_path_factory.mktemp(f"controlnet-{name}")
    ref.save_pretrained(folder)
    ours = ControlNetModel.from_pretrained(folder)
    return name, cfg, ref, ours, folder


# ------------------------------------------------------------------------------------ layout and config
def test_init_signature_is_the_reference_config():
    ours = inspect.signature(ControlNetModel.__init__).parameters
    ref = inspect.signature(RefControlNet.__init__).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in ref.items()}
    for method in ("forward", "from_unet"):
        assert list(inspect.signature(getattr(ControlNetModel, method)).parameters) == list(
            inspect.signature(getattr(RefControlNet, method)).parameters
        )


def test_exported_lazily():
    assert diffpipe.ControlNetModel is ControlNetModel
    assert diffpipe.MultiControlNetModel is MultiControlNetModel


def test_layout_config_and_seeded_init_match_the_reference(family):
    _, cfg, _, _, _ = family
    torch.manual_seed(3)
    ref = RefControlNet(**cfg)
    torch.manual_seed(3)
    ours = ControlNetModel(**cfg)
    assert _layout(ours) == _layout(ref)
    assert _config(ours) == _config(ref)
    ref_state = ref.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    # the output convolutions start at zero
    zero = [k for k, v in ours.state_dict().items() if not v.any()]
    assert {k.rsplit(".", 1)[0] for k in zero if "norm" not in k} >= {"controlnet_mid_block"}
    assert not ours.controlnet_cond_embedding.conv_out.weight.any()
    assert all(not conv.weight.any() for conv in ours.controlnet_down_blocks)


def test_attn_processor_keys_and_attention_slicing(family):
    _, cfg, ref, ours, _ = family
    assert list(ours.attn_processors) == list(ref.attn_processors)
    args, kwargs = _inputs(cfg)
    with torch.no_grad():
        want = ours(*args, **kwargs, return_dict=False)
        ours.set_attention_slice(1)
        try:
            _same_residuals(ours(*args, **kwargs, return_dict=False), want)
        finally:
            ours.set_attention_slice(None)


@pytest.mark.parametrize("config", [SD15_CANNY, SDXL_CANNY], ids=["sd15_canny", "sdxl_canny"])
def test_full_size_published_configs_on_meta_device(config):
    with torch.device("meta"):
        ref = RefControlNet.from_config(config)
        ours = ControlNetModel.from_config(config)
    assert _layout(ours) == _layout(ref)
    assert all(p.device.type == "meta" for p in ours.parameters())
    assert _config(ours) == _config(ref)


# ------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("call", sorted(CALLS))
def test_reference_folder_loads_with_equal_outputs(family, call):
    _, cfg, ref, ours, _ = family
    args, kwargs = _inputs(cfg)
    kwargs.update(CALLS[call])
    with torch.no_grad():
        out_ref = ref(*args, **kwargs)
        out = ours(*args, **kwargs)
        plain = ours(*args, **kwargs, return_dict=False)
    assert isinstance(out, ControlNetOutput)
    _same_residuals((out.down_block_res_samples, out.mid_block_res_sample), tuple(out_ref.values()))
    assert isinstance(plain, tuple) and isinstance(plain[0], tuple)
    _same_residuals(plain, tuple(out_ref.values()))
    assert out[0] is out.down_block_res_samples  # tuple-style access
    if cfg.get("global_pool_conditions"):
        assert all(r.shape[-2:] == (1, 1) for r in (*out.down_block_res_samples, out.mid_block_res_sample))


def test_state_dict_round_trip_and_our_save_loads_in_the_reference(family, tmp_path):
    _, cfg, ref, ours, folder = family
    ref_state = ref.state_dict()
    assert list(ours.state_dict()) == list(ref_state)
    assert all(torch.equal(v, ref_state[k]) for k, v in ours.state_dict().items())
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    theirs = json.loads((folder / "config.json").read_text())
    assert saved["_class_name"] == "ControlNetModel"
    assert set(saved) - {"_name_or_path"} == set(theirs)  # ours was loaded from a folder
    back = RefControlNet.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, ref_state[k]) for k, v in back.state_dict().items())
    args, kwargs = _inputs(cfg, seed=5)
    with torch.no_grad():
        _same_residuals(tuple(back(*args, **kwargs).values()), tuple(ours(*args, **kwargs).values()))


def test_bgr_order_flips_the_conditioning_channels():
    cfg = dict(TINY["sd"], controlnet_conditioning_channel_order="bgr")
    ref = _perturbed_reference(cfg)
    ours = ControlNetModel(**cfg).eval()
    ours.load_state_dict(ref.state_dict())
    rgb = ControlNetModel(**TINY["sd"]).eval()
    rgb.load_state_dict(ref.state_dict())
    (sample, t, states, cond), kwargs = _inputs(cfg)
    with torch.no_grad():
        out = ours(sample, t, states, cond)
        _same_residuals(tuple(out.values()), tuple(ref(sample, t, states, cond).values()))
        _same_residuals(tuple(out.values()), tuple(rgb(sample, t, states, cond.flip(1)).values()))


def test_attention_mask_and_scalar_timestep_match_the_reference():
    cfg = dict(TINY["sd"], mid_block_type="UNetMidBlock2D")  # attention at one resolution: the mask fits it
    ref = _perturbed_reference(cfg)
    ours = ControlNetModel(**cfg).eval()
    ours.load_state_dict(ref.state_dict())
    (sample, _, states, cond), _ = _inputs(cfg)
    mask = (torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) > 0.3).long()  # self-attention keys
    with torch.no_grad():
        for t in (10, 999.0, torch.tensor(7)):
            _same_residuals(
                tuple(ours(sample, t, states, cond, attention_mask=mask).values()),
                tuple(ref(sample, t, states, cond, attention_mask=mask).values()),
            )


# ------------------------------------------------------------------------------------ from_unet
UNETS = {
    "sd": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=8,
    ),
    "sdxl_inpaint": dict(
        in_channels=9,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=[2, 4],
        transformer_layers_per_block=[1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        class_embed_type="timestep",
        encoder_hid_dim=12,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=8,
    ),
}


@pytest.mark.parametrize("load_weights", [True, False], ids=["weights", "no_weights"])
@pytest.mark.parametrize("name", sorted(UNETS))
def test_from_unet_equals_the_reference(name, load_weights):
    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(**UNETS[name])
    with torch.no_grad():
        for p in ref_unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet = UNet2DConditionModel(**UNETS[name])
    unet.load_state_dict(ref_unet.state_dict())
    kwargs = dict(
        conditioning_embedding_out_channels=(8, 16), conditioning_channels=1, load_weights_from_unet=load_weights
    )
    torch.manual_seed(1)
    ref = RefControlNet.from_unet(ref_unet, controlnet_conditioning_channel_order="bgr", **kwargs)
    torch.manual_seed(1)
    ours = ControlNetModel.from_unet(unet, controlnet_conditioning_channel_order="bgr", **kwargs)
    assert _config(ours) == _config(ref)
    ref_state, unet_state = ref.state_dict(), unet.state_dict()
    assert list(ours.state_dict()) == list(ref_state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    copied = [k for k in ref_state if k.startswith(("conv_in", "time_embedding", "class_embedding", "down_blocks"))]
    assert copied and all(torch.equal(ours.state_dict()[k], unet_state[k]) == load_weights for k in copied)


# ------------------------------------------------------------------------------------ MultiControlNetModel
def test_multi_controlnet_sums_as_the_reference(tmp_path):
    cfg = TINY["sdxl"]
    refs = [_perturbed_reference(cfg, seed=s) for s in (0, 1)]
    ref_multi = RefMulti(refs)
    ref_multi.save_pretrained(str(tmp_path / "cn"))  # the reference needs a str
    assert (tmp_path / "cn_1" / "config.json").is_file()
    ours = MultiControlNetModel.from_pretrained(tmp_path / "cn")
    assert len(ours.nets) == 2
    (sample, t, states, cond), kwargs = _inputs(cfg)
    conds = [cond, cond.flip(-1)]
    with torch.no_grad():
        for guess in (False, True):
            # (the reference's MultiControlNetModel only works with return_dict=False, as its pipelines call it)
            want = ref_multi(sample, t, states, conds, [1.0, 0.5], guess_mode=guess, return_dict=False, **kwargs)
            got = ours(sample, t, states, conds, [1.0, 0.5], guess_mode=guess, **kwargs)
            assert isinstance(got, tuple) and len(got) == 2
            _same_residuals(got, want)
        # one net alone gives that net's residuals
        single = MultiControlNetModel([ours.nets[0]])(sample, t, states, [cond], [0.7], **kwargs)
        _same_residuals(single, ours.nets[0](sample, t, states, cond, 0.7, return_dict=False, **kwargs))
    # and our save loads in the reference
    ours.save_pretrained(tmp_path / "ours")
    back = RefMulti.from_pretrained(str(tmp_path / "ours"))  # the reference needs a str
    with torch.no_grad():
        _same_residuals(
            back(sample, t, states, conds, [1.0, 0.5], return_dict=False, **kwargs),
            ours(sample, t, states, conds, [1.0, 0.5], **kwargs),
        )


# ------------------------------------------------------------------------------------ errors
def _tiny_sd():
    return ControlNetModel(**TINY["sd"]).eval()


def test_wrong_conditioning_image_size_names_expected_and_found():
    model = _tiny_sd()
    (sample, t, states, cond), _ = _inputs(TINY["sd"])
    with pytest.raises(ValueError, match=r"\[2, 3, 64, 64\].*8x the sample's 8x8.*got \(2, 3, 32, 32\)"):
        model(sample, t, states, cond[..., :32, :32])
    with pytest.raises(ValueError, match=r"conditioning_channels=3.*got \(2, 4, 64, 64\)"):
        model(sample, t, states, torch.cat([cond, cond[:, :1]], dim=1))


def test_other_bad_inputs_fail_clearly():
    model = _tiny_sd()
    (sample, t, states, cond), _ = _inputs(TINY["sd"])
    with pytest.raises(ValueError, match=r"`sample` of shape \[batch, 4, height, width\].*got \(2, 9, 8, 8\)"):
        model(torch.randn(2, 9, 8, 8), t, states, cond)
    with pytest.raises(ValueError, match=r"encoder_hidden_states.*24.*got \(2, 7, 32\)"):
        model(sample, t, torch.randn(2, 7, 32), cond)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        model(sample, t, states, cond, timestep_cond=torch.randn(2, 4))
    sdxl = ControlNetModel(**TINY["sdxl"]).eval()
    (sample, t, states, cond), _ = _inputs(TINY["sdxl"])
    with pytest.raises(ValueError, match="text_embeds"):
        sdxl(sample, t, states, cond)
    multi = MultiControlNetModel([model, model])
    (sample, t, states, cond), _ = _inputs(TINY["sd"])
    with pytest.raises(ValueError, match="2 ControlNets.*got 1 images"):
        multi(sample, t, states, [cond], [1.0, 1.0])


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ({"mid_block_type": None}, ConfigError),
        ({"down_block_types": ("CrossAttnDownBlock2D", "AttnDownBlock2D")}, ConfigError),
        ({"controlnet_conditioning_channel_order": "rbg"}, ConfigError),
        ({"block_out_channels": (32, 64, 64)}, ConfigError),
        ({"addition_embed_type": "text_time"}, ConfigError),
    ],
)
def test_invalid_configs(override, error):
    with pytest.raises(error):
        ControlNetModel(**{**TINY["sd"], **override})


def test_legacy_published_config_folder_loads_in_both(tmp_path):
    """A folder in the published SD 1.5 ControlNets' layout (a 0.14-era config without the newer keys),
    shrunk to a tiny size."""
    config = {
        **SD15_CANNY,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "cross_attention_dim": 24,
        "norm_num_groups": 16,
        "conditioning_embedding_out_channels": [8, 16],
        "_name_or_path": "lllyasviel/sd-controlnet-canny",
    }
    torch.manual_seed(0)
    ref = RefControlNet.from_config(config)
    ref.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ref = RefControlNet.from_pretrained(tmp_path).eval()
    ours = ControlNetModel.from_pretrained(tmp_path)
    assert _config(ours) | {"_name_or_path": None} == _config(ref) | {"_name_or_path": None}
    cfg = {"cross_attention_dim": 24, "conditioning_embedding_out_channels": [8, 16]}
    args, _ = _inputs(cfg)
    with torch.no_grad():
        _same_residuals(tuple(ours(*args).values()), tuple(ref(*args).values()))
