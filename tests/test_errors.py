"""Our exceptions are instances of the built-in types the reference raises in the same situation, so
``except ValueError:`` / ``except OSError:`` written against the reference keeps working."""

from __future__ import annotations

import builtins
import warnings

import pytest
import torch

import diffpipe
from diffpipe.errors import DiffpipeError
from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("errors") / "sd", safety_checker=False, seed=3)


CASES = {
    "a folder that does not exist": lambda lib, f: lib.StableDiffusionPipeline.from_pretrained(
        str(f.parent / "nope")
    ),  # a Path crashes the reference
    "a variant no component has": lambda lib, f: lib.StableDiffusionPipeline.from_pretrained(f, variant="fp16"),
    "a model subfolder that does not exist": lambda lib, f: lib.UNet2DConditionModel.from_pretrained(
        f, subfolder="nope"
    ),
    "a model variant that does not exist": lambda lib, f: lib.UNet2DConditionModel.from_pretrained(
        f, subfolder="unet", variant="fp16"
    ),
    "prompt and prompt_embeds together": lambda lib, f: lib.StableDiffusionPipeline.from_pretrained(f)(
        prompt="a", prompt_embeds=torch.zeros(1, 77, 32), num_inference_steps=1
    ),
    "more steps than training timesteps": lambda lib, f: lib.DDIMScheduler().set_timesteps(2000),
}


def builtin_bases(error: BaseException) -> set[type]:
    return {
        c for c in type(error).__mro__ if c.__module__ == "builtins" and c not in (object, BaseException, Exception)
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reference_s_exception_types_catch_ours(folder, case, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception) as expected, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        CASES[case](diffusers, folder)
    with pytest.raises(Exception) as got:
        CASES[case](diffpipe, folder)
    wanted = builtin_bases(expected.value)
    assert wanted, f"the reference raised {type(expected.value).__name__}"
    # the most specific built-in the reference raised (OSError, ValueError, ...) catches ours
    most_specific = min(wanted, key=lambda c: len(c.__mro__) * -1)
    assert isinstance(got.value, most_specific), (case, type(got.value).__mro__, most_specific)
    assert isinstance(got.value, (DiffpipeError, ValueError))


def test_every_error_class_keeps_the_message_and_is_a_builtin_too():
    for name in dir(diffpipe.errors):
        cls = getattr(diffpipe.errors, name)
        if isinstance(cls, type) and issubclass(cls, DiffpipeError) and cls is not DiffpipeError:
            assert any(issubclass(cls, getattr(builtins, b)) for b in ("ValueError", "OSError"))
            assert str(cls("what went wrong")) == "what went wrong"
