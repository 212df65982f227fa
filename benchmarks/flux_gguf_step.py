"""One 256x256 step of a full-size Flux.1-dev transformer quantized to GGUF Q4_0, in each library.

    python benchmarks/flux_gguf_step.py            # writes _work/flux-dev-Q4_0.gguf once (6.7 GB)

The file has the published architecture in the BFL layout city96's conversions use, with random
but valid Q4_0 blocks (fp16 scales of a realistic size) for every Linear weight and F32 for the rest.
Each library loads it with its GGUF path (compute in float32: this CPU has no fast bf16) in a fresh
process and runs one transformer call at 256x256 (256 image tokens, 512 T5 tokens). Prints the CPU
flags, load time, step time and peak RSS per library, and the ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILE = HERE / "_work" / "flux-dev-Q4_0.gguf"
CONFIG = HERE / "_work" / "flux-dev-config"  # the transformer's config, for the reference's loader
DEPTH = dict(num_layers=19, num_single_layers=38)

WORKER = r"""
import json, resource, sys, time, warnings
import torch
warnings.simplefilter("ignore")
lib, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if lib == "diffpipe":
    import diffpipe
    model = diffpipe.FluxTransformer2DModel.from_single_file(
        path, quantization_config=diffpipe.GGUFQuantizationConfig(compute_dtype=torch.float32))
else:
    import diffusers
    model = diffusers.FluxTransformer2DModel.from_single_file(
        path, quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=torch.float32),
        config=sys.argv[3], subfolder="transformer", local_files_only=True)
load = time.perf_counter() - start
g = torch.Generator().manual_seed(0)
ids = torch.zeros(16, 16, 3)
ids[..., 1] += torch.arange(16)[:, None]
ids[..., 2] += torch.arange(16)[None, :]
inputs = dict(hidden_states=torch.randn(1, 256, 64, generator=g),
              encoder_hidden_states=torch.randn(1, 512, 4096, generator=g),
              pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.tensor([0.5]),
              guidance=torch.tensor([3.5]), img_ids=ids.reshape(256, 3), txt_ids=torch.zeros(512, 3))
with torch.no_grad():
    start = time.perf_counter()
    out = model(**inputs, return_dict=False)[0]
    step = time.perf_counter() - start
print(json.dumps({"load_seconds": load, "step_seconds": step, "finite": bool(torch.isfinite(out).all()),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_file(path: Path) -> None:
    import gguf
    import numpy as np

    sys.path.insert(0, str(HERE.parent / "tests"))
    sys.path.insert(0, str(HERE.parent / "tests" / "single_file"))
    import torch
    from test_single_file_flux import to_bfl

    import diffpipe
    from diffpipe.nn.construction import empty_modules

    with empty_modules():
        model = diffpipe.FluxTransformer2DModel(
            in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=[16, 56, 56], **DEPTH,
        )  # fmt: skip
    model.save_config(CONFIG / "transformer")
    names = to_bfl({k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()})
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, meta in names.items():
        shape = tuple(meta.shape)
        if len(shape) == 2 and shape[1] % 32 == 0:
            blocks = shape[0] * shape[1] // 32
            raw = rng.integers(0, 256, size=(blocks, 18), dtype=np.uint8)
            scale = (rng.uniform(0.002, 0.01, size=blocks).astype(np.float16)).view(np.uint8).reshape(blocks, 2)
            raw[:, :2] = scale
            raw = raw.reshape(shape[0], shape[1] // 32 * 18)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(name, rng.normal(0.0, 0.02, size=shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    sys.path.insert(0, str(HERE))
    from run import machine

    if not FILE.is_file():
        FILE.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_file(FILE)
        print(f"wrote {FILE} ({FILE.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
    print(f"Machine: {machine()}")
    results = {}
    for lib in ("diffpipe", "diffusers"):
        command = [sys.executable, "-c", WORKER, lib, str(FILE), str(CONFIG)]
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode:
            results[lib] = {"error": proc.stderr.strip().splitlines()[-1][:300]}
        else:
            results[lib] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(lib, results[lib], flush=True)
    ours, ref = results["diffpipe"], results["diffusers"]
    if "error" not in ours and "error" not in ref:
        for key in ("load_seconds", "step_seconds", "peak_rss"):
            print(f"{key}: ratio {ours[key] / ref[key]:.2f}")


if __name__ == "__main__":
    main()
