"""Build a Flux.1-dev transformer folder at the published widths with fewer blocks (random weights, bf16).

The published transformer is 11.9B parameters (23.8 GB in bf16); loading it and touching every weight
needs that much memory in each library, more than this 24 GiB machine has beside the other process.
This slice keeps every width of the published config (3072 inner, 24 heads of 128, T5 4096, CLIP 768,
the 12288-wide MLPs) and 4 double + 8 single blocks of the 19 + 38 (2.6B parameters, 5.2 GB): per-tensor
costs are the real ones, the total scales with the block count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT = Path(__file__).resolve().parent / "_work" / "flux-dev-slice"
CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)


def build(folder: Path = DEFAULT) -> Path:
    from diffpipe import FluxTransformer2DModel

    if (folder / "config.json").is_file():
        return folder
    from diffpipe.nn.construction import empty_modules

    start = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 5 GB, not 10 GB of fp32 first
    try:
        with empty_modules():
            model = FluxTransformer2DModel(**CONFIG)
    finally:
        torch.set_default_dtype(torch.float32)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="10GB")
    print(f"built {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT)
    print(build(parser.parse_args().out))
