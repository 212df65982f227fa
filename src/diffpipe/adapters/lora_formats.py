"""LoRA checkpoint layouts -> one form: ``{component: {module path: LoraWeights}}``.

Layouts read (the names a file uses decide; a file mixing them is read key by key):

- diffusers / peft: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (``lora_B.bias`` too), with
  ``text_encoder.`` / ``text_encoder_2.`` prefixes for the text encoders; the scaling comes from the
  safetensors metadata ``lora_adapter_metadata`` (``<component>.lora_alpha``, ``r``,
  ``alpha_pattern``, ``rank_pattern``) or, without it, is 1;
- older diffusers: ``<path>.lora.down.weight`` / ``.lora.up.weight``, attention-processor LoRAs
  ``<attention>.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``, ``to_out``; on the text
  encoder they mean ``q_proj`` .. ``out_proj``) and ``lora_linear_layer.down`` / ``.up`` - this is the
  layout of the published AnimateDiff motion LoRAs;
- kohya / A1111: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  ``lora_te_`` (``lora_te1_``, ``lora_te2_``) for the text encoders; the underscored names are
  matched against the model's own module names (for a UNet also against the original LDM/SGM names,
  ``input_blocks_4_1_...``, which kohya's SDXL LoRAs use), and the scaling is ``alpha / rank``;
  the same names carry LyCORIS networks: LoHa (``hada_w1_a`` ..), LoKr (``lokr_w1`` ..) and DoRA's
  ``dora_scale`` (built in ``lora_lycoris.py``);
- DoRA in peft's layout: ``<path>.lora_magnitude_vector`` (``.weight``) beside lora_A / lora_B.

Keys that name no layer, or are no LoRA key at all, go to the caller's ``unmapped`` list (with the
reason) when it passes one; the loader warns about them, or refuses under ``strict=True``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import StateDictMismatchError, summarize

KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
METADATA_KEY = "lora_adapter_metadata"
_ATTN_PROC = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_TEXT_ATTN_PROC = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}


@dataclass
class LoraWeights:
    """One target layer's low-rank pair: ``up @ down`` (times ``alpha / rank``) is added to it."""

    down: torch.Tensor | None = None  # [rank, in] (Linear) or [rank, in, kh, kw] (Conv2d)
    up: torch.Tensor | None = None  # [out, rank] or [out, rank, 1, 1]
    up_bias: torch.Tensor | None = None
    alpha: float | None = None  # None: alpha == rank (scale 1)
    keys: list[str] = field(default_factory=list)  # the file's keys, for messages
    lycoris: dict[str, torch.Tensor] = field(default_factory=dict)  # hada_* / lokr_* tensors by name
    magnitude: torch.Tensor | None = None  # DoRA: peft's lora_magnitude_vector or LyCORIS's dora_scale
    magnitude_from: str = ""  # "peft" or "lycoris"

    @property
    def kind(self) -> str:
        """``lora`` (down/up), ``loha`` or ``lokr``."""
        kinds = {k.split("_", 1)[0] for k in self.lycoris}
        return {"hada": "loha", "lokr": "lokr"}[kinds.pop()] if len(kinds) == 1 else "lora" if not kinds else "mixed"

    @property
    def rank(self) -> int:
        if self.kind != "lora":
            from .lora_lycoris import lycoris_rank_alpha

            return lycoris_rank_alpha(self)[0]
        return int(self.down.shape[0])


Parsed = dict[str, dict[str, LoraWeights]]


def parse(
    tensors: dict[str, torch.Tensor],
    metadata: dict | None,
    models: dict[str, nn.Module],
    unmapped: list[tuple[str, str]] | None = None,
) -> Parsed:
    """Read a LoRA state dict for the pipeline components in ``models`` (``{"unet": ..., ...}``).
    Keys that are no LoRA key go to ``unmapped`` as ``(key, reason)``; without that list they raise."""
    if not tensors:
        raise StateDictMismatchError("the LoRA state dict is empty")
    foreign: list[tuple[str, str]] = [] if unmapped is None else unmapped
    out: Parsed = {}
    kohya = {k: v for k, v in tensors.items() if k.startswith(tuple(KOHYA_PREFIXES))}
    if kohya:
        _parse_kohya(kohya, models, out, foreign)
    rest = {k: v for k, v in tensors.items() if k not in kohya}
    if rest:
        _parse_diffusers(rest, models, out, foreign)
        _apply_metadata(out, _read_metadata(metadata))
    if unmapped is None and foreign:
        raise StateDictMismatchError(f"{foreign[0][1]}: {summarize(sorted(k for k, _ in foreign))}")
    for component, layers in out.items():
        for path, w in layers.items():
            if path.startswith("?"):
                continue  # a layer the model does not have: reported with the unmapped keys, whole or not
            if w.lycoris or w.kind == "mixed":
                from .lora_lycoris import lycoris_missing

                missing = lycoris_missing(w)
                if missing:
                    raise StateDictMismatchError(
                        f"LyCORIS (LoHa/LoKr) layer {component}.{path} is incomplete ({', '.join(w.keys)}): {missing}"
                    )
                continue
            if w.down is None and w.up is None and (w.magnitude is not None or w.alpha is not None):
                raise StateDictMismatchError(
                    f"LoRA layer {component}.{path} has no weights, only {', '.join(w.keys)}; an alpha or a "
                    "DoRA magnitude needs its LoRA pair (lora_down/lora_up, lora_A/lora_B) or LoHa/LoKr factors"
                )
            if w.down is None or w.up is None:
                raise StateDictMismatchError(
                    f"LoRA layer {component}.{path} has only its {'up' if w.down is None else 'down'} weight "
                    f"({', '.join(w.keys)}); both halves (lora_A/lora_B, down/up) are needed"
                )
    return out


# ------------------------------------------------------------------------------------- kohya / A1111
_LYCORIS = {
    *(f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *(f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
}


def _parse_kohya(tensors: dict, models: dict[str, nn.Module], out: Parsed, unmapped: list) -> None:
    lookup: dict[str, dict[str, str]] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        prefix = next(p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p))
        component = KOHYA_PREFIXES[prefix]
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale") and suffix not in _LYCORIS:
            unmapped.append(
                (
                    key,
                    "kohya-style keys of a kind diffpipe does not read (a kohya/LyCORIS layer has lora_down/"
                    "lora_up, hada_* (LoHa), lokr_* (LoKr), alpha and dora_scale)",
                )
            )
            continue
        if component not in lookup:
            model = models.get(component)
            lookup[component] = _underscored_names(model) if model is not None else {}
        flat = name[len(prefix) :]
        path = lookup[component].get(flat)
        if path is None and flat.startswith("text_model_"):  # transformers 5 flattened CLIPTextModel
            path = lookup[component].get(flat[len("text_model_") :])
        if path is None:
            path = "?" + flat  # matches nothing: reported with the file's keys
        entry = out.setdefault(component, {}).setdefault(path, LoraWeights())
        entry.keys.append(key)
        if suffix == "alpha":
            entry.alpha = float(value.item())
        elif suffix == "lora_down.weight":
            entry.down = value
        elif suffix == "lora_up.weight":
            entry.up = value
        elif suffix == "dora_scale":
            entry.magnitude, entry.magnitude_from = value, "lycoris"
        else:
            entry.lycoris[suffix] = value


def _underscored_names(model: nn.Module) -> dict[str, str]:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` for every
    Linear / Conv2d of ``model``, and for a UNet also the original (LDM/SGM) spelling kohya uses for
    SDXL, ``input_blocks_4_1_proj_in``; a name two layers share maps to None."""
    names: dict[str, str] = {}
    ldm = _LdmNames(model) if hasattr(model, "down_blocks") and hasattr(model, "up_blocks") else None
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and "diffpipe_lora" not in path:
            for spelling in (path, ldm and ldm.name(path)):
                if spelling:
                    flat = spelling.replace(".", "_")
                    names[flat] = None if names.get(flat, path) != path else path
    return names


class _LdmNames:
    """A diffusers UNet module path -> its name in the original (LDM / SGM) UNet: ``input_blocks``
    numbered across the down blocks (conv_in is 0), ``middle_block.0..2``, ``output_blocks``."""

    _RESNET = {
        "conv1": "in_layers.2",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
        "norm1": "in_layers.0",
        "norm2": "out_layers.0",
    }
    _FIXED = {
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }

    def __init__(self, unet: nn.Module):
        self.down = [len(b.resnets) for b in unet.down_blocks]  # layers per down block
        self.up = [len(b.resnets) for b in unet.up_blocks]
        self.up_attention = [bool(getattr(b, "attentions", None)) for b in unet.up_blocks]

    def _inner(self, kind: str, rest: str) -> str:
        if kind == "attentions":
            return f"1.{rest}"
        head, _, tail = rest.partition(".")
        return f"0.{self._RESNET.get(head, head)}" + (f".{tail}" if tail else "")

    def name(self, path: str) -> str | None:
        if path in self._FIXED:
            return self._FIXED[path]
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            side, block, kind, layer, rest = m.groups()
            block, layer = int(block), int(layer)
            if side == "down":
                index = 1 + sum(n + 1 for n in self.down[:block]) + layer
                return f"input_blocks.{index}.{self._inner(kind, rest)}"
            index = sum(self.up[:block]) + layer
            return f"output_blocks.{index}.{self._inner(kind, rest)}"
        m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.conv", path)
        if m:
            block = int(m.group(2))
            if m.group(1) == "down":
                return f"input_blocks.{sum(n + 1 for n in self.down[: block + 1])}.0.op"
            return f"output_blocks.{sum(self.up[: block + 1]) - 1}.{2 if self.up_attention[block] else 1}.conv"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", path)
        if m:
            kind, layer, rest = m.groups()
            index = 1 if kind == "attentions" else 2 * int(layer)
            return f"middle_block.{index}.{self._inner(kind, rest)[2:]}"
        return None


# ------------------------------------------------------------------------------------- diffusers / peft
_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)


def _split_component(key: str, models: dict[str, nn.Module]) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in models or head in ("unet", "text_encoder", "text_encoder_2"):
        return head, rest
    unet = models.get("unet")
    if unet is not None and hasattr(unet, head):  # old files: UNet keys without the "unet." prefix
        return "unet", key
    return head, rest


def _parse_diffusers(tensors: dict, models: dict[str, nn.Module], out: Parsed, unmapped: list) -> None:
    for key, value in tensors.items():
        component, rest = _split_component(key, models)
        rest = rest.replace(".processor.", ".")
        path = kind = None
        for suffix, what in _SUFFIXES:
            if rest.endswith(suffix):
                path, kind = rest[: -len(suffix)], what
                break
        if path is None:
            m = re.fullmatch(r"(.+)\.(to_q_lora|to_k_lora|to_v_lora|to_out_lora)\.(down|up)\.weight", rest)
            if m is None:
                unmapped.append(
                    (
                        key,
                        "not LoRA keys (every key must be a LoRA weight: lora_A/lora_B, lora.down/lora.up, "
                        "lora_down/lora_up with alpha, lora_magnitude_vector, or to_q_lora...)",
                    )
                )
                continue
            names = _ATTN_PROC if component == "unet" else _TEXT_ATTN_PROC
            path, kind = f"{m.group(1)}.{names[m.group(2)]}", m.group(3)
        model = models.get(component)
        if component.startswith("text_encoder") and model is not None and not hasattr(model, "text_model"):
            path = path.removeprefix("text_model.")  # transformers 5 flattened CLIPTextModel
        entry = out.setdefault(component, {}).setdefault(path, LoraWeights())
        entry.keys.append(key)
        if kind == "alpha":
            entry.alpha = float(value.item())
        elif kind == "magnitude":
            entry.magnitude, entry.magnitude_from = value, "peft"
        else:
            setattr(entry, kind, value)


def _read_metadata(metadata: dict | None) -> dict:
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError) as e:
        raise StateDictMismatchError(f"the LoRA file's {METADATA_KEY} metadata is not JSON: {e}") from e
    return parsed if isinstance(parsed, dict) else {}


def _pattern_value(patterns: dict, path: str):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern.lstrip('^')}", path):
            return value
    return None


def _apply_metadata(out: Parsed, metadata: dict) -> None:
    """Per-component ``lora_alpha`` / ``alpha_pattern`` (the config peft saves) onto layers without
    an alpha of their own."""
    if not metadata:
        return
    for component, layers in out.items():
        own = {k[len(component) + 1 :]: v for k, v in metadata.items() if k.startswith(component + ".")}
        if not own:
            continue
        for path, w in layers.items():
            if w.alpha is not None:
                continue
            alpha = _pattern_value(own.get("alpha_pattern"), path)
            w.alpha = float(alpha if alpha is not None else own.get("lora_alpha", w.rank if w.down is not None else 1))
