"""GGUF-quantized weights: the torch kernels against gguf's numpy dequantization, and a tiny UNet
written as a GGUF file (diffusers key names, as city96's conversions keep them) loaded by diffpipe and
by the reference."""

from __future__ import annotations

import builtins
import json
import zlib

import gguf  # the test extra (the writer and numpy dequantizer): missing, the module fails to load
import numpy as np
import pytest
import torch

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
from diffpipe.errors import CorruptCheckpointError, StateDictMismatchError
from diffpipe.quantization import GGUFQuantizationConfig
from diffpipe.quantization.gguf_kernels import UnsupportedQuantTypeError, dequantize
from diffpipe.quantization.gguf_linear import GGUFLinear, GGUFWeight, load_gguf_into, quantized_bytes

Q = gguf.GGMLQuantizationType
KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# fp16 scale offsets inside each block, set to small finite values so random blocks are sane weights
SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
# widths: every Linear's input is a multiple of 32; the cross-attention and feed-forward-out inputs are 256
UNET = dict(
    block_out_channels=(32, 64),
    norm_num_groups=8,
    cross_attention_dim=256,
    attention_head_dim=8,
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
)


def random_blocks(qtype: str, rows: int, cols: int, rng, scale=(0.001, 0.01)) -> np.ndarray:
    """Valid raw blocks of ``qtype`` for a (rows, cols) tensor: random bytes with fp16 scales in range."""
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for at in SCALES.get(qtype, (0,) if qtype in ("Q8_0", "Q4_0", "Q5_0") else (0, 2)):
        value = rng.uniform(*scale, size=raw.shape[:2]).astype(np.float16)
        raw[..., at : at + 2] = value.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def quantize(array: np.ndarray, qtype: str, rng) -> np.ndarray:
    if qtype.endswith("_K"):  # gguf quantizes no K type in numpy: random blocks, weights of a usual size
        return random_blocks(qtype, *array.shape, rng, scale=(1e-5, 1e-4))
    return gguf.quants.quantize(array, Q[qtype])


# ------------------------------------------------------------------------------------------ kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_kernel_matches_gguf_numpy_dequantize(qtype):
    rng = np.random.default_rng(0)
    raw = random_blocks(qtype, 5, 512, rng)
    expected = gguf.quants.dequantize(raw, Q[qtype])
    ours = dequantize(torch.from_numpy(raw), int(Q[qtype])).numpy()
    assert ours.shape == expected.shape == (5, 512)
    np.testing.assert_array_equal(ours, expected)  # bit-equal
    # any bytes at all (scales that are inf or NaN included) decode as gguf decodes them
    raw = rng.integers(0, 256, size=raw.shape, dtype=np.uint8)
    with np.errstate(all="ignore"):
        expected = gguf.quants.dequantize(raw, Q[qtype])
    np.testing.assert_array_equal(dequantize(torch.from_numpy(raw), int(Q[qtype])).numpy(), expected)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1"])
def test_kernel_roundtrips_gguf_quantize(qtype):
    values = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    raw = gguf.quants.quantize(values, Q[qtype])
    ours = dequantize(torch.from_numpy(raw), int(Q[qtype]), torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    expected = torch.from_numpy(gguf.quants.dequantize(raw, Q[qtype])).to(torch.bfloat16)
    assert torch.equal(ours, expected)
    assert float((ours.float() - torch.from_numpy(values)).abs().max()) < 0.5  # a quantization, not noise


# ------------------------------------------------------------------------------------------ a GGUF UNet
def write_gguf(path, state: dict, linear_keys: set, choose, rng) -> dict:
    """Write ``state`` to ``path``: Linear weights quantized as ``choose(key, shape)`` says, other
    matrices and convolutions as F16, vectors as F32. Returns key -> type name."""
    writer = gguf.GGUFWriter(str(path), arch="unet")
    types = {}
    for key, tensor in state.items():
        array = tensor.float().numpy()
        qtype = choose(key, array.shape) if key in linear_keys else None
        if qtype is not None:
            raw = quantize(array, qtype, rng)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=Q[qtype])
        elif array.ndim >= 2:
            qtype = "F16"
            writer.add_tensor(key, array.astype(np.float16))
        else:
            qtype = "F32"
            writer.add_tensor(key, array)
        types[key] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def mixed(key, shape):  # a K type where the row is 256 values, else the 32-value types by turns
    if shape[-1] % 256 == 0:
        return "Q4_K"
    return "Q8_0" if zlib.crc32(key.encode()) % 2 else "Q4_0"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gguf")
    reference = diffusers.UNet2DConditionModel(**UNET).eval()
    reference.save_config(folder / "config")
    state = reference.state_dict()
    linear = {n + ".weight" for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}
    types = write_gguf(folder / "unet.gguf", state, linear, mixed, np.random.default_rng(0))
    return folder, types, linear


def dequantized_state(path) -> dict:
    """The file's values, dequantized by gguf's numpy code (the oracle)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(list(t.shape)))
        out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape).float()
    return out


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 3, 256, generator=g)


def load(folder, compute_dtype=torch.float32, **kwargs):
    return diffpipe.UNet2DConditionModel.from_single_file(
        str(folder / "unet.gguf"),
        quantization_config=diffpipe.GGUFQuantizationConfig(compute_dtype=compute_dtype),
        config=str(folder / "config"),
        **kwargs,
    )


def test_gguf_unet_matches_its_dequantized_weights_and_the_reference(tiny_gguf):
    folder, types, linear = tiny_gguf
    model = load(folder)
    kinds = {types[k] for k in linear}
    assert {"Q8_0", "Q4_0", "Q4_K"} <= kinds
    quantized = {n for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert {n + ".weight" for n in quantized} == linear
    # exactly the plain model with gguf's own dequantized values
    plain = diffusers.UNet2DConditionModel(**UNET).eval()
    plain.load_state_dict(dequantized_state(folder / "unet.gguf"))
    sample, text = inputs()
    with torch.no_grad():
        ours = model(sample, 10, text).sample
        exact = plain(sample, 10, text).sample
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)
    # the reference's own GGUF path (its kernels round through fp16: within that of ours)
    ref = diffusers.UNet2DConditionModel.from_single_file(
        str(folder / "unet.gguf"),
        quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(folder / "config"),
    )
    with torch.no_grad():
        theirs = ref(sample, 10, text).sample
    scale = float(exact.abs().max())
    assert float((ours - theirs).abs().max()) < 2e-3 * scale  # measured: 8e-5


def test_quantized_layers_hold_the_files_bytes(tiny_gguf):
    folder, types, linear = tiny_gguf
    model = load(folder)
    reader = gguf.GGUFReader(str(folder / "unet.gguf"))
    file_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name in linear)
    assert quantized_bytes(model) == file_bytes
    dense = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, GGUFLinear))
    assert file_bytes < dense / 3.5  # 8-bit and 4-bit blocks against float32
    layer = model.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k")
    assert layer.weight.dtype == torch.uint8 and layer.quant_type_name == "Q4_K"
    assert tuple(layer.weight.shape) == (64, 144) and (layer.out_features, layer.in_features) == (64, 256)
    assert not any(p.is_meta for p in model.parameters())


def test_dtypes_state_dict_and_moves(tiny_gguf):
    folder, _, linear = tiny_gguf
    model = load(folder, compute_dtype=torch.bfloat16)
    assert model.conv_in.weight.dtype == torch.bfloat16  # unquantized weights take compute_dtype ...
    assert load(folder, torch.bfloat16, torch_dtype=torch.float16).conv_in.weight.dtype == torch.float16  # ... or this
    sample, text = inputs()
    with torch.no_grad():
        out = model(sample.bfloat16(), 10, text.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # to(dtype): the unquantized weights change, the quantized bytes stay, forward still works
    model.to(torch.float32)
    layer = model.get_submodule("time_embedding.linear_1")
    assert model.conv_in.weight.dtype == torch.float32 and layer.weight.dtype == torch.uint8
    with torch.no_grad():
        assert model(sample, 10, text).sample.dtype == torch.float32
    model.to("cpu")
    # state_dict(): dequantized values (compute_dtype), so save_pretrained writes a plain model
    state = model.state_dict()
    oracle = dequantized_state(folder / "unet.gguf")
    key = "time_embedding.linear_1.weight"
    assert state[key].shape == (128, 32) and state[key].dtype == torch.bfloat16
    torch.testing.assert_close(state[key].float(), oracle[key].bfloat16().float())
    with pytest.raises(RuntimeError, match="GGUF-quantized"):
        model.load_state_dict(state)
    model.save_pretrained(folder / "saved")  # a plain model, loadable without the gguf package
    saved = diffpipe.UNet2DConditionModel.from_pretrained(folder / "saved", torch_dtype="auto")
    assert saved.time_embedding.linear_1.weight.dtype == torch.bfloat16
    assert torch.equal(saved.time_embedding.linear_1.weight, state[key])


def test_load_gguf_into_with_a_key_map(tiny_gguf, tmp_path):
    folder, types, linear = tiny_gguf
    config = json.loads((folder / "config" / "config.json").read_text())
    renamed = tmp_path / "renamed.gguf"
    state = {"model." + k: v for k, v in diffusers.UNet2DConditionModel(**UNET).state_dict().items()}
    write_gguf(renamed, state, {"model." + k for k in linear}, lambda k, s: "Q8_0", np.random.default_rng(2))

    def strip(tensors):
        assert isinstance(tensors["model.time_embedding.linear_1.weight"], GGUFWeight)
        return {k.removeprefix("model."): v for k, v in tensors.items()}, []

    model = load_gguf_into(diffpipe.UNet2DConditionModel, renamed, config, torch.float32, key_map=strip)
    assert isinstance(model.time_embedding.linear_1, GGUFLinear)
    by_dict = load_gguf_into(
        diffpipe.UNet2DConditionModel, renamed, config, torch.float32, key_map={k: k[6:] for k in state}
    )
    assert torch.equal(model.time_embedding.linear_1.weight, by_dict.time_embedding.linear_1.weight)
    with pytest.raises(StateDictMismatchError, match="missing"):
        load_gguf_into(diffpipe.UNet2DConditionModel, renamed, config, torch.float32)


def test_gguf_weight_keeps_its_type_through_row_operations():
    raw = torch.from_numpy(random_blocks("Q8_0", 6, 64, np.random.default_rng(3)))
    w = GGUFWeight(raw, int(Q.Q8_0))
    q, k, v = torch.chunk(w, 3, dim=0)
    assert isinstance(q, GGUFWeight) and q.quant_shape == (2, 64)
    joined = torch.cat([q, v])
    assert isinstance(joined, GGUFWeight) and joined.quant_shape == (4, 64)
    torch.testing.assert_close(joined.dequantize(), torch.cat([w.dequantize()[:2], w.dequantize()[4:]]))
    assert not isinstance(w.float(), GGUFWeight)


# ------------------------------------------------------------------------------------------ errors
def test_unsupported_type_names_the_tensor(tiny_gguf, tmp_path):
    folder, _, linear = tiny_gguf
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), arch="unet")
    raw = np.zeros((4, 66), dtype=np.uint8)  # one IQ2_XXS block per row
    writer.add_tensor("time_embedding.linear_1.weight", raw, raw_shape=raw.shape, raw_dtype=Q.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedQuantTypeError, match=r"time_embedding\.linear_1\.weight.*IQ2_XXS"):
        diffpipe.UNet2DConditionModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(), config=str(folder / "config")
        )


def test_not_a_gguf_file(tiny_gguf, tmp_path):
    folder, _, _ = tiny_gguf
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(CorruptCheckpointError, match="not a GGUF file"):
        diffpipe.UNet2DConditionModel.from_single_file(
            str(path), quantization_config=GGUFQuantizationConfig(), config=str(folder / "config")
        )
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes((folder / "unet.gguf").read_bytes()[:5000])
    with pytest.raises(CorruptCheckpointError):
        diffpipe.UNet2DConditionModel.from_single_file(
            str(truncated), quantization_config=GGUFQuantizationConfig(), config=str(folder / "config")
        )


def test_no_config_and_wrong_quantization_config(tiny_gguf):
    folder, _, _ = tiny_gguf
    with pytest.raises(diffpipe.errors.ConfigError, match="pass config="):
        diffpipe.UNet2DConditionModel.from_single_file(
            str(folder / "unet.gguf"), quantization_config=GGUFQuantizationConfig()
        )
    with pytest.raises(diffpipe.errors.ConfigError, match="not supported"):
        diffpipe.UNet2DConditionModel.from_single_file(
            str(folder / "unet.gguf"), quantization_config=object(), config=str(folder / "config")
        )
    with pytest.raises(TypeError, match="floating"):
        GGUFQuantizationConfig(compute_dtype=torch.int8)


def test_missing_gguf_package_says_how_to_install(tiny_gguf, monkeypatch):
    folder, _, _ = tiny_gguf
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf" or name.startswith("gguf."):
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ImportError, match=r"pip install diffpipe\[gguf\]"):
        load(folder)


def test_exported_from_the_package():
    assert diffpipe.GGUFQuantizationConfig is GGUFQuantizationConfig
    assert GGUFQuantizationConfig().compute_dtype == torch.float32
    assert GGUFQuantizationConfig(compute_dtype="bfloat16").to_dict()["compute_dtype"] == torch.bfloat16
