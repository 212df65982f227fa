"""Key maps between the original checkpoint layout (the LDM / SGM training code's, which web UIs and
model sites publish as one file) and diffpipe's modules, in both directions, in one place.

Each component's map is data: a table of module prefixes (original -> ours) built from the
component's config (how many blocks, which have attention), plus per-kind leaf renames (a ResNet's
``in_layers.0`` is our ``norm1``). Renaming returns views of the tensors it was given: the only
tensors made are the ones a layout genuinely differs in (OpenCLIP's fused ``in_proj`` split in three
as views, VAE attention's 1x1 convs as linear weights by reshape, the text projection transposed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

# ------------------------------------------------------------------------------------ where each part lives
# Prefixes of each component in a whole-pipeline file, per layout family.
UNET_PREFIX = "model.diffusion_model."
CONTROLNET_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": {"text_encoder": "cond_stage_model.transformer."},
    "sd2": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    },
    "sdxl-refiner": {"text_encoder_2": "conditioner.embedders.0.model."},
}

RESNET_LEAVES = {  # original -> ours, inside a UNet ResNet block
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET_LEAVES = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
OPENCLIP_LEAVES = {  # inside one resblock
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # in the file, not in a text encoder


@dataclass
class PrefixMap:
    """Module prefixes original -> ours, each with the leaf renames that apply under it."""

    pairs: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)

    def add(self, original: str, ours: str, leaves: dict[str, str] | None = None) -> None:
        self.pairs[original] = (ours, leaves or {})

    def inverse(self) -> "PrefixMap":
        out = PrefixMap()
        for original, (ours, leaves) in self.pairs.items():
            out.add(ours, original, {v: k for k, v in leaves.items()})
        return out

    def rename(self, key: str) -> str | None:
        """``key`` under the longest matching prefix, renamed; None where no prefix matches."""
        parts = key.split(".")
        for cut in range(min(len(parts) - 1, 6), 0, -1):
            head = ".".join(parts[:cut])
            hit = self.pairs.get(head)
            if hit is None:
                continue
            ours, leaves = hit
            rest = ".".join(parts[cut:])
            for leaf_from, leaf_to in leaves.items():
                if rest == leaf_from or rest.startswith(leaf_from + "."):
                    rest = leaf_to + rest[len(leaf_from) :]
                    break
            return f"{ours}.{rest}" if ours else rest
        return None


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def unet_map(config) -> PrefixMap:
    """The original UNet layout (``input_blocks`` / ``middle_block`` / ``output_blocks``) for ``config``."""
    m = _encoder_map(config)
    m.add("out.0", "conv_norm_out")
    m.add("out.2", "conv_out")
    n = len(config["block_out_channels"])
    up = config["up_block_types"]
    up_layers = list(reversed(_per_block(config["layers_per_block"], n)))
    index = 0
    for b in range(n):
        count = up_layers[b] + 1
        for j in range(count):
            m.add(f"output_blocks.{index}.0", f"up_blocks.{b}.resnets.{j}", RESNET_LEAVES)
            if _has_attention(up[b]):
                m.add(f"output_blocks.{index}.1", f"up_blocks.{b}.attentions.{j}")
            if j == count - 1 and b < n - 1:
                position = 2 if _has_attention(up[b]) else 1
                m.add(f"output_blocks.{index}.{position}.conv", f"up_blocks.{b}.upsamplers.0.conv")
            index += 1
    return m


def _encoder_map(config) -> PrefixMap:
    """The UNet's encoder half (time embedding, ``input_blocks``, ``middle_block``), which a ControlNet
    shares."""
    m = PrefixMap()
    n = len(config["block_out_channels"])
    layers = _per_block(config["layers_per_block"], n)
    down = config["down_block_types"]
    m.add("time_embed.0", "time_embedding.linear_1")
    m.add("time_embed.2", "time_embedding.linear_2")
    m.add("label_emb.0.0", "add_embedding.linear_1")
    m.add("label_emb.0.2", "add_embedding.linear_2")
    m.add("input_blocks.0.0", "conv_in")
    index = 1
    for b in range(n):
        for j in range(layers[b]):
            m.add(f"input_blocks.{index}.0", f"down_blocks.{b}.resnets.{j}", RESNET_LEAVES)
            if _has_attention(down[b]):
                m.add(f"input_blocks.{index}.1", f"down_blocks.{b}.attentions.{j}")
            index += 1
        if b < n - 1:
            m.add(f"input_blocks.{index}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
            index += 1
    m.add("middle_block.0", "mid_block.resnets.0", RESNET_LEAVES)
    m.add("middle_block.1", "mid_block.attentions.0")
    m.add("middle_block.2", "mid_block.resnets.1", RESNET_LEAVES)
    return m


def controlnet_map(config) -> PrefixMap:
    """The original ControlNet layout (``control_model.``: the UNet encoder's names, the hint block, the
    zero convolutions) for a ``ControlNetModel`` config."""
    m = _encoder_map(config)
    hint = len(config["conditioning_embedding_out_channels"])
    convs = ["conv_in", *(f"blocks.{k}" for k in range(2 * (hint - 1))), "conv_out"]
    for k, name in enumerate(convs):  # a Sequential of convs with SiLUs between them
        m.add(f"input_hint_block.{2 * k}", f"controlnet_cond_embedding.{name}")
    n = len(config["block_out_channels"])
    residuals = 1 + sum(_per_block(config["layers_per_block"], n)) + (n - 1)
    for i in range(residuals):
        m.add(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    m.add("middle_block_out.0", "controlnet_mid_block")
    return m


def vae_map(config) -> PrefixMap:
    """The original VAE layout (``encoder.down.N.block.M``, ``decoder.up`` in reverse order) for ``config``."""
    m = PrefixMap()
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    for part in ("encoder", "decoder"):
        m.add(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", VAE_RESNET_LEAVES)
        m.add(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", VAE_ATTENTION_LEAVES)
        m.add(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", VAE_RESNET_LEAVES)
        m.add(f"{part}.norm_out", f"{part}.conv_norm_out")
        for same in ("conv_in", "conv_out"):
            m.add(f"{part}.{same}", f"{part}.{same}")
    for i in range(n):
        for j in range(layers):
            m.add(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET_LEAVES)
        if i < n - 1:
            m.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
        for j in range(layers + 1):
            m.add(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{n - 1 - i}.resnets.{j}", VAE_RESNET_LEAVES)
        if i > 0:
            m.add(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{n - 1 - i}.upsamplers.0.conv")
    m.add("quant_conv", "quant_conv")
    m.add("post_quant_conv", "post_quant_conv")
    return m


# ------------------------------------------------------------------------------------ original -> ours
def unet_to_ours(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(our state dict, keys that map nowhere) from a UNet's original-layout tensors (prefix removed)."""
    return _renamed(state, unet_map(config))


def controlnet_to_ours(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[str]]:
    return _renamed(state, controlnet_map(config))


def vae_to_ours(state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unmapped = _renamed(state, vae_map(config))
    for key, tensor in out.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and tensor.ndim == 4:
            out[key] = tensor.reshape(tensor.shape[:2])  # 1x1 conv -> linear (a view)
    return out, unmapped


def _renamed(state, prefix_map: PrefixMap) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unmapped = {}, []
    for key, tensor in state.items():
        new = prefix_map.rename(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = tensor
    return out, unmapped


def clip_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A CLIP text encoder already in the transformers layout (SD 1.x, SDXL's first): the same keys,
    under ``text_model.`` (old files lack it); the ``position_ids`` buffer is dropped (computed)."""
    out, unmapped = {}, []
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("text_projection"):
            out[key] = tensor
            continue
        out[key if key.startswith("text_model.") else "text_model." + key] = tensor
    return out, unmapped


def openclip_to_ours(
    state: dict[str, torch.Tensor], num_layers: int, with_projection: bool
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An OpenCLIP text tower (SD 2.x, SDXL's second) as a transformers CLIP text encoder of
    ``num_layers`` layers (SD 2.x's has one fewer than the tower: the last is never used)."""
    out, unmapped = {}, []
    for key, tensor in state.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = tensor
        elif key == "text_projection":
            if with_projection:
                out["text_projection.weight"] = tensor.t().contiguous()
        elif key in OPENCLIP_UNUSED:
            continue
        elif key.startswith("transformer.resblocks."):
            _, _, index, rest = key.split(".", 3)
            if int(index) >= num_layers:
                continue  # a layer the encoder does not use
            base = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = part
                continue
            for leaf_from, leaf_to in OPENCLIP_LEAVES.items():
                if rest.startswith(leaf_from + "."):
                    out[base + leaf_to + rest[len(leaf_from) :]] = tensor
                    break
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    return out, unmapped


# ------------------------------------------------------------------------------------ ours -> original
def unet_to_original(state: dict[str, torch.Tensor], config) -> Iterator[tuple[str, torch.Tensor]]:
    inverse = unet_map(config).inverse()
    for key, tensor in state.items():
        yield UNET_PREFIX + _must(inverse.rename(key), key, "UNet"), tensor


def vae_to_original(state: dict[str, torch.Tensor], config, prefix: str = VAE_PREFIX):
    inverse = vae_map(config).inverse()
    for key, tensor in state.items():
        new = _must(inverse.rename(key), key, "VAE")
        if ".mid.attn_1." in new and new.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # linear -> the original's 1x1 conv
        yield prefix + new, tensor


def text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict with every key under ``text_model.`` (the layout of
    its files; some transformers versions leave the prefix out of ``CLIPTextModel.state_dict()``)."""
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in state.items()}


def fit_text_model_keys(state: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """``state`` (keys under ``text_model.``) in the key layout of a model whose state dict has ``expected``."""
    if any(k.startswith("text_model.") for k in expected):
        return state
    return {k[len("text_model.") :] if k.startswith("text_model.") else k: v for k, v in state.items()}


def clip_to_original(state: dict[str, torch.Tensor], prefix: str):
    for key, tensor in text_model_keys(state).items():
        if not key.endswith("position_ids"):
            yield prefix + key, tensor


def openclip_to_original(state: dict[str, torch.Tensor], prefix: str):
    top = {v: k for k, v in OPENCLIP_TOP.items()}
    leaves = {v: k for k, v in OPENCLIP_LEAVES.items()}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in text_model_keys(state).items():
        if key in top:
            yield prefix + top[key], tensor
        elif key == "text_projection.weight":
            yield prefix + "text_projection", tensor.t().contiguous()
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key[len("text_model.encoder.layers.") :].split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, name, kind = rest.split(".")
                fused.setdefault((index, kind), {})[name] = tensor
                continue
            for leaf_to, leaf_from in leaves.items():
                if rest.startswith(leaf_to + "."):
                    yield f"{prefix}transformer.resblocks.{index}.{leaf_from}{rest[len(leaf_to) :]}", tensor
                    break
            else:
                raise KeyError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
        elif not key.endswith("position_ids"):
            raise KeyError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
    for (index, kind), parts in fused.items():
        merged = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        yield f"{prefix}transformer.resblocks.{index}.attn.in_proj_{kind}", merged


def _must(new: str | None, key: str, what: str) -> str:
    if new is None:
        raise KeyError(f"{what} key {key!r} has no place in the original layout")
    return new
