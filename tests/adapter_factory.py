"""Tiny adapters with random weights in the published formats, for the IP-Adapter and LoRA tests.

Layer lists and widths are read from the *reference's* models (the oracle), never from diffpipe's,
so a naming or ordering slip in diffpipe shows up as a mismatch instead of being mirrored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

TOL = 2 / 255


def load_both(folder, task: str = "StableDiffusionPipeline"):
    """(the reference's pipeline, diffpipe's) of class ``task`` from ``folder``, progress bars off."""
    import diffusers

    import diffpipe

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(diffusers, task).from_pretrained(folder)
    ours = getattr(diffpipe, task).from_pretrained(folder)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def images(pipe, kwargs: dict, seed: int = 0):
    """``pipe(**kwargs).images`` with a CPU generator seeded ``seed`` (the reference's warnings muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


def assert_close(expected, got):
    assert got.shape == expected.shape
    diff = np.abs(got - expected).max()
    assert diff <= TOL, f"max abs difference {diff:.5f} > 2/255"


def tiny_image_encoder(seed: int = 5):
    """A CLIPVisionModelWithProjection small enough for tests (32 px, 4 patches a side)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    return CLIPVisionModelWithProjection(config).eval()


def _randn(g, *shape, std=0.2):
    return torch.randn(*shape, generator=g) * std


def cross_attention_widths(reference_unet) -> list[int]:
    """Output width of every cross-attention layer, in the reference's ``attn_processors`` order."""
    widths = []
    for name in reference_unet.attn_processors:
        if name.endswith("attn1.processor") or "motion_modules" in name:
            continue
        widths.append(reference_unet.get_submodule(name[: -len(".processor")]).to_k.out_features)
    return widths


def ip_adapter_state(
    reference_unet,
    kind: str = "plain",
    *,
    seed: int = 0,
    embed_dim: int = 24,
    hidden_states_dim: int = 32,
    tokens: int = 4,
    std: float = 0.2,
) -> dict:
    """``{"image_proj": ..., "ip_adapter": ...}`` with the original repo's key names."""
    g = torch.Generator().manual_seed(seed)
    cross = reference_unet.config.cross_attention_dim
    if kind == "plain":
        image_proj = {
            "proj.weight": _randn(g, tokens * cross, embed_dim),
            "proj.bias": _randn(g, tokens * cross),
            "norm.weight": 1 + _randn(g, cross, std=0.05),
            "norm.bias": _randn(g, cross, std=0.05),
        }
    elif kind == "plus":
        hidden, inner = 32, 64  # one head of 64 (the reference reads heads as to_q rows // 64)
        image_proj = {
            "latents": _randn(g, 1, tokens, hidden, std=1.0),
            "proj_in.weight": _randn(g, hidden, hidden_states_dim),
            "proj_in.bias": _randn(g, hidden),
            "proj_out.weight": _randn(g, cross, hidden),
            "proj_out.bias": _randn(g, cross),
            "norm_out.weight": 1 + _randn(g, cross, std=0.05),
            "norm_out.bias": _randn(g, cross, std=0.05),
        }
        for i in range(4):  # the reference always builds four resampler layers
            p = f"layers.{i}."
            image_proj.update(
                {
                    p + "0.norm1.weight": 1 + _randn(g, hidden, std=0.05),
                    p + "0.norm1.bias": _randn(g, hidden, std=0.05),
                    p + "0.norm2.weight": 1 + _randn(g, hidden, std=0.05),
                    p + "0.norm2.bias": _randn(g, hidden, std=0.05),
                    p + "0.to_q.weight": _randn(g, inner, hidden),
                    p + "0.to_kv.weight": _randn(g, 2 * inner, hidden),
                    p + "0.to_out.weight": _randn(g, hidden, inner),
                    p + "1.0.weight": 1 + _randn(g, hidden, std=0.05),
                    p + "1.0.bias": _randn(g, hidden, std=0.05),
                    p + "1.1.weight": _randn(g, 4 * hidden, hidden),
                    p + "1.3.weight": _randn(g, hidden, 4 * hidden),
                }
            )
    elif kind == "full":
        image_proj = {
            "proj.0.weight": _randn(g, hidden_states_dim, hidden_states_dim),
            "proj.0.bias": _randn(g, hidden_states_dim),
            "proj.2.weight": _randn(g, cross, hidden_states_dim),
            "proj.2.bias": _randn(g, cross),
            "proj.3.weight": 1 + _randn(g, cross, std=0.05),
            "proj.3.bias": _randn(g, cross, std=0.05),
        }
    else:
        raise ValueError(kind)
    ip = {}
    for j, width in enumerate(cross_attention_widths(reference_unet)):
        ip[f"{2 * j + 1}.to_k_ip.weight"] = _randn(g, width, cross, std=std)
        ip[f"{2 * j + 1}.to_v_ip.weight"] = _randn(g, width, cross, std=std)
    return {"image_proj": image_proj, "ip_adapter": ip}


def write_ip_repo(folder: Path, states: dict[str, dict], encoder=None, subfolder: str = "models") -> Path:
    """``folder/subfolder/<name>`` for each state (``.bin`` nested pickle or flat ``.safetensors``) and
    the image encoder in ``folder/subfolder/image_encoder``."""
    target = Path(folder) / subfolder
    target.mkdir(parents=True, exist_ok=True)
    for name, state in states.items():
        if name.endswith(".safetensors"):
            flat = {
                f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in state[part].items()
            }
            save_file(flat, target / name)
        else:
            torch.save(state, target / name)
    if encoder is not None:
        encoder.save_pretrained(target / "image_encoder")
    return Path(folder)


def lora_pairs(model, suffixes, rank: int, g, std: float = 0.3, conv_too: bool = False):
    """{module path: (down, up)} for the reference model's Linear (and Conv2d) layers ending in ``suffixes``."""
    out = {}
    for name, module in model.named_modules():
        if not name.endswith(tuple(suffixes)):
            continue
        if isinstance(module, torch.nn.Linear):
            out[name] = (_randn(g, rank, module.in_features, std=std), _randn(g, module.out_features, rank, std=std))
        elif conv_too and isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size
            out[name] = (
                _randn(g, rank, module.in_channels, *k, std=std),
                _randn(g, module.out_channels, rank, 1, 1, std=std),
            )
    return out


def peft_lora(pairs_by_component: dict[str, dict], *, alpha_by_component: dict | None = None):
    """(tensors, safetensors metadata) in the diffusers/peft layout."""
    tensors, metadata = {}, {}
    for component, pairs in pairs_by_component.items():
        for path, (down, up) in pairs.items():
            tensors[f"{component}.{path}.lora_A.weight"] = down.contiguous()
            tensors[f"{component}.{path}.lora_B.weight"] = up.contiguous()
        if alpha_by_component and component in alpha_by_component:
            rank = next(iter(pairs.values()))[0].shape[0]
            metadata[f"{component}.r"] = rank  # the LoraConfig fields diffusers writes
            metadata[f"{component}.lora_alpha"] = alpha_by_component[component]
            metadata[f"{component}.target_modules"] = sorted(pairs)
    return tensors, ({"lora_adapter_metadata": json.dumps(metadata)} if metadata else {})


def kohya_lora(pairs_by_component: dict[str, dict], alpha_by_component: dict[str, float]):
    """The kohya / A1111 layout: ``lora_unet_...`` / ``lora_te_text_model_...`` with alphas."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    tensors = {}
    for component, pairs in pairs_by_component.items():
        for path, (down, up) in pairs.items():
            name = path if component == "unet" or path.startswith("text_model.") else f"text_model.{path}"
            base = prefix[component] + name.replace(".", "_")
            tensors[f"{base}.lora_down.weight"] = down.contiguous()
            tensors[f"{base}.lora_up.weight"] = up.contiguous()
            tensors[f"{base}.alpha"] = torch.tensor(float(alpha_by_component[component]))
    return tensors


def motion_lora(reference_motion_unet, *, rank: int = 2, seed: int = 0, std: float = 0.3) -> dict:
    """The published AnimateDiff motion-LoRA layout: ``unet.<motion attention>.processor.to_q_lora.down.weight``."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    names = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for name, module in reference_motion_unet.named_modules():
        if "motion_modules" not in name or not isinstance(module, torch.nn.Linear):
            continue
        for proj, lora_name in names.items():
            owner = name[: -len(proj) - 1]
            if name.endswith(f".{proj}") and owner.rsplit(".", 1)[-1] in ("attn1", "attn2"):
                key = f"unet.{owner}.processor.{lora_name}"
                tensors[f"{key}.down.weight"] = _randn(g, rank, module.in_features, std=std)
                tensors[f"{key}.up.weight"] = _randn(g, module.out_features, rank, std=std)
    return tensors


def save_lora(
    folder: Path, tensors: dict, metadata: dict | None = None, name: str = "pytorch_lora_weights.safetensors"
) -> Path:
    Path(folder).mkdir(parents=True, exist_ok=True)
    if name.endswith(".safetensors"):
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            Path(folder) / name,
            metadata={"format": "pt", **(metadata or {})},
        )
    else:
        torch.save(tensors, Path(folder) / name)
    return Path(folder) / name


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_name(component: str, path: str, *, sd1: bool = False) -> str:
    """kohya's name of a layer: ``lora_unet_down_blocks_0_...``, ``lora_te1_text_model_encoder_...``
    (``lora_te_`` with ``sd1=True``, the single-text-encoder spelling)."""
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    prefix = "lora_te_" if sd1 and component == "text_encoder" else KOHYA_PREFIX[component]
    return prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


def loha_factors(shape, rank: int, g, *, tucker: bool = False, std: float = 0.3) -> dict:
    """LyCORIS LoHa factors for a weight of ``shape`` (``hada_*`` names; Tucker ``hada_t1/t2`` for convs)."""
    out, rest = shape[0], shape[1:]
    fan_in = int(np.prod(rest))
    if tucker:
        kh, kw = shape[2:]
        return {
            "hada_w1_a": _randn(g, rank, out, std=std),
            "hada_w1_b": _randn(g, rank, shape[1], std=std),
            "hada_t1": _randn(g, rank, rank, kh, kw, std=std),
            "hada_w2_a": _randn(g, rank, out, std=std),
            "hada_w2_b": _randn(g, rank, shape[1], std=std),
            "hada_t2": _randn(g, rank, rank, kh, kw, std=std),
        }
    return {
        "hada_w1_a": _randn(g, out, rank, std=std),
        "hada_w1_b": _randn(g, rank, fan_in, std=std),
        "hada_w2_a": _randn(g, out, rank, std=std),
        "hada_w2_b": _randn(g, rank, fan_in, std=std),
    }


def lokr_factors(shape, g, *, a: int, c: int, w1_rank=None, w2_rank=None, tucker=False, std=0.3) -> dict:
    """LyCORIS LoKr factors for a weight ``[a*b, c*d(, kh, kw)]``: ``lokr_w1 [a, c]`` (or ``_a @ _b`` of
    rank ``w1_rank``), ``lokr_w2 [b, d(, kh, kw)]`` (or ``_a @ _b`` of rank ``w2_rank``; with ``tucker``
    for a conv, ``lokr_t2 [r, r, kh, kw]``, ``lokr_w2_a [r, b]``, ``lokr_w2_b [r, d]``)."""
    b, d, kernel = shape[0] // a, shape[1] // c, tuple(shape[2:])
    f = {}
    if w1_rank:
        f["lokr_w1_a"], f["lokr_w1_b"] = _randn(g, a, w1_rank, std=std), _randn(g, w1_rank, c, std=std)
    else:
        f["lokr_w1"] = _randn(g, a, c, std=std)
    if tucker:
        f["lokr_t2"] = _randn(g, w2_rank, w2_rank, *kernel, std=std)
        f["lokr_w2_a"], f["lokr_w2_b"] = _randn(g, w2_rank, b, std=std), _randn(g, w2_rank, d, std=std)
    elif w2_rank:
        fan = d * int(np.prod(kernel)) if kernel else d
        f["lokr_w2_a"], f["lokr_w2_b"] = _randn(g, b, w2_rank, std=std), _randn(g, w2_rank, fan, std=std)
    else:
        f["lokr_w2"] = _randn(g, b, d, *kernel, std=std)
    return f
