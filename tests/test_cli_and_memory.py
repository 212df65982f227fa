"""The diffpipe command and the memory figures: footprint, shared counting, estimate before download."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys

import PIL.Image
import pytest
import torch

from diffpipe import DiffusionPipeline, StableDiffusionImg2ImgPipeline
from diffpipe.cli import main
from diffpipe.estimate import estimate
from diffpipe.pipelines.pipeline import memory_footprint
from sd_factory import save_reference_pipeline

_ids = itertools.count()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    path = save_reference_pipeline(root / "sd", safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.to(torch.float16).save_pretrained(path, variant="fp16")
    return path


def state_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# ------------------------------------------------------------------------------------ memory
def test_footprint_per_component_and_dtype(folder):
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype={"unet": torch.bfloat16, "default": torch.float32})
    fp = pipe.memory_footprint()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    assert fp["components"]["unet"]["bytes"] == unet_params * 2
    assert fp["components"]["unet"]["dtypes"] == {"bfloat16": unet_params * 2}
    assert fp["components"]["vae"]["dtypes"].keys() == {"float32"}
    assert fp["total"] == sum(c["bytes"] for c in fp["components"].values())
    assert "tokenizer" not in fp["components"] and "scheduler" not in fp["components"]


def test_shared_components_are_counted_once(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert memory_footprint(pipe, other)["total"] == pipe.memory_footprint()["total"]
    separate = DiffusionPipeline.from_pretrained(folder)
    assert memory_footprint(pipe, separate)["total"] == 2 * pipe.memory_footprint()["total"]


@pytest.mark.parametrize("variant, dtype", [(None, torch.float32), ("fp16", torch.float16)])
def test_estimate_equals_the_loaded_bytes(folder, variant, dtype):
    result = estimate(folder, variant=variant)
    pipe = DiffusionPipeline.from_pretrained(folder, variant=variant, torch_dtype=dtype)
    for name in ("unet", "vae", "text_encoder"):
        assert result["components"][name]["bytes"] == state_bytes(getattr(pipe, name)), name
    name = str(dtype).removeprefix("torch.")
    assert result["as_dtype"][name] == sum(state_bytes(getattr(pipe, n)) for n in ("unet", "vae", "text_encoder"))


def test_estimate_from_the_hub_downloads_no_weights(hub, folder, hf_cache):
    repo = f"test-org/estimate-{next(_ids)}"
    hub.add_repo(repo, folder)
    result = estimate(repo, variant="fp16")
    local = estimate(folder, variant="fp16")
    assert result["components"] == local["components"] and result["total"] == local["total"]
    assert hub.downloads() == ["model_index.json"]
    assert hub.range_reads(repo)  # headers came by range requests
    assert all(f.endswith(".safetensors") for f, _ in hub.range_reads(repo))


# ------------------------------------------------------------------------------------ CLI
def test_cli_generate_text_and_image_to_image(folder, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert (
        main(
            [
                "generate",
                "a red cat",
                "--model",
                str(folder),
                "--steps",
                "2",
                "--size",
                "32",
                "--seed",
                "3",
                "--output",
                str(out),
                "--scheduler",
                "DDIMScheduler",
            ]
        )
        == 0
    )
    assert PIL.Image.open(out).size == (32, 32)
    out2 = tmp_path / "b.png"
    assert (
        main(
            [
                "--quiet",
                "generate",
                "a blue dog",
                "--model",
                str(folder),
                "--image",
                str(out),
                "--strength",
                "0.5",
                "--steps",
                "4",
                "--output",
                str(out2),
            ]
        )
        == 0
    )
    assert PIL.Image.open(out2).size == (32, 32)
    text = capsys.readouterr().out
    assert "wrote" in text and str(out) in text


def test_cli_generate_same_seed_same_image(folder, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for p in paths:
        assert (
            main(
                [
                    "--quiet",
                    "generate",
                    "a cat",
                    "--model",
                    str(folder),
                    "--steps",
                    "2",
                    "--size",
                    "32",
                    "--output",
                    str(p),
                ]
            )
            == 0
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_cli_inspect_estimate_convert(folder, tmp_path, capsys):
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "StableDiffusionPipeline" in text and "UNet2DConditionModel" in text and "variants present: fp16" in text
    assert main(["estimate", str(folder), "--variant", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "if loaded as float32" in text and "nothing downloaded" in text
    target = tmp_path / "converted"
    shutil.copytree(folder, target)
    assert main(["--quiet", "convert", str(target), str(target), "--variant", "bf16", "--dtype", "bf16"]) == 0
    loaded = DiffusionPipeline.from_pretrained(target, variant="bf16", torch_dtype="auto")
    assert loaded.unet.dtype == torch.bfloat16


def test_cli_errors_are_one_line_and_non_zero(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffpipe inspect: error:") and "\n" not in err and "Traceback" not in err
    assert main(["generate", "x", "--model", str(tmp_path), "--dtype", "int3"]) == 1
    assert "--dtype must be one of" in capsys.readouterr().err


def test_cli_is_installed_as_a_console_script(tmp_path):
    exe = shutil.which("diffpipe", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "generate" in proc.stdout and "estimate" in proc.stdout


def test_cli_demo_runs_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--output", str(tmp_path / "demo"), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "from_pipe" in text and "memory:" in text
    assert (tmp_path / "demo" / "text2image.png").is_file() and (tmp_path / "demo" / "image2image.png").is_file()
    assert (tmp_path / "demo" / "demo-checkpoint" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
