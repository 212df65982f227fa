"""A small random-weight Stable Diffusion checkpoint for demos and offline smoke runs.

Its weights are random: it produces noise-like images. It exists so that the whole loading and
generation path (folder layout, variants, tokenizer files, from_pretrained, from_pipe) can be shown
on a machine that cannot reach the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DEMO_WORDS = [
    "a",
    "photo",
    "of",
    "an",
    "astronaut",
    "in",
    "jungle",
    "cat",
    "dog",
    "bear",
    "eats",
    "pizza",
    "red",
    "blue",
    "cold",
    "color",
    "palette",
]


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (the CLIP tokenizer's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep] + [chr(256 + i) for i in range(len(others))]


def write_tiny_tokenizer(folder: Path, words=DEMO_WORDS, max_length: int = 77) -> int:
    """A CLIP tokenizer in the classic layout (vocab.json + merges.txt); returns the vocab size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = byte_level_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1], *parts[2:]]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
    config = {**special, "model_max_length": max_length, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return len(vocab)


def build_demo_pipeline(seed: int = 0, *, tokenizer_dir: Path):
    """A tiny StableDiffusionPipeline with random weights (seeded), built with diffpipe's classes."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .models.autoencoder_kl import AutoencoderKL
    from .models.unet_2d_condition import UNet2DConditionModel
    from .pipelines.stable_diffusion import StableDiffusionPipeline
    from .schedulers.pndm import PNDMScheduler

    torch.manual_seed(seed)
    vocab_size = write_tiny_tokenizer(tokenizer_dir)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=32,
        )
    ).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
