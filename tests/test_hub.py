"""Hub resolution through huggingface_hub against the local test server: only needed files, caching,
offline mode, revisions."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffpipe.errors import CheckpointNotFoundError

from factories import TinyModel, same_weights, tiny_model

_ids = itertools.count()


def make_repo(hub, tmp_path, *, seed=0, revision="main", repo_id=None):
    """A repo with unet/ holding fp32, fp16, non_ema safetensors and a .bin, and a vae/ folder."""
    folder = tmp_path / f"repo-{seed}-{revision}"
    tiny_model(seed=seed).save_pretrained(folder / "unet")
    tiny_model(seed=seed).half().save_pretrained(folder / "unet", variant="fp16")
    tiny_model(seed=seed + 100).save_pretrained(folder / "unet", variant="non_ema")
    tiny_model(seed=seed).save_pretrained(folder / "unet", safe_serialization=False)
    tiny_model(seed=seed + 1).save_pretrained(folder / "vae")
    repo_id = repo_id or f"test-org/tiny-{next(_ids)}"
    hub.add_repo(repo_id, folder, revision=revision)
    return repo_id


def test_only_the_needed_files_are_downloaded(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    model = TinyModel.from_pretrained(repo, subfolder="unet")
    assert same_weights(model, tiny_model(seed=0))
    assert sorted(hub.downloads(repo)) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


def test_variant_downloads_only_the_variant_weights(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    model = TinyModel.from_pretrained(repo, subfolder="unet", variant="fp16", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert sorted(hub.downloads(repo)) == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    hub.clear_log()
    TinyModel.from_pretrained(repo, subfolder="unet", variant="non_ema")
    assert hub.downloads(repo) == ["unet/diffusion_pytorch_model.non_ema.safetensors"]


def test_use_safetensors_false_downloads_the_bin_only(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    TinyModel.from_pretrained(repo, subfolder="unet", use_safetensors=False)
    assert sorted(hub.downloads(repo)) == ["unet/config.json", "unet/diffusion_pytorch_model.bin"]


def test_a_cached_second_load_downloads_nothing(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    TinyModel.from_pretrained(repo, subfolder="unet")
    hub.clear_log()
    again = TinyModel.from_pretrained(repo, subfolder="unet")
    assert hub.downloads() == []
    assert same_weights(again, tiny_model(seed=0))


def test_offline_loads_from_the_cache_with_no_request(hub, tmp_path, hf_cache, monkeypatch):
    repo = make_repo(hub, tmp_path)
    TinyModel.from_pretrained(repo, subfolder="unet")
    TinyModel.from_pretrained(repo, subfolder="vae")
    hub.clear_log()
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet", local_files_only=True), tiny_model(seed=0))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="vae"), tiny_model(seed=1))
    assert hub.requests == []


def test_offline_with_an_empty_cache_fails_clearly_without_network(hub, tmp_path, hf_cache, monkeypatch):
    repo = make_repo(hub, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as err:
        TinyModel.from_pretrained(repo, subfolder="unet")
    assert repo in str(err.value) and "not in the local cache" in str(err.value)
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert hub.requests == []


def test_offline_when_the_cache_lacks_the_asked_variant(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    TinyModel.from_pretrained(repo, subfolder="unet")
    with pytest.raises(CheckpointNotFoundError) as err:
        TinyModel.from_pretrained(repo, subfolder="unet", variant="fp16", local_files_only=True)
    assert "fp16" in str(err.value) and "cache" in str(err.value)


def test_revision_picks_the_right_files(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path, seed=0)
    make_repo(hub, tmp_path, seed=7, revision="v2", repo_id=repo)
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet"), tiny_model(seed=0))
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet", revision="v2"), tiny_model(seed=7))
    commit = hub.commit_sha(repo, "v2")
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet", revision=commit), tiny_model(seed=7))
    hub.clear_log()
    offline = TinyModel.from_pretrained(repo, subfolder="unet", revision="v2", local_files_only=True)
    assert same_weights(offline, tiny_model(seed=7)) and hub.requests == []


def test_unknown_repo_and_revision_are_clear_errors(hub, tmp_path, hf_cache):
    with pytest.raises(CheckpointNotFoundError, match="no repo 'nobody/nothing'"):
        TinyModel.from_pretrained("nobody/nothing", subfolder="unet")
    repo = make_repo(hub, tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no revision 'v9'"):
        TinyModel.from_pretrained(repo, subfolder="unet", revision="v9")


def test_a_missing_variant_in_a_repo_names_the_repo(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    with pytest.raises(CheckpointNotFoundError) as err:
        TinyModel.from_pretrained(repo, subfolder="vae", variant="fp16")
    assert repo in str(err.value) and "'fp16'" in str(err.value)
    assert hub.downloads() == []


def test_hub_unreachable_falls_back_to_the_cache(hub, tmp_path, hf_cache):
    repo = make_repo(hub, tmp_path)
    TinyModel.from_pretrained(repo, subfolder="unet")
    hub.set_down(True)
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet"), tiny_model(seed=0))


def test_a_local_path_downloads_nothing(hub, tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    TinyModel.from_pretrained(tmp_path / "m")
    assert hub.requests == []


def test_a_missing_local_path_is_not_sent_to_the_hub(hub, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no folder at"):
        TinyModel.from_pretrained(str(tmp_path / "does" / "not" / "exist"))
    assert hub.requests == []
