"""AutoModel loads what a folder's config names, as the reference's does (models, transformers models,
schedulers), from a folder or the local Hub, and only from the allow-list."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import diffpipe
from diffpipe.errors import UnsupportedComponentError
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("auto") / "sd", safety_checker=False, seed=71)


@pytest.mark.parametrize("subfolder", ["unet", "vae", "text_encoder", "scheduler"])
def test_the_class_the_config_names(folder, subfolder):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = diffusers.AutoModel.from_pretrained(str(folder), subfolder=subfolder)
    got = diffpipe.AutoModel.from_pretrained(folder, subfolder=subfolder)
    assert type(got).__name__ == type(expected).__name__
    if isinstance(got, torch.nn.Module):
        theirs, ours = expected.state_dict(), got.state_dict()
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_keywords_reach_the_class_and_from_config(folder):
    unet = diffpipe.AutoModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.bfloat16)
    assert type(unet).__name__ == "UNet2DConditionModel" and unet.dtype == torch.bfloat16
    text = diffpipe.AutoModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.bfloat16)
    assert text.dtype == torch.bfloat16
    built = diffpipe.AutoModel.from_config(unet.config)
    assert type(built).__name__ == "UNet2DConditionModel"


def test_from_the_local_hub(hub, hf_cache, folder):
    hub.add_repo("owner/tiny-sd", folder)
    assert type(diffpipe.AutoModel.from_pretrained("owner/tiny-sd", subfolder="vae")).__name__ == "AutoencoderKL"


def test_refusals(folder, tmp_path):
    with pytest.raises(OSError, match="not instantiated"):
        diffpipe.AutoModel()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"_class_name": "os.system"}))
    with pytest.raises(UnsupportedComponentError, match="'os.system', which diffpipe does not implement"):
        diffpipe.AutoModel.from_pretrained(odd)
    (odd / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedComponentError, match="allow-list"):
        diffpipe.AutoModel.from_pretrained(odd)
    with pytest.raises(ValueError, match="no config.json or scheduler_config.json"):
        diffpipe.AutoModel.from_pretrained(folder)
