"""What a single checkpoint file holds, told from its tensors' names and shapes alone (no network).

The families are told apart by structure, not by sizes, so that fine-tunes and small test models of
the same architecture are recognised too: SDXL's two-encoder ``conditioner.embedders`` (a refiner has
only the OpenCLIP one), SD 2.x's OpenCLIP ``cond_stage_model.model`` and linear ``proj_in`` (SD 1.x:
the transformers-layout ``cond_stage_model.transformer`` and 1x1-conv ``proj_in``), inpainting's 9 UNet
input channels. What cannot be told from tensors (SD 2.x v-prediction at 768 px vs the 512 px base
model) takes the reference's default (v-prediction) unless the caller says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .keymap import CONTROLNET_PREFIX, TEXT_PREFIXES, UNET_PREFIX, VAE_PREFIX

# Architectures a file may be of that are not a Stable Diffusion UNet pipeline: (marker, what, advice).
OTHER_FAMILIES = (
    ("lora_unet_", "a LoRA (kohya layout)", "load it into a pipeline with pipe.load_lora_weights(path)"),
    ("lora_te_", "a LoRA (kohya layout)", "load it into a pipeline with pipe.load_lora_weights(path)"),
    (".lora_down.", "a LoRA", "load it into a pipeline with pipe.load_lora_weights(path)"),
    (".lora_A.", "a LoRA (peft layout)", "load it into a pipeline with pipe.load_lora_weights(path)"),
    ("double_blocks.", "a Flux transformer", "load it with FluxTransformer2DModel.from_single_file(path)"),
    ("joint_blocks.", "a Stable Diffusion 3 transformer", "SD3 single files are not supported yet"),
    ("emb_params", "a textual-inversion embedding", "load it with pipe.load_textual_inversion(path)"),
    ("string_to_param", "a textual-inversion embedding", "load it with pipe.load_textual_inversion(path)"),
    ("image_proj.", "an IP-Adapter", "load it with pipe.load_ip_adapter(...)"),
    ("down_blocks.0.resnets.0.conv1.weight", "a model in the diffusers layout (not an original single file)",
     "put it in a folder with its config.json and use from_pretrained"),
)  # fmt: skip


@dataclass
class Detection:
    """What a file holds: ``kind`` (a type with shipped configs, e.g. ``"sd1"``, ``"sdxl-inpaint"``,
    ``"vae"``), the family of its text encoders' layout, and which parts are in it."""

    kind: str
    family: str  # "sd1", "sd2", "sdxl", "sdxl-refiner", or "vae"
    parts: list[str] = field(default_factory=list)  # unet, vae, text_encoder, text_encoder_2
    in_channels: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def pipeline_class(self) -> str:
        xl = self.family.startswith("sdxl")
        if self.kind.endswith("inpaint"):
            return "StableDiffusionXLInpaintPipeline" if xl else "StableDiffusionInpaintPipeline"
        if self.family == "sdxl-refiner":
            return "StableDiffusionXLImg2ImgPipeline"
        return "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"


def detect(shapes: dict[str, tuple], where: str) -> Detection:
    """The :class:`Detection` of a file whose tensors have these names and shapes."""
    names = list(shapes)
    if CONTROLNET_PREFIX + "input_hint_block.0.weight" in shapes:  # an original-layout ControlNet
        inner = {
            UNET_PREFIX + n[len(CONTROLNET_PREFIX) :]: v for n, v in shapes.items() if n.startswith(CONTROLNET_PREFIX)
        }
        family = _family([], inner)
        return Detection(
            "controlnet", family, ["controlnet"], int(shapes[CONTROLNET_PREFIX + "input_blocks.0.0.weight"][1])
        )
    unet_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    has_unet = unet_in is not None
    has_vae = any(n.startswith(VAE_PREFIX + "decoder.") for n in names)
    if not has_unet:
        if _is_bare_vae(names):
            return Detection("vae", "vae", ["vae"])
        if has_vae:
            return Detection("vae", "vae", ["vae"], notes=["only the VAE of a whole-pipeline file is present"])
        refuse_other(names, where)
    family = _family(names, shapes)
    in_channels = int(unet_in[1])
    parts = ["unet"] + (["vae"] if has_vae else [])
    parts += [name for name, prefix in TEXT_PREFIXES[family].items() if any(n.startswith(prefix) for n in names)]
    inpaint = in_channels == 9
    if family == "sdxl-refiner":
        kind = "sdxl-refiner"
    else:
        kind = family + ("-inpaint" if inpaint else "")
    notes = []
    if family == "sd2" and not inpaint:
        notes.append(
            "SD 2.x: v-prediction at 768 px assumed (the tensors cannot tell it from the 512 px base model); pass "
            "prediction_type='epsilon' for a base-model fine-tune"
        )
    return Detection(kind, family, parts, in_channels, notes)


def _is_bare_vae(names) -> bool:
    return any(n.startswith("decoder.conv_in.") for n in names) and any(n.startswith("encoder.conv_in.") for n in names)


def _family(names, shapes) -> str:
    """The text-encoder layout family: from the encoders' prefixes, else from the UNet's structure."""
    if any(n.startswith("conditioner.embedders.1.model.") for n in names):
        return "sdxl"
    if any(n.startswith("conditioner.embedders.0.model.") for n in names):
        return "sdxl-refiner"
    if any(n.startswith("conditioner.embedders.") for n in names):
        return "sdxl"
    if any(n.startswith("cond_stage_model.model.") for n in names):
        return "sd2"
    if any(n.startswith("cond_stage_model.transformer.") for n in names):
        return "sd1"
    # a UNet without text encoders: SDXL's has a label embedding (the refiner's takes 2560 features,
    # the base's 2816); SD 2.x projects into attention with linears, SD 1.x with 1x1 convs
    label = shapes.get(UNET_PREFIX + "label_emb.0.0.weight")
    if label is not None:
        return "sdxl-refiner" if int(label[1]) == 2560 else "sdxl"
    proj_in = next((v for n, v in shapes.items() if n.startswith(UNET_PREFIX) and n.endswith(".proj_in.weight")), None)
    if proj_in is not None and len(proj_in) == 2:
        return "sd2"
    return "sd1"


def refuse_other(names, where: str) -> None:
    """The error for a file that holds no Stable Diffusion UNet pipeline part: what it looks like."""
    for marker, what, advice in OTHER_FAMILIES:
        if any(marker in n for n in names):
            raise ConfigError(f"{where} looks like {what}, not a Stable Diffusion checkpoint: {advice}")
    shown = ", ".join(sorted(names)[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
    raise ConfigError(
        f"{where}: unknown architecture: no UNet ({UNET_PREFIX}input_blocks.0.0.weight) and no VAE found among "
        f"{len(names)} tensor(s): {shown or 'none'}. diffpipe reads single files of Stable Diffusion 1.x / 2.x / "
        "XL (base, refiner, inpainting) and standalone VAEs; for other models use a diffusers folder."
    )
