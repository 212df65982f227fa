"""The ``diffpipe`` command: generate, inspect, estimate, convert, demo, batch, serve.

Errors end as one line on stderr and a non-zero exit code, not a traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def peak_rss_bytes() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except (ImportError, OSError):
        return 0


class Console:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def say(self, *parts) -> None:
        if not self.quiet:
            print(*parts, flush=True)


def _dtype(name: str | None):
    import torch

    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(sorted(DTYPES))}, got {name!r}")
    return getattr(torch, DTYPES[name])


def _size(text: str | None) -> tuple[int | None, int | None]:
    from .images import parse_image_size

    if not text:
        return None, None
    try:
        return parse_image_size(text)
    except ValueError:
        raise ValueError(f"--size must be N or WIDTHxHEIGHT, got {text!r}") from None


# ------------------------------------------------------------------------------------ commands
def _load_kwargs(args) -> dict:
    """``--variant`` and ``--dtype`` as ``from_pretrained`` keywords."""
    kwargs = {}
    if args.variant:
        kwargs["variant"] = args.variant
    dtype = _dtype(args.dtype)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    return kwargs


def cmd_generate(args, out: Console) -> int:
    import torch

    from . import DiffusionPipeline, load_image
    from .registry import find_class

    if args.bf16:
        if args.dtype not in (None, "bfloat16"):
            raise ValueError(f"--bf16 and --dtype {args.dtype} disagree: give one of them")
        args.dtype = "bfloat16"
    kwargs = _load_kwargs(args)
    start = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model, **kwargs)
    out.say(f"loaded {type(pipe).__name__} from {args.model} in {time.perf_counter() - start:.1f} s")
    _speed_options(pipe, args, out)
    if args.scheduler:
        cls = find_class(args.scheduler)
        if cls is None or not hasattr(cls, "set_timesteps"):
            names = sorted(c.__name__ for c in pipe.scheduler.compatibles)
            raise ValueError(
                f"--scheduler {args.scheduler!r} is not a diffpipe scheduler; try one of {', '.join(names)}"
            )
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=args.quiet)
    height, width = _size(args.size)
    call = dict(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
        negative_prompt=args.negative_prompt,
    )
    if args.image:
        from .pipelines.auto import AutoPipelineForImage2Image

        pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        call.update(image=load_image(args.image), strength=args.strength)
        if height:
            call.update(height=height, width=width)
    else:
        call.update(height=height, width=width)
    start = time.perf_counter()
    image = pipe(**call).images[0]
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    out.say(f"wrote {output} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s")
    if args.compile:
        out.say(
            f"compiling (or loading compiled kernels from {pipe.compile_cache}) took {pipe.compile_seconds:.1f} s of it"
        )
    return 0


def _speed_options(pipe, args, out: Console) -> None:
    """``--tiny-vae``, ``--deepcache``, ``--compile`` on a loaded pipeline."""
    if args.tiny_vae:
        from .models.autoencoder_tiny import AutoencoderTiny

        if getattr(pipe, "vae", None) is None:
            raise ValueError(f"--tiny-vae: {type(pipe).__name__} has no VAE to replace")
        pipe.vae = AutoencoderTiny.from_pretrained(args.tiny_vae, torch_dtype=pipe.vae.dtype)
        out.say(f"decoding with the tiny VAE from {args.tiny_vae}")
    if args.deepcache:
        if not hasattr(pipe, "enable_deepcache"):
            raise ValueError(f"--deepcache: {type(pipe).__name__} has no UNet to cache features of")
        pipe.enable_deepcache(cache_interval=args.deepcache, cache_branch_id=0)
    if args.compile:
        pipe.compile()


def _is_single_file(name: str) -> bool:
    return str(name).lower().endswith((".safetensors", ".ckpt", ".pt", ".pth")) and not Path(name).is_dir()


def cmd_inspect(args, out: Console) -> int:
    from . import DiffusionPipeline
    from .hub import list_local_files

    if _is_single_file(args.model):
        from .single_file.report import describe

        print("\n".join(describe(args.model)))
        return 0

    pipe = DiffusionPipeline.from_pretrained(args.model, **({"variant": args.variant} if args.variant else {}))
    print(f"{type(pipe).__name__}  ({args.model})")
    footprint = pipe.memory_footprint()
    for name, component in pipe.components.items():
        if component is None:
            print(f"  {name:<18} -")
            continue
        info = footprint["components"].get(name)
        size = (
            f"{info['parameters'] / 1e6:8.2f} M params  {human(info['bytes']):>10}  "
            + ", ".join(f"{k} {human(v)}" for k, v in info["dtypes"].items())
            if info
            else ""
        )
        print(f"  {name:<18} {type(component).__name__:<34} {size}")
    print(f"  total: {human(footprint['total'])}")
    folder = Path(pipe.snapshot_folder) if getattr(pipe, "snapshot_folder", None) else None
    if folder is not None and folder.is_dir():
        from .io.files import variants_present

        files = list_local_files(folder)
        print(
            "  variants present: "
            + (
                ", ".join(
                    variants_present(
                        {f.rsplit("/", 1)[-1] for f in files}, {"diffusion_pytorch_model", "model", "pytorch_model"}
                    )
                )
                or "none"
            )
        )
        for f in sorted(files):
            if f.endswith((".safetensors", ".bin")):
                print(f"    {f}  {human((folder / f).stat().st_size)}")
    return 0


def cmd_estimate(args, out: Console) -> int:
    from .estimate import estimate

    result = estimate(args.model, variant=args.variant, revision=args.revision)
    print(f"{args.model}: {result['class_name']} (from safetensors headers; nothing downloaded)")
    for name, info in result["components"].items():
        dtypes = ", ".join(f"{k} {human(v)}" for k, v in info["dtypes"].items())
        print(
            f"  {name:<18} {info['parameters'] / 1e6:9.2f} M params  {human(info['bytes']):>10}  ({dtypes})  "
            f"{info['file']}"
        )
    for dtype, n in result["as_dtype"].items():
        print(f"  if loaded as {dtype:<9} {human(n)}")
    print(f"  as stored: {human(result['total'])}")
    return 0


def cmd_convert(args, out: Console) -> int:
    from . import DiffusionPipeline

    dtype = _dtype(args.dtype)
    if args.variant == "fp16" and dtype is None:
        import torch

        dtype = torch.float16  # the fp16 variant holds fp16 weights
    loading = {"torch_dtype": dtype} if dtype else {}
    if _is_single_file(args.model):
        extra = {"config": args.config} if args.config else {}
        pipe = DiffusionPipeline.from_single_file(args.model, **loading, **extra)
    else:
        pipe = DiffusionPipeline.from_pretrained(args.model, **loading)
    if args.to == "single-file":
        from .single_file.save import save_single_file

        save_single_file(pipe, args.out)
        out.say(f"wrote {type(pipe).__name__} as one file in the original layout: {args.out}")
        return 0
    pipe.save_pretrained(args.out, variant=args.variant)
    out.say(f"wrote {type(pipe).__name__} to {args.out}" + (f" as variant {args.variant!r}" if args.variant else ""))
    return 0


def cmd_demo(args, out: Console) -> int:
    import torch

    from . import DiffusionPipeline, StableDiffusionImg2ImgPipeline
    from .demo import build_demo_pipeline
    from .pipelines.pipeline import memory_footprint

    root = Path(args.output)
    checkpoint = root / "demo-checkpoint"
    out.say("diffpipe demo: a tiny Stable Diffusion pipeline with RANDOM weights (it draws noise, not pictures);")
    out.say("it shows the whole path offline: save with a variant, load, generate, switch task with from_pipe.")
    start = time.perf_counter()
    pipe = build_demo_pipeline(seed=args.seed, tokenizer_dir=root / ".tokenizer-src")
    pipe.save_pretrained(checkpoint)
    pipe.to(torch.float16).save_pretrained(checkpoint, variant="fp16")
    out.say(f"1. built and saved {checkpoint} (fp32 and fp16 variant) in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    loaded = DiffusionPipeline.from_pretrained(checkpoint, variant="fp16", torch_dtype=torch.float32)
    out.say(
        f"2. DiffusionPipeline.from_pretrained(variant='fp16', torch_dtype=float32) -> "
        f"{type(loaded).__name__} in {time.perf_counter() - start:.2f} s; weights read from:"
    )
    for name, files in loaded.loading_report.files.items():
        out.say(f"     {name:<13} {', '.join(files)}")
    loaded.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    prompt = "a photo of an astronaut in a jungle"
    image = loaded(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed)).images[0]
    first = root / "text2image.png"
    image.save(first)
    out.say(f"3. text-to-image '{prompt}' ({args.steps} steps) -> {first} in {time.perf_counter() - start:.2f} s")

    start = time.perf_counter()
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(loaded)
    second = img2img(
        "a red cat",
        image=image,
        strength=0.6,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed + 1),
    ).images[0]
    second_path = root / "image2image.png"
    second.save(second_path)
    out.say(
        f"4. from_pipe -> {type(img2img).__name__} sharing every component; image-to-image -> "
        f"{second_path} in {time.perf_counter() - start:.2f} s"
    )

    one = loaded.memory_footprint()["total"]
    both = memory_footprint(loaded, img2img)["total"]
    out.say(
        f"5. memory: one pipeline {human(one)}; both pipelines together {human(both)} "
        f"(shared, counted once); process peak RSS {human(peak_rss_bytes())}"
    )
    return 0


def cmd_batch(args, out: Console) -> int:
    from .batch import run_batch

    return run_batch(
        args.prompts,
        model=args.model,
        out_dir=args.out,
        ray_address=args.ray_address,
        workers=args.workers,
        threads=args.threads,
        steps=args.steps,
        size=args.size,
        say=print,
        **_load_kwargs(args),
    )


def cmd_serve(args, out: Console) -> int:
    from .serve.settings import Settings, is_loopback, load_served_pipeline

    key = args.api_key or os.environ.get("DIFFPIPE_API_KEY") or None
    if not key and not args.insecure and not is_loopback(args.host):
        raise ValueError(
            f"refusing to serve on non-loopback host {args.host!r} without an API key: "
            "give --api-key KEY or DIFFPIPE_API_KEY, or --insecure to serve it open"
        )
    limits = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
    settings = Settings(api_key=key, host=args.host, model_name=args.model_name or args.model, **limits)
    if args.replicas is not None or args.ray_address:
        return _serve_on_ray(args, settings, out)
    import uvicorn

    from .serve.app import create_app

    pipe = load_served_pipeline(args.model, **_load_kwargs(args))
    app = create_app(pipe, settings)
    out.say(f"serving {type(pipe).__name__} from {args.model} on http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def _serve_on_ray(args, settings, out: Console) -> int:
    """``diffpipe serve --replicas N [--ray-address A]``: the same app as a Ray Serve deployment."""
    import ray
    from ray import serve

    from .distributed import serve_app
    from .serve.settings import is_loopback

    if args.ray_address in (None, "local"):  # a cluster of this machine alone
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1" if is_loopback(args.host) else None)
    else:
        ray.init(address=args.ray_address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = serve_app(args.model, num_replicas=args.replicas or 1, settings=settings, **_load_kwargs(args))
    out.say(f"serving {args.model} with {args.replicas or 1} Ray Serve replica(s) on http://{args.host}:{args.port}/")
    serve.run(app, name="diffpipe", route_prefix="/", blocking=True)
    return 0


# diffpipe serve's limits: Settings fields, with their flags' help (defaults are Settings')
LIMITS = {
    "max_pixels": (int, "largest width*height of one image (default 1048576)"),
    "max_steps": (int, "most steps one request may ask for (default 150)"),
    "max_n": (int, "most images in one request (default 4)"),
    "max_queue": (int, "requests that may wait behind the running one; more get 429 (default 8)"),
    "max_body_bytes": (int, "largest request body in bytes (default 20000000); uploaded images count"),
}


def _quiet_transformers() -> None:
    """transformers draws its own bars for every tiny save and load; they drown the demo's lines."""
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpipe", description="Load and run diffusion pipelines in the diffusers format."
    )
    parser.add_argument("--quiet", action="store_true", help="print only results and errors")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image from a prompt (and an image, for img2img)")
    g.add_argument("prompt")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"repo id or folder (default {DEFAULT_MODEL})")
    g.add_argument("--image", help="start from this image (path or URL): image-to-image")
    g.add_argument("--strength", type=float, default=0.8)
    g.add_argument("--scheduler", help="scheduler class name, e.g. DPMSolverMultistepScheduler")
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--negative-prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--variant")
    g.add_argument("--dtype", help="float32, float16 or bfloat16")
    g.add_argument("--size", help="N or WIDTHxHEIGHT in pixels")
    g.add_argument("--bf16", action="store_true", help="bfloat16 weights (native kernels where the CPU has them)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet/transformer and VAE decoder (cached)")
    g.add_argument("--deepcache", type=int, metavar="N", help="DeepCache: a full UNet pass every N steps")
    g.add_argument("--tiny-vae", metavar="PATH", help="decode with this AutoencoderTiny (TAESD) folder or repo")
    g.add_argument("--output", default="out.png")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "inspect", help="a pipeline's components, parameters, dtypes, files; or a single file's type and metadata"
    )
    i.add_argument("model")
    i.add_argument("--variant")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("estimate", help="memory a repo needs, from its safetensors headers (downloads no weights)")
    e.add_argument("model")
    e.add_argument("--variant")
    e.add_argument("--revision")
    e.set_defaults(func=cmd_estimate)

    c = sub.add_parser(
        "convert", help="a folder, repo or single file (.safetensors/.ckpt) -> a diffusers folder, or --to single-file"
    )
    c.add_argument("model", help="a diffusers folder or repo id, or one checkpoint file in the original layout")
    c.add_argument("out", help="the folder to write (or the .safetensors file with --to single-file)")
    c.add_argument("--to", choices=("folder", "single-file"), default="folder")
    c.add_argument("--variant")
    c.add_argument("--dtype")
    c.add_argument("--config", help="for a single file: a folder or repo id to take configs and tokenizers from")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="offline demo on a small random-weight checkpoint")
    d.add_argument("--output", default="demo-output")
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("batch", help="one PNG per JSONL row (resumable), in-process or on Ray Data")
    b.add_argument("prompts", help="JSONL: prompt, optional seed, negative_prompt, steps, size, guidance_scale, id")
    b.add_argument("--model", required=True, help="a diffusers folder or repo id")
    b.add_argument("--out", required=True, help="the folder for <id>.png")
    b.add_argument("--ray-address", help="run on Ray Data: auto, an address, or local (starts a local Ray)")
    b.add_argument("--workers", type=int, default=1, help="pipeline replicas (Ray actors)")
    b.add_argument(
        "--threads", type=int, help="torch threads per worker (default: torch's in-process, 1 per Ray actor)"
    )
    b.add_argument("--steps", type=int, help="default steps for rows without one")
    b.add_argument("--size", help="default N or WIDTHxHEIGHT for rows without one")
    b.add_argument("--variant")
    b.add_argument("--dtype", help="float32, float16 or bfloat16")
    b.set_defaults(func=cmd_batch)

    s = sub.add_parser("serve", help="an HTTP server (OpenAI images and A1111 APIs, a web page) for one model")
    s.add_argument("--model", required=True, help="a diffusers folder or repo id")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $DIFFPIPE_API_KEY)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback host without an API key")
    s.add_argument("--model-name", help="the name clients see in /v1/models (default: --model)")
    s.add_argument("--replicas", type=int, help="serve with Ray Serve: this many replicas, each holding the model")
    s.add_argument("--ray-address", help="with Ray Serve: auto or a cluster address (default: a local Ray)")
    s.add_argument("--variant")
    s.add_argument("--dtype", help="float32, float16 or bfloat16")
    for name, (kind, help_text) in LIMITS.items():
        s.add_argument("--" + name.replace("_", "-"), type=kind, help=help_text)
    s.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.ERROR if args.quiet else logging.WARNING),
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.quiet or args.command == "demo":
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        _quiet_transformers()
    try:
        return args.func(args, Console(args.quiet))
    except KeyboardInterrupt:
        print("diffpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, not a traceback
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"diffpipe {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
