"""The command line for single files (inspect, convert both ways), tokenizers from the Hub cache, and
UNet-only files."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

import diffpipe
from diffpipe.cli import main
from single_file_factory import save_reference_kind, write_single_file

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_inspect_prints_the_type_the_parts_and_the_metadata(tmp_path, capsys):
    folder = save_reference_kind("sdxl", tmp_path / "xl")
    path = write_single_file(folder, tmp_path / "xl.safetensors", "sdxl", logit_scale=True)
    state = load_file(str(path))
    state["model_ema.decay"] = torch.tensor(0.9999)
    metadata = {"modelspec.architecture": "stable-diffusion-xl-v1-base", "ss_network_dim": "4", "format": "pt"}
    save_file(state, str(path), metadata=metadata)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "detected: sdxl" in out and "StableDiffusionXLPipeline" in out
    for line in ("unet", "vae", "text_encoder ", "text_encoder_2"):
        assert line in out
    assert "modelspec.architecture: stable-diffusion-xl-v1-base" in out and "ss_network_dim: 4" in out
    assert "ignored" in out and "float32" in out


def test_inspect_of_a_lora_says_what_it_is(tmp_path, capsys):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "a LoRA" in capsys.readouterr().out


def test_convert_a_single_file_to_a_folder_and_back(tmp_path, capsys):
    folder = save_reference_kind("sd1", tmp_path / "sd")
    path = write_single_file(folder, tmp_path / "sd.safetensors", "sd1")
    out_folder = tmp_path / "converted"
    assert main(["convert", str(path), str(out_folder), "--config", str(folder), "--variant", "fp16"]) == 0
    assert (out_folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(out_folder, variant="fp16", torch_dtype="auto")
    assert pipe.unet.dtype == torch.float16
    reference = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    want, have = reference.unet.state_dict(), pipe.unet.state_dict()
    assert all(torch.equal(want[k].half(), have[k]) for k in want)
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(folder), str(back), "--to", "single-file"]) == 0
    written, original = load_file(str(back)), load_file(str(path))
    assert sorted(written) == sorted(original) and all(torch.equal(written[k], original[k]) for k in original)


def test_a_bad_file_is_one_line_on_stderr(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 10)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffpipe convert: error:") and "broken.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_tokenizers_come_from_the_hub_cache_offline(tmp_path, hub, hf_cache, monkeypatch):
    """The shipped configs name the tokenizer's repo; once it is in the local cache (here: fetched from
    the test Hub once), a single file loads offline with no config=."""
    folder = save_reference_kind("sd1", tmp_path / "sd")
    hub.add_repo(REPO, folder)
    diffpipe.StableDiffusionPipeline.from_pretrained(REPO)  # fills the cache
    path = write_single_file(folder, tmp_path / "sd.safetensors", "sd1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    parts = {name: reference.components[name] for name in ("unet", "vae", "text_encoder")}
    pipe = diffpipe.StableDiffusionPipeline.from_single_file(path, **parts)  # sizes differ from the shipped
    assert pipe.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids


def test_a_unet_only_file_with_or_without_the_prefix(tmp_path):
    folder = save_reference_kind("sd1", tmp_path / "sd")
    state = load_file(str(write_single_file(folder, tmp_path / "sd.safetensors", "sd1")))
    unet = {k: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    want = diffpipe.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").state_dict()
    for name, tensors in (
        ("prefixed", unet),
        ("bare", {k[len("model.diffusion_model.") :]: v for k, v in unet.items()}),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        have = diffpipe.UNet2DConditionModel.from_single_file(path, config=str(folder), subfolder="unet").state_dict()
        assert set(have) == set(want) and all(torch.equal(want[k], have[k]) for k in want), name
