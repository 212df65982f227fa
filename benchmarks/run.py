"""Side-by-side benchmarks: diffpipe against the reference, alternating, each run in a fresh process.

    python benchmarks/run.py                      # everything (builds the full-size folder first)
    python benchmarks/run.py --only load_unet_fp32 unet_step_fp32 --repeats 3

Prints medians, ranges and ratios (ours / reference; below 1 is better for us) and writes
docs/benchmarks.md with the machine description and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable

# name -> (worker task, extra args, what it measures)
CASES = {
    "import": ("import", [], "`from X import DiffusionPipeline` in a fresh process"),
    "load_unet_fp32": ("load_unet", ["--dtype", "float32"], "UNet from_pretrained + touch every weight, fp32"),
    "load_unet_fp16": (
        "load_unet",
        ["--dtype", "float16", "--variant", "fp16"],
        "UNet from_pretrained + touch, fp16 variant as fp16",
    ),
    "load_unet_fp32_as_fp16": (
        "load_unet",
        ["--dtype", "float16"],
        "UNet from the fp32 file with torch_dtype=float16 (no variant) + touch",
    ),
    "load_vae_fp32": ("load_vae", ["--dtype", "float32"], "VAE from_pretrained + touch, fp32"),
    "load_vae_fp16": (
        "load_vae",
        ["--dtype", "float16", "--variant", "fp16"],
        "VAE from_pretrained + touch, fp16 variant",
    ),
    "load_pipeline_fp32": ("load_pipeline", ["--dtype", "float32"], "pipeline from_pretrained + touch, fp32"),
    "load_pipeline_fp16": (
        "load_pipeline",
        ["--dtype", "float16", "--variant", "fp16"],
        "pipeline from_pretrained + touch, fp16 variant",
    ),
    "load_single_file_fp32_as_fp16": (
        "load_single_file",
        ["--dtype", "float16"],
        "pipeline from one fp32 original-layout file with torch_dtype=float16 (config= the folder) + touch",
    ),
    "load_flux_bf16": (
        "load_flux",
        ["--dtype", "bfloat16"],
        "Flux.1-dev transformer at the published widths, 4+8 of 19+38 blocks (2.6B, bf16) from_pretrained + touch",
    ),
    "unet_step_fp32": ("unet_step", ["--dtype", "float32"], "UNet forward, 64x64 latents, batch 2, fp32"),
    "unet_step_bf16": ("unet_step", ["--dtype", "bfloat16"], "UNet forward, 64x64 latents, batch 2, bf16 (ours only)"),
    "unet_step_bf16_small": (
        "unet_step",
        ["--dtype", "bfloat16", "--latent", "16", "--batch", "1", "--calls", "2"],
        "UNet forward, 16x16 latents, batch 1, bf16",
    ),
    "vae_decode_fp32": ("vae_decode", ["--dtype", "float32"], "VAE decode of one 64x64 latent (512x512), fp32"),
    "e2e_fp32": ("e2e", ["--dtype", "float32"], "load + 256x256, 4 steps, guidance 7.5, fp32 (peak RSS too)"),
    "cli_first_image": ("cli", [], "CLI `generate` to the first PNG, 256x256, 4 steps, vs the same reference script"),
    "rates": ("rates", [], "UNet step FLOPs and the machine's matmul rates (diffpipe process only)"),
}

# Cases run for diffpipe only, and why.
OURS_ONLY = {
    "unet_step_bf16": "on a CPU without bf16 instructions the reference's bf16 UNet step runs PyTorch's "
    "emulated bf16 kernels (conv 146x slower than fp32): an estimated 15-20 minutes per step "
    "at this size (7.2 s of fp32 convolution x 146; not run), so it is compared at 16x16 "
    "latents (unet_step_bf16_small) and here against the floor",
}

REFERENCE_SCRIPT = """
import sys, torch, warnings
warnings.simplefilter("ignore")
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe("a photo of an astronaut", height=256, width=256, num_inference_steps=4,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(sys.argv[2])
"""


def warm_page_cache(folder: Path) -> None:
    """Read every file of the folder once, so each run starts from a warm cache (what the issue asks
    to compare). Without this the first run after another case's files went through the page cache
    pays the disk reads, and in the first repeat that is always diffpipe's run."""
    buffer = bytearray(16 << 20)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass


def single_file(folder: Path) -> Path:
    """The folder's pipeline as one fp32 file in the original layout, written once (by diffpipe; the
    tests check it against a converter written from the layout's facts and the reference's loader),
    kept inside the folder so that the page cache is warmed with it."""
    path = folder / "single_file" / "model.safetensors"
    if not path.is_file():
        code = (
            "import sys, diffpipe\n"
            "diffpipe.DiffusionPipeline.from_pretrained(sys.argv[1]).save_single_file(sys.argv[2])"
        )
        subprocess.run([PYTHON, "-c", code, str(folder), str(path)], check=True)
    return path


def run_once(lib: str, case: str, folder: Path) -> dict:
    task, extra, _ = CASES[case]
    if task == "load_single_file":
        single_file(folder)
    if task == "load_flux":  # its own folder, built once in a child process
        command = [PYTHON, str(HERE / "make_flux.py")]
        folder = Path(
            subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
    if task != "import":
        warm_page_cache(folder)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if task == "cli":
        out = HERE / "_work" / f"cli-{lib}.png"
        if lib == "diffpipe":
            cmd = [
                str(Path(PYTHON).parent / "diffpipe"),
                "--quiet",
                "generate",
                "a photo of an astronaut",
                "--model",
                str(folder),
                "--steps",
                "4",
                "--size",
                "256",
                "--output",
                str(out),
            ]
        else:
            cmd = [PYTHON, "-c", REFERENCE_SCRIPT, str(folder), str(out)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{lib} {case} failed:\n{proc.stderr[-2000:]}")
        return {"seconds": seconds}
    cmd = [PYTHON, str(HERE / "worker.py"), lib, task, str(folder), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{lib} {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); CPU flags: {cpu_flags()}"
    )


def cpu_flags() -> str:
    """The flags that decide the CPU's kernels (native bf16 is avx512_bf16 / amx_bf16)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16")
    try:
        present = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        )
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in wanted if f in present) or "none of " + " ".join(wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=[c for c in CASES if c != "rates"], help="run only these cases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()

    # Built in a child process: Linux carries a process's peak RSS across fork and exec, so a folder
    # built here (gigabytes) would become every worker's reported peak.
    command = [PYTHON, str(HERE / "make_checkpoint.py"), *(["--out", str(args.folder)] if args.folder else [])]
    folder = Path(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    cases = args.only or [c for c in CASES if c != "rates"]
    rows = []
    for case in cases:
        samples: dict[str, list[dict]] = {"diffpipe": [], "diffusers": []}
        for i in range(args.repeats):
            order = ("diffpipe", "diffusers") if i % 2 == 0 else ("diffusers", "diffpipe")
            for lib in order:
                if lib == "diffpipe" or case not in OURS_ONLY:
                    samples[lib].append(run_once(lib, case, folder))
        row = {"case": case, "what": CASES[case][2]}
        for key in ("seconds", "peak_rss"):
            if all(key in s for s in samples["diffpipe"] + samples["diffusers"]):
                ours = summarize([s[key] for s in samples["diffpipe"]])
                ref = summarize([s[key] for s in samples["diffusers"]]) if samples["diffusers"] else None
                row[key] = {"ours": ours, "ref": ref, "ratio": ours[0] / ref[0] if ref else None}
        rows.append(row)
        print(format_row(row), flush=True)
    rates = run_once("diffpipe", "rates", folder) if any(c.startswith("unet_step") for c in cases) else None
    write_report(args.write, rows, args, rates)


def format_row(row: dict) -> str:
    parts = [f"{row['case']:<20}"]
    for key, unit, scale in (("seconds", "s", 1.0), ("peak_rss", "GB", 1e-9)):
        if key in row:
            o, r = row[key]["ours"], row[key]["ref"]
            text = f"{key}: ours {o[0] * scale:.3g}{unit} [{o[1] * scale:.3g}-{o[2] * scale:.3g}]"
            if r:
                text += (
                    f" ref {r[0] * scale:.3g}{unit} [{r[1] * scale:.3g}-{r[2] * scale:.3g}] "
                    f"ratio {row[key]['ratio']:.2f}"
                )
            parts.append(text)
    return "  ".join(parts)


def floor_lines(rows: list[dict], rates: dict) -> list[str]:
    """The compute floor section: one step's FLOPs over the measured matmul rate, per dtype."""
    flops = rates["unet_step_flops"]
    lines = [
        "",
        "### Compute floor of the UNet step (64x64 latents, batch 2)",
        "",
        f"FLOPs counted by torch's FlopCounterMode: {flops / 1e12:.3f} TFLOP.",
        "",
    ]
    steps = {r["case"]: r["seconds"]["ours"][0] for r in rows if r["case"].startswith("unet_step") and "seconds" in r}
    for dtype, case in (("float32", "unet_step_fp32"), ("bfloat16", "unet_step_bf16")):
        rate = rates[f"matmul_flops_per_s_{dtype}"]
        floor = flops / rate
        text = f"- {dtype}: PyTorch matmul here {rate / 1e9:.1f} GFLOP/s, floor {floor:.3g} s"
        if case in steps:
            text += f"; our step {steps[case]:.3g} s = {steps[case] / floor:.2f}x the floor"
            if dtype == "bfloat16":
                fp32_floor = flops / rates["matmul_flops_per_s_float32"]
                text += f" ({steps[case] / fp32_floor:.2f}x the fp32 floor, which is what the upcast kernels run at)"
        lines.append(text)
    return lines


def write_report(path: Path, rows: list[dict], args, rates: dict | None = None) -> None:
    lines = [
        "# Benchmarks: diffpipe against the reference (diffusers 0.42.1)",
        "",
        f"Machine: {machine()}.",
        "",
        f"Command: `python benchmarks/run.py --repeats {args.repeats}"
        + (f" --only {' '.join(args.only)}" if args.only else "")
        + "` (each run a fresh process, the two libraries "
        "alternating; medians with [min-max]; ratio = ours / reference, below 1 is better for us).",
        "Folder: a full-size SD 1.5-architecture pipeline with random weights, built by "
        "`benchmarks/make_checkpoint.py` (fp32 + fp16 variant), read by both libraries.",
        "",
        "| case | what | time ours | time reference | ratio | peak RSS ours | peak RSS reference | ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s, m = row.get("seconds"), row.get("peak_rss")
        cells = [row["case"], row["what"]]
        skipped = "not run (see below)" if row["case"] in OURS_ONLY else ""
        cells += (
            [
                f"{s['ours'][0]:.3g} s [{s['ours'][1]:.3g}-{s['ours'][2]:.3g}]",
                f"{s['ref'][0]:.3g} s [{s['ref'][1]:.3g}-{s['ref'][2]:.3g}]" if s["ref"] else skipped,
                f"**{s['ratio']:.2f}**" if s["ref"] else "",
            ]
            if s
            else ["", "", ""]
        )
        cells += (
            [
                f"{m['ours'][0] / 1e9:.2f} GB",
                f"{m['ref'][0] / 1e9:.2f} GB" if m["ref"] else "",
                f"{m['ratio']:.2f}" if m["ref"] else "",
            ]
            if m
            else ["", "", ""]
        )
        lines.append("| " + " | ".join(cells) + " |")
    for case in (c for c in OURS_ONLY if any(r["case"] == c for r in rows)):
        lines += ["", f"`{case}`: {OURS_ONLY[case]}."]
    if rates:
        lines += floor_lines(rows, rates)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else ""
    notes_marker = "\n## Notes\n"
    notes = previous[previous.index(notes_marker) :] if notes_marker in previous else ""
    path.write_text("\n".join(lines) + "\n" + notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
