"""Flux transformers as people download them: one file in the original Black Forest Labs layout
(``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``, ...; ComfyUI's under ``model.diffusion_model.``)
and city96's GGUF-quantized files in the same layout. The files are written here from a reference-built
tiny transformer by a converter written from the layout's facts, and diffpipe must recover the reference's
weights exactly. (The reference's own single-file and GGUF loaders cut the fused layers at the published
widths, 3072, so they cannot read a tiny file; the oracle is the reference-built model itself, and for GGUF
that model with the gguf package's own dequantized weights.)"""

from __future__ import annotations

import warnings


import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import diffpipe
import diffusers  # the oracle (test extra): missing, the module fails to load
import gguf  # the test extra's GGUF writer (missing, the module fails to load)
from flux_factory import save_reference_flux

DOUBLE = {  # diffusers module -> (BFL module, index of the part in the fused rows or None)
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.norm_q": ("img_attn.norm.query_norm", None),
    "attn.norm_k": ("img_attn.norm.key_norm", None),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_add_out": ("txt_attn.proj", None),
    "attn.norm_added_q": ("txt_attn.norm.query_norm", None),
    "attn.norm_added_k": ("txt_attn.norm.key_norm", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
}
SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
    "attn.norm_q": ("norm.query_norm", None),
    "attn.norm_k": ("norm.key_norm", None),
}
TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def to_bfl(state: dict) -> dict:
    """diffusers-layout Flux weights -> the BFL layout (fused rows concatenated in order)."""
    fused: dict[str, dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if module in TOP:
            if module == "norm_out.linear":  # (scale, shift) here, (shift, scale) there
                scale, shift = value.chunk(2)
                value = torch.cat([shift, scale])
            out[f"{TOP[module]}.{leaf}"] = value
            continue
        kind, index, rest = module.split(".", 2)
        table, block = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        name, part = table[rest]
        leaf = "scale" if name.endswith("_norm") else leaf
        target = f"{block}.{index}.{name}.{leaf}"
        if part is None:
            out[target] = value
        else:
            fused.setdefault(target, {})[part] = value
    for target, parts in fused.items():
        out[target] = torch.cat([parts[i] for i in sorted(parts)])
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-single-file")
    folder = save_reference_flux(root / "dev", attention_head_dim=16, axes_dims_rope=[4, 6, 6], joint_attention_dim=32)
    reference = diffusers.FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    return folder, reference


def same(model, reference) -> bool:
    a, b = model.state_dict(), reference.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."], ids=["bfl", "comfyui"])
def test_an_original_layout_file_loads_with_the_reference_s_weights(flux, tmp_path, prefix):
    folder, reference = flux
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in to_bfl(reference.state_dict()).items()}, str(path))
    ours = diffpipe.FluxTransformer2DModel.from_single_file(path, config=str(folder), subfolder="transformer")
    assert same(ours, reference)


def from_bfl(state: dict, like: dict) -> dict:
    """The inverse of :func:`to_bfl` for a model whose diffusers-layout tensors look like ``like``."""
    out = {}
    for key, target in like.items():
        module, _, leaf = key.rpartition(".")
        if module in TOP:
            value = state[f"{TOP[module]}.{leaf}"]
            if module == "norm_out.linear":
                shift, scale = value.chunk(2)
                value = torch.cat([scale, shift])
            out[key] = value
            continue
        kind, index, rest = module.split(".", 2)
        table, block = (DOUBLE, "double_blocks") if kind == "transformer_blocks" else (SINGLE, "single_blocks")
        name, part = table[rest]
        source = state[f"{block}.{index}.{name}.{'scale' if name.endswith('_norm') else leaf}"]
        if part is None:
            out[key] = source
            continue
        sizes = [like[f"{kind}.{index}.{r}.{leaf}"].shape[0] for r, (n, p) in table.items() if n == name]
        out[key] = torch.split(source, sizes)[part]
    return out


def test_the_config_is_read_from_the_shapes_except_the_rope_axes(flux, tmp_path):
    folder, reference = flux
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_bfl(reference.state_dict()).items()}, str(path))
    with pytest.raises(ValueError, match="rope axes.*pass config="):
        diffpipe.FluxTransformer2DModel.from_single_file(path)
    ours = diffpipe.FluxTransformer2DModel.from_single_file(path, axes_dims_rope=[4, 6, 6])
    for key in ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "guidance_embeds"):
        assert ours.config[key] == reference.config[key], key
    assert same(ours, reference)


def test_a_gguf_file_loads_quantized_and_matches_the_reference(flux, tmp_path):
    folder, reference = flux
    path = tmp_path / "flux1-tiny-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    quantized = 0
    for key, value in to_bfl(reference.state_dict()).items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            quantized += 1
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert quantized > 10
    config = diffpipe.GGUFQuantizationConfig(compute_dtype=torch.float32)
    ours = diffpipe.FluxTransformer2DModel.from_single_file(
        path, quantization_config=config, config=str(folder), subfolder="transformer"
    )
    assert type(ours.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    # the oracle: the reference's model holding the gguf package's own dequantization of the file
    reader = gguf.GGUFReader(str(path))
    dequantized = {
        t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(
            [int(d) for d in reversed(t.shape)]
        )
        for t in reader.tensors
    }
    oracle = diffusers.FluxTransformer2DModel.from_config(reference.config)
    oracle.load_state_dict(from_bfl(dequantized, reference.state_dict()))
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        got = ours(**inputs, return_dict=False)[0]
        expected = oracle(**inputs, return_dict=False)[0]
        exact = reference(**inputs, return_dict=False)[0]
    scale = float(exact.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    assert float((got - exact).abs().max()) <= 0.05 * scale  # Q8_0 against the unquantized weights


def test_a_flux_pipeline_from_a_single_file_takes_the_rest_from_config(flux, tmp_path):
    folder, reference = flux
    path = tmp_path / "flux1-tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_bfl(reference.state_dict()).items()}, str(path))
    with pytest.raises(ValueError, match="holds only the transformer; pass config="):
        diffpipe.FluxPipeline.from_single_file(path)
    pipe = diffpipe.DiffusionPipeline.from_single_file(path, config=str(folder))
    assert type(pipe).__name__ == "FluxPipeline" and same(pipe.transformer, reference)
    plain = diffpipe.FluxPipeline.from_pretrained(folder)
    args = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np")
    for p in (pipe, plain):
        p.set_progress_bar_config(disable=True)
    got = pipe(generator=torch.Generator().manual_seed(0), **args).images
    want = plain(generator=torch.Generator().manual_seed(0), **args).images
    np.testing.assert_array_equal(got, want)


def test_a_flux_pipeline_with_a_gguf_transformer(flux, tmp_path):
    folder, reference = flux
    path = tmp_path / "flux1-tiny-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, value in to_bfl(reference.state_dict()).items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    config = diffpipe.GGUFQuantizationConfig(compute_dtype=torch.float32)
    pipe = diffpipe.FluxPipeline.from_single_file(path, config=str(folder), quantization_config=config)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q).__name__ == "GGUFLinear"
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, height=32, width=32, max_sequence_length=16, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_a_diffusers_layout_gguf_loads_like_the_reference_s(flux, tmp_path):
    """With the diffusers names (no fused layers to cut) the reference's own GGUF path reads a tiny file:
    the two libraries' outputs agree within Q8_0's rounding of each other."""
    folder, reference = flux
    path = tmp_path / "flux-diffusers-Q8_0.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, value in reference.state_dict().items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            raw = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = diffpipe.FluxTransformer2DModel.from_single_file(
        path,
        quantization_config=diffpipe.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=str(folder),
        subfolder="transformer",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.FluxTransformer2DModel.from_single_file(
            str(path),
            quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
            config=str(folder),
            subfolder="transformer",
            local_files_only=True,
        )
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g),
        timestep=torch.tensor([0.5, 0.25]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5, 3.5]),
    )
    with torch.no_grad():
        got, expected = ours(**inputs, return_dict=False)[0], ref(**inputs, return_dict=False)[0]
    assert float((got - expected).abs().max()) <= 2e-3 * float(expected.abs().max())
