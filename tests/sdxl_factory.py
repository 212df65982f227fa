"""Tiny Stable Diffusion XL pipelines written by the reference library (the oracle), for parity tests.

The shapes follow SDXL's wiring at toy size: two CLIP text encoders whose widths add up to the
UNet's cross-attention width, the second with a projection whose width plus the time ids' fills the
UNet's added embedding (6 ids for a base model, 5 with the aesthetic score for a refiner). Then the
helpers the SDXL parity tests share: load a folder with both libraries, run both, compare.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from sd_factory import write_tokenizer

WIDTH_1, WIDTH_2, PROJECTION, TIME_DIM = 32, 40, 24, 8


def _text_config(vocab_size: int, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **extra,
    )


def tiny_unet_config(refiner: bool = False) -> dict:
    """The tiny SDXL UNet's config: cross-attention over both encoders' widths (the second's alone for
    a refiner) and an added embedding for the pooled text plus 6 time ids (5 with the aesthetic score)."""
    n_ids = 5 if refiner else 6
    return dict(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=PROJECTION + n_ids * TIME_DIM,
        cross_attention_dim=WIDTH_2 if refiner else WIDTH_1 + WIDTH_2,
        norm_num_groups=4,
    )


def sdxl_components(
    seed: int = 0,
    *,
    tmp: Path,
    refiner: bool = False,
    scheduler: str = "EulerDiscreteScheduler",
    force_upcast: bool = True,
    latents_stats: bool = False,
    unet_kwargs: dict | None = None,
) -> dict:
    """Tiny SDXL components built with the reference, seeded. ``refiner``: only text_encoder_2 and the
    aesthetic-score UNet. ``latents_stats``: a VAE with per-channel latents_mean / latents_std.
    ``unet_kwargs`` add to or replace the UNet's config (``time_cond_proj_dim=`` for an LCM-distilled UNet,
    ``in_channels=9`` for an inpainting UNet)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**{**tiny_unet_config(refiner), **(unet_kwargs or {})})
    vae_extra = {}
    if latents_stats:
        vae_extra = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0])
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
        **vae_extra,
    )
    tok_dir = tmp / f"diffpipe-xl-tok-{seed}"
    vocab_size = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")  # SDXL's second tokenizer pads with "!"
    text_encoder = CLIPTextModel(_text_config(vocab_size, WIDTH_1)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, WIDTH_2, projection_dim=PROJECTION)).eval()
    sched = getattr(diffusers, scheduler)(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        **({"timestep_spacing": "leading"} if scheduler != "DDPMScheduler" else {}),
    )
    if refiner:
        text_encoder = tokenizer = None
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=sched,
    )


def save_reference_sdxl(
    folder: Path,
    *,
    task: str = "StableDiffusionXLPipeline",
    variant: str | None = None,
    refiner: bool = False,
    **kwargs,
) -> Path:
    """Build a tiny SDXL pipeline with the reference and save it to ``folder``."""
    import diffusers

    components = sdxl_components(tmp=folder.parent, refiner=refiner, **kwargs)
    settings = {"requires_aesthetics_score": True} if refiner else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, task)(**components, add_watermarker=False, **settings)
        pipe.save_pretrained(folder, variant=variant)
    return folder


# The published SDXL base UNet's config (full size; built on the meta device in the tests).
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


# ---------------------------------------------------------------------------------------- parity helpers
TOL = 2 / 255  # the bound of every parity test: max abs difference on output_type="np"


def load_both(folder, task: str, scheduler: str | None = None, **kwargs):
    """The reference's pipeline and ours, loaded from the same folder (``scheduler``: swapped for both)."""
    import diffusers

    import diffpipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder, add_watermarker=False, **kwargs)
        ours = getattr(diffpipe, task).from_pretrained(folder, **kwargs)
    if scheduler is not None:
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
        ours.scheduler = getattr(diffpipe, scheduler).from_config(ours.scheduler.config)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def run_both(ref, ours, seed=0, generator_list=0, output_type="np", **kwargs):
    """(the reference's images, ours) from the same arguments and seeds (``generator_list``: that many
    generators, seeded ``seed``, ``seed + 1``, ...)."""

    def gen():
        if generator_list:
            return [torch.Generator().manual_seed(seed + i) for i in range(generator_list)]
        return torch.Generator().manual_seed(seed)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(generator=gen(), output_type=output_type, **kwargs).images
    got = ours(generator=gen(), output_type=output_type, **kwargs).images
    return expected, got


def as_array(images) -> np.ndarray:
    """Images as one float array in ``[0, 1]``: arrays as they are, PIL images (a list) scaled from 0-255."""
    if isinstance(images, list):
        return np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])
    return np.asarray(images)


def assert_close(expected, got, tol=TOL) -> float:
    """Same shape, max abs difference within ``tol``; returns the difference."""
    expected, got = as_array(expected), as_array(got)
    assert got.shape == expected.shape
    diff = float(np.abs(got - expected).max())
    assert diff <= tol, f"max abs difference {diff:.5f} > {tol:.5f}"
    return diff


def an_image(h=40, w=48, seed=0):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
