"""Model weight I/O: the spec's variant table, safetensors/pickle rules, shards, atomic saves."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from diffpipe.errors import (
    CheckpointNotFoundError,
    StateDictMismatchError,
    UnsafeCheckpointError,
)
from diffpipe.io.state_dict import load_safetensors, save_pickle

from factories import TinyModel, same_weights, tiny_model

PREFIX = "diffusion_pytorch_model"


def files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def full_folder(tmp_path):
    """A folder like the spec's unet/: original, fp16 and non_ema weights side by side."""
    folder = tmp_path / "unet"
    main = tiny_model(seed=0)
    main.save_pretrained(folder)
    tiny_model(seed=0).half().save_pretrained(folder, variant="fp16")
    tiny_model(seed=1).save_pretrained(folder, variant="non_ema")
    return folder, main


def test_variant_files_follow_the_spec_table(full_folder):
    folder, _ = full_folder
    assert files(folder) == [
        "config.json",
        f"{PREFIX}.fp16.safetensors",
        f"{PREFIX}.non_ema.safetensors",
        f"{PREFIX}.safetensors",
    ]


def test_fp16_variant_without_torch_dtype_is_converted_to_fp32(full_folder):
    folder, main = full_folder
    model = TinyModel.from_pretrained(folder, variant="fp16")
    assert model.dtype == torch.float32
    assert model.loaded_from[-1].endswith(f"{PREFIX}.fp16.safetensors")
    assert same_weights(model, main.half())


def test_fp16_variant_with_torch_dtype_stays_fp16(full_folder):
    folder, main = full_folder
    model = TinyModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    assert model.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_torch_dtype_alone_loads_the_original_and_converts(full_folder):
    folder, main = full_folder
    model = TinyModel.from_pretrained(folder, torch_dtype=torch.float16)
    assert model.loaded_from[-1].endswith(f"{PREFIX}.safetensors")
    assert model.dtype == torch.float16
    assert same_weights(model, main.half())


def test_non_ema_variant_loads_the_non_ema_file(full_folder):
    folder, main = full_folder
    model = TinyModel.from_pretrained(folder, variant="non_ema")
    assert same_weights(model, tiny_model(seed=1))
    assert not same_weights(model, main)


def test_dtype_is_an_alias_of_torch_dtype_and_both_is_an_error(full_folder):
    folder, _ = full_folder
    assert TinyModel.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert TinyModel.from_pretrained(folder, torch_dtype="float16").dtype == torch.float16
    with pytest.raises(TypeError, match="either torch_dtype= or dtype="):
        TinyModel.from_pretrained(folder, torch_dtype=torch.float16, dtype=torch.float16)


def test_auto_dtype_keeps_the_checkpoint_dtype(full_folder):
    folder, _ = full_folder
    assert TinyModel.from_pretrained(folder, variant="fp16", torch_dtype="auto").dtype == torch.float16


def test_only_fp16_files_fail_without_variant_and_load_with_it(tmp_path):
    folder = tmp_path / "vae"
    tiny_model().half().save_pretrained(folder, variant="fp16")
    with pytest.raises(CheckpointNotFoundError) as err:
        TinyModel.from_pretrained(folder, torch_dtype=torch.float16)
    message = str(err.value)
    assert str(folder) in message and f"{PREFIX}.safetensors" in message
    assert "variant='fp16'" in message  # says what to do
    assert TinyModel.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16).dtype == torch.float16


def test_missing_variant_names_folder_variant_and_present_files(full_folder):
    folder, _ = full_folder
    with pytest.raises(CheckpointNotFoundError) as err:
        TinyModel.from_pretrained(folder, variant="bf16")
    message = str(err.value)
    assert str(folder) in message and "'bf16'" in message
    assert f"{PREFIX}.fp16.safetensors" in message and "fp16, non_ema" in message


def test_bin_only_with_use_safetensors_true_fails_clearly(tmp_path):
    main = tiny_model()
    main.save_pretrained(tmp_path, safe_serialization=False)
    assert files(tmp_path) == ["config.json", f"{PREFIX}.bin"]
    with pytest.raises(CheckpointNotFoundError, match="use_safetensors=True"):
        TinyModel.from_pretrained(tmp_path, use_safetensors=True)
    # the default prefers safetensors and falls back to the pickle file
    assert same_weights(TinyModel.from_pretrained(tmp_path), main)


def test_safetensors_preferred_and_the_pickle_never_opened(tmp_path):
    main = tiny_model()
    main.save_pretrained(tmp_path)
    (tmp_path / f"{PREFIX}.bin").write_bytes(b"not a pickle at all")
    assert same_weights(TinyModel.from_pretrained(tmp_path), main)
    with pytest.raises(Exception):
        TinyModel.from_pretrained(tmp_path, use_safetensors=False)


def test_use_safetensors_false_loads_the_bin_file(tmp_path):
    tiny_model(seed=0).save_pretrained(tmp_path)
    tiny_model(seed=3).save_pretrained(tmp_path, safe_serialization=False)
    assert same_weights(TinyModel.from_pretrained(tmp_path, use_safetensors=False), tiny_model(seed=3))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_carrying_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    tiny_model().save_pretrained(tmp_path)  # config.json
    os.remove(tmp_path / f"{PREFIX}.safetensors")
    with open(tmp_path / f"{PREFIX}.bin", "wb") as f:
        pickle.dump({"layers.0.weight": _Payload(str(marker))}, f)
    # torch.save's zip format with the same payload
    (tmp_path / "zip").mkdir()
    tiny_model().save_pretrained(tmp_path / "zip", safe_serialization=False)
    torch.save({"layers.0.weight": _Payload(str(marker))}, tmp_path / "zip" / f"{PREFIX}.bin")
    for folder in (tmp_path, tmp_path / "zip"):
        with pytest.raises(UnsafeCheckpointError, match="weights_only"):
            TinyModel.from_pretrained(folder)
    assert not marker.exists()


def test_sharded_round_trip_with_and_without_variant(tmp_path):
    main = tiny_model(width=16)
    main.save_pretrained(tmp_path, max_shard_size=600)
    main.half().save_pretrained(tmp_path, variant="fp16", max_shard_size="1KB")
    names = files(tmp_path)
    assert f"{PREFIX}.safetensors.index.json" in names
    assert f"{PREFIX}.safetensors.index.fp16.json" in names
    assert any(n.startswith(f"{PREFIX}-00001-of-") for n in names)
    assert any(n.startswith(f"{PREFIX}.fp16-00001-of-") for n in names)
    assert same_weights(TinyModel.from_pretrained(tmp_path), tiny_model(width=16))
    loaded = TinyModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert same_weights(loaded, tiny_model(width=16).half())


def test_resaving_unsharded_removes_stale_shards_of_that_variant_only(tmp_path):
    tiny_model(width=16).save_pretrained(tmp_path, max_shard_size=600)
    tiny_model(width=16).half().save_pretrained(tmp_path, variant="fp16", max_shard_size=600)
    tiny_model(width=16, seed=5).save_pretrained(tmp_path)
    names = files(tmp_path)
    assert not any(n.startswith(f"{PREFIX}-0") for n in names)
    assert f"{PREFIX}.safetensors.index.json" not in names
    assert any(n.startswith(f"{PREFIX}.fp16-0") for n in names)  # the other variant is untouched
    assert same_weights(TinyModel.from_pretrained(tmp_path), tiny_model(width=16, seed=5))
    assert TinyModel.from_pretrained(tmp_path, variant="fp16").dtype == torch.float32


def test_loaded_tensors_are_views_of_the_mapped_file(tmp_path):
    tiny_model(width=32).save_pretrained(tmp_path)
    path = tmp_path / f"{PREFIX}.safetensors"
    model = TinyModel.from_pretrained(tmp_path)
    size = path.stat().st_size
    for p in model.parameters():  # every parameter shares the one storage that maps the file
        assert p.untyped_storage().nbytes() == size
    assert {p.untyped_storage().data_ptr() for p in model.parameters()} == {
        next(model.parameters()).untyped_storage().data_ptr()
    }


def test_loading_assigns_trainable_parameters_and_restores_the_garbage_collector(tmp_path):
    import gc

    tiny_model(width=16).save_pretrained(tmp_path)
    model = TinyModel.from_pretrained(tmp_path)
    assert gc.isenabled()  # paused only while loading
    for name, p in model.named_parameters():  # what load_state_dict(assign=True) would give
        assert type(p) is torch.nn.Parameter and p.requires_grad and not p.is_meta, name
    assert same_weights(model, tiny_model(width=16))
    with pytest.raises(StateDictMismatchError):
        TinyModel.from_pretrained(tmp_path, width=8)
    assert gc.isenabled()  # also after a failed load
    gc.disable()
    try:  # a caller that paused it itself keeps it paused
        TinyModel.from_pretrained(tmp_path)
        assert not gc.isenabled()
    finally:
        gc.enable()


class HookedModel(TinyModel):
    """A model whose submodule renames a key when loading: assignment must go through its hook."""

    def __init__(self, width: int = 8, depth: int = 2, groups: int = 2):
        super().__init__(width, depth, groups)
        self.norm._register_load_state_dict_pre_hook(self._note)
        self.hook_calls = 0

    def _note(self, *args, **kwargs):
        self.hook_calls += 1


def test_modules_with_load_hooks_are_loaded_through_load_state_dict(tmp_path):
    tiny_model(width=8).save_pretrained(tmp_path)
    model = HookedModel.from_pretrained(tmp_path)
    assert model.hook_calls == 1
    assert same_weights(model, tiny_model(width=8))


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if not line.split(maxsplit=1)[0].endswith(":"):  # a mapping's header line, not a field
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc to see resident pages")
def test_casting_while_reading_releases_the_files_pages_and_keeps_other_tensors_intact(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(2048, 1024, generator=g),  # 8 MiB of fp32, cast to fp16 while reading
        "odd": torch.randn(3, 7, generator=g).half(),  # already fp16: stays a view of the mapping
        "steps": torch.arange(5),  # integers are never cast
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))

    plain = load_safetensors(path)
    assert float(plain["big"].sum()) == float(tensors["big"].sum())
    assert _resident_kib(path) >= 8 * 1024 - 64  # read through the mapping: resident
    del plain

    cast = load_safetensors(path, cast_to=torch.float16)
    assert cast["big"].dtype == torch.float16 and torch.equal(cast["big"], tensors["big"].half())
    assert torch.equal(cast["odd"], tensors["odd"]) and torch.equal(cast["steps"], tensors["steps"])
    assert cast["odd"].untyped_storage().nbytes() == path.stat().st_size  # still a view of the file
    assert _resident_kib(path) <= 128  # the 8 MiB the cast read were let go


def test_shape_mismatch_names_the_parameter_both_shapes_and_the_file(tmp_path):
    tiny_model(width=8).save_pretrained(tmp_path)
    with pytest.raises(StateDictMismatchError) as err:
        TinyModel.from_pretrained(tmp_path, width=4, groups=2)
    message = str(err.value)
    assert "'layers.0.weight' checkpoint [8, 8] vs model [4, 4]" in message
    assert f"{PREFIX}.safetensors" in message


def test_missing_keys_are_an_error_unless_allowed(tmp_path):
    tiny_model(depth=2).save_pretrained(tmp_path)
    with pytest.raises(StateDictMismatchError) as err:
        TinyModel.from_pretrained(tmp_path, depth=3)
    assert "2 missing key(s)" in str(err.value) and "layers.2.weight" in str(err.value)
    model = TinyModel.from_pretrained(tmp_path, depth=3, allow_missing_keys=True)
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.layers[0].weight, tiny_model(depth=2).layers[0].weight)


def test_unexpected_keys_are_a_warning_listing_them(tmp_path, caplog):
    tiny_model(depth=3).save_pretrained(tmp_path)
    model = TinyModel.from_pretrained(tmp_path, depth=2)
    assert "layers.2.weight" in caplog.text and "ignoring 2 key(s)" in caplog.text
    assert torch.equal(model.layers[1].weight, tiny_model(depth=3).layers[1].weight)


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import diffpipe.models.modeling as modeling

    before = tiny_model(seed=0)
    before.save_pretrained(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def exploding_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(modeling, "save_safetensors", exploding_save)
    with pytest.raises(OSError, match="No space left"):
        tiny_model(seed=9, width=16).save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == snapshot
    assert not [p for p in tmp_path.parent.iterdir() if "staging" in p.name]
    assert same_weights(TinyModel.from_pretrained(tmp_path), before)


def test_save_refuses_unsafe_variant_names(tmp_path):
    from diffpipe.errors import UnsafePathError

    with pytest.raises(UnsafePathError):
        tiny_model().save_pretrained(tmp_path, variant="../evil")


def test_pickle_round_trip_uses_weights_only_loader(tmp_path):
    state = {"a": torch.arange(4.0)}
    save_pickle(state, tmp_path / "x.bin")
    from diffpipe.io.state_dict import load_pickle

    assert torch.equal(load_pickle(tmp_path / "x.bin")["a"], state["a"])


def test_safetensors_written_by_safetensors_itself_loads(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(2).half()}
    save_file(tensors, tmp_path / "t.safetensors")
    loaded = load_safetensors(tmp_path / "t.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
