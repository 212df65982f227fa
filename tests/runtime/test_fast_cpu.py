"""The fast CPU paths at tiny size: ``pipe.compile()`` (inductor, cached on disk; channels-last) against the
eager pipeline, bf16 against fp32 and against the reference's bf16, and ``diffpipe generate``'s speed flags
against the same calls through the API. (How fast they are is for benchmarks/, never asserted here.)"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import diffpipe
from factories import TINY_MODELS
from sd_factory import save_reference_pipeline

TOL = 2  # of 255
CALL = dict(prompt="a red fox", num_inference_steps=3, height=32, width=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("fast") / "sd", safety_checker=False, seed=5)


def load(folder, **kwargs):
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, seed=0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(**CALL, generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(out).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def psnr(a, b) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


SECOND_PROCESS = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from torch._dynamo.utils import counters
    import diffpipe
    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(sys.argv[1]).compile()
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt="a red fox", num_inference_steps=3, height=32, width=32, generator=generator)
    np.save(sys.argv[2], np.asarray(out.images[0]))
    print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
    """
)


def test_compiled_pipeline_equals_eager_and_a_second_process_uses_the_cache(folder, tmp_path, monkeypatch):
    cache = tmp_path / "inductor"
    monkeypatch.setenv("DIFFPIPE_COMPILE_CACHE", str(cache))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    pipe = load(folder)
    keys = list(pipe.unet.state_dict())
    eager = image(pipe)
    assert pipe.compile() is pipe
    compiled = image(pipe)
    assert max_diff(compiled, eager) <= TOL
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(pipe.unet.state_dict()) == keys  # in place: the checkpoint's names, unchanged
    # regional by default: the UNet's resnets and transformers are compiled, the UNet's own call is not
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel")]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert pipe.unet._compiled_call_impl is None
    assert pipe.compile_seconds > 0 and pipe.compile_cache == cache
    assert any(cache.rglob("*.py")), "inductor wrote nothing to the cache folder"
    np.testing.assert_array_equal(image(pipe), compiled)  # compiled once, reused
    eager_cached = load(folder)
    eager_cached.enable_deepcache(cache_interval=2, cache_branch_id=0)
    pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)  # skip steps run blocks already compiled
    assert max_diff(image(pipe), image(eager_cached)) <= TOL
    pipe.disable_deepcache()
    # saving a compiled pipeline writes the same folder as an uncompiled one would
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")
    assert max_diff(image(reloaded), eager) <= TOL

    env = {"DIFFPIPE_COMPILE_CACHE": str(cache)}
    second = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(folder), str(tmp_path / "second.npy")],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert second.returncode == 0, second.stderr[-3000:]
    hits, misses = (int(v) for v in second.stdout.split()[-2:])
    assert hits > 0 and misses == 0, f"the second process compiled again: {hits} hits, {misses} misses"
    assert max_diff(np.load(tmp_path / "second.npy"), compiled) == 0


def test_bf16_is_close_to_fp32_and_to_the_reference_bf16(folder, monkeypatch):
    """Both bf16 paths, whichever CPU runs this: PyTorch's own bf16 kernels (the native ones, and the default,
    on a CPU with AVX512-BF16/AMX) give the reference's bf16 image; the fp32 upcast kernels (the default on a
    CPU without) are as close to fp32 as the reference's bf16 is."""
    import diffusers

    from diffpipe.runtime.cpu_kernels import _cpu_has_native

    ours32 = image(load(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    ref16 = image(reference)
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "0")
    torch_kernels = image(load(folder, torch_dtype=torch.bfloat16))
    monkeypatch.setenv("DIFFPIPE_CPU_FLOAT32_KERNELS", "1")
    upcast = image(load(folder, torch_dtype=torch.bfloat16))
    monkeypatch.delenv("DIFFPIPE_CPU_FLOAT32_KERNELS")
    default = image(load(folder, torch_dtype=torch.bfloat16))

    assert max_diff(torch_kernels, ref16) <= TOL
    assert psnr(torch_kernels, ours32) >= 30, f"bf16 vs fp32: {psnr(torch_kernels, ours32):.1f} dB"
    # the upcast rounds at other points than the reference's kernels (4/255 apart on an AVX2 EPYC), at the
    # same distance from fp32 (49.6 dB against the reference's 50.1 there)
    assert psnr(upcast, ours32) >= max(30, psnr(ref16, ours32) - 1), f"upcast vs fp32: {psnr(upcast, ours32):.1f} dB"
    assert psnr(upcast, ref16) >= 40, f"upcast vs the reference's bf16: {psnr(upcast, ref16):.1f} dB"
    np.testing.assert_array_equal(default, torch_kernels if _cpu_has_native(torch.bfloat16) else upcast)


def test_generate_speed_flags_equal_the_api(folder, tmp_path):
    from diffpipe.cli import main
    from diffpipe.models.autoencoder_tiny import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
    ).save_pretrained(tmp_path / "taesd")
    out = tmp_path / "flags.png"
    argv = ["--quiet", "generate", CALL["prompt"], "--model", str(folder), "--steps", "3", "--size", "32"]
    argv += ["--seed", "0", "--bf16", "--deepcache", "2", "--tiny-vae", str(tmp_path / "taesd"), "--output", str(out)]
    assert main(argv) == 0

    pipe = load(folder, torch_dtype=torch.bfloat16)
    pipe.vae = AutoencoderTiny.from_pretrained(tmp_path / "taesd", torch_dtype=torch.bfloat16)
    pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = pipe(**CALL, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))
    assert main(["generate", "x", "--model", str(folder), "--bf16", "--dtype", "float32"]) == 1


def test_compiled_deepcache_equals_eager_and_compiles_each_step_kind_once(folder, tmp_path, monkeypatch):
    """DeepCache turned on and off on a compiled pipeline takes effect (the compiled UNet sees the hook
    come and go), and its plan is made outside the compiled UNet, so the body compiles once for full
    steps and once for skip steps. A third variant (the second full step used to recompile the whole
    UNet, because the body read the cache's state) fails the call here instead of costing a compile."""
    monkeypatch.setenv("DIFFPIPE_COMPILE_CACHE", str(tmp_path / "inductor"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    call = {**CALL, "num_inference_steps": 5}  # with DeepCache every 2: full, skip, full, skip, full

    def run(pipe):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(pipe(**call, generator=torch.Generator().manual_seed(0)).images[0])

    eager_pipe = load(folder)
    eager_plain = run(eager_pipe)
    eager_pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)
    eager_cached = run(eager_pipe)
    assert max_diff(eager_cached, eager_plain) > TOL  # else this test could not tell them apart

    pipe = load(folder).compile(regional=False)  # the whole UNet: one graph per step kind
    assert pipe.unet._compiled_call_impl is not None
    plain = run(pipe)
    pipe.enable_deepcache(cache_interval=2, cache_branch_id=0)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        cached = run(pipe)
        again = run(pipe)
    pipe.disable_deepcache()
    after = run(pipe)
    assert max_diff(plain, eager_plain) <= TOL
    assert max_diff(cached, eager_cached) <= TOL
    np.testing.assert_array_equal(again, cached)
    np.testing.assert_array_equal(after, plain)
    assert pipe.compile_seconds > 0


def test_compile_repeated_blocks_compiles_each_block_in_place():
    from diffpipe.models.autoencoder_kl import AutoencoderKL

    unet = diffpipe.UNet2DConditionModel(**TINY_MODELS["UNet2DConditionModel"])
    keys = list(unet.state_dict())
    assert unet.compile_repeated_blocks() is None
    kinds = {type(m).__name__ for m in unet.modules() if m._compiled_call_impl is not None}
    assert kinds == {"ResnetBlock2D", "Transformer2DModel"}  # the outermost: not the blocks inside a transformer
    assert unet._compiled_call_impl is None and list(unet.state_dict()) == keys
    with pytest.raises(ValueError, match="names no repeated blocks"):
        AutoencoderKL(**TINY_MODELS["AutoencoderKL"]).compile_repeated_blocks()
