"""Bad single files get a clear error that names the file, what was found and what to do, and
nothing is half-loaded: truncated files, unknown architectures, files of another family, unsafe
pickles, missing and extra tensors, a pipeline file without tokenizers offline."""

from __future__ import annotations

import logging
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffpipe
from diffpipe.errors import CorruptCheckpointError, StateDictMismatchError, UnsafeCheckpointError
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD 1.x folder and the same pipeline as one original-layout file."""
    root = tmp_path_factory.mktemp("single_file_errors")
    folder = save_reference_pipeline(root / "sd", safety_checker=False, seed=5)
    path = diffpipe.StableDiffusionPipeline.from_pretrained(folder).save_single_file(root / "sd.safetensors")
    return folder, path


def _load(path, folder, **kwargs):
    return diffpipe.StableDiffusionPipeline.from_single_file(path, config=str(folder), **kwargs)


def test_a_truncated_file_names_the_file(sd, tmp_path):
    folder, path = sd
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.safetensors"):
        _load(cut, folder)


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "a LoRA"),
        ({"double_blocks.0.img_attn.qkv.weight": (8, 8)}, "a Flux transformer"),
        ({"emb_params": (2, 8)}, "a textual-inversion embedding"),
        ({"down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, "diffusers layout"),
        ({"some.weight": (2, 2), "other.bias": (2,)}, "unknown architecture"),
    ],
)
def test_files_of_another_family_say_what_they_are(sd, tmp_path, keys, found):
    folder, _ = sd
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    with pytest.raises(ValueError, match=found) as error:
        _load(path, folder)
    assert "other.safetensors" in str(error.value)


def test_a_vae_file_given_as_a_pipeline_says_how_to_load_it(sd, tmp_path):
    folder, path = sd
    vae = {
        k[len("first_stage_model.") :]: v for k, v in load_file(str(path)).items() if k.startswith("first_stage_model.")
    }
    vae_path = tmp_path / "vae.safetensors"
    save_file(vae, str(vae_path))
    with pytest.raises(ValueError, match=r"only a VAE.*AutoencoderKL.from_single_file"):
        _load(vae_path, folder)
    loaded = diffpipe.AutoencoderKL.from_single_file(vae_path, config=str(folder), subfolder="vae")
    reference = diffpipe.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values()))


def test_missing_tensors_are_an_error_naming_them(sd, tmp_path):
    folder, path = sd
    state = load_file(str(path))
    dropped = "model.diffusion_model.out.2.weight"
    del state[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(StateDictMismatchError, match=r"missing.*conv_out.weight") as error:
        _load(broken, folder)
    assert "broken.safetensors" in str(error.value)


def test_extra_tensors_are_named_in_a_warning(sd, tmp_path, caplog):
    folder, path = sd
    state = load_file(str(path))
    state["model.diffusion_model.mystery.weight"] = torch.zeros(2)
    state["something_else"] = torch.zeros(2)
    state["model_ema.decay"] = torch.tensor(0.999)  # EMA copies and training buffers are ignored quietly
    extra = tmp_path / "extra.safetensors"
    save_file(state, str(extra))
    caplog.set_level(logging.WARNING)
    pipe = _load(extra, folder)
    assert pipe.unet is not None
    assert "mystery.weight" in caplog.text and "something_else" in caplog.text
    assert "model_ema" not in caplog.text


def test_a_file_of_another_size_says_where_its_configs_came_from(sd):
    """Without config= the shipped full-size SD 1.x configs are used: a tiny file does not fit them."""
    _, path = sd
    with pytest.raises(StateDictMismatchError, match="shipped with diffpipe, unless config= was given"):
        diffpipe.StableDiffusionPipeline.from_single_file(path, tokenizer=object())


def test_mixed_precision_files_load_in_the_asked_dtype(sd, tmp_path):
    folder, path = sd
    state = load_file(str(path))
    mixed = {k: (v.half() if i % 2 else v) for i, (k, v) in enumerate(state.items())}
    mixed_path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(mixed_path))
    for dtype in (torch.float32, torch.float16):
        pipe = _load(mixed_path, folder, torch_dtype=dtype)
        assert {p.dtype for c in (pipe.unet, pipe.vae, pipe.text_encoder) for p in c.parameters()} == {dtype}


class _Payload:
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_that_needs_code_is_refused_and_a_plain_one_loads(sd, tmp_path):
    folder, path = sd
    state = load_file(str(path))
    safe = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, safe)
    assert _load(safe, folder).unet is not None
    unsafe = tmp_path / "unsafe.ckpt"
    with open(unsafe, "wb") as f:
        pickle.dump({"state_dict": state, "payload": _Payload()}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"unsafe.ckpt.*safetensors"):
        _load(unsafe, folder)


def test_offline_without_tokenizers_says_which_repo_to_provide(sd, tmp_path, monkeypatch):
    """The shipped configs name the tokenizers' repo; offline with an empty cache that is the error."""
    folder, path = sd
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    unet = diffpipe.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = diffpipe.AutoencoderKL.from_pretrained(folder, subfolder="vae")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.*stable-diffusion-v1-5/stable-diffusion-v1-5") as error:
        diffpipe.StableDiffusionPipeline.from_single_file(path, unet=unet, vae=vae, text_encoder=object())
    assert "config=" in str(error.value)


def test_a_missing_file_and_a_folder_are_clear(sd, tmp_path):
    folder, _ = sd
    with pytest.raises(FileNotFoundError, match="no such file"):
        diffpipe.StableDiffusionPipeline.from_single_file(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="is a folder.*from_pretrained"):
        diffpipe.StableDiffusionPipeline.from_single_file(folder)
