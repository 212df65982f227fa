"""docs/guide.md: every python block runs, in order, against tiny models on the local Hub server."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import torch

from diffpipe import DiffusionPipeline
from flux_factory import save_reference_flux
from sd_factory import save_reference_pipeline

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.S)


def test_every_guide_block_runs(hub, hf_cache, tmp_path, monkeypatch):
    folder = save_reference_pipeline(tmp_path / "repo")
    DiffusionPipeline.from_pretrained(folder).to(torch.float16).save_pretrained(folder, variant="fp16")
    hub.add_repo(REPO, folder)
    hub.add_repo("black-forest-labs/FLUX.1-schnell", save_reference_flux(tmp_path / "flux", dev=False))
    monkeypatch.chdir(tmp_path)
    code = blocks()
    assert len(code) >= 10
    namespace: dict = {}
    outputs = []  # what each block printed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(code):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"{GUIDE.name} block {i + 1}", "exec"), namespace)
            outputs.append(out.getvalue())
    printed = "".join(outputs)

    def printed_by(snippet: str) -> list[str]:
        """The lines printed by the block whose source contains ``snippet``."""
        (index,) = [i for i, block in enumerate(code) if snippet in block]
        return outputs[index].splitlines()

    assert "StableDiffusionPipeline\n" in printed
    assert "StableDiffusionPipeline ['diffusers', 'UNet2DConditionModel'] ['transformers', 'CLIPTokenizer']" in printed
    assert "torch.float16 torch.float32" in printed
    assert "needs variant=: True" in printed
    assert "StableDiffusionInpaintPipeline" in printed and "None\n" in printed
    # from_pipe shares every component: the two pipelines together take no more memory than one
    assert printed_by('memory_footprint(pipe_sd)["total"] ==') == ["True"]
    # the fp32-to-fp16 estimate reports the bytes it would hold in float16
    assert printed_by('report["as_dtype"]["float16"] > 0')[-1] == "True"
    # a single file written from the repo loads back with the configs and tokenizers of config=
    assert printed_by("save_single_file")[-1] == "sd1 torch.float16"
    assert printed_by("AutoencoderKL.from_single_file")[-1] == "AutoencoderKL"
    # ControlNet from_pipe shares the UNet; the output takes the conditioning image's size
    assert printed_by("StableDiffusionControlNetPipeline.from_pipe")[-1] == "True (64, 64)"
    # a two-vector embedding expands in the prompt
    assert printed_by("load_textual_inversion")[-1] == "a <cat-toy> <cat-toy>_1"
    # a hand-written kohya LoRA loads (its foreign key only warned about), saves and hot-swaps
    assert printed_by("lora_state_dict")[-1] == "['style'] {'unet': ['style']}"
    # Flux from the (test) Hub in bf16; img2img shares its components
    assert printed_by("FluxImg2ImgPipeline.from_pipe")[-1] == "FluxImg2ImgPipeline (64, 64) True"
    # a served image carries its settings; the OpenAI client talks to diffpipe serve
    assert printed_by("client.images.generate")[-1] == "(64, 64) Seed: 7"
    # a batch writes one PNG per row, and its rerun writes nothing; Ray Data runs the same rows
    batch = printed_by("run_batch(")
    assert [line for line in batch if line.endswith(" failed")] == [
        "2 written, 0 skipped, 0 failed",
        "0 written, 2 skipped, 0 failed",
    ]
    assert batch[-1] == "['cat.png', 'dog.png']"
    assert printed_by("PipelineRunner")[-1] == "['written', 'written']"
    # bf16 with the tiny VAE and DeepCache
    assert printed_by("enable_deepcache")[-1] == "AutoencoderTiny torch.bfloat16 (64, 64)"
