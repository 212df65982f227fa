"""Tiny Flux.1 pipelines built with the reference (random weights, real layouts): a CLIP and a T5 text
encoder with tokenizers made here (no Hub), a 16-channel-style VAE with Flux's scaling and shift
factors (4 latent channels here), a dev (guidance embedding) or schnell transformer, FlowMatchEuler."""

from __future__ import annotations

import string
import warnings
from pathlib import Path

import torch

from sd_factory import write_tokenizer

FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels, packed 2x2
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[2, 2, 4],
)
FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=1.5035,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# The published transformer configs (black-forest-labs/FLUX.1-dev and -schnell).
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=[16, 56, 56],
)
FLUX_SCHNELL = dict(FLUX_DEV, guidance_embeds=False)


def write_t5_tokenizer(folder: Path) -> int:
    """A T5 (Unigram, fast) tokenizer over a small vocabulary; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    words = ["▁a", "▁cat", "▁dog", "▁blue", "▁red", "▁photo", "▁of", "▁house", "▁the", "▁on", "▁beach"]
    words += ["▁" + c for c in string.ascii_lowercase] + list(string.ascii_lowercase) + list("<>-_0123456789")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(w, -1.0 - i * 0.01) for i, w in enumerate(words)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = T5TokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def flux_components(tmp: Path, *, dev: bool = True, seed: int = 0, **transformer) -> dict:
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    clip_folder, t5_folder = tmp / "clip-tokenizer", tmp / "t5-tokenizer"
    clip_vocab = write_tokenizer(clip_folder)
    t5_vocab = write_t5_tokenizer(t5_folder)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=clip_vocab,
                max_position_embeddings=77,
                projection_dim=32,
                hidden_act="quick_gelu",
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                d_model=32,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                vocab_size=t5_vocab,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
            )
        )
        config = dict(FLUX_TRANSFORMER, guidance_embeds=dev, **transformer)
        model = diffusers.FluxTransformer2DModel(**config)
        with torch.no_grad():  # zero-initialised output projections would hide everything
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        vae = diffusers.AutoencoderKL(**FLUX_VAE)
    return dict(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=CLIPTokenizer.from_pretrained(clip_folder),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=T5TokenizerFast.from_pretrained(t5_folder),
        transformer=model.eval(),
    )


def save_reference_flux(folder: Path, *, dev: bool = True, seed: int = 0, task: str = "FluxPipeline", **transformer):
    """A tiny Flux pipeline of the reference's ``task`` class saved to ``folder``."""
    import diffusers

    folder = Path(folder)
    components = flux_components(folder.parent / f"{folder.name}-src", dev=dev, seed=seed, **transformer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        getattr(diffusers, task)(**components).save_pretrained(folder)
    return folder
