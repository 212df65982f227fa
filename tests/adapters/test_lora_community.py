"""Community LoRA formats and the LoRA API around them, on tiny reference-built pipelines.

Where the reference loads the format (kohya with per-module alphas, LoCon 3x3 convs, SDXL with
``lora_te1_`` / ``lora_te2_``, peft DoRA, files written by ``save_lora_weights``, hot-swapped adapters)
the images are compared with its images (max abs difference <= 2/255). LyCORIS LoHa / LoKr and
``dora_scale`` the reference does not load (it refuses LoHa/LoKr keys and silently drops
``dora_scale``), so there the fused weights are compared with ``W + scale * dW`` computed here from the
format's definition, and the unfused (hooked) images with the fused ones.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

import diffpipe
from adapter_factory import (
    assert_close,
    images,
    kohya_name,
    load_both,
    loha_factors,
    lokr_factors,
    lora_pairs,
    peft_lora,
    save_lora,
)
from diffpipe.errors import StateDictMismatchError
from sd_factory import save_reference_pipeline

import peft  # noqa: F401,E402  the reference's LoRA backend (test extra)

ARGS = dict(
    prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=3, height=32, width=32, output_type="np"
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("lora-community") / "sd", safety_checker=False, seed=7)


def run(pipe, seed=0, **kwargs):
    return images(pipe, {**ARGS, **kwargs}, seed)


def load_into_both(ref, ours, source, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_weights(dict(source), **kwargs)
    ours.load_lora_weights(dict(source), **kwargs)


def kohya_tensors(pairs_by_component: dict, alphas, sd1: bool = True) -> dict:
    """kohya keys for ``{component: {path: (down, up)}}`` with alpha ``alphas(i, path)`` for the i-th layer."""
    tensors, i = {}, 0
    for component, pairs in pairs_by_component.items():
        for path, (down, up) in pairs.items():
            base = kohya_name(component, path, sd1=sd1)
            tensors[f"{base}.lora_down.weight"] = down
            tensors[f"{base}.lora_up.weight"] = up
            tensors[f"{base}.alpha"] = torch.tensor(float(alphas(i, path)))
            i += 1
    return tensors


def per_module_alpha(i: int, path: str) -> float:
    """A different alpha per module, except on UNet attention projections (to_q/k/v/out) and text-encoder
    layers: the reference gives all of those one alpha (its alpha_pattern does not reach them), so
    those share one per component."""
    if path.startswith("encoder."):
        return 3.0
    return 1.0 if ".attn" in path else 0.5 + i % 4


# ------------------------------------------------------------------------------ formats the reference loads
def test_kohya_sd_per_module_alpha_and_conv_locon(folder):
    ref, ours = load_both(folder)
    g = torch.Generator().manual_seed(11)
    unet = lora_pairs(ref.unet, ("to_q", "to_out.0", "proj_in", "conv1", "conv2", "time_emb_proj"), 2, g, conv_too=True)
    assert any(down.ndim == 4 and down.shape[-1] == 3 for down, _ in unet.values())  # LoCon 3x3 in the ResNets
    pairs = {"unet": unet, "text_encoder": lora_pairs(ref.text_encoder, TEXT_TARGETS, 2, g)}
    without = run(ours)
    load_into_both(ref, ours, kohya_tensors(pairs, per_module_alpha), adapter_name="k")
    got = run(ours)
    assert_close(run(ref), got)
    assert np.abs(got - without).max() > 0.02


def test_kohya_sdxl_with_te1_and_te2(tmp_path):
    from sdxl_factory import save_reference_sdxl

    ref, ours = load_both(save_reference_sdxl(tmp_path / "sdxl"), "StableDiffusionXLPipeline")
    g = torch.Generator().manual_seed(12)
    pairs = {
        "unet": lora_pairs(ref.unet, ("attn1.to_q", "attn2.to_v", "conv1"), 2, g, conv_too=True),
        "text_encoder": lora_pairs(ref.text_encoder, TEXT_TARGETS, 2, g),
        "text_encoder_2": lora_pairs(ref.text_encoder_2, TEXT_TARGETS, 2, g),
    }
    kwargs = {**ARGS, "negative_prompt": None}
    without = images(ours, kwargs)
    load_into_both(
        ref,
        ours,
        kohya_tensors(pairs, lambda i, path: 3.0 if path.startswith("encoder.") else 1.5, sd1=False),
        adapter_name="xl",
    )
    got = images(ours, kwargs)
    assert_close(images(ref, kwargs), got)
    assert np.abs(got - without).max() > 0.02
    assert ours.get_list_adapters() == {"unet": ["xl"], "text_encoder": ["xl"], "text_encoder_2": ["xl"]}
    # the text encoders alone matter too: with the UNet's part at 0 the images still differ
    for pipe in (ref, ours):
        pipe.set_adapters("xl", adapter_weights={"unet": 0.0, "text_encoder": 1.0, "text_encoder_2": 1.0})
    te_only = images(ours, kwargs)
    assert_close(images(ref, kwargs), te_only)
    assert np.abs(te_only - without).max() > 0.02


@pytest.mark.parametrize("suffix", [".lora_magnitude_vector", ".lora_magnitude_vector.weight"])
def test_peft_dora_matches_the_reference(folder, suffix):
    ref, ours = load_both(folder)
    g = torch.Generator().manual_seed(13)
    pairs = {
        "unet": lora_pairs(ref.unet, ("to_q", "to_v", "proj_in", "conv1"), 2, g, conv_too=True),
        "text_encoder": lora_pairs(ref.text_encoder, ("q_proj", "fc1"), 2, g),
    }
    tensors, _ = peft_lora(pairs)
    for component, layers in pairs.items():
        model = getattr(ref, component)
        for path in layers:
            w = model.get_submodule(path).weight.detach()
            norm = w.flatten(1).norm(dim=1)
            if w.ndim == 4:  # peft's layout of a conv's magnitude
                norm = norm.reshape(1, -1, 1, 1)
            tensors[f"{component}.{path}{suffix}"] = norm * (0.6 + 0.8 * torch.rand(norm.shape, generator=g))
    without = run(ours)
    load_into_both(ref, ours, tensors, adapter_name="dora")
    got = run(ours)
    assert_close(run(ref), got)
    assert np.abs(got - without).max() > 0.02
    for pipe in (ref, ours):  # the weight enters the norm as well (peft: scaling inside W + s*BA)
        pipe.set_adapters("dora", adapter_weights=0.5)
    half = run(ours)
    if not suffix.endswith(".weight"):
        # with the bare ".lora_magnitude_vector" spelling the reference's set_adapters result differs
        # (by 0.015; at weight 1 both spellings agree): the oracle is the reference with the same LoRA
        # spelled ".lora_magnitude_vector.weight", which follows peft's definition
        ref, _ = load_both(folder)
        spelled = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in tensors.items()}
        load_into_both(ref, load_both(folder)[1], spelled, adapter_name="dora")
        ref.set_adapters("dora", adapter_weights=0.5)
    assert_close(run(ref), half)
    before = ours.unet.down_blocks[1].attentions[0].proj_in.weight.clone()
    ours.fuse_lora()
    assert_close(half, run(ours))
    ours.unfuse_lora()
    torch.testing.assert_close(ours.unet.down_blocks[1].attentions[0].proj_in.weight, before, rtol=0, atol=1e-6)
    assert_close(half, run(ours))


# ------------------------------------------------------------------------------ LyCORIS: the format's definition
def tucker(t, a, b):
    """``sum_ij t[i, j] * a[i, p] * b[j, q]`` -> ``[p, q, kh, kw]`` (LyCORIS's CP/Tucker rebuild)."""
    return torch.einsum("ijhw,ip,jq->pqhw", t, a, b)


def kron(w1, w2):
    """Kronecker product by blocks: block (i, j) is ``w1[i, j] * w2``."""
    rows = [torch.cat([w1[i, j] * w2 for j in range(w1.shape[1])], dim=1) for i in range(w1.shape[0])]
    return torch.cat(rows, dim=0)


def expected_delta(f: dict, shape) -> torch.Tensor:
    f = {k: v.double() for k, v in f.items()}
    if "hada_w1_a" in f:
        if "hada_t1" in f:
            return tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * tucker(
                f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"]
            )
        return ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])).reshape(shape)
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_t2" in f:
        w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    elif "lokr_w2" in f:
        w2 = f["lokr_w2"]
    else:
        w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
    return kron(w1, w2)


def expected_scale(f: dict, alpha) -> float:
    """LoHa: alpha / rank of hada_w1_b. LoKr: alpha / the factorised dim (lokr_w2_b, else lokr_w1_b), 1 if
    both factors are full. No alpha: 1."""
    if alpha is None:
        return 1.0
    for key in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if key in f:
            return alpha / f[key].shape[0]
    return 1.0


def dora(weight, scale_vector):
    """LyCORIS DoRA with a [out, 1, ...] dora_scale: norm per output channel over the input dims (keepdim)."""
    norm = weight.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
    return scale_vector * weight / norm


def lycoris_cases(unet, text):
    """(component, path, factors, alpha, with dora_scale) for every LoHa / LoKr variant."""
    lin = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    lin2 = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    lin3 = "mid_block.attentions.0.proj_in"
    conv = "down_blocks.1.resnets.0.conv1"
    conv2 = "up_blocks.1.resnets.0.conv2"
    conv3 = "mid_block.resnets.0.conv1"
    conv4 = "up_blocks.0.resnets.0.conv1"
    q = "encoder.layers.0.self_attn.q_proj"
    shape = {p: tuple(unet.get_submodule(p).weight.shape) for p in (lin, lin2, lin3, conv, conv2, conv3, conv4)}
    shape[q] = tuple(text.get_submodule(q).weight.shape)
    g = torch.Generator().manual_seed(14)
    return [
        ("unet", lin, loha_factors(shape[lin], 2, g), 3.0, False),
        ("unet", conv, loha_factors(shape[conv], 2, g), None, False),
        ("unet", conv2, loha_factors(shape[conv2], 2, g, tucker=True), 1.0, False),
        ("unet", lin2, lokr_factors(shape[lin2], g, a=4, c=2, w2_rank=2), 1.0, False),
        ("unet", lin3, lokr_factors(shape[lin3], g, a=2, c=4, w1_rank=2), 4.0, True),
        ("unet", conv3, lokr_factors(shape[conv3], g, a=2, c=2), 5.0, False),  # full factors: scale 1
        ("unet", conv4, lokr_factors(shape[conv4], g, a=2, c=2, w2_rank=2, tucker=True), 3.0, True),
        ("text_encoder", q, loha_factors(shape[q], 2, g), 1.0, True),
    ]


def test_loha_lokr_and_dora_scale_follow_the_format_definition(folder):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    cases = lycoris_cases(ours.unet, ours.text_encoder)
    g = torch.Generator().manual_seed(15)
    tensors, expected = {}, {}
    for component, path, factors, alpha, with_dora in cases:
        base = kohya_name(component, path, sd1=True)
        tensors.update({f"{base}.{k}": v for k, v in factors.items()})
        if alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(alpha)
        w = getattr(ours, component).get_submodule(path).weight.detach().double()
        merged = w + expected_scale(factors, alpha) * expected_delta(factors, w.shape)
        if with_dora:
            m = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
            m = m * (0.7 + 0.6 * torch.rand(m.shape, generator=g, dtype=torch.float64))
            tensors[f"{base}.dora_scale"] = m.float()
            merged = dora(merged, m)
        expected[(component, path)] = merged
    # and a plain kohya LoRA with a dora_scale (the common LyCORIS DoRA file)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    w = ours.unet.get_submodule(path).weight.detach().double()
    down, up = torch.randn(2, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 2, generator=g) * 0.3
    m = w.norm(dim=1, keepdim=True) * 1.3
    base = kohya_name("unet", path)
    tensors.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": torch.tensor(1.0)})
    tensors[f"{base}.dora_scale"] = m.float()
    expected[("unet", path)] = dora(w + 0.5 * (up.double() @ down.double()), m)

    without = run(ours)
    ours.load_lora_weights(tensors, adapter_name="lyco")
    hooked = run(ours)
    assert np.abs(hooked - without).max() > 0.02
    base_weights = {key: getattr(ours, key[0]).get_submodule(key[1]).weight.clone() for key in expected}
    ours.fuse_lora()
    for (component, path), want in expected.items():
        got = getattr(ours, component).get_submodule(path).weight.double()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{component}.{path}")
    assert_close(hooked, run(ours))  # the hooks add what fusing bakes in
    ours.unfuse_lora()
    for key, before in base_weights.items():
        torch.testing.assert_close(getattr(ours, key[0]).get_submodule(key[1]).weight, before, rtol=0, atol=1e-5)


def test_incomplete_or_misfit_lycoris_layers_are_refused(folder):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    name = kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    shape = tuple(ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.shape)
    g = torch.Generator().manual_seed(16)
    f = loha_factors(shape, 2, g)
    with pytest.raises(StateDictMismatchError, match="LoHa/LoKr.*missing hada_w2_b"):
        ours.load_lora_weights({f"{name}.{k}": v for k, v in f.items() if k != "hada_w2_b"})
    bad = lokr_factors((shape[0], shape[1] * 2), g, a=2, c=2)
    with pytest.raises(StateDictMismatchError, match=r"lokr factors .* do not make the layer's weight"):
        ours.load_lora_weights({f"{name}.{k}": v for k, v in bad.items()})
    assert ours.get_list_adapters() == {}


# ------------------------------------------------------------------------------ the unmapped-key report
def test_unmapped_keys_warn_strict_raises_and_all_foreign_fails(folder, caplog):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    g = torch.Generator().manual_seed(17)
    tensors, _ = peft_lora({"unet": lora_pairs(ours.unet, ("to_q", "to_v"), 2, g)})
    foreign = {
        "unet.down_blocks.0.no_such_layer.lora_A.weight": torch.zeros(2, 16),
        "unet.down_blocks.0.no_such_layer.lora_B.weight": torch.zeros(16, 2),
    }
    with pytest.raises(StateDictMismatchError, match="strict=True.*no_such_layer"):
        ours.load_lora_weights({**tensors, **foreign}, adapter_name="x", strict=True)
    assert ours.get_list_adapters() == {}
    with caplog.at_level(logging.WARNING):
        ours.load_lora_weights(
            {**tensors, **foreign, "unet.time_embedding.norm.weight": torch.zeros(4)}, adapter_name="x"
        )
    text = caplog.text
    assert "ignored 3 LoRA key(s)" in text and "no_such_layer.lora_A.weight" in text
    assert "unet.time_embedding.norm.weight" in text
    assert ours.get_list_adapters() == {"unet": ["x"]}
    with_foreign = run(ours)
    ours.delete_adapters("x")
    ours.load_lora_weights(tensors, adapter_name="y")
    assert np.array_equal(run(ours), with_foreign)  # the foreign keys changed nothing
    with pytest.raises(StateDictMismatchError, match="maps to no layer, nothing was loaded"):
        ours.load_lora_weights(foreign, adapter_name="z")
    kohya_foreign = {"lora_unet_down_blocks_9_nothing.lora_down.weight": torch.zeros(2, 4)}
    kohya_foreign["lora_unet_down_blocks_9_nothing.lora_up.weight"] = torch.zeros(4, 2)
    with pytest.raises(StateDictMismatchError, match="maps to no layer.*down_blocks_9_nothing"):
        ours.load_lora_weights(kohya_foreign, adapter_name="z")
    assert ours.get_list_adapters() == {"unet": ["y"]}


# ------------------------------------------------------------------------------ save_lora_weights
def test_save_lora_weights_loads_in_the_reference(folder, tmp_path):
    import diffusers

    ref, ours = load_both(folder)
    g = torch.Generator().manual_seed(18)
    pairs = {
        "unet": lora_pairs(ref.unet, ("to_q", "to_out.0", "conv1"), 2, g, conv_too=True),
        "text_encoder": lora_pairs(ref.text_encoder, ("q_proj", "fc2"), 3, g),
    }
    ours.load_lora_weights(kohya_tensors(pairs, per_module_alpha), adapter_name="mine")
    loaded = run(ours)
    diffpipe.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved",
        unet_lora_layers=diffpipe.adapters.lora_state_dict(ours.unet),
        text_encoder_lora_layers=diffpipe.adapters.lora_state_dict(ours.text_encoder, "mine"),
    )
    file = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    with safe_open(str(file), "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
    assert {k.split(".", 1)[0] for k in keys} == {"unet", "text_encoder"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert '"unet.lora_alpha"' in metadata["lora_adapter_metadata"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_weights(str(tmp_path / "saved"), adapter_name="saved")
    assert_close(run(ref), loaded)
    again = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    again.set_progress_bar_config(disable=True)
    again.load_lora_weights(str(file), adapter_name="saved")
    assert_close(loaded, run(again))
    assert diffusers.StableDiffusionPipeline.save_lora_weights is not None  # the same classmethod API
    with pytest.raises(ValueError, match="pass at least one of"):
        diffpipe.StableDiffusionPipeline.save_lora_weights(tmp_path / "none")


# ------------------------------------------------------------------------------ hot-swapping
def test_hotswap_replaces_weights_in_place(folder):
    from diffpipe.adapters.lora import ModelLora
    from diffpipe.runtime.hooks import get_hook

    ref, ours = load_both(folder)
    g = torch.Generator().manual_seed(19)
    first = peft_lora({"unet": lora_pairs(ref.unet, ("to_q", "to_v", "conv1"), 3, g, conv_too=True)})[0]
    second_pairs = lora_pairs(ref.unet, ("to_q", "conv1"), 2, g, conv_too=True)  # a subset, lower rank
    second = peft_lora({"unet": second_pairs})[0]
    load_into_both(ref, ours, first, adapter_name="x")
    state = ModelLora.of(ours.unet)
    layers = dict(state.paths["x"])
    hooks = {p: get_hook(ours.unet.get_submodule(p), "lora") for p in layers}
    pointers = {p: layer.down.weight.data_ptr() for p, layer in layers.items()}
    ours.load_lora_weights(second, adapter_name="x", hotswap=True)
    fresh = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    fresh.set_progress_bar_config(disable=True)
    assert ModelLora.of(ours.unet).paths["x"] == layers
    assert all(get_hook(ours.unet.get_submodule(p), "lora") is hooks[p] for p in layers)
    assert all(layers[p].down.weight.data_ptr() == pointers[p] for p in layers)
    fresh.load_lora_weights(second, adapter_name="x")
    assert_close(run(fresh), run(ours))


def test_hotswap_with_alpha_matches_a_fresh_load_and_the_reference(folder, tmp_path):
    ref, ours = load_both(folder)
    g = torch.Generator().manual_seed(20)
    first = peft_lora({"unet": lora_pairs(ref.unet, ("to_q", "to_v"), 2, g)})[0]
    second = save_lora(
        tmp_path / "b",
        *peft_lora({"unet": lora_pairs(ref.unet, ("to_q", "to_v"), 2, g)}, alpha_by_component={"unet": 6}),
    )
    load_into_both(ref, ours, first, adapter_name="x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_weights(str(second), adapter_name="x", hotswap=True)
    ours.load_lora_weights(str(second), adapter_name="x", hotswap=True)
    got = run(ours)
    assert_close(run(ref), got)
    fresh = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(second), adapter_name="x")
    assert_close(run(fresh), got)


def test_hotswap_refusals_and_enable_lora_hotswap(folder):
    from diffpipe.adapters.lora_attach import HotswapError

    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(21)
    small = peft_lora({"unet": lora_pairs(ours.unet, ("to_q",), 2, g)})[0]
    other = peft_lora({"unet": lora_pairs(ours.unet, ("to_k",), 2, g)})[0]
    big = peft_lora({"unet": lora_pairs(ours.unet, ("to_q",), 4, g)})[0]
    with pytest.raises(ValueError, match="no existing adapter by that name"):
        ours.load_lora_weights(small, adapter_name="x", hotswap=True)
    ours.load_lora_weights(small, adapter_name="x")
    with pytest.raises(HotswapError, match="layers of the unet the adapter does not target.*to_k"):
        ours.load_lora_weights(other, adapter_name="x", hotswap=True)
    with pytest.raises(RuntimeError, match="rank 4 does not fit the loaded rank 2.*enable_lora_hotswap"):
        ours.load_lora_weights(big, adapter_name="x", hotswap=True)
    with pytest.raises(RuntimeError, match="before loading the first LoRA"):
        ours.enable_lora_hotswap(target_rank=4)
    # prepared: every load is padded to rank 4, so a rank-4 LoRA swaps in
    prepared = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    prepared.set_progress_bar_config(disable=True)
    prepared.enable_lora_hotswap(target_rank=4)
    prepared.load_lora_weights(small, adapter_name="x")
    ours.delete_adapters("x")
    ours.load_lora_weights(small, adapter_name="x")
    assert_close(run(ours), run(prepared))  # padding changes nothing
    prepared.load_lora_weights(big, adapter_name="x", hotswap=True)
    ours.delete_adapters("x")
    ours.load_lora_weights(big, adapter_name="x")
    assert_close(run(ours), run(prepared))
