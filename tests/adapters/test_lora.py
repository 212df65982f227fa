"""LoRA against the reference, on tiny pipelines with LoRAs of random weights in each layout
(diffusers/peft with and without alpha metadata, older diffusers attention-processor keys, kohya/A1111
with alphas), several adapters mixed with weights, and fused vs unfused.

The reference's LoRA path needs peft (a test-only dependency here; diffpipe does not use it). With
peft 0.21.2 and transformers 5 the reference loads text-encoder LoRAs too, so both the UNet and the
text encoder sides are compared with it. Expected images are computed by the reference at test time;
the bound is max abs difference <= 2/255 with output_type="np".
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import diffpipe
from adapter_factory import assert_close, images, kohya_lora, load_both, lora_pairs, peft_lora, save_lora
from diffpipe.errors import StateDictMismatchError
from sd_factory import save_reference_pipeline

import peft  # noqa: F401,E402  the reference's LoRA backend (test extra): missing, the module fails to load

ARGS = dict(
    prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=3, height=32, width=32, output_type="np"
)
UNET_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "time_emb_proj",
)
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # what kohya trains


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("lora") / "sd", safety_checker=False, seed=5)


@pytest.fixture(scope="module")
def loras(folder):
    """LoRA pairs for the reference's own modules: a (UNet + text encoder) and b (UNet attention only)."""
    import diffusers
    import transformers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    g = torch.Generator().manual_seed(0)
    return {
        "a": {
            "unet": lora_pairs(unet, UNET_TARGETS, 2, g, conv_too=True),
            "text_encoder": lora_pairs(text, TEXT_TARGETS, 2, g),
        },
        "b": {"unet": lora_pairs(unet, ("attn1.to_q", "attn2.to_v", "attn2.to_out.0"), 3, g)},
    }


def run(pipe, seed=0, **kwargs):
    return images(pipe, {**ARGS, **kwargs}, seed)


def load_into_both(ref, ours, source, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_weights(dict(source) if isinstance(source, dict) else str(source), **kwargs)
    ours.load_lora_weights(dict(source) if isinstance(source, dict) else str(source), **kwargs)


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, expected, exact=True):
    state = model.state_dict()
    if sorted(state) != sorted(expected):
        return False
    if exact:
        return all(torch.equal(state[k], expected[k]) for k in state)
    return all(torch.allclose(state[k], expected[k], atol=1e-6) for k in state)


@pytest.mark.parametrize("layout", ["peft", "peft-metadata", "kohya", "diffusers-old"])
def test_parity_per_layout(folder, loras, layout, tmp_path):
    ref, ours = load_both(folder)
    unet_before, text_before = base_state(ours.unet), base_state(ours.text_encoder)
    without = run(ours)
    if layout == "peft":
        tensors, _ = peft_lora(loras["a"])
        source = tensors
    elif layout == "peft-metadata":  # alpha 4 for rank 2: scale 2 on the UNet, 1 on the text encoder
        tensors, metadata = peft_lora(loras["a"], alpha_by_component={"unet": 4, "text_encoder": 2})
        source = save_lora(tmp_path / "lora", tensors, metadata)
    elif layout == "kohya":
        source = save_lora(
            tmp_path / "kohya", kohya_lora(loras["a"], {"unet": 1.0, "text_encoder": 4.0}), name="my_lora.safetensors"
        )
    else:  # attention-processor keys, as the AnimateDiff motion LoRAs are published
        pairs = {p: v for p, v in loras["a"]["unet"].items() if ".attn" in p}
        names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
        source = {}
        for path, (down, up) in pairs.items():
            owner, leaf = next((path[: -len(k) - 1], v) for k, v in names.items() if path.endswith("." + k))
            source[f"unet.{owner}.processor.{leaf}.down.weight"] = down
            source[f"unet.{owner}.processor.{leaf}.up.weight"] = up
    load_into_both(ref, ours, source, adapter_name="a")
    got = run(ours)
    assert_close(run(ref), got)
    assert np.abs(got - without).max() > 0.02  # the LoRA matters
    # the base models are unchanged while the LoRA is attached: a save is still the base model
    assert same_state(ours.unet, unet_before) and same_state(ours.text_encoder, text_before)
    assert ours.get_list_adapters() == ref.get_list_adapters()
    assert ours.get_active_adapters() == ["a"]


def test_two_adapters_mixed_fused_and_unfused(folder, loras):
    ref, ours = load_both(folder)
    unet_before, text_before = base_state(ours.unet), base_state(ours.text_encoder)
    load_into_both(ref, ours, peft_lora(loras["a"])[0], adapter_name="a")
    load_into_both(ref, ours, peft_lora(loras["b"])[0], adapter_name="b")
    # loading makes an adapter the only active one of each model it touches: "b" in the UNet, while the
    # text encoder keeps "a" (the reference reports the text encoder's, diffpipe the UNet's)
    assert ours.get_active_adapters() == ["b"] and ref.get_active_adapters() == ["a"]
    assert_close(run(ref), run(ours))
    for pipe in (ref, ours):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    mixed = run(ours)
    assert_close(run(ref), mixed)
    for pipe in (ref, ours):
        pipe.set_adapters(["a", "b"], adapter_weights=[{"unet": 0.5, "text_encoder": 1.5}, 1.0])
    assert_close(run(ref), run(ours))
    for pipe in (ref, ours):
        pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    # fused: the same images, now from the weights themselves
    for pipe in (ref, ours):
        pipe.fuse_lora()
    fused = run(ours)
    assert_close(run(ref), fused)
    assert_close(mixed, fused)
    assert not same_state(ours.unet, unet_before, exact=False)
    for pipe in (ref, ours):
        pipe.unfuse_lora()
    assert same_state(ours.unet, unet_before, exact=False) and same_state(ours.text_encoder, text_before, exact=False)
    assert_close(run(ref), run(ours))
    # fused at a lower strength
    for pipe in (ref, ours):
        pipe.fuse_lora(lora_scale=0.5)
    assert_close(run(ref), run(ours))
    ours.unfuse_lora()
    assert_close(mixed, run(ours))  # unfusing gives back the weights set with set_adapters


def test_disable_enable_delete_unload(folder, loras):
    ref, ours = load_both(folder)
    unet_before = base_state(ours.unet)
    without = run(ours)
    load_into_both(ref, ours, peft_lora(loras["a"])[0], adapter_name="a")
    load_into_both(ref, ours, peft_lora(loras["b"])[0], adapter_name="b")
    with_b = run(ours)
    for pipe in (ref, ours):
        pipe.disable_lora()
    assert np.array_equal(run(ours), without)
    assert_close(run(ref), without)
    for pipe in (ref, ours):
        pipe.enable_lora()
    assert np.array_equal(run(ours), with_b)
    for pipe in (ref, ours):
        pipe.delete_adapters("b")
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    for pipe in (ref, ours):
        pipe.set_adapters("a")
    assert_close(run(ref), run(ours))
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {} and ours.get_active_adapters() == []
    assert np.array_equal(run(ours), without) and same_state(ours.unet, unet_before)
    assert not any("diffpipe_lora" in name for name, _ in ours.unet.named_modules())
    # fuse, then unload: the LoRA stays baked into the weights (the reference's way to merge one)
    ours.load_lora_weights(peft_lora(loras["b"])[0], adapter_name="b")
    only_b = run(ours)
    ours.fuse_lora()
    ours.unload_lora_weights()
    assert ours.get_list_adapters() == {}
    assert_close(only_b, run(ours))
    assert not same_state(ours.unet, unet_before, exact=False)


def test_lora_bytes_are_counted_and_follow_the_model(folder, loras):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    before = ours.memory_footprint()["components"]["unet"]["bytes"]
    ours.load_lora_weights(peft_lora(loras["b"])[0], adapter_name="b")
    lora_bytes = sum(d.numel() * 4 + u.numel() * 4 for d, u in loras["b"]["unet"].values())
    assert ours.memory_footprint()["components"]["unet"]["bytes"] == before + lora_bytes
    ours.unet.to(torch.float64)
    assert {p.dtype for n, p in ours.unet.named_parameters() if "diffpipe_lora" in n} == {torch.float64}


def _keys(loras, component="unet"):
    return peft_lora({component: loras["b"]["unet"]} if component == "unet" else loras["a"])[0]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda pairs: {
                "unet.down_blocks.7.attentions.0.to_q.lora_A.weight": torch.zeros(2, 16),
                "unet.down_blocks.7.attentions.0.to_q.lora_B.weight": torch.zeros(16, 2),
            },
            StateDictMismatchError,
            r"match no layer of the unet .*down_blocks\.7\.attentions\.0\.to_q\.lora_A\.weight",
        ),
        (
            lambda pairs: {k: (v[:1] if k.endswith("lora_A.weight") else v) for k, v in _keys(pairs).items()},
            StateDictMismatchError,
            r"rank mismatch, down has rank 1",
        ),
        (
            lambda pairs: {
                k: (torch.zeros(3, 5) if k.endswith("lora_A.weight") else v) for k, v in _keys(pairs).items()
            },
            StateDictMismatchError,
            r"down \(3, 5\) takes width 5, the layer takes 16",
        ),
        (
            # only foreign keys: nothing maps, an error (one foreign key among LoRA keys is a warning now;
            # test_lora_community.py covers that)
            lambda pairs: {"unet.mid_block.attentions.0.norm.weight": torch.zeros(16)},
            StateDictMismatchError,
            r"not LoRA keys .*unet\.mid_block\.attentions\.0\.norm\.weight",
        ),
        (
            lambda pairs: {
                "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 32),
                "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 2),
            },
            StateDictMismatchError,
            r"weights for \['text_encoder_2'\], which StableDiffusionPipeline does not have",
        ),
        (
            lambda pairs: {k: v for k, v in _keys(pairs).items() if k.endswith("lora_A.weight")},
            StateDictMismatchError,
            "has only its down weight",
        ),
        (
            lambda pairs: {"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)},
            StateDictMismatchError,
            "LoHa/LoKr",
        ),
    ],
)
def test_bad_loras_are_refused_and_change_nothing(folder, loras, make, error, message):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    before = base_state(ours.unet)
    with pytest.raises(error, match=message):
        ours.load_lora_weights(make(loras), adapter_name="x")
    assert ours.get_list_adapters() == {} and same_state(ours.unet, before)
    assert not any("diffpipe_lora" in name for name, _ in ours.unet.named_modules())


def test_adapter_names_are_checked(folder, loras):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    ours.load_lora_weights(peft_lora(loras["b"])[0], adapter_name="b")
    with pytest.raises(ValueError, match="adapter name 'b' is already in use"):
        ours.load_lora_weights(peft_lora(loras["a"])[0], adapter_name="b")
    ours.load_lora_weights(peft_lora(loras["a"])[0])
    assert ours.get_list_adapters()["unet"] == ["b", "default_1"]
    with pytest.raises(
        ValueError,
        match=r"unknown adapter name\(s\) \['zoom-in'\]; loaded adapters: "
        r"\['b', 'default_1'\]",
    ):
        ours.set_adapters(["b", "zoom-in"], adapter_weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="2 adapter names but 3 weights"):
        ours.set_adapters(["b", "default_1"], adapter_weights=[1.0, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) \['nope'\]"):
        ours.delete_adapters("nope")


def test_lora_file_is_found_in_a_folder(folder, loras, tmp_path):
    ours = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    repo = tmp_path / "repo"
    save_lora(repo, peft_lora(loras["b"])[0], name="diffusion_pytorch_model.safetensors")
    ours.load_lora_weights(str(repo), adapter_name="only-file")  # the one weight file there
    save_lora(repo, peft_lora(loras["b"])[0], name="other.safetensors")
    with pytest.raises(ValueError, match="several weight files.*pick one with weight_name="):
        ours.load_lora_weights(str(repo), adapter_name="two-files")
    ours.load_lora_weights(str(repo), weight_name="other.safetensors", adapter_name="named")
    assert ours.get_list_adapters()["unet"] == ["only-file", "named"]


def test_sdxl_lora_on_the_unet_and_both_text_encoders(tmp_path):
    from sdxl_factory import save_reference_sdxl

    ref, ours = load_both(save_reference_sdxl(tmp_path / "sdxl"), "StableDiffusionXLPipeline")
    g = torch.Generator().manual_seed(1)
    pairs = {
        "unet": lora_pairs(ref.unet, ("to_q", "to_v", "conv1"), 2, g, conv_too=True),
        "text_encoder": lora_pairs(ref.text_encoder, TEXT_TARGETS, 2, g),
        "text_encoder_2": lora_pairs(ref.text_encoder_2, TEXT_TARGETS, 2, g),
    }
    kwargs = {**ARGS, "negative_prompt": None}
    without = images(ours, kwargs)
    load_into_both(ref, ours, peft_lora(pairs)[0], adapter_name="xl")
    got = images(ours, kwargs)
    assert_close(images(ref, kwargs), got)
    assert np.abs(got - without).max() > 0.02
    assert ours.get_list_adapters() == {"unet": ["xl"], "text_encoder": ["xl"], "text_encoder_2": ["xl"]}


def test_cross_attention_scale_scales_every_lora_for_one_call(folder, loras):
    ref, ours = load_both(folder)
    load_into_both(ref, ours, peft_lora(loras["a"])[0], adapter_name="a")
    full = run(ours)
    half = run(ours, cross_attention_kwargs={"scale": 0.5})
    assert_close(run(ref, cross_attention_kwargs={"scale": 0.5}), half)
    assert np.abs(half - full).max() > 0.02
    assert np.array_equal(run(ours), full)  # only for that call
    with pytest.raises(TypeError, match="LoRA strength"):
        run(ours, cross_attention_kwargs={"scale": "half"})


# kohya's SDXL LoRAs name UNet layers as the original (SGM) UNet does; here for the tiny SDXL UNet
# (one layer per block), spelled out by hand.
SGM_NAMES = {
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_emb_layers_1": "down_blocks.1.resnets.0.time_emb_proj",
    "input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_1_1_transformer_blocks_0_attn1_to_out_0": (
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"
    ),
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.1.conv_shortcut",
}


def test_kohya_sdxl_lora_with_original_unet_names(tmp_path):
    from sdxl_factory import save_reference_sdxl

    ref, ours = load_both(save_reference_sdxl(tmp_path / "sdxl"), "StableDiffusionXLPipeline")
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for name, path in SGM_NAMES.items():
        ((down, up),) = lora_pairs(ref.unet, (path,), 2, g, conv_too=True).values()
        tensors.update(
            {
                f"lora_unet_{name}.lora_down.weight": down,
                f"lora_unet_{name}.lora_up.weight": up,
                f"lora_unet_{name}.alpha": torch.tensor(3.0),
            }
        )
    kwargs = {**ARGS, "negative_prompt": None}
    without = images(ours, kwargs)
    load_into_both(ref, ours, tensors, adapter_name="sgm")
    got = images(ours, kwargs)
    assert_close(images(ref, kwargs), got)
    assert np.abs(got - without).max() > 0.02
    from diffpipe.adapters.lora import ModelLora

    assert sorted(ModelLora.of(ours.unet).paths["sgm"]) == sorted(SGM_NAMES.values())
