"""UNet2DConditionModel against the reference (diffusers, test oracle only).

Tiny configs of each SD family run on CPU in float32; the full-size configs are built on the meta
device only (no weights), to compare state-dict layouts.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import diffusers  # the oracle (test extra): missing, the module fails to load

from diffpipe.errors import ConfigError  # noqa: E402
from diffpipe.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from diffpipe.nn.attention import AttnProcessor, AttnProcessorMath  # noqa: E402
from sdxl_factory import SDXL_UNET

RefUNet = diffusers.UNet2DConditionModel

# ------------------------------------------------------------------------------------ configs
TINY = {
    # SD 1.x: conv projections, one head count for every block.
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=16,
    ),
    # SD 2.x: linear projections, per-block head counts, upcast_attention.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40,
        attention_head_dim=[2, 4, 8],
        use_linear_projection=True,
        upcast_attention=True,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=16,
    ),
    # SDXL: text_time added embeddings, per-block transformer depth, no attention at the top level.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=[2, 4, 8],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=16,
    ),
    # SD inpainting: 9 input channels (latents + mask + masked-image latents).
    "inpaint": dict(
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=8,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=16,
    ),
    # Less common options of SD-family configs in one model (LCM's time_cond_proj_dim, the x4
    # upscaler's class embeddings, scale-shift resnets, per-layer transformer depths, ...).
    "options": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        layers_per_block=[1, 2],
        transformer_layers_per_block=[[1], [2, 1]],
        reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1]],
        norm_num_groups=16,
        time_cond_proj_dim=12,
        timestep_post_act="silu",
        time_embedding_act_fn="mish",
        time_embedding_dim=96,
        class_embed_type="timestep",
        class_embeddings_concat=True,
        resnet_time_scale_shift="scale_shift",
        encoder_hid_dim=20,
        only_cross_attention=[True, False],
        conv_in_kernel=1,
        conv_out_kernel=1,
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        mid_block_scale_factor=1.5,
        act_fn="mish",
        sample_size=16,
    ),
    "no_mid_plain_classes": dict(
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2D",
        cross_attention_dim=24,
        attention_head_dim=4,
        layers_per_block=1,
        norm_num_groups=8,
        num_class_embeds=10,
        sample_size=16,
    ),
    # No mid block; an unCLIP-style projected class embedding.
    "no_mid_projection": dict(
        block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None,
        cross_attention_dim=24,
        attention_head_dim=2,
        layers_per_block=1,
        norm_num_groups=8,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=6,
        sample_size=16,
    ),
}


def _inputs(name: str, cfg: dict, batch: int = 2, size=(16, 16), seed: int = 1) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, cfg.get("in_channels", 4), *size, generator=g)
    width = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    states = torch.randn(batch, 7, width, generator=g)
    kwargs: dict = {}
    if cfg.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 16, generator=g),
            "time_ids": torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 48.0]] * batch),
        }
    if cfg.get("time_cond_proj_dim"):
        kwargs["timestep_cond"] = torch.randn(batch, cfg["time_cond_proj_dim"], generator=g)
    if cfg.get("class_embed_type") == "timestep":
        kwargs["class_labels"] = torch.tensor([3.0, 250.0][:batch])
    if cfg.get("num_class_embeds"):
        kwargs["class_labels"] = torch.tensor([1, 7][:batch])
    if cfg.get("class_embed_type") == "projection":
        kwargs["class_labels"] = torch.randn(batch, cfg["projection_class_embeddings_input_dim"], generator=g)
    return (sample, torch.tensor(501), states), kwargs


def _pair(cfg: dict, seed: int = 0):
    """(reference model, our model) with the same random weights; every parameter is perturbed so that
    swapped or unused weights change the outputs."""
    torch.manual_seed(seed)
    ref = RefUNet(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = UNet2DConditionModel(**cfg).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture(scope="module", params=sorted(TINY))
def family(request):
    name = request.param
    cfg = TINY[name]
    ref, ours = _pair(cfg)
    return name, cfg, ref, ours


def _layout(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    assert a.shape == b.shape
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff} (output magnitude {scale})"


# ------------------------------------------------------------------------------------ layout
def test_state_dict_keys_order_and_shapes(family):
    _, _, ref, ours = family
    assert _layout(ours) == _layout(ref)
    assert list(ours.buffers()) == []  # everything comes from the checkpoint


def test_init_signature_is_the_reference_config():
    ours = inspect.signature(UNet2DConditionModel.__init__).parameters
    ref = inspect.signature(RefUNet.__init__).parameters
    assert list(ours) == list(ref)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in ref.items()}


def test_builds_from_the_reference_config(family):
    _, _, ref, _ = family
    ours = UNet2DConditionModel.from_config(dict(ref.config))
    assert _layout(ours) == _layout(ref)
    assert ours.config.encoder_hid_dim_type == ref.config.encoder_hid_dim_type


# ------------------------------------------------------------------------------------ numerics
def test_forward_matches_reference(family):
    name, cfg, ref, ours = family
    args, kwargs = _inputs(name, cfg)
    with torch.no_grad():
        expected = ref(*args, **kwargs).sample
        out = ours(*args, **kwargs)
    _close(out.sample, expected)
    assert out[0] is out.sample
    with torch.no_grad():
        plain = ours(*args, **kwargs, return_dict=False)
    assert isinstance(plain, tuple) and len(plain) == 1


@pytest.mark.parametrize(
    "timestep",
    [
        7,
        7.5,
        torch.tensor(7),
        torch.tensor([7.5]),
        torch.tensor([3, 900]),
        torch.tensor([3.25, 900.0], dtype=torch.float64),
    ],
    ids=["int", "float", "0d", "1d-len1", "1d-batch", "1d-float64"],
)
def test_timestep_forms(timestep):
    cfg = TINY["inpaint"]
    ref, ours = _pair(cfg)
    (sample, _, states), kwargs = _inputs("inpaint", cfg)
    with torch.no_grad():
        _close(ours(sample, timestep, states).sample, ref(sample, timestep, states).sample)


def test_odd_sizes_masks_controlnet_and_adapter_residuals():
    cfg = TINY["sd1"]
    ref, ours = _pair(cfg)
    (sample, t, states), _ = _inputs("sd1", cfg, size=(10, 14))  # not a multiple of 4: explicit upsample sizes
    mask = torch.ones(2, 7)
    mask[0, 5:] = 0
    with torch.no_grad():
        _close(
            ours(sample, t, states, encoder_attention_mask=mask).sample,
            ref(sample, t, states, encoder_attention_mask=mask).sample,
        )
        # ControlNet-style residuals: one per skip connection, plus one for the mid block.
        shapes = _skip_shapes(ours, sample, t, states)
        g = torch.Generator().manual_seed(5)
        down = [torch.randn(s, generator=g) for s in shapes[:-1]]
        mid = torch.randn(shapes[-1], generator=g)
        expected = ref(sample, t, states, down_block_additional_residuals=list(down), mid_block_additional_residual=mid)
        got = ours(sample, t, states, down_block_additional_residuals=list(down), mid_block_additional_residual=mid)
        _close(got.sample, expected.sample)
        # T2I-Adapter residuals: one per down block output.
        adapter = [torch.randn(s, generator=g) for s in _block_output_shapes(ours, sample, t, states)]
        expected = ref(sample, t, states, down_intrablock_additional_residuals=list(adapter)).sample
        caller_list = list(adapter)
        got = ours(sample, t, states, down_intrablock_additional_residuals=caller_list).sample
        _close(got, expected)
        assert len(caller_list) == len(adapter)  # the caller's list is not consumed


def _skip_shapes(model, sample, t, states):
    """Shapes of the skip connections (down-block outputs) and of the mid-block output."""
    shapes = [(sample.shape[0], model.config.block_out_channels[0], *sample.shape[2:])]
    hooks = []

    def grab(_, __, out):
        shapes.extend(tuple(s.shape) for s in out[1])

    for block in model.down_blocks:
        hooks.append(block.register_forward_hook(grab))
    mid = []
    hooks.append(model.mid_block.register_forward_hook(lambda _, __, out: mid.append(tuple(out.shape))))
    model(sample, t, states)
    for h in hooks:
        h.remove()
    return shapes + mid


def _block_output_shapes(model, sample, t, states):
    """Where T2I-Adapter features are added: a cross-attention block's last pre-downsampling state, a
    plain block's output."""
    shapes = []

    def grab(block, _, out):
        if getattr(block, "has_cross_attention", False):
            shapes.append(tuple(out[1][-2 if block.downsamplers is not None else -1].shape))
        else:
            shapes.append(tuple(out[0].shape))

    hooks = [b.register_forward_hook(grab) for b in model.down_blocks]
    model(sample, t, states)
    for h in hooks:
        h.remove()
    return shapes


def test_meta_construction_then_assign_matches():
    """The loader's path: build on the meta device, then take every tensor from the state dict."""
    cfg = TINY["sdxl"]
    ref, _ = _pair(cfg)
    with torch.device("meta"):
        ours = UNet2DConditionModel(**cfg)
    ours.load_state_dict(ref.state_dict(), assign=True)
    ours.eval()
    assert all(p.device.type == "cpu" for p in ours.parameters())
    args, kwargs = _inputs("sdxl", cfg)
    with torch.no_grad():
        _close(ours(*args, **kwargs).sample, ref(*args, **kwargs).sample)


# ------------------------------------------------------------------------------------ processors
def test_attn_processor_keys_match_reference(family):
    name, cfg, ref, ours = family
    assert list(ours.attn_processors) == list(ref.attn_processors)
    assert len(ours.attn_processors) > 0
    assert all(k.endswith(("attn1.processor", "attn2.processor")) for k in ours.attn_processors)


def test_set_attn_processor_changes_outputs_and_math_processor_agrees():
    cfg = TINY["sd2"]
    _, ours = _pair(cfg)
    args, kwargs = _inputs("sd2", cfg)
    with torch.no_grad():
        base = ours(*args, **kwargs).sample

        calls = []

        class Muted:
            """Attention output zeroed: a processor with the documented signature."""

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
                calls.append(attn)
                return torch.zeros_like(hidden_states)

        ours.set_attn_processor(Muted())
        muted = ours(*args, **kwargs).sample
        assert len(calls) == len(ours.attn_processors)
        assert (muted - base).abs().max() > 1e-3

        # A dict sets one layer only; the others keep theirs.
        procs = {k: AttnProcessor() for k in ours.attn_processors}
        first = next(iter(procs))
        procs[first] = Muted()
        ours.set_attn_processor(procs)
        assert type(ours.attn_processors[first]) is Muted
        assert sum(type(p) is AttnProcessor for p in ours.attn_processors.values()) == len(procs) - 1
        with pytest.raises(ValueError, match="one processor per attention layer"):
            ours.set_attn_processor({first: AttnProcessor()})

        # The explicit-probabilities processor computes the same function.
        ours.set_attn_processor(AttnProcessorMath())
        _close(ours(*args, **kwargs).sample, base)
        ours.set_default_attn_processor()
        _close(ours(*args, **kwargs).sample, base)


def test_processor_with_weights_becomes_a_submodule():
    """Processors that are nn.Modules (image-prompt adapters) carry weights under `...processor.*`."""
    _, ours = _pair(TINY["inpaint"])
    key = next(iter(ours.attn_processors))

    class Weighted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain

    before = set(ours.state_dict())
    ours.set_attn_processor({k: (Weighted() if k == key else AttnProcessor()) for k in ours.attn_processors})
    assert set(ours.state_dict()) - before == {f"{key}.gain"}
    args, _ = _inputs("inpaint", TINY["inpaint"])
    with torch.no_grad():
        ours(*args)
    ours.set_default_attn_processor()
    assert set(ours.state_dict()) == before


def test_num_attention_heads_overrides_attention_head_dim():
    """`attention_head_dim` is the head count unless `num_attention_heads` is given (then it wins).

    The reference rejects `num_attention_heads` for this class; diffpipe accepts it with that meaning.
    """
    cfg = TINY["inpaint"]
    ref, _ = _pair({**cfg, "attention_head_dim": 4})
    ours = UNet2DConditionModel(**{**cfg, "attention_head_dim": 8, "num_attention_heads": 4}).eval()
    ours.load_state_dict(ref.state_dict())
    assert {m.heads for m in ours.modules() if hasattr(m, "heads")} == {4}
    args, _ = _inputs("inpaint", cfg)
    with torch.no_grad():
        _close(ours(*args).sample, ref(*args).sample)


def test_cross_attention_kwargs_reach_processors():
    cfg = TINY["inpaint"]
    _, ours = _pair(cfg)
    seen = []

    def scaled(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, gain=1.0):
        seen.append(gain)
        return AttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * gain

    ours.set_attn_processor(scaled)
    args, _ = _inputs("inpaint", cfg)
    with torch.no_grad():
        a = ours(*args, cross_attention_kwargs={"gain": 1.0}).sample
        b = ours(*args, cross_attention_kwargs={"gain": 0.0, "not_taken": 1}).sample
    assert set(seen) == {1.0, 0.0}
    assert (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ full-size layouts
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
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
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 96,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD15_INPAINT_UNET = {**SD15_UNET, "in_channels": 9}


@pytest.mark.parametrize(
    "config",
    [SD15_UNET, SD21_UNET, SDXL_UNET, SD15_INPAINT_UNET],
    ids=["sd15", "sd21", "sdxl", "sd15-inpaint"],
)
def test_full_size_layout_on_meta_device(config):
    with torch.device("meta"):
        ref = RefUNet(**config)
        ours = UNet2DConditionModel(**config)
    assert _layout(ours) == _layout(ref)
    assert list(ours.attn_processors) == list(ref.attn_processors)
    assert all(p.device.type == "meta" for p in ours.parameters())


# ------------------------------------------------------------------------------------ bad input
class _NoCompute:
    """Fails the test if conv_in runs: input errors must come before any heavy compute."""

    def __init__(self, model):
        self.handle = model.conv_in.register_forward_pre_hook(self._fail)

    @staticmethod
    def _fail(*_):
        raise AssertionError("the UNet started computing before rejecting bad input")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_wrong_latent_channels():
    _, ours = _pair(TINY["inpaint"])
    (_, t, states), _ = _inputs("inpaint", TINY["inpaint"])
    with _NoCompute(ours), pytest.raises(ValueError, match=r"\[batch, 9, height, width\].*got \(2, 4, 16, 16\)"):
        ours(torch.randn(2, 4, 16, 16), t, states)


def test_wrong_encoder_width_and_batch():
    cfg = TINY["sd1"]
    _, ours = _pair(cfg)
    (sample, t, _), _ = _inputs("sd1", cfg)
    with _NoCompute(ours), pytest.raises(ValueError, match=r"\[batch, sequence, 24\].*got \(2, 7, 768\)"):
        ours(sample, t, torch.randn(2, 7, 768))
    with _NoCompute(ours), pytest.raises(ValueError, match="batch 1 but `sample` has batch 2"):
        ours(sample, t, torch.randn(1, 7, 24))
    with _NoCompute(ours), pytest.raises(ValueError, match="timestep"):
        ours(sample, torch.tensor([1, 2, 3]), torch.randn(2, 7, 24))


def test_sdxl_without_added_cond_kwargs():
    cfg = TINY["sdxl"]
    _, ours = _pair(cfg)
    (sample, t, states), kwargs = _inputs("sdxl", cfg)
    good = kwargs["added_cond_kwargs"]
    with _NoCompute(ours):
        with pytest.raises(ValueError, match=r"text_embeds.*time_ids.*= 64"):
            ours(sample, t, states)
        with pytest.raises(ValueError, match=r"lacks \['text_embeds'\]"):
            ours(sample, t, states, added_cond_kwargs={"time_ids": good["time_ids"]})
        with pytest.raises(ValueError, match=r"lacks \['time_ids'\]"):
            ours(sample, t, states, added_cond_kwargs={"text_embeds": good["text_embeds"]})
        with pytest.raises(ValueError, match=r"which give 56"):
            ours(
                sample,
                t,
                states,
                added_cond_kwargs={"text_embeds": good["text_embeds"], "time_ids": good["time_ids"][:, :5]},
            )


def test_missing_class_labels():
    cfg = TINY["no_mid_plain_classes"]
    _, ours = _pair(cfg)
    (sample, t, states), _ = _inputs("no_mid_plain_classes", cfg)
    with _NoCompute(ours), pytest.raises(ValueError, match="class_labels"):
        ours(sample, t, states)


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override, error",
    [
        (dict(dual_cross_attention=True), NotImplementedError),
        (dict(attention_type="gated"), NotImplementedError),
        (dict(time_embedding_type="fourier"), NotImplementedError),
        (dict(addition_embed_type="text"), NotImplementedError),
        (dict(encoder_hid_dim=8, encoder_hid_dim_type="image_proj"), NotImplementedError),
        (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), NotImplementedError),
        (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), NotImplementedError),
        (dict(down_block_types=("NoSuchBlock", "DownBlock2D")), ValueError),
        (dict(block_out_channels=(32, 64, 64)), ConfigError),
        (dict(attention_head_dim=[2, 4, 8]), ConfigError),
        (dict(transformer_layers_per_block=[[1], [1]]), ConfigError),
        (dict(class_embed_type="projection"), ConfigError),
        (dict(addition_embed_type="text_time"), ConfigError),
    ],
)
def test_unsupported_or_invalid_configs(override, error):
    with pytest.raises(error):
        UNet2DConditionModel(**{**TINY["inpaint"], **override})


def test_inert_keys_are_accepted_and_recorded():
    """Keys that only matter for block types diffpipe does not build behave as in the reference: inert."""
    extra = dict(resnet_skip_time_act=True, resnet_out_scale_factor=2.0, cross_attention_norm="layer_norm")
    cfg = {**TINY["inpaint"], **extra}
    ref, ours = _pair(cfg)
    assert {k: ours.config[k] for k in extra} == extra
    args, _ = _inputs("inpaint", cfg)
    with torch.no_grad():
        _close(ours(*args).sample, ref(*args).sample)


def test_from_pretrained_reads_a_reference_folder(tmp_path):
    """End to end through the loader: config.json and weights as the reference writes them."""
    cfg = TINY["sdxl"]
    ref, _ = _pair(cfg)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    assert not ours.training
    args, kwargs = _inputs("sdxl", cfg)
    with torch.no_grad():
        _close(ours(*args, **kwargs).sample, ref(*args, **kwargs).sample)
