"""One measurement in a fresh process: `python worker.py LIB TASK FOLDER [--dtype D] [--variant V]`.

LIB is `diffpipe` or `diffusers` (the reference). Prints one JSON line: {"seconds": ..., "peak_rss": ...}.
Both libraries run the same calls on the same folder; loads are measured as load plus touching every
weight once, because the reference maps files lazily and would otherwise be timed reading nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings

T0 = time.perf_counter()


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def touch(*modules) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for m in modules:
            if isinstance(m, torch.nn.Module):
                for t in list(m.parameters()) + list(m.buffers()):
                    total += float(t.sum()) if t.is_floating_point() else 0.0
    return total


def _best(run, repeats: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def compute_rates(lib, folder: str) -> dict:
    """FLOPs of one UNet step (64x64 latents, batch 2), counted by torch's FlopCounterMode on the meta
    device, and the machine's measured rates in fp32 and bf16 of a large matmul and of a UNet-shaped 3x3
    convolution: the floors the steps are held to (at the better of the two)."""
    import json
    from pathlib import Path

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffpipe.nn.construction import empty_modules

    config = json.loads((Path(folder) / "unet" / "config.json").read_text())
    with empty_modules():
        unet = lib.UNet2DConditionModel.from_config(config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(
            torch.randn(2, 4, 64, 64, device="meta"),
            torch.tensor([500, 500], device="meta"),
            encoder_hidden_states=torch.randn(2, 77, 768, device="meta"),
        )
    rates = {"unet_step_flops": counter.get_total_flops()}
    from diffpipe.runtime.cpu_kernels import upcast_wanted

    native_bf16 = not upcast_wanted(torch.bfloat16)
    for dtype, n in ((torch.float32, 4096), (torch.bfloat16, 4096 if native_bf16 else 1024)):  # emulated: slow
        name = str(dtype).split(".")[-1]
        a = torch.randn(n, n).to(dtype)
        rates[f"matmul_flops_per_s_{name}"] = 2 * n**3 / _best(lambda: a @ a)
        # the UNet's own shape of work: a 3x3 convolution, 320 channels at 64x64, batch 2, channels-last
        # (oneDNN; on this kind of CPU it outruns MKL's matmul in fp32)
        x = torch.randn(2, 320, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(320, 320, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
        flops = 2 * 2 * 64 * 64 * 320 * 320 * 9
        rates[f"conv_flops_per_s_{name}"] = flops / _best(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    return rates


def library(name: str):
    warnings.simplefilter("ignore")
    if name == "diffusers":
        import diffusers
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        return diffusers
    import diffpipe

    return diffpipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("lib", choices=["diffpipe", "diffusers"])
    parser.add_argument("task")
    parser.add_argument("folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--variant", default=None)
    parser.add_argument("--latent", type=int, default=64, help="unet_step: latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="unet_step: batch size")
    parser.add_argument("--calls", type=int, default=3, help="unet_step: calls (the first is a warm-up)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        choices=("regional", "whole"),
        help="diffpipe only: pipe.compile() (regional=False for 'whole'); unet_step: the UNet's blocks, or all of it",
    )
    parser.add_argument("--deepcache", type=int, default=0, help="t2i, diffpipe only: DeepCache interval")
    parser.add_argument("--tiny-vae", default=None, help="t2i: an AutoencoderTiny folder to decode with")
    parser.add_argument("--size", type=int, default=512, help="t2i: image size")
    parser.add_argument("--steps", type=int, default=20, help="t2i: DPM-Solver++ 2M steps")
    args = parser.parse_args()

    if args.task == "import":
        start = time.perf_counter()
        if args.lib == "diffusers":
            from diffusers import DiffusionPipeline  # noqa: F401
        else:
            from diffpipe import DiffusionPipeline  # noqa: F401,F811
        print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
        return

    import torch

    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    torch.manual_seed(0)
    lib = library(args.lib)
    dtype = getattr(torch, args.dtype)
    result = {}
    if args.task in ("load_unet", "load_vae"):
        cls, sub = (lib.UNet2DConditionModel, "unet") if args.task == "load_unet" else (lib.AutoencoderKL, "vae")
        start = time.perf_counter()
        model = cls.from_pretrained(args.folder, subfolder=sub, variant=args.variant, torch_dtype=dtype)
        result["load_seconds"] = time.perf_counter() - start
        touch(model)
        result["seconds"] = time.perf_counter() - start
    elif args.task == "load_pipeline":
        # The reference imports transformers' CLIP classes when it is imported, diffpipe when a component
        # needs them: resolve them first so both are timed on loading alone (import is its own case).
        import transformers

        transformers.CLIPTextModel, transformers.CLIPTokenizer  # noqa: B018
        start = time.perf_counter()
        pipe = lib.DiffusionPipeline.from_pretrained(args.folder, variant=args.variant, torch_dtype=dtype)
        result["load_seconds"] = time.perf_counter() - start
        touch(*pipe.components.values())
        result["seconds"] = time.perf_counter() - start
    elif args.task == "load_single_file":  # the file run.py wrote; configs and tokenizers from the folder
        import transformers

        transformers.CLIPTextModel, transformers.CLIPTokenizer  # noqa: B018
        path = f"{args.folder}/single_file/model.safetensors"
        start = time.perf_counter()
        pipe = lib.StableDiffusionPipeline.from_single_file(path, config=args.folder, torch_dtype=dtype)
        result["load_seconds"] = time.perf_counter() - start
        touch(*pipe.components.values())
        result["seconds"] = time.perf_counter() - start
    elif args.task == "load_flux":  # the transformer slice make_flux.py wrote (bf16 safetensors)
        start = time.perf_counter()
        model = lib.FluxTransformer2DModel.from_pretrained(args.folder, torch_dtype=dtype)
        result["load_seconds"] = time.perf_counter() - start
        touch(model)
        result["seconds"] = time.perf_counter() - start
    elif args.task == "unet_step":
        unet = lib.UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet", torch_dtype=dtype)
        if args.compile:  # as pipe.compile() does it: channels-last weights, inductor with the disk cache
            from diffpipe.runtime.compile import _enable_disk_cache

            _enable_disk_cache()
            unet.to(memory_format=torch.channels_last)
            if args.compile == "whole":
                unet.compile()
            else:
                unet.compile_repeated_blocks()
        x = torch.randn(args.batch, 4, args.latent, args.latent, dtype=dtype)
        context = torch.randn(args.batch, 77, 768, dtype=dtype)
        t = torch.tensor([500] * args.batch)
        times = []
        with torch.no_grad():
            for _ in range(args.calls):  # the first call warms allocators and kernels
                start = time.perf_counter()
                unet(x, t, encoder_hidden_states=context)
                times.append(time.perf_counter() - start)
        result["seconds"] = min(times[1:])
        result["first_call"] = times[0]
    elif args.task == "vae_decode":
        vae = lib.AutoencoderKL.from_pretrained(args.folder, subfolder="vae", torch_dtype=dtype)
        z = torch.randn(1, 4, 64, 64, dtype=dtype)
        times = []
        with torch.no_grad():
            for _ in range(2):
                start = time.perf_counter()
                vae.decode(z)
                times.append(time.perf_counter() - start)
        result["seconds"] = times[-1]
    elif args.task == "e2e":
        start = time.perf_counter()
        pipe = lib.DiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype, variant=args.variant)
        pipe.set_progress_bar_config(disable=True)
        pipe(
            "a photo of an astronaut",
            height=256,
            width=256,
            num_inference_steps=4,
            generator=torch.Generator().manual_seed(0),
        )
        result["seconds"] = time.perf_counter() - start
    elif args.task == "t2i":  # text-to-image, DPM-Solver++ 2M, generation timed apart from loading
        pipe = lib.DiffusionPipeline.from_pretrained(args.folder, torch_dtype=dtype)
        pipe.scheduler = lib.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if args.tiny_vae:
            pipe.vae = lib.AutoencoderTiny.from_pretrained(args.tiny_vae, torch_dtype=dtype)
        if args.deepcache:
            pipe.enable_deepcache(cache_interval=args.deepcache, cache_branch_id=0)
        if args.compile:
            pipe.compile(regional=args.compile == "regional")
        start = time.perf_counter()
        pipe(
            "a photo of an astronaut",
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(0),
        )
        result["seconds"] = time.perf_counter() - start
        result["compile_seconds"] = getattr(pipe, "compile_seconds", 0.0)
    elif args.task == "rates":  # the machine's compute floor, diffpipe only (no library involved)
        result.update(compute_rates(lib, args.folder))
    else:
        sys.exit(f"unknown task {args.task}")
    result["peak_rss"] = peak_rss()
    result["process_seconds"] = time.perf_counter() - T0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
