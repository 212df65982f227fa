"""Tiny Stable Diffusion pipelines written by the reference library (the oracle), for parity tests.

Every folder here is made by ``diffusers`` itself, so a test that loads it in diffpipe checks that we
read what the reference writes. ``legacy=True`` rewrites the folder the way older published
checkpoints look (tokenizer as vocab.json + merges.txt, old VAE attention names, configs without
newer keys).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def write_tokenizer(folder: Path) -> int:
    """A tiny CLIP tokenizer in the legacy layout (vocab.json + merges.txt); returns its vocab size."""
    from diffpipe.demo import write_tiny_tokenizer

    return write_tiny_tokenizer(folder)


def reference_components(
    seed: int = 0,
    *,
    safety_checker: bool = True,
    flag_everything: bool = False,
    scheduler: str = "PNDMScheduler",
    in_channels: int = 4,
    tmp: Path | None = None,
    unet_kwargs: dict | None = None,
):
    """Tiny components built with the reference, seeded. ``unet_kwargs`` add to the UNet's config
    (``time_cond_proj_dim=`` for an LCM-distilled UNet)."""
    import diffusers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=4,
        attention_head_dim=4,
        **(unet_kwargs or {}),
    )
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
    )
    tok_dir = (tmp or Path("/tmp")) / f"diffpipe-tok-{seed}"
    vocab_size = write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_config = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    sched_cls = getattr(diffusers, scheduler)
    sched = sched_cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        **({"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}),
    )
    components = dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
    )
    if safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        config = CLIPConfig(
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=16,
        )
        checker = StableDiffusionSafetyChecker(config).eval()
        with torch.no_grad():
            for p in checker.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.2)
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            thresholds = -2.0 if flag_everything else 2.0  # cosine is within [-1, 1]
            checker.concept_embeds_weights.fill_(thresholds)
            checker.special_care_embeds_weights.fill_(2.0)
        components["safety_checker"] = checker
        components["feature_extractor"] = CLIPImageProcessor(crop_size=32, size=32)
    return components


def save_reference_pipeline(
    folder: Path, *, task: str = "StableDiffusionPipeline", legacy: bool = False, variant: str | None = None, **kwargs
) -> Path:
    """Build a tiny pipeline with the reference and save it to ``folder``."""
    import diffusers

    components = reference_components(tmp=folder.parent, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = getattr(diffusers, task)(**components, requires_safety_checker=components["safety_checker"] is not None)
        pipe.save_pretrained(folder, variant=variant)
    if legacy:
        make_legacy(folder)
    return folder


def make_legacy(folder: Path) -> None:
    """Rewrite a reference-saved folder the way older published checkpoints look."""
    # tokenizer: vocab.json + merges.txt (no tokenizer.json)
    tok = folder / "tokenizer"
    for p in tok.iterdir():
        p.unlink()
    write_tokenizer(tok)
    # VAE: old attention names (diffusers < 0.14 wrote query/key/value/proj_attn, as Linear weights)
    for path in (folder / "vae").glob("diffusion_pytorch_model*.safetensors"):
        state = load_file(path)
        renamed = {}
        for k, v in state.items():
            for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
                if ".attentions." in k and f".{new}." in k:
                    k = k.replace(f".{new}.", f".{old}.")
                    break
            renamed[k] = v.contiguous()
        save_file(renamed, path, metadata={"format": "pt"})
    # text encoder: keys under `text_model.` as transformers 4 wrote them
    for path in (folder / "text_encoder").glob("model*.safetensors"):
        state = load_file(path)
        save_file(
            {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()},
            path,
            metadata={"format": "pt"},
        )
    # configs without keys newer releases added
    for sub, keys in (
        (
            "vae",
            (
                "force_upcast",
                "latents_mean",
                "latents_std",
                "shift_factor",
                "use_quant_conv",
                "use_post_quant_conv",
                "mid_block_add_attention",
            ),
        ),
        (
            "unet",
            (
                "addition_embed_type_num_heads",
                "attention_type",
                "mid_block_only_cross_attention",
                "reverse_transformer_layers_per_block",
                "dropout",
            ),
        ),
        ("scheduler", ("timestep_spacing", "prediction_type")),
    ):
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        path = folder / sub / name
        config = json.loads(path.read_text())
        for k in keys:
            config.pop(k, None)
        config["_diffusers_version"] = "0.6.0"
        path.write_text(json.dumps(config, indent=2))
    index = json.loads((folder / "model_index.json").read_text())
    index["_diffusers_version"] = "0.6.0"
    if index.get("feature_extractor", [None])[0] == "transformers":
        index["feature_extractor"] = ["transformers", "CLIPFeatureExtractor"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


TINY_ADAPTER = dict(
    block_out_channels=(8, 16),
    motion_layers_per_block=1,
    motion_norm_num_groups=4,
    motion_num_attention_heads=2,
    motion_max_seq_length=8,
)


def save_reference_adapter(folder, seed: int = 0, **overrides):
    """A tiny MotionAdapter built and saved by the reference; its output projections get weights
    large enough that the motion modules visibly change the frames."""
    import diffusers

    torch.manual_seed(seed)
    adapter = diffusers.MotionAdapter(**{**TINY_ADAPTER, **overrides})
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if "proj_out" in name or "to_out" in name:
                p.normal_(0, 0.5)
    adapter.save_pretrained(folder)
    return folder
