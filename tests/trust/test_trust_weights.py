"""Trustworthy loading, weight files (issue 11): every broken or hostile weight file ends in one of
diffpipe's error types, whose message names the model, the file and the cause, and nothing runs or
is written. Cases the older suites already prove are referenced in docs/security.md, not repeated.
"""

from __future__ import annotations

import json
import logging
import pickle
import struct
import tracemalloc

import pytest
import torch

from diffpipe.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DiffpipeError,
    StateDictMismatchError,
    UnsafePathError,
)

from factories import TinyModel, same_weights, tiny_model

PREFIX = "diffusion_pytorch_model"
WEIGHTS = f"{PREFIX}.safetensors"


# ------------------------------------------------------------------------------------- helpers
def header_bytes(header) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def write_weights(folder, header, data: bytes = b"", name: str = WEIGHTS):
    (folder / name).write_bytes(header_bytes(header) + data)


@pytest.fixture
def model_folder(tmp_path):
    """A TinyModel folder (config.json + one safetensors file) and the model saved in it."""
    folder = tmp_path / "unet"
    model = tiny_model(seed=0)
    model.save_pretrained(folder)
    return folder, model


def load_error(folder, expected=DiffpipeError, **kwargs):
    with pytest.raises(expected) as err:
        TinyModel.from_pretrained(folder, **kwargs)
    return err.value


def assert_names_model_and_file(error, folder, name=WEIGHTS):
    message = str(error)
    assert "TinyModel" in message, message
    assert str(folder / name) in message, message


def chain(error):
    """The exception and its causes, outermost first."""
    out = []
    while error is not None:
        out.append(error)
        error = error.__cause__
    return out


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything opens a pickle through torch.load."""
    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", spy)
    return calls


# ------------------------------------------------------------------------------ 1. truncated files
@pytest.mark.parametrize("keep", ["0 bytes", "4 bytes", "half"])
def test_truncated_safetensors_is_corrupt_and_says_truncated(model_folder, keep):
    folder, _ = model_folder
    path = folder / WEIGHTS
    data = path.read_bytes()
    path.write_bytes({"0 bytes": b"", "4 bytes": data[:4], "half": data[: len(data) // 2]}[keep])
    error = load_error(folder, CorruptCheckpointError)
    assert_names_model_and_file(error, folder)
    assert "truncated" in str(error)
    # the file-level error is kept as the cause of the model-level one
    assert isinstance(error.__cause__, CorruptCheckpointError) and "truncated" in str(error.__cause__)


def test_truncated_pickle_keeps_torch_error_as_the_cause(tmp_path):
    tiny_model().save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / f"{PREFIX}.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    error = load_error(tmp_path, CorruptCheckpointError)
    assert_names_model_and_file(error, tmp_path, f"{PREFIX}.bin")
    causes = chain(error)
    assert any(not isinstance(e, DiffpipeError) for e in causes[1:]), causes  # torch's own error is kept


# ------------------------------------------------------------------------ 2. header length lies
@pytest.mark.parametrize(
    "claimed, fragment",
    [
        (10_000, "truncated: its header claims 10000 bytes"),
        (99_000_000, "truncated: its header claims 99000000 bytes"),  # under the limit, still never read
        (200_000_000, "over the format's limit"),
        (2**64 - 1, "over the format's limit"),
    ],
)
def test_header_length_beyond_file_or_limit_fails_without_allocating_it(tmp_path, claimed, fragment):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(struct.pack("<Q", claimed) + b'{"a": 1}' + b" " * 100)
    tracemalloc.start()
    try:
        error = load_error(tmp_path, CorruptCheckpointError)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fragment in str(error)
    assert_names_model_and_file(error, tmp_path)
    assert peak < 5_000_000, f"loading allocated {peak} bytes for a header it should never read"


# ------------------------------------------------------------------------------ 3. header text
@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b'{"a": ', "not valid JSON"),
        (b"\xff\xfe\x00{}", "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),  # nesting too deep for the parser
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "not valid JSON"),
    ],
)
def test_header_that_is_not_json_or_not_utf8(tmp_path, raw, fragment):
    tiny_model().save_pretrained(tmp_path)
    write_weights(tmp_path, raw)
    error = load_error(tmp_path, CorruptCheckpointError)
    assert fragment in str(error)
    assert_names_model_and_file(error, tmp_path)


# --------------------------------------------------------------------- 4. and 5. byte layout, dtypes
F32x2 = {"dtype": "F32", "shape": [2]}  # 8 bytes


@pytest.mark.parametrize(
    "tensors, data_len, fragment",
    [
        ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}}, 20, "gap of 4 bytes"),
        ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}}, 12, "overlaps"),
        ({"a": {**F32x2, "data_offsets": [0, 12]}}, 12, "needs 8"),
        ({"a": {"dtype": "F16", "shape": [3, 3], "data_offsets": [0, 8]}}, 8, "needs 18"),
        ({"a": {**F32x2, "data_offsets": [0, 8]}}, 11, "3 unexpected trailing bytes"),
        ({"a": {**F32x2, "data_offsets": [8, 16]}}, 16, "gap of 8 bytes"),
        ({"a": {**F32x2, "data_offsets": [0, 8]}}, 4, "truncated"),
        ({"a": {**F32x2, "data_offsets": [8, 0]}}, 8, "invalid data_offsets"),
        ({"a": {**F32x2, "data_offsets": [0]}}, 8, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, "invalid shape"),
        ({"a": [1, 2]}, 0, "is not an object"),
        ({"__metadata__": [1]}, 0, "'__metadata__'"),
        ({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype 'Q4_K'"),
        ({"a": {"dtype": None, "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype None"),
    ],
)
def test_bad_byte_layout_or_dtype(tmp_path, tensors, data_len, fragment):
    tiny_model().save_pretrained(tmp_path)
    write_weights(tmp_path, tensors, b"\0" * data_len)
    error = load_error(tmp_path, CorruptCheckpointError)
    assert fragment in str(error), str(error)
    assert_names_model_and_file(error, tmp_path)


def test_duplicate_tensor_names_are_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    raw = (
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    )
    write_weights(tmp_path, raw, b"\0" * 16)
    error = load_error(tmp_path, CorruptCheckpointError)
    assert "names tensor(s) twice: ['a']" in str(error)
    assert_names_model_and_file(error, tmp_path)


# ------------------------------------------------------------------------------ 6. git-lfs pointer
@pytest.mark.parametrize("name, safe", [(WEIGHTS, True), (f"{PREFIX}.bin", False)])
def test_lfs_pointer_in_place_of_weights_says_to_fetch_the_lfs_content(tmp_path, name, safe):
    tiny_model().save_pretrained(tmp_path, safe_serialization=safe)
    pointer = (
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1234\n"
    )
    (tmp_path / name).write_text(pointer)
    error = load_error(tmp_path, CorruptCheckpointError)
    assert "git-lfs pointer" in str(error) and "git lfs pull" in str(error)
    assert_names_model_and_file(error, tmp_path, name)


# ---------------------------------------------------------------------------- 7. no weight file
def test_no_weight_file_lists_every_name_tried(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    error = load_error(tmp_path, CheckpointNotFoundError)
    for tried in (WEIGHTS, f"{WEIGHTS}.index.json", f"{PREFIX}.bin", f"{PREFIX}.bin.index.json"):
        assert tried in str(error)
    assert str(tmp_path) in str(error) and "TinyModel" in str(error)


def test_use_safetensors_true_never_switches_to_a_pickle(tmp_path, no_torch_load):
    tiny_model().save_pretrained(tmp_path, safe_serialization=False)
    error = load_error(tmp_path, CheckpointNotFoundError, use_safetensors=True)
    assert f"tried {WEIGHTS}, {WEIGHTS}.index.json." in str(error)
    assert f"{PREFIX}.bin" in str(error)  # named as present, not opened
    assert no_torch_load == []


# ------------------------------------------------------------------------------ 8. pickles only
def test_pickle_files_are_only_ever_opened_with_weights_only(tmp_path, monkeypatch):
    model = tiny_model(seed=4)
    model.save_pretrained(tmp_path, safe_serialization=False)
    real_load, calls = torch.load, []

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    assert same_weights(TinyModel.from_pretrained(tmp_path), model)
    assert calls and all(kwargs.get("weights_only") is True for kwargs in calls)


class WritesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------- 9. safetensors and pickle present
def test_with_both_formats_the_pickle_is_never_opened(model_folder, no_torch_load):
    folder, model = model_folder
    marker = folder.parent / "payload-ran"
    with open(folder / f"{PREFIX}.bin", "wb") as f:
        pickle.dump({"layers.0.weight": WritesAFile(marker)}, f)
    assert same_weights(TinyModel.from_pretrained(folder), model)
    # a broken safetensors file is an error, not a reason to fall back to the pickle
    (folder / WEIGHTS).write_bytes(b"\0" * 4)
    error = load_error(folder, CorruptCheckpointError)
    assert_names_model_and_file(error, folder)
    assert no_torch_load == [] and not marker.exists()


# ------------------------------------------------------------------ 10. missing or broken config.json
@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no config.json"),
        (b"{oops", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b'"a string"', "expected an object"),
    ],
)
def test_missing_or_invalid_config_json_names_the_path(model_folder, content, fragment):
    folder, _ = model_folder
    if content is None:
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_bytes(content)
    error = load_error(folder, ConfigError)
    assert fragment in str(error) and str(folder) in str(error)


def test_config_written_for_another_class_is_refused(model_folder):
    folder, _ = model_folder
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "AutoencoderKL"
    (folder / "config.json").write_text(json.dumps(config))
    error = load_error(folder, ConfigError)
    assert "describes a AutoencoderKL, not a TinyModel" in str(error)
    assert str(folder / "config.json") in str(error)


# ------------------------------------------------------------------------- 16. names that are paths
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(subfolder="../unet"),
        dict(subfolder="/etc"),
        dict(subfolder="a/../../b"),
        dict(variant="../fp16"),
        dict(variant="a/b"),
        dict(variant="/abs"),
        dict(variant=".."),
    ],
)
def test_path_like_subfolder_or_variant_is_refused(model_folder, kwargs):
    folder, _ = model_folder
    error = load_error(folder.parent, UnsafePathError, **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(error)


def sharded(tmp_path, seed=0):
    """A TinyModel saved in several shards; returns (folder, model, index path)."""
    model = tiny_model(seed=seed, width=16)
    model.save_pretrained(tmp_path, max_shard_size=600)
    index = tmp_path / f"{WEIGHTS}.index.json"
    assert index.is_file() and len(list(tmp_path.glob(f"{PREFIX}-*"))) > 1
    return tmp_path, model, index


def edit_weight_map(index, change):
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "shard",
    [
        "../diffusion_pytorch_model-00001-of-00003.safetensors",
        "/etc/passwd.safetensors",
        "sub/x.safetensors",
        "..\\x.safetensors",
    ],
)
def test_shard_index_naming_a_path_is_refused(tmp_path, shard):
    folder, _, index = sharded(tmp_path)
    edit_weight_map(index, lambda m: m.update({"layers.0.weight": shard}))
    error = load_error(folder, UnsafePathError)
    assert repr(shard) in str(error) and str(index) in str(error)


# ------------------------------------------------------------------------------ 17. shard index lies
def test_shard_index_naming_a_missing_shard(tmp_path):
    folder, _, index = sharded(tmp_path)
    missing = f"{PREFIX}-00009-of-00009.safetensors"
    edit_weight_map(index, lambda m: m.update({"norm.weight": missing}))
    error = load_error(folder, CheckpointNotFoundError)
    assert missing in str(error) and str(index) in str(error) and "TinyModel" in str(error)


def test_tensor_missing_from_the_shard_the_index_names(tmp_path):
    folder, _, index = sharded(tmp_path)
    first = sorted(folder.glob(f"{PREFIX}-*"))[0].name
    edit_weight_map(index, lambda m: m.update({"no.such.tensor": first}))
    error = load_error(folder, CorruptCheckpointError)
    assert "'no.such.tensor'" in str(error) and str(folder / first) in str(error)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _, index = sharded(tmp_path)
    first, second = sorted(folder.glob(f"{PREFIX}-*"))[:2]
    stolen = sorted(load_file(first))[0]
    tensors = {**load_file(second), stolen: torch.zeros_like(load_file(first)[stolen])}
    save_file(tensors, second)
    error = load_error(folder, CorruptCheckpointError)
    assert repr(stolen) in str(error) and "one shard only" in str(error)


# ----------------------------------------------------------------- 11. the wrong kind of dtype
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8])
def test_an_integer_tensor_where_the_model_has_floats_is_refused(model_folder, dtype):
    from safetensors.torch import load_file, save_file

    folder, _ = model_folder
    tensors = load_file(folder / WEIGHTS)
    tensors["layers.0.weight"] = tensors["layers.0.weight"].to(dtype)
    save_file(tensors, folder / WEIGHTS)
    for torch_dtype in (None, "auto", torch.float16):
        error = load_error(folder, StateDictMismatchError, torch_dtype=torch_dtype)
        assert f"'layers.0.weight' checkpoint {dtype} vs model torch.float32" in str(error)
        assert WEIGHTS in str(error) and "TinyModel" in str(error)


# ------------------------------------------------------------------------- 12. nothing left on meta
def test_allowed_missing_keys_leave_no_parameter_on_meta_or_uninitialised(tmp_path):
    tiny_model(depth=1).save_pretrained(tmp_path)
    model = TinyModel.from_pretrained(tmp_path, depth=2, allow_missing_keys=True)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert not tensor.is_meta, name
        assert bool(torch.isfinite(tensor).all()), name
    assert model.layers[1].weight.abs().sum() > 0  # a real initialisation, not empty memory left as zeros


# ------------------------------------------------------------------------------ 25. verify=True
def put_nan(folder, key="layers.1.bias"):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / WEIGHTS)
    tensors[key][0] = float("nan")
    save_file(tensors, folder / WEIGHTS)


def test_verify_refuses_weights_holding_nan_and_names_them(model_folder):
    folder, _ = model_folder
    put_nan(folder)
    TinyModel.from_pretrained(folder)  # without verify the file loads: NaN is a valid float
    error = load_error(folder, CorruptCheckpointError, verify=True)
    assert "'layers.1.bias'" in str(error) and WEIGHTS in str(error) and "NaN or Inf" in str(error)


def test_verify_passes_an_intact_local_model(model_folder):
    folder, model = model_folder
    assert same_weights(TinyModel.from_pretrained(folder, verify=True), model)


def test_verify_checks_hub_files_against_the_hub_sha256(hub, tmp_path, hf_cache):
    folder = tmp_path / "repo"
    tiny_model(seed=2).save_pretrained(folder / "unet")
    repo = "trust/verify-model"
    hub.add_repo(repo, folder)
    assert same_weights(TinyModel.from_pretrained(repo, subfolder="unet", verify=True), tiny_model(seed=2))
    assert any("blobs=" in r.path for r in hub.requests)  # asked the Hub for the files' metadata
    # damage the cached copy in place (same size, one byte changed)
    cached = next(hf_cache.rglob(f"snapshots/*/unet/{WEIGHTS}")).resolve()
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0x01
    cached.write_bytes(bytes(data))
    error = load_error(repo, CorruptCheckpointError, subfolder="unet", verify=True)
    assert f"unet/{WEIGHTS}" in str(error) and "sha256" in str(error) and "TinyModel" in str(error)
    TinyModel.from_pretrained(repo, subfolder="unet")  # without verify the damage goes unseen


def test_verify_offline_says_hashes_were_not_checked(hub, tmp_path, hf_cache, caplog):
    folder = tmp_path / "repo"
    tiny_model(seed=3).save_pretrained(folder)
    repo = "trust/verify-offline"
    hub.add_repo(repo, folder)
    TinyModel.from_pretrained(repo)
    hub.clear_log()
    with caplog.at_level(logging.WARNING):
        model = TinyModel.from_pretrained(repo, local_files_only=True, verify=True)
    assert same_weights(model, tiny_model(seed=3)) and hub.requests == []
    assert "hashes cannot be checked" in caplog.text
