"""Batch throughput: ``diffpipe batch`` in-process (1 worker, torch's threads) against Ray Data (2 workers
of 1 thread each, a local Ray on loopback), on a tiny pipeline and on the full-size SD 1.5-architecture
folder at 256x256.

    python benchmarks/batch_throughput.py [--cases tiny sd15-256] [--repeats 2]

Each run is the CLI in a fresh process, as a user runs it. Two rates per run, in images per minute:
- end to end: rows / (the command's wall time), load and Ray start-up included;
- steady: (rows - workers) / (last PNG's mtime - first PNG's mtime per worker start), i.e. images
  produced once the workers are up (the first image of each worker is not counted).
Also checks that both runs wrote byte-identical PNGs at one thread per worker.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
SD15 = WORK / "sd15-random"

# case -> (rows, steps, size)
CASES = {"tiny": (60, 4, 64), "sd15-256": (8, 4, 256)}
MODES = {
    "in-process, 1 worker (2 threads)": [],
    "Ray Data, 2 workers x 1 thread": ["--ray-address", "local", "--workers", "2", "--threads", "1"],
}


def tiny_folder() -> Path:
    folder = WORK / "tiny-sd"
    if not (folder / "model_index.json").is_file():
        from diffpipe.demo import build_demo_pipeline

        build_demo_pipeline(seed=0, tokenizer_dir=WORK / "tiny-tokenizer").save_pretrained(folder)
    return folder


def model_for(case: str) -> Path:
    if case == "tiny":
        return tiny_folder()
    if not (SD15 / "model_index.json").is_file():
        subprocess.run([sys.executable, str(HERE / "make_checkpoint.py")], check=True)
    return SD15


def run(model: Path, prompts: Path, out: Path, mode: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "diffpipe.cli", "--quiet", "batch", str(prompts), "--model", str(model)]
    start = time.time()
    proc = subprocess.run([*command, "--out", str(out), *mode], capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode:
        raise SystemExit(f"batch failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    mtimes = sorted(p.stat().st_mtime for p in out.glob("*.png"))
    workers = 2 if "--ray-address" in mode else 1
    steady_span = mtimes[-1] - mtimes[workers - 1]
    return {
        "images": len(mtimes),
        "wall_s": wall,
        "end_to_end_per_min": 60 * len(mtimes) / wall,
        "steady_per_min": 60 * (len(mtimes) - workers) / steady_span if steady_span > 0 else float("nan"),
        "files": {p.name: p.read_bytes() for p in out.glob("*.png")},
    }


def main() -> None:
    sys.path.insert(0, str(HERE))
    from run import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"Machine: {machine()}", flush=True)  # (it names the CPU flags)
    tmp = Path(tempfile.mkdtemp(prefix="diffpipe-batch-bench-"))
    try:
        for case in args.cases:
            rows, steps, size = CASES[case]
            model = model_for(case)
            prompts = tmp / f"{case}.jsonl"
            lines = [json.dumps({"id": f"r{i:03d}", "prompt": f"a photo of thing {i}", "seed": i}) for i in range(rows)]
            prompts.write_text("\n".join(lines) + "\n")
            settings = ["--steps", str(steps), "--size", str(size)]
            results: dict[str, list[dict]] = {}
            for _ in range(args.repeats):
                for name, mode in MODES.items():  # alternating, each run a fresh process
                    results.setdefault(name, []).append(run(model, prompts, tmp / "out", [*settings, *mode]))
            print(f"\n{case}: {rows} rows, {steps} steps, {size}x{size}, guidance 7.5 ({args.repeats} runs each)")
            medians = {}
            for name, runs in results.items():
                e2e = statistics.median(r["end_to_end_per_min"] for r in runs)
                steady = statistics.median(r["steady_per_min"] for r in runs)
                wall = statistics.median(r["wall_s"] for r in runs)
                medians[name] = (e2e, steady)
                print(f"  {name:<34} end to end {e2e:7.1f} img/min ({wall:.0f} s)   steady {steady:7.1f} img/min")
            (base_e2e, base_steady), (ray_e2e, ray_steady) = medians.values()
            print(
                f"  ratio Ray / in-process: end to end {ray_e2e / base_e2e:.2f}, steady {ray_steady / base_steady:.2f}"
            )
            single = results[next(iter(MODES))][0]["files"]
            ray = results[list(MODES)[1]][0]["files"]
            print(f"  same PNG bytes in both modes: {sum(single[k] == ray.get(k) for k in single)}/{len(single)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
