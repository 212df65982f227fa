"""The single-file oracle fixture (tests/single_file_factory.py), judged by the reference.

A tiny pipeline of each kind is saved by the reference, written to one file in the original layout by
the converter, and loaded back with the reference's own ``from_single_file``: every weight must equal
the folder's (the reference from ``from_pretrained``) and the images must agree within 2/255. Then the
full-size layouts (meta device): the names and shapes of the published checkpoints.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

from sdxl_factory import TOL, an_image, assert_close
from single_file_factory import (
    KINDS,
    PIPELINES,
    TEXT_ENCODERS,
    config_folder,
    full_size_components,
    original_layout_full_size,
    save_reference_kind,
    to_original_state_dict,
    write_single_file,
)

SIZE = dict(height=32, width=32)
PUBLISHED_EXTRAS = dict(position_ids=True, logit_scale=True)


def a_mask(h=32, w=32):
    m = np.zeros((h, w), dtype=np.uint8)
    m[6:24, 8:28] = 255
    return PIL.Image.fromarray(m)


def call_args(kind: str) -> dict:
    args = dict(prompt="a blue cat", num_inference_steps=2, output_type="np", **SIZE)
    if kind.endswith("inpaint"):
        args.update(image=an_image(32, 32), mask_image=a_mask())
    if kind == "sdxl-refiner":
        args.update(image=an_image(32, 32), strength=0.7, num_inference_steps=3, aesthetic_score=7.0)
    return args


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("single-file-factory")
    return {kind: save_reference_kind(kind, root / kind, seed=i) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def configs(folders, tmp_path_factory):
    """The folders without their weights: the reference's from_single_file gets only the file's."""
    root = tmp_path_factory.mktemp("single-file-configs")
    return {kind: config_folder(folder, root / kind) for kind, folder in folders.items()}


def load_reference(kind: str, folder, path=None, **kwargs):
    """The reference's pipeline from the folder (``path`` None) or from the single file, with
    ``folder`` (a weightless copy) as its config; nothing may come from the network."""
    import diffusers

    cls = getattr(diffusers, PIPELINES[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path is None:
            pipe = cls.from_pretrained(folder, **kwargs)
        else:
            assert not list(Path(folder).rglob("*.safetensors")), "the config folder holds weights"
            pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_weights(expected, got) -> int:
    """Every module component of the two pipelines holds the same tensors; the scheduler and pipeline
    configs agree. Returns the number of tensors compared."""
    assert set(got.components) == set(expected.components)
    compared = 0
    for name, module in expected.components.items():
        other = got.components[name]
        assert (module is None) == (other is None), name
        if isinstance(module, torch.nn.Module):
            want, have = module.state_dict(), other.state_dict()
            assert set(have) == set(want), f"{name}: {sorted(set(have) ^ set(want))[:10]}"
            unequal = [k for k in want if not torch.equal(want[k], have[k])]
            assert not unequal, f"{name}: {len(unequal)} tensors differ, e.g. {unequal[:5]}"
            compared += len(want)
        elif hasattr(module, "config") and name == "scheduler":
            assert dict(other.config) == dict(module.config)
    assert {k: v for k, v in got.config.items() if not k.startswith("_")} == {
        k: v for k, v in expected.config.items() if not k.startswith("_")
    }
    return compared


def run(pipe, kind: str, seed: int = 0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(generator=torch.Generator().manual_seed(seed), **call_args(kind)).images


# ---------------------------------------------------------------------------------------- tiny, judged by the reference
@pytest.mark.parametrize("kind", KINDS)
def test_reference_loads_the_file_like_the_folder(folders, configs, tmp_path, hub, kind):
    folder = folders[kind]
    path = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind)
    expected = load_reference(kind, folder)
    got = load_reference(kind, configs[kind], path)
    assert hub.requests == [], "from_single_file went to the network"
    assert assert_same_weights(expected, got) > 100
    if kind == "sd2":
        assert got.scheduler.config.prediction_type == "v_prediction"
        assert got.unet.config.use_linear_projection is True
        assert got.text_encoder.config.hidden_act == "gelu"
    if kind == "sdxl-refiner":
        assert got.text_encoder is None and got.config.requires_aesthetics_score is True
    if kind.endswith("inpaint"):
        assert got.unet.config.in_channels == 9
    want = run(expected, kind)
    assert want.shape == (1, 32, 32, 3)
    assert_close(want, run(got, kind), TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_loads_the_published_extras(folders, configs, tmp_path, kind):
    """The optional keys published files carry (CLIP-L's position_ids, OpenCLIP's logit_scale, SD2's
    unused 24th-of-24 resblock -- here one after the encoder's last) are accepted and ignored."""
    folder = folders[kind]
    path = write_single_file(folder, tmp_path / f"{kind}.safetensors", kind, **PUBLISHED_EXTRAS)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith("embeddings.position_ids") for k in keys) == (kind not in ("sd2", "sdxl-refiner"))
    assert any(k.endswith("model.logit_scale") for k in keys) == (kind not in ("sd1", "sd1-inpaint"))
    assert_same_weights(load_reference(kind, folder), load_reference(kind, configs[kind], path))


@pytest.mark.parametrize("kind", ["sd2"])
def test_sd2_tower_without_the_unused_resblock(folders, configs, tmp_path, kind):
    """SD2's pipeline runs 23 of OpenCLIP's 24 resblocks; a file with only those also loads."""
    folder = folders[kind]
    path = write_single_file(folder, tmp_path / "sd2.safetensors", kind, open_clip_extra_layers=0)
    n = load_reference(kind, folder).text_encoder.config.num_hidden_layers
    with safe_open(str(path), "pt") as f:
        assert not any(k.startswith(f"cond_stage_model.model.transformer.resblocks.{n}.") for k in f.keys())
    assert_same_weights(load_reference(kind, folder), load_reference(kind, configs[kind], path))


@pytest.mark.parametrize(
    "kind, name",
    [
        ("sd2", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),
        ("sdxl", "model.diffusion_model.label_emb.0.0.weight"),
        ("sd1", "first_stage_model.decoder.up.0.block.0.conv1.weight"),
    ],
)
def test_a_wrong_weight_is_caught(folders, configs, tmp_path, kind, name):
    """The judge has teeth: one tensor of the file changed (q and k swapped in a merged in_proj; a
    sign flipped) and the reference's weights no longer match the folder's."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in to_original_state_dict(folders[kind], kind).items()}
    value = state[name]
    if "in_proj" in name:
        q, k, v = value.chunk(3)
        state[name] = torch.cat([k, q, v])
    else:
        state[name] = -value
    path = tmp_path / "wrong.safetensors"
    save_file(state, str(path))
    with pytest.raises(AssertionError, match="tensors differ"):
        assert_same_weights(load_reference(kind, folders[kind]), load_reference(kind, configs[kind], path))


def test_half_precision_file(folders, configs, tmp_path):
    """``dtype=torch.float16``: every floating tensor is stored in half; the reference loads it with
    the folder's weights rounded to half."""
    folder = folders["sdxl"]
    path = write_single_file(folder, tmp_path / "xl16.safetensors", "sdxl", dtype=torch.float16)
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    expected = load_reference("sdxl", folder)
    for module in (expected.unet, expected.vae, expected.text_encoder, expected.text_encoder_2):
        module.to(torch.float16)
    got = load_reference("sdxl", configs["sdxl"], path, torch_dtype=torch.float16)
    assert_same_weights(expected, got)


def test_converter_sources_agree(folders):
    """A folder, a loaded pipeline and a mapping of its modules convert alike, one name per weight."""
    folder = folders["sdxl"]
    from_folder = to_original_state_dict(folder, "sdxl")
    pipe = load_reference("sdxl", folder)
    for source in (pipe, {k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")}):
        other = to_original_state_dict(source, "sdxl")
        assert set(other) == set(from_folder)
        assert all(torch.equal(other[k], from_folder[k]) for k in other)
    n_weights = sum(len(getattr(pipe, k).state_dict()) for k in ("unet", "vae", "text_encoder", "text_encoder_2"))
    # bigG's q / k / v weights and biases merge (3 -> 1 twice per layer); nothing else is lost or added
    n_layers = pipe.text_encoder_2.config.num_hidden_layers
    assert len(from_folder) == n_weights - 4 * n_layers
    assert from_folder["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


# ---------------------------------------------------------------------------------------- full size (meta)
PREFIXES = {
    "sd1": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
    "sd2": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."),
    "sdxl": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.1.model.",
    ),
    "sdxl-refiner": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.model."),
}
PREFIXES["sd1-inpaint"] = PREFIXES["sd1"]
PREFIXES["sdxl-inpaint"] = PREFIXES["sdxl"]

U, V = "model.diffusion_model.", "first_stage_model."
KNOWN = {
    "sd1": {
        U + "input_blocks.0.0.weight": (320, 4, 3, 3),
        U + "time_embed.0.weight": (1280, 320),
        U + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        U + "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        U + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        U + "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        U + "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
        U + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        U + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        U + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        U + "out.2.weight": (4, 320, 3, 3),
        V + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        V + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        V + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        V + "quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    },
    "sd1-inpaint": {U + "input_blocks.0.0.weight": (320, 9, 3, 3)},
    "sd2": {
        U + "input_blocks.0.0.weight": (320, 4, 3, 3),
        U + "input_blocks.1.1.proj_in.weight": (320, 320),
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_bias": (3072,),
        "cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.ln_final.weight": (1024,),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
    },
    "sdxl": {
        U + "input_blocks.0.0.weight": (320, 4, 3, 3),
        U + "label_emb.0.0.weight": (1280, 2816),
        U + "label_emb.0.2.weight": (1280, 1280),
        U + "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        U + "middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        U + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        U + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    },
    "sdxl-refiner": {
        U + "input_blocks.0.0.weight": (384, 4, 3, 3),
        U + "label_emb.0.0.weight": (1536, 2560),
        U + "input_blocks.4.1.transformer_blocks.3.attn2.to_k.weight": (768, 1280),
        U + "middle_block.1.transformer_blocks.3.attn1.to_q.weight": (1536, 1536),
        "conditioner.embedders.0.model.transformer.resblocks.31.mlp.c_proj.weight": (1280, 5120),
        "conditioner.embedders.0.model.text_projection": (1280, 1280),
    },
    "sdxl-inpaint": {
        U + "input_blocks.0.0.weight": (320, 9, 3, 3),
        U + "label_emb.0.0.weight": (1280, 2816),
    },
}
ABSENT = {
    "sd1": (U + "label_emb.0.0.weight", U + "output_blocks.2.2.conv.weight", "cond_stage_model.model."),
    "sd2": ("cond_stage_model.model.transformer.resblocks.24.", "cond_stage_model.transformer."),
    "sdxl": (
        "conditioner.embedders.1.model.transformer.resblocks.32.",
        "cond_stage_model.",
        "conditioner.embedders.2.",
    ),
    "sdxl-refiner": ("conditioner.embedders.1.", "conditioner.embedders.0.transformer."),
}
# (UNet, VAE, text) tensor counts of the published files
COUNTS = {
    "sd1": (686, 248, 197),
    "sd1-inpaint": (686, 248, 197),
    "sd2": (686, 248, 24 * 12 + 6),
    "sdxl": (1680, 248, 196 + 32 * 12 + 6),
    "sdxl-refiner": (1220, 248, 32 * 12 + 6),
    "sdxl-inpaint": (1680, 248, 196 + 32 * 12 + 6),
}


@pytest.mark.parametrize("kind", KINDS)
def test_full_size_layout(kind):
    layout = original_layout_full_size(kind)
    assert layout and all(isinstance(s, tuple) for s in layout.values())
    for prefix in PREFIXES[kind]:
        assert any(k.startswith(prefix) for k in layout), prefix
    assert all(k.startswith(PREFIXES[kind]) for k in layout)
    wrong = {k: (layout.get(k), shape) for k, shape in KNOWN[kind].items() if layout.get(k) != shape}
    assert not wrong, wrong
    for name in ABSENT.get(kind, ()):
        assert not any(k.startswith(name) for k in layout), name
    unet = sum(k.startswith(U) for k in layout)
    vae = sum(k.startswith(V) for k in layout)
    assert (unet, vae, len(layout) - unet - vae) == COUNTS[kind]


def test_full_size_layout_options():
    plain = original_layout_full_size("sdxl", position_ids=False, logit_scale=False)
    full = original_layout_full_size("sdxl", position_ids=True, logit_scale=True)
    assert set(full) - set(plain) == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
    }
    with pytest.raises(ValueError, match="unknown kind"):
        original_layout_full_size("sd3")


DETECTED = {  # what the reference's own detector calls each published layout
    "sd1": "v1",
    "sd1-inpaint": "inpainting",
    "sd2": "v2",
    "sdxl": "xl_base",
    "sdxl-refiner": "xl_refiner",
    "sdxl-inpaint": "xl_inpaint",
}


def _shapes(state: dict) -> dict:
    """name -> shape, transformers' ``text_model.`` prefix dropped, CLIP's position_ids buffer left out."""
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in state.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reads_the_full_size_layout(kind):
    """The reference's single-file machinery, run on the full-size layout (meta tensors, no data):
    its detector names the published model, and its own converters turn the layout back into exactly
    the names and shapes of the full-size diffusers / transformers modules."""
    from diffusers.loaders import single_file_utils as ref

    checkpoint = {k: torch.empty(s, device="meta") for k, s in original_layout_full_size(kind).items()}
    assert ref.infer_diffusers_model_type(checkpoint) == DETECTED[kind]
    modules = full_size_components(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = {
            "unet": ref.convert_ldm_unet_checkpoint(dict(checkpoint), modules["unet"].config),
            "vae": ref.convert_ldm_vae_checkpoint(dict(checkpoint), modules["vae"].config),
        }
        for name, (prefix, style) in TEXT_ENCODERS[kind].items():
            if style == "clip":
                converted[name] = ref.convert_ldm_clip_checkpoint(
                    dict(checkpoint), remove_prefix=prefix + "transformer."
                )
            else:
                converted[name] = ref.convert_open_clip_checkpoint(
                    modules[name], dict(checkpoint), prefix=prefix + "model."
                )
    for name, module in modules.items():
        want, got = _shapes(module.state_dict()), _shapes(converted[name])
        assert got == want, (
            f"{name}: {sorted(set(got) ^ set(want))[:6]} / {[k for k in want if got.get(k) != want[k]][:6]}"
        )
