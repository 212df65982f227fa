"""Textual inversion against the reference, on tiny SD and SDXL pipelines with embeddings of random
vectors written here in each format: diffusers ``{token: tensor}`` (.bin / .safetensors), A1111 ``.pt``
(``string_to_param``) and ``.safetensors`` (``emb_params``), and SDXL ``clip_l`` + ``clip_g`` pairs.

Images (output_type="np") must be within 2/255 of the reference's; token ids, the prompt expansion and
the tokenizer after unloading must equal the reference's. diffpipe keeps the text encoder's embedding
matrix as it is (the new rows live in a hidden side table), so its state_dict must not change.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffpipe.adapters.textual_inversion import BANK
from diffpipe.errors import CheckpointNotFoundError, UnsafeCheckpointError
from sd_factory import save_reference_pipeline
from sdxl_factory import assert_close, load_both, run_both, save_reference_sdxl

ARGS = dict(num_inference_steps=2, height=32, width=32)
WIDTH, WIDTH_1, WIDTH_2 = 32, 32, 40  # the tiny text encoders' widths (sd_factory, sdxl_factory)


class Opaque:
    """An object a weights_only pickle load refuses (its class is code)."""


def vectors(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("ti") / "sd", safety_checker=False, seed=5)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return save_reference_sdxl(tmp_path_factory.mktemp("ti") / "xl")


@pytest.fixture
def sd(sd_folder):
    import transformers

    transformers.logging.set_verbosity_error()
    return load_both(sd_folder, "StableDiffusionPipeline")


@pytest.fixture
def xl(xl_folder):
    return load_both(xl_folder, "StableDiffusionXLPipeline")


def both(pipes, *args, **kwargs):
    for pipe in pipes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.load_textual_inversion(*args, **kwargs)


def ids(pipe, prompt, tokenizer=None):
    tokenizer = tokenizer or pipe.tokenizer
    return tokenizer(pipe.maybe_convert_prompt(prompt, tokenizer)).input_ids


def compare(ref, ours, prompt, baseline=None, **kwargs):
    """Images within 2/255 of the reference's; with ``baseline``, also visibly changed from it."""
    expected, got = run_both(ref, ours, prompt=prompt, **ARGS, **kwargs)
    assert_close(expected, got)
    if baseline is not None:
        assert np.abs(expected - baseline).max() > 0.01, "the embedding did not change the image"
    return expected


def backend_json(tokenizer):
    """The tokenizer's backend as JSON, less the padding/truncation settings the last call left there."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    return {k: v for k, v in data.items() if k not in ("padding", "truncation")}


# ------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_diffusers_single_vector(sd, tmp_path, suffix):
    ref, ours = sd
    baseline = compare(ref, ours, "a <cat> on a mat", negative_prompt="<cat>")
    path = tmp_path / f"learned_embeds{suffix}"
    state = {"<cat>": vectors(WIDTH)}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    both(sd, path)
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder
    assert ids(ours, "a <cat> on a mat") == ids(ref, "a <cat> on a mat")
    compare(ref, ours, "a <cat> on a mat", baseline, negative_prompt="<cat>")


def test_a1111_pt_multi_vector(sd, tmp_path):
    ref, ours = sd
    baseline = compare(ref, ours, ["a <dog>s", "<dog> and dog"])
    torch.save(
        {
            "string_to_param": {"*": vectors(3, WIDTH, seed=1)},
            "name": "dog",
            "step": 500,
            "string_to_token": {"*": 265},
        },
        tmp_path / "dog.pt",
    )
    both(sd, tmp_path / "dog.pt", token="<dog>")
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder
    for prompt in ["a <dog>s", "<dog> and dog", "x<dog>y <dog>_1", "<DOG> <dog>", ["<dog>", "b"]]:
        assert ours.maybe_convert_prompt(prompt, ours.tokenizer) == ref.maybe_convert_prompt(prompt, ref.tokenizer)
        assert ids(ours, prompt) == ids(ref, prompt)
    compare(ref, ours, ["a <dog>s", "<dog> and dog"], baseline)


def test_a1111_pt_token_from_name(sd, tmp_path):
    ref, ours = sd
    torch.save({"string_to_param": {"*": vectors(2, WIDTH, seed=2)}, "name": "puppy"}, tmp_path / "p.pt")
    both(sd, tmp_path / "p.pt")
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder
    compare(ref, ours, "a puppy")


def test_a1111_safetensors_emb_params(sd, tmp_path):
    ref, ours = sd
    baseline = compare(ref, ours, "a <style> painting")
    save_file({"emb_params": vectors(2, WIDTH, seed=3)}, tmp_path / "style.safetensors")
    both(sd, tmp_path / "style.safetensors", token="<style>")
    assert ids(ours, "a <style> painting") == ids(ref, "a <style> painting")
    compare(ref, ours, "a <style> painting", baseline)
    both(sd, tmp_path / "style.safetensors")  # no token: the reference names it after the key
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder


def test_lists_dicts_tensors_and_folders(sd, tmp_path):
    ref, ours = sd
    folder = tmp_path / "repo" / "embeds"
    folder.mkdir(parents=True)
    save_file({"<a>": vectors(WIDTH, seed=4)}, folder / "learned_embeds.safetensors")
    torch.save({"string_to_param": {"*": vectors(2, WIDTH, seed=5)}, "name": "b"}, tmp_path / "b.pt")
    both(sd, [tmp_path / "b.pt", {"<c>": vectors(1, WIDTH, seed=6)}], token=["<b>", None])
    both(sd, str(tmp_path / "repo"), subfolder="embeds")
    both(sd, vectors(2, WIDTH, seed=7), token="<d>")
    torch.save({"<e>": vectors(WIDTH, seed=8)}, tmp_path / "repo" / "other.bin")
    both(sd, tmp_path / "repo", weight_name="other.bin")
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder
    prompt = "<a> <b> <c> <d> <e>"
    assert ids(ours, prompt) == ids(ref, prompt)
    compare(ref, ours, prompt)


def test_sdxl_pair(xl, tmp_path):
    ref, ours = xl
    prompt = "a <s> cat"
    baseline = compare(ref, ours, prompt, negative_prompt="<s> ugly")
    pair = {"clip_l": vectors(2, WIDTH_1, seed=9), "clip_g": vectors(2, WIDTH_2, seed=10)}
    save_file(pair, tmp_path / "s.safetensors")
    for pipe in xl:  # the reference's way: each half into its encoder, as tensors
        pipe.load_textual_inversion(
            pair["clip_g"], token="<s>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        pipe.load_textual_inversion(
            pair["clip_l"], token="<s>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
    for name in ("tokenizer", "tokenizer_2"):
        assert ids(ours, prompt, getattr(ours, name)) == ids(ref, prompt, getattr(ref, name))
    expected = compare(ref, ours, prompt, baseline, negative_prompt="<s> ugly")

    # the file itself, per encoder (the reference refuses the file; diffpipe picks the encoder's half)
    with pytest.raises(ValueError):
        ref.load_textual_inversion(tmp_path / "s.safetensors", token="<t>")
    for tokenizer, encoder in ((ours.tokenizer, ours.text_encoder), (ours.tokenizer_2, ours.text_encoder_2)):
        ours.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
    path = tmp_path / "s.safetensors"
    ours.load_textual_inversion(path, token="<s>", tokenizer=ours.tokenizer_2, text_encoder=ours.text_encoder_2)
    ours.load_textual_inversion(path, token="<s>", tokenizer=ours.tokenizer, text_encoder=ours.text_encoder)
    got = run_both(ref, ours, prompt=prompt, negative_prompt="<s> ugly", **ARGS)[1]
    assert_close(expected, got)
    # and without tokenizer=/text_encoder=: both halves at once
    for tokenizer, encoder in ((ours.tokenizer, ours.text_encoder), (ours.tokenizer_2, ours.text_encoder_2)):
        ours.unload_textual_inversion(tokenizer=tokenizer, text_encoder=encoder)
    ours.load_textual_inversion(path, token="<s>")
    assert_close(expected, run_both(ref, ours, prompt=prompt, negative_prompt="<s> ugly", **ARGS)[1])


def test_sdxl_second_encoder_only_and_state_dicts(xl):
    ref, ours = xl
    before = {k: v.clone() for k, v in ours.text_encoder_2.state_dict().items()}
    for pipe in xl:
        pipe.load_textual_inversion(
            {"<g>": vectors(3, WIDTH_2, seed=11)}, tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2
        )
    assert ids(ours, "<g> x", ours.tokenizer_2) == ids(ref, "<g> x", ref.tokenizer_2)
    compare(ref, ours, "a <g> x")
    after = ours.text_encoder_2.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# ------------------------------------------------------------------------------------- the text encoder
def test_state_dict_unchanged_and_rows(sd, tmp_path):
    ref, ours = sd
    encoder = ours.text_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    params = sum(p.numel() for p in encoder.parameters())
    both(sd, {"<r>": vectors(4, WIDTH, seed=12)})
    after = encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in encoder.parameters()) == params
    assert (
        encoder.get_input_embeddings().weight.shape == before[next(k for k in before if "token_embedding" in k)].shape
    )
    new = torch.tensor([ref.tokenizer.convert_tokens_to_ids(["<r>", "<r>_1", "<r>_2", "<r>_3"]) + [5, 300]])
    torch.testing.assert_close(encoder.get_input_embeddings()(new), ref.text_encoder.get_input_embeddings()(new))
    encoder.save_pretrained(tmp_path / "te")  # saves the base model only
    from safetensors.torch import load_file

    saved = load_file(next((tmp_path / "te").glob("*.safetensors")))
    assert not any(BANK in k for k in saved) and all(torch.equal(saved[k], before[k]) for k in saved)


# ------------------------------------------------------------------------------------- unloading
def test_unload(sd, tmp_path):
    ref, ours = sd
    original = backend_json(ours.tokenizer)
    length = len(ours.tokenizer)
    prompt = "a <x> and <y>"
    baseline = compare(ref, ours, prompt)
    both(sd, [{"<x>": vectors(3, WIDTH, seed=13)}, {"<y>": vectors(WIDTH, seed=14)}])
    compare(ref, ours, prompt, baseline)
    for pipe in sd:  # one token: the later ones move down, as in the reference
        pipe.unload_textual_inversion("<x>")
    assert ours.tokenizer.added_tokens_encoder == ref.tokenizer.added_tokens_encoder
    assert ids(ours, prompt) == ids(ref, prompt)
    compare(ref, ours, prompt)
    for pipe in sd:
        pipe.unload_textual_inversion()
    assert len(ours.tokenizer) == len(ref.tokenizer) == length
    assert backend_json(ours.tokenizer) == original
    assert BANK not in dict(ours.text_encoder.named_children())
    np.testing.assert_allclose(compare(ref, ours, prompt), baseline, atol=1e-6)
    both(sd, {"<x>": vectors(WIDTH, seed=15)})  # loads again after unloading
    compare(ref, ours, prompt)


# ------------------------------------------------------------------------------------- errors
def test_errors(sd, tmp_path):
    ref, ours = sd
    ours.load_textual_inversion({"<cat>": vectors(WIDTH)})
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ours.load_textual_inversion({"<cat>": vectors(WIDTH)})
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ours.load_textual_inversion({"a": vectors(WIDTH)})
    with pytest.raises(ValueError, match="already in the tokenizer"):
        ours.load_textual_inversion({"<cat>": vectors(WIDTH)}, token="<|endoftext|>")
    torch.save({"<w>": vectors(48)}, tmp_path / "wide.bin")
    with pytest.raises(ValueError, match=r"\(48,\).*width 32") as info:
        ours.load_textual_inversion(tmp_path / "wide.bin")
    assert "wide.bin" in str(info.value)
    with pytest.raises(CheckpointNotFoundError, match="no file"):
        ours.load_textual_inversion(tmp_path / "missing.bin")
    with pytest.raises(CheckpointNotFoundError, match="learned_embeds"):
        ours.load_textual_inversion(tmp_path)
    save_file({"foo": vectors(WIDTH), "bar": vectors(WIDTH)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        ours.load_textual_inversion(tmp_path / "two.safetensors")
    torch.save({"x": {"y": 1}}, tmp_path / "notemb.pt")
    with pytest.raises(ValueError, match="not a textual-inversion embedding"):
        ours.load_textual_inversion(tmp_path / "notemb.pt")
    torch.save({"string_to_param": {"*": vectors(1, WIDTH)}, "obj": Opaque()}, tmp_path / "code.pt")
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        ours.load_textual_inversion(tmp_path / "code.pt")
    with pytest.raises(ValueError, match="2 embedding"):
        ours.load_textual_inversion([{"<p>": vectors(WIDTH)}, {"<q>": vectors(WIDTH)}], token=["<p>"])
    with pytest.raises(ValueError, match="repeat"):
        ours.load_textual_inversion([{"<p>": vectors(WIDTH)}, {"<q>": vectors(WIDTH)}], token=["<p>", "<p>"])
    with pytest.raises(ValueError, match="token="):
        ours.load_textual_inversion(vectors(WIDTH))
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours.load_textual_inversion({"<z>": vectors(WIDTH)}, tokenz="<z>")
    with pytest.raises(ValueError, match="no tokens to remove"):
        ours.unload_textual_inversion("<nope>")
    with pytest.raises(ValueError, match="no tokens to remove"):
        ours.unload_textual_inversion("<|endoftext|>")
    # a failed load leaves nothing behind
    assert list(ours.tokenizer.added_tokens_encoder) == ["<|startoftext|>", "<|endoftext|>", "<cat>"]
    assert ours.text_encoder.get_submodule(BANK).ids.tolist() == [ours.tokenizer.convert_tokens_to_ids("<cat>")]
