"""Single-file checkpoints in the ORIGINAL Stability / LDM layout, written from diffusers-format folders.

The test-side oracle for single-file loading: a converter written here from the public facts of the
original layout (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``,
``conditioner.embedders.*``), the inverse of what a single-file loader does. tests/single_file/
test_factory.py proves it against the reference's own ``from_single_file``: a file written here and
loaded by the reference gives the same weights and images as the folder it came from.

Kinds: ``sd1``, ``sd1-inpaint``, ``sd2`` (OpenCLIP-style text tower, v-prediction), ``sdxl``,
``sdxl-refiner``, ``sdxl-inpaint``. Three things:

* ``save_reference_kind(kind, folder)``: a tiny pipeline of that kind, built and saved by the reference;
* ``to_original_state_dict(folder_or_components, kind)`` / ``write_single_file(folder, path, kind)``:
  the conversion to one original-layout state dict / .safetensors file;
* ``original_layout_full_size(kind)``: names -> shapes of the published full-size checkpoints'
  layout (SD1.5, SD1.5-inpaint, SD2.1, SDXL base 1.0, SDXL refiner 1.0), built on the meta device.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch

from sd_factory import reference_components, save_reference_pipeline
from sdxl_factory import SDXL_UNET, save_reference_sdxl

KINDS = ("sd1", "sd1-inpaint", "sd2", "sdxl", "sdxl-refiner", "sdxl-inpaint")

# the reference's pipeline class for each kind (what from_single_file is called on)
PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
    "sdxl-inpaint": "StableDiffusionXLInpaintPipeline",
}

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# where each kind's text encoders go: component -> (the embedder's prefix in the original file, "clip" (its
# names under `transformer.text_model.`) | "open_clip" (under `model.`))
TEXT_ENCODERS = {
    "sd1": {"text_encoder": ("cond_stage_model.", "clip")},
    "sd1-inpaint": {"text_encoder": ("cond_stage_model.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.", "open_clip")},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.", "open_clip"),
    },
    "sdxl-refiner": {"text_encoder_2": ("conditioner.embedders.0.", "open_clip")},
    "sdxl-inpaint": {
        "text_encoder": ("conditioner.embedders.0.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.", "open_clip"),
    },
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


# ---------------------------------------------------------------------------------------- tiny folders
def save_reference_kind(kind: str, folder: Path, seed: int = 0) -> Path:
    """A tiny pipeline of ``kind`` built and saved by the reference to ``folder`` (random weights, real
    key layouts: two UNet levels, attention in the second, CLIP / OpenCLIP-style text encoders)."""
    _check_kind(kind)
    folder = Path(folder)
    if kind == "sd1":
        return save_reference_pipeline(folder, safety_checker=False, seed=seed)
    if kind == "sd1-inpaint":
        return save_reference_pipeline(folder, task=PIPELINES[kind], in_channels=9, safety_checker=False, seed=seed)
    if kind == "sd2":
        return _save_reference_sd2(folder, seed)
    if kind == "sdxl":
        return save_reference_sdxl(folder, seed=seed)
    if kind == "sdxl-refiner":
        return save_reference_sdxl(folder, task=PIPELINES[kind], refiner=True, seed=seed)
    return save_reference_sdxl(folder, task=PIPELINES[kind], unet_kwargs={"in_channels": 9}, seed=seed)


def _save_reference_sd2(folder: Path, seed: int) -> Path:
    """SD2-style: an OpenCLIP-like text encoder (a CLIPTextModel with plain gelu), linear projections in
    the UNet's transformers, upcast attention, a v-prediction DDIM scheduler."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    components = reference_components(
        seed,
        safety_checker=False,
        scheduler="DDIMScheduler",
        tmp=folder.parent,
        unet_kwargs={"use_linear_projection": True, "upcast_attention": True},
    )
    old = components["text_encoder"].config
    torch.manual_seed(seed + 1000)
    config = CLIPTextConfig(
        hidden_size=old.hidden_size,
        intermediate_size=4 * old.hidden_size,
        num_attention_heads=old.num_attention_heads,
        num_hidden_layers=old.num_hidden_layers,
        vocab_size=old.vocab_size,
        max_position_embeddings=old.max_position_embeddings,
        bos_token_id=old.bos_token_id,
        eos_token_id=old.eos_token_id,
        pad_token_id=old.pad_token_id,
        hidden_act="gelu",
        projection_dim=old.hidden_size,
    )
    components["text_encoder"] = CLIPTextModel(config).eval()
    tok_dir = folder.parent / f"diffpipe-tok-{seed}"
    components["tokenizer"] = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")  # SD2 pads with "!"
    components["scheduler"] = diffusers.DDIMScheduler.from_config(
        components["scheduler"].config, prediction_type="v_prediction", steps_offset=1, clip_sample=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(**components, requires_safety_checker=False)
        pipe.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------- UNet
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _count(keys, pattern: str) -> int:
    """1 + the largest number captured by ``pattern`` among ``keys`` (0 when none match)."""
    found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _resnet_name(rest: str) -> str:
    layer, _, param = rest.partition(".")
    if layer not in _RESNET:
        raise KeyError(f"unexpected resnet parameter {rest!r}")
    return f"{_RESNET[layer]}.{param}"


def unet_key_map(keys) -> dict[str, str]:
    """diffusers UNet2DConditionModel names -> original ``openaimodel`` names (without the
    ``model.diffusion_model.`` prefix). Every resnet of a level is a block of its own (its transformer
    at ``.1``); the down levels' downsamplers are blocks of their own (``.0.op``), the up levels'
    upsamplers sit in the level's last block, after its transformer if it has one (``.2.conv``, else
    ``.1.conv``). The resnets per level come from the names."""
    keys = list(keys)
    per_block = _count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    per_up = _count(keys, r"up_blocks\.0\.resnets\.(\d+)\.")
    up_attn = {int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key in keys:
        top = next((t for t in _UNET_TOP if key.startswith(t + ".")), None)
        if top is not None:
            out[key] = _UNET_TOP[top] + key[len(top) :]
            continue
        if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, part, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = 1 + level * (per_block + 1) + j
            out[key] = f"input_blocks.{n}.0.{_resnet_name(rest)}" if part == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            n = 1 + int(m.group(1)) * (per_block + 1) + per_block
            out[key] = f"input_blocks.{n}.0.op.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[key] = f"middle_block.{2 * int(m.group(1))}.{_resnet_name(m.group(2))}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            out[key] = f"middle_block.1.{m.group(1)}"
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            level, part, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            n = level * per_up + j
            out[key] = (
                f"output_blocks.{n}.0.{_resnet_name(rest)}" if part == "resnets" else f"output_blocks.{n}.1.{rest}"
            )
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            level = int(m.group(1))
            n = level * per_up + per_up - 1
            slot = 2 if level in up_attn else 1
            out[key] = f"output_blocks.{n}.{slot}.conv.{m.group(2)}"
        else:
            raise KeyError(f"unexpected UNet parameter {key!r}")
    return out


# ---------------------------------------------------------------------------------------- VAE
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}


def vae_key_map(keys) -> dict[str, str]:
    """diffusers AutoencoderKL names -> original ``first_stage_model`` names (without the prefix). The
    decoder's up blocks run in reverse: diffusers' up_blocks.i is the original's up.(n - 1 - i)."""
    keys = list(keys)
    n_up = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key in keys:
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            out[key] = key
            continue
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE parameter {key!r}")
        if m := re.match(r"(conv_in|conv_out|conv_norm_out)\.(.+)", rest):
            name = {"conv_norm_out": "norm_out"}.get(m.group(1), m.group(1))
            new = f"{name}.{m.group(2)}"
        elif m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.+)", rest):
            i = int(m.group(2)) if m.group(1) == "down" else n_up - 1 - int(m.group(2))
            new = f"{m.group(1)}.{i}.block.{m.group(3)}.{_VAE_RESNET[m.group(4)]}.{m.group(5)}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
            new = f"down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
            new = f"up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", rest):
            new = f"mid.block_{int(m.group(1)) + 1}.{_VAE_RESNET[m.group(2)]}.{m.group(3)}"
        elif m := re.match(r"mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", rest):
            new = f"mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}"
        else:
            raise KeyError(f"unexpected VAE parameter {key!r}")
        out[key] = f"{side}.{new}"
    return out


def convert_vae(state: dict) -> dict:
    """The VAE in the original layout: its attention's q / k / v / proj_out are 1x1 convs."""
    out = {}
    for key, new in vae_key_map(state).items():
        value = state[key]
        if ".attn_1." in new and new.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


# ---------------------------------------------------------------------------------------- text encoders
def _text_state(state: dict) -> dict:
    """A transformers CLIP text model's state with the ``text_model.`` prefix dropped (transformers 5
    keeps it on CLIPTextModelWithProjection, not on CLIPTextModel)."""
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def convert_clip(state: dict) -> dict:
    """CLIP-L as the original keeps it: transformers' own names under ``transformer.text_model.``."""
    state = _text_state(state)
    return {f"transformer.text_model.{k}": v for k, v in state.items() if not k.startswith("text_projection.")}


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def convert_open_clip(state: dict, *, extra_layers: int = 0, projection: torch.Tensor | None = None) -> dict:
    """An OpenCLIP text tower (names under ``model.``): q / k / v merged into ``attn.in_proj_weight`` /
    ``in_proj_bias``, the projection stored as [width, proj] (used as ``x @ P``). ``extra_layers``:
    resblocks after the last the encoder has, copies of its last (SD2's tower has one the pipeline never
    runs). ``projection``: the [width, proj] matrix when the encoder has none (SD2)."""
    state = _text_state(state)
    out = {
        "model.token_embedding.weight": state["embeddings.token_embedding.weight"],
        "model.positional_embedding": state["embeddings.position_embedding.weight"],
        "model.ln_final.weight": state["final_layer_norm.weight"],
        "model.ln_final.bias": state["final_layer_norm.bias"],
    }
    n = _count(state, r"encoder\.layers\.(\d+)\.")
    for i in range(n + extra_layers):
        src, dst = f"encoder.layers.{min(i, n - 1)}.", f"model.transformer.resblocks.{i}."
        copy = torch.clone if i >= n else (lambda t: t)  # a file holds no two names on one storage
        for part in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{part}"] = torch.cat(qkv, dim=0)
            for old, new in _OPEN_CLIP_LAYER.items():
                out[f"{dst}{new}.{part}"] = copy(state[f"{src}{old}.{part}"])
    if "text_projection.weight" in state:
        projection = state["text_projection.weight"].T
    if projection is not None:
        out["model.text_projection"] = projection
    return out


# ---------------------------------------------------------------------------------------- whole files
def config_folder(folder, dest) -> Path:
    """A copy of ``folder`` without its weights (model_index.json, every config, tokenizer and
    scheduler file; no .safetensors / .bin): what ``from_single_file(path, config=...)`` can take, so a
    loaded weight can only have come from the single file."""
    import shutil

    folder, dest = Path(folder), Path(dest)
    for src in folder.rglob("*"):
        if src.is_file() and src.suffix not in (".safetensors", ".bin", ".ckpt", ".pt"):
            target = dest / src.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return dest


_WEIGHT_FILE = re.compile(r"(diffusion_pytorch_model|model)(-\d+-of-\d+)?\.safetensors")


def _load_component(folder: Path, name: str) -> dict:
    """One component's state from a diffusers folder (its non-variant .safetensors, shards merged)."""
    from safetensors.torch import load_file

    files = sorted(p for p in (folder / name).glob("*.safetensors") if _WEIGHT_FILE.fullmatch(p.name))
    if not files:
        raise FileNotFoundError(f"no weights for {name!r} under {folder}")
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def _components(source, kind: str) -> dict[str, dict]:
    """{component: state dict} from a folder, a pipeline (its ``components``) or a mapping of modules /
    state dicts."""
    names = ["unet", "vae", *TEXT_ENCODERS[kind]]
    if isinstance(source, (str, Path)):
        return {name: _load_component(Path(source), name) for name in names}
    source = getattr(source, "components", source)
    out = {}
    for name in names:
        value = source[name]
        out[name] = value.state_dict() if hasattr(value, "state_dict") else dict(value)
    return out


def to_original_state_dict(
    folder_or_components,
    kind: str,
    *,
    position_ids: bool = False,
    logit_scale: bool = False,
    open_clip_extra_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """One original-layout state dict from a diffusers-format pipeline of ``kind`` (a folder, a
    pipeline, or a mapping of its components' modules / state dicts).

    ``position_ids``: write CLIP-L's optional ``embeddings.position_ids`` buffer ([1, n] int64), as
    some published SD1 files do. ``logit_scale``: write the OpenCLIP towers' ``model.logit_scale``
    scalar (the contrastive temperature, log(1 / 0.07); no pipeline uses it) as the published SD2 /
    SDXL files keep it. ``open_clip_extra_layers``: resblocks after the encoder's last
    (copies of it) in the OpenCLIP towers; None means the published shape, one for SD2 (its tower
    has 24 resblocks, the pipeline runs 23), none for SDXL's bigG.
    """
    _check_kind(kind)
    parts = _components(folder_or_components, kind)
    out = {UNET_PREFIX + new: parts["unet"][old] for old, new in unet_key_map(parts["unet"]).items()}
    out.update({VAE_PREFIX + k: v for k, v in convert_vae(parts["vae"]).items()})
    for name, (prefix, style) in TEXT_ENCODERS[kind].items():
        if style == "clip":
            text = convert_clip(parts[name])
            if position_ids:
                n = text["transformer.text_model.embeddings.position_embedding.weight"].shape[0]
                text["transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
        else:
            extra = open_clip_extra_layers
            if extra is None:
                extra = 1 if kind == "sd2" else 0
            projection = None
            if kind == "sd2":  # CLIPTextModel has none; OpenCLIP's is [width, width], SD2 never uses it
                ln = _text_state(parts[name])["final_layer_norm.weight"]
                projection = torch.eye(ln.shape[0], dtype=ln.dtype, device=ln.device)
            text = convert_open_clip(parts[name], extra_layers=extra, projection=projection)
            if logit_scale:
                ln = text["model.ln_final.weight"]
                text["model.logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=ln.dtype, device=ln.device)
        out.update({prefix + k: v for k, v in text.items()})
    return out


def write_single_file(folder, path, kind: str, dtype: torch.dtype | None = None, **options) -> Path:
    """Write ``folder`` (a diffusers-format pipeline of ``kind``) as one original-layout .safetensors at
    ``path``; ``dtype`` casts the floating-point tensors. ``options`` go to ``to_original_state_dict``."""
    from safetensors.torch import save_file

    state = to_original_state_dict(folder, kind, **options)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


# ---------------------------------------------------------------------------------------- full size
# The published configs (only what differs from the library defaults, plus what names the layout).
SD15_UNET = dict(
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=64,
)
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
SDXL_REFINER_UNET = dict(
    SDXL_UNET,
    attention_head_dim=[6, 12, 24, 24],
    block_out_channels=[384, 768, 1536, 1536],
    cross_attention_dim=1280,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=4,
    projection_class_embeddings_input_dim=2560,
    addition_time_embed_dim=256,
)
SD_VAE = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=512,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    vocab_size=49408,
    max_position_embeddings=77,
)
OPEN_CLIP_H = dict(  # SD2's ViT-H/14 text tower as diffusers keeps it: 23 of its 24 resblocks
    CLIP_L, hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu"
)
OPEN_CLIP_BIGG = dict(  # SDXL's bigG/14 text tower, all 32 resblocks, with its projection
    CLIP_L,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
)

_FULL_SIZE = {  # kind -> (UNet config, {text encoder: (config, with projection)})
    "sd1": (SD15_UNET, {"text_encoder": (CLIP_L, False)}),
    "sd1-inpaint": (dict(SD15_UNET, in_channels=9), {"text_encoder": (CLIP_L, False)}),
    "sd2": (SD21_UNET, {"text_encoder": (OPEN_CLIP_H, False)}),
    "sdxl": (SDXL_UNET, {"text_encoder": (CLIP_L, False), "text_encoder_2": (OPEN_CLIP_BIGG, True)}),
    "sdxl-refiner": (SDXL_REFINER_UNET, {"text_encoder_2": (OPEN_CLIP_BIGG, True)}),
    "sdxl-inpaint": (
        dict(SDXL_UNET, in_channels=9),
        {"text_encoder": (CLIP_L, False), "text_encoder_2": (OPEN_CLIP_BIGG, True)},
    ),
}
FULL_SIZE_NAMES = {
    "sd1": "SD1.5",
    "sd1-inpaint": "SD1.5-inpaint",
    "sd2": "SD2.1",
    "sdxl": "SDXL base 1.0",
    "sdxl-refiner": "SDXL refiner 1.0",
    "sdxl-inpaint": "SDXL inpaint 0.1",
}


def full_size_components(kind: str) -> dict:
    """The published architecture of ``kind`` as reference / transformers modules on the meta device
    (no memory, no data): unet, vae and the text encoder(s)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_kind(kind)
    unet_config, encoders = _FULL_SIZE[kind]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"unet": diffusers.UNet2DConditionModel(**unet_config), "vae": diffusers.AutoencoderKL(**SD_VAE)}
        for name, (config, projection) in encoders.items():
            cls = CLIPTextModelWithProjection if projection else CLIPTextModel
            out[name] = cls(CLIPTextConfig(**config))
    return out


def original_layout_full_size(
    kind: str, *, position_ids: bool | None = None, logit_scale: bool | None = None
) -> dict[str, tuple]:
    """Name -> shape of the published full-size checkpoint of ``kind`` in the original layout, mapped
    through the converter from the meta-device modules (SD2's OpenCLIP tower with all 24 resblocks and
    its [1024, 1024] text_projection). The optional extras, None meaning as the published files have
    them: ``position_ids`` (CLIP-L's [1, 77] buffer; SD1.5's files) and ``logit_scale`` (the OpenCLIP
    towers' scalar, shape (); SD2's and SDXL's files). Pipeline schedule buffers (betas, alphas_cumprod,
    ...) and EMA copies that some published files also hold are not included."""
    _check_kind(kind)
    if position_ids is None:
        position_ids = kind.startswith("sd1")
    if logit_scale is None:
        logit_scale = not kind.startswith("sd1")
    components = full_size_components(kind)
    state = to_original_state_dict(components, kind, position_ids=position_ids, logit_scale=logit_scale)
    return {k: tuple(v.shape) for k, v in state.items()}
