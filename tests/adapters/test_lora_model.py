"""LoRA on a model itself: unet.load_lora_adapter / save_lora_adapter / load_attn_procs against the
reference (its UNet outputs with the same LoRA; its loader reading our saved file, and ours reading
its saved file)."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

import diffpipe
from adapter_factory import lora_pairs, peft_lora, save_lora
from diffpipe.errors import StateDictMismatchError
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("lora-model") / "sd", safety_checker=False, seed=61)


@pytest.fixture(scope="module")
def pairs(folder):
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    g = torch.Generator().manual_seed(3)
    return lora_pairs(unet, ("to_q", "to_v", "to_out.0", "conv1", "proj_in"), 2, g, conv_too=True)


def unets(folder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    return ref, diffpipe.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


def outputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([10, 500]), encoder_hidden_states=context).sample


def assert_outputs_close(ref, ours):
    torch.testing.assert_close(outputs(ours), outputs(ref), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", ["unet", None])
def test_load_lora_adapter_is_the_reference_s(folder, pairs, prefix):
    tensors, _ = peft_lora({"unet": pairs})
    if prefix is None:
        tensors = {k[len("unet.") :]: v for k, v in tensors.items()}
    ref, ours = unets(folder)
    plain = outputs(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter(dict(tensors), prefix=prefix, adapter_name="a")
    ours.load_lora_adapter(dict(tensors), prefix=prefix, adapter_name="a")
    assert_outputs_close(ref, ours)
    assert (outputs(ours) - plain).abs().max() > 1e-3


def test_a_prefix_matching_no_key_is_an_error_not_a_silent_no_op(folder, pairs):
    _, ours = unets(folder)
    with pytest.raises(StateDictMismatchError, match=r"no LoRA key starts with prefix='transformer'.*\['unet'\]"):
        ours.load_lora_adapter(peft_lora({"unet": pairs})[0])  # the reference's default prefix


def test_save_lora_adapter_round_trips_through_the_reference(folder, pairs, tmp_path):
    import diffusers

    tensors, metadata = peft_lora({"unet": pairs}, alpha_by_component={"unet": 4})
    _, ours = unets(folder)
    ours.load_lora_adapter(save_lora(tmp_path / "in", tensors, metadata), prefix="unet", adapter_name="a")
    ours.save_lora_adapter(tmp_path / "ours", adapter_name="a")
    with safe_open(tmp_path / "ours" / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = set(f.keys())
    assert keys == {k[len("unet.") :] for k in tensors}  # the reference's saved layout: no prefix
    # the reference reads our file and gives our outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
        # (the reference finds no file in a folder without weight_name, even in its own saves; ours does)
        ref.load_lora_adapter(
            str(tmp_path / "ours"), prefix=None, adapter_name="a", weight_name="pytorch_lora_weights.safetensors"
        )
    assert_outputs_close(ref, ours)
    # and ours reads the reference's own save
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_lora_adapter(tmp_path / "theirs", adapter_name="a")
    _, again = unets(folder)
    again.load_lora_adapter(str(tmp_path / "theirs"), prefix=None, adapter_name="a")
    assert_outputs_close(ref, again)


def test_load_attn_procs_reads_the_attention_processor_layout(folder, pairs):
    attn = {p: v for p, v in pairs.items() if ".attn" in p and p.endswith(("to_q", "to_v", "to_out.0"))}
    names = {"to_q": "to_q_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    processors = {}
    for path, (down, up) in attn.items():
        leaf = next(k for k in names if path.endswith("." + k))
        owner = path[: -len(leaf) - 1]
        processors[f"{owner}.processor.{names[leaf]}.down.weight"] = down
        processors[f"{owner}.processor.{names[leaf]}.up.weight"] = up
    ref, ours = unets(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter({f"unet.{k}": v for k, v in processors.items()}, prefix="unet", adapter_name="x")
    ours.load_attn_procs(dict(processors))
    assert_outputs_close(ref, ours)
