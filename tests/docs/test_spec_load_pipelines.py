"""The spec (../shared/seed/load-pipelines.md), call by call, with `diffusers` replaced by `diffpipe`.

The repos are tiny pipelines the reference wrote, served under the spec's repo ids by the local
Hub test server, so every call goes through huggingface_hub's download and cache.
"""

from __future__ import annotations

import io
import logging
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from sd_factory import reference_components, save_reference_pipeline

REPO = "runwayml/stable-diffusion-v1-5"
VAE_REPO = "madebyollin/sdxl-vae-fp16-fix"
IMAGES = "huggingface/documentation-images"


@pytest.fixture(scope="module")
def spec_repos(tmp_path_factory, _hub_endpoint):
    """The spec's SD 1.5 layout: safetensors and .bin, fp16 variants, a non_ema UNet."""
    import diffusers

    hub = _hub_endpoint
    root = tmp_path_factory.mktemp("spec")
    folder = save_reference_pipeline(root / "sd15")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
        pipe.save_pretrained(folder, safe_serialization=False)
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16", safe_serialization=False)
        non_ema = reference_components(seed=11, safety_checker=False, tmp=root)["unet"]
        non_ema.save_pretrained(folder / "unet", variant="non_ema")
        vae = reference_components(seed=12, safety_checker=False, tmp=root)["vae"]
        vae.save_pretrained(root / "vae-fix")
        vae.half().save_pretrained(root / "vae-fix", variant="fp16")
    hub.add_repo(REPO, folder)
    hub.add_repo(VAE_REPO, root / "vae-fix")
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    hub.add_repo(IMAGES, {"diffusers/img2img-init.png": buf.getvalue()})
    return {"folder": folder, "non_ema": non_ema, "vae": vae}


@pytest.fixture
def fresh_cache(hf_cache):
    return hf_cache


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weight_downloads(hub):
    return sorted(d for d in hub.downloads(REPO) if d.endswith((".safetensors", ".bin")))


def test_load_a_pipeline_with_the_generic_class(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline, StableDiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    assert type(pipeline) is StableDiffusionPipeline
    assert weight_downloads(hub) == [
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    # a second load comes from the cache
    hub.clear_log()
    DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    assert hub.downloads() == []


def test_the_same_checkpoint_for_image_to_image(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline
    from diffpipe.utils import load_image

    pipeline = quiet(DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True))
    init_image = load_image(f"{hub.endpoint}/{IMAGES}/resolve/main/diffusers/img2img-init.png")
    assert init_image.mode == "RGB" and init_image.size == (40, 48)
    prompt = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
    image = pipeline(
        prompt, image=init_image, num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert isinstance(image, PIL.Image.Image) and image.size == (40, 48)
    # it is the image-to-image task, as the task class computes it
    from diffpipe import StableDiffusionImg2ImgPipeline

    direct = quiet(StableDiffusionImg2ImgPipeline.from_pipe(pipeline))(
        prompt, image=init_image, num_inference_steps=4, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(direct))


def test_task_classes_load_the_same_checkpoint(hub, spec_repos, fresh_cache):
    from diffpipe import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    i2i = StableDiffusionImg2ImgPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    assert type(sd) is StableDiffusionPipeline and type(i2i) is StableDiffusionImg2ImgPipeline


def test_local_pipeline_downloads_nothing(hub, spec_repos, tmp_path, monkeypatch):
    import shutil

    from diffpipe import DiffusionPipeline

    shutil.copytree(spec_repos["folder"], tmp_path / "stable-diffusion-v1-5")  # the `git clone`
    monkeypatch.chdir(tmp_path)
    stable_diffusion = DiffusionPipeline.from_pretrained("./stable-diffusion-v1-5", use_safetensors=True)
    assert type(stable_diffusion).__name__ == "StableDiffusionPipeline"
    assert hub.requests == []


def test_customize_with_a_scheduler_and_a_vae(hub, spec_repos, fresh_cache):
    from diffpipe import AutoencoderKL, HeunDiscreteScheduler, StableDiffusionPipeline

    scheduler = HeunDiscreteScheduler.from_pretrained("runwayml/stable-diffusion-v1-5", subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(
        "madebyollin/sdxl-vae-fp16-fix", torch_dtype=torch.float16, use_safetensors=True
    )
    assert vae.dtype == torch.float16
    hub.clear_log()
    pipeline = StableDiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5",
        scheduler=scheduler,
        vae=vae,
        torch_dtype=torch.float16,
        variant="fp16",
        use_safetensors=True,
    )
    assert pipeline.scheduler is scheduler and pipeline.vae is vae
    assert pipeline.unet.dtype == torch.float16 and pipeline.text_encoder.dtype == torch.float16
    assert pipeline.config["scheduler"] == ["diffusers", "HeunDiscreteScheduler"]
    fetched = hub.downloads(REPO)
    assert not any(f.startswith(("vae/", "scheduler/")) for f in fetched)  # overridden: not fetched
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fetched
    assert not any(f.endswith(".bin") for f in fetched)


def test_wrong_typed_override_names_what_was_expected(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline

    with pytest.raises(TypeError, match="vae= must be a AutoencoderKL"):
        DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", vae="not a model")
    with pytest.raises(TypeError, match="scheduler= must be a PNDMScheduler"):
        DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", scheduler=torch.nn.Linear(1, 1))


def parameter_bytes(*pipelines) -> int:
    seen, total = set(), 0
    for pipe in pipelines:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for t in list(component.parameters()) + list(component.buffers()):
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
                    if key not in seen:
                        seen.add(key)
                        total += t.numel() * t.element_size()
    return total


def test_reuse_components_with_from_pipe(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline, StableDiffusionImg2ImgPipeline

    pipe_sd = DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", torch_dtype=torch.float16)
    one = parameter_bytes(pipe_sd)
    pipe_i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe_sd)
    assert all(pipe_i2i.components[k] is v for k, v in pipe_sd.components.items())
    assert parameter_bytes(pipe_sd, pipe_i2i) == one  # no extra memory
    assert pipe_i2i.unet.dtype == torch.float16  # the source's dtype is kept (no silent fp32 cast)
    # state is shared: a change made through one pipeline is seen by the other
    pipe_i2i.unet.set_attn_processor(pipe_i2i.unet.attn_processors)
    pipe_i2i.scheduler.register_to_config(marker=1)
    assert pipe_sd.scheduler.config.marker == 1


def test_safety_checker_none_warns(hub, spec_repos, fresh_cache, caplog):
    from diffpipe import DiffusionPipeline

    caplog.set_level(logging.WARNING)
    pipeline = DiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", safety_checker=None, use_safetensors=True
    )
    assert pipeline.safety_checker is None
    assert "You have disabled the safety checker" in caplog.text
    assert not any(f.startswith("safety_checker/") for f in hub.downloads(REPO))


def test_variants_fp16_and_non_ema(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", variant="fp16", torch_dtype=torch.float16, use_safetensors=True
    )
    assert {pipeline.unet.dtype, pipeline.vae.dtype, pipeline.text_encoder.dtype} == {torch.float16}
    assert all(".fp16." in f for f in weight_downloads(hub))
    hub.clear_log()
    pipeline = DiffusionPipeline.from_pretrained(
        "runwayml/stable-diffusion-v1-5", variant="non_ema", use_safetensors=True
    )
    assert weight_downloads(hub) == [  # the non_ema UNet; the others have no such variant
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    expected = spec_repos["non_ema"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in pipeline.unet.state_dict().items())
    # the other components have no non_ema file: they fall back, and the pipeline says so
    assert sorted(pipeline.loading_report.variant_fallbacks) == ["safety_checker", "text_encoder", "vae"]


def test_save_variants_into_the_same_folder_and_the_wont_work_pair(hub, spec_repos, fresh_cache, tmp_path):
    from diffpipe import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    target = tmp_path / "stable-diffusion-v1-5"
    pipeline.save_pretrained(target, variant="fp16")
    # (bad) this won't work: the folder holds only the fp16 variant
    with pytest.raises(Exception) as err:
        DiffusionPipeline.from_pretrained(str(target), torch_dtype=torch.float16, use_safetensors=True)
    assert "variant" in str(err.value)
    # (good) this works
    good = DiffusionPipeline.from_pretrained(
        str(target), variant="fp16", torch_dtype=torch.float16, use_safetensors=True
    )
    assert good.unet.dtype == torch.float16
    # saving the non_ema variant into the same folder keeps the fp16 one
    pipeline.save_pretrained(target, variant="non_ema")
    names = os.listdir(target / "unet")
    assert "diffusion_pytorch_model.fp16.safetensors" in names
    assert "diffusion_pytorch_model.non_ema.safetensors" in names


def test_print_pipeline_shows_class_and_components(hub, spec_repos, fresh_cache):
    from diffpipe import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5", use_safetensors=True)
    text = repr(pipeline)
    assert text.startswith("StableDiffusionPipeline {")
    for line in (
        '"scheduler": [\n    "diffusers",\n    "PNDMScheduler"\n  ]',
        '"unet": [\n    "diffusers",\n    "UNet2DConditionModel"\n  ]',
        '"safety_checker": [\n    "stable_diffusion",\n    "StableDiffusionSafetyChecker"\n  ]',
        '"text_encoder": [\n    "transformers",\n    "CLIPTextModel"\n  ]',
    ):
        assert line in text
    assert sorted(pipeline.components) == [
        "feature_extractor",
        "image_encoder",
        "safety_checker",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ]
    assert pipeline.tokenizer.model_max_length == 77
