"""Build a full-size Stable Diffusion 1.5-architecture pipeline folder with random weights.

The configs are SD 1.5's published ones (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M);
the weights are seeded random numbers, so loading and compute cost the same as the real model's.
Written once with diffpipe's own save (fp32 plus an fp16 variant); both libraries read this folder.
The tokenizer is a tiny one (the real vocabulary cannot be downloaded here); the text encoder keeps
the real 49408-token embedding table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT = Path(__file__).resolve().parent / "_work" / "sd15-random"

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)


def build(folder: Path = DEFAULT) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from diffpipe import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffpipe.demo import write_tiny_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    for seed, module in enumerate((unet, vae, text_encoder)):
        _randomize(module, seed)
    write_tiny_tokenizer(folder.parent / "tokenizer-src")
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(folder.parent / "tokenizer-src"),
        scheduler=PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The fp16 variant first: transformers writes the dtype into the text encoder's config.json, and
    # published repos' configs describe their main (fp32) weights. Saved the other way round, the
    # reference (which leaves transformers' dtype at "auto") would load the fp32 text encoder as fp16.
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    pipe.to(torch.float32).save_pretrained(folder)
    print(f"built {folder} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT)
    print(build(parser.parse_args().out))
