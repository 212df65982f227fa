"""Flux transformers in the original (Black Forest Labs) layout -> the diffusers layout, in one table.

BFL's checkpoints (and ComfyUI's, under ``model.diffusion_model.``; city96's GGUF files) name the blocks
``double_blocks.N`` / ``single_blocks.N`` and fuse projections the diffusers layout keeps apart:
``img_attn.qkv`` is ``to_q | to_k | to_v`` stacked on the output dimension, ``single_blocks.N.linear1``
is ``to_q | to_k | to_v | proj_mlp``; norms call their weight ``scale``; the final modulation holds
``(shift, scale)`` where the diffusers layout holds ``(scale, shift)``. The same table renames LoRA
layers (a fused layer's LoRA: the shared down projection, the up projection cut like the weight).
"""

from __future__ import annotations

import re

# a fused BFL module -> the diffusers modules its output rows are, in order (None: the rest)
_DOUBLE = {
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "img_attn.proj": ["attn.to_out.0"],
    "img_attn.norm.query_norm": ["attn.norm_q"],
    "img_attn.norm.key_norm": ["attn.norm_k"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "txt_attn.proj": ["attn.to_add_out"],
    "txt_attn.norm.query_norm": ["attn.norm_added_q"],
    "txt_attn.norm.key_norm": ["attn.norm_added_k"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
    "norm.query_norm": ["attn.norm_q"],
    "norm.key_norm": ["attn.norm_k"],
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) -> (scale, shift)
}
SWAPPED = {"norm_out.linear"}
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def is_bfl(names) -> bool:
    return any(_strip(n).startswith(("double_blocks.", "single_blocks.")) for n in names)


def _strip(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def targets(module: str) -> list[str] | None:
    """The diffusers module(s) a BFL module (no parameter suffix, prefixes allowed) becomes, in the
    order its output rows hold them; None when the name is not BFL's."""
    module = _strip(module)
    if module in _TOP:
        return [_TOP[module]]
    match = _BLOCK.match(module)
    if match is None:
        return None
    kind, index, rest = match.groups()
    table, block = (
        (_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_SINGLE, "single_transformer_blocks")
    )
    names = table.get(rest)
    return None if names is None else [f"{block}.{index}.{name}" for name in names]


def split_sizes(module: str, rows: int, inner_dim: int) -> list[int]:
    """How a fused module's ``rows`` output rows divide among its targets (q, k, v: ``inner_dim``
    each; a single block's MLP input: the rest)."""
    names = targets(module)
    if len(names) == 1:
        return [rows]
    if len(names) == 3:
        return [rows // 3] * 3
    return [inner_dim] * 3 + [rows - 3 * inner_dim]


def convert(state: dict, inner_dim: int | None = None) -> tuple[dict, list[str]]:
    """A BFL-layout state dict -> (the diffusers layout, names that map nowhere). Tensors are cut into
    views on their first dimension; the final modulation's halves are swapped."""
    import torch

    if inner_dim is None:
        img_in = next((v for k, v in state.items() if _strip(k) == "img_in.weight"), None)
        inner_dim = int(img_in.shape[0]) if img_in is not None else None
    out, unmapped = {}, []
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        names = targets(module)
        if names is None or leaf not in ("weight", "bias", "scale"):
            unmapped.append(key)
            continue
        leaf = "weight" if leaf == "scale" else leaf
        parts = torch.split(tensor, split_sizes(module, tensor.shape[0], inner_dim), dim=0)
        for name, part in zip(names, parts):
            if name in SWAPPED:
                shift, scale = part.chunk(2, dim=0)
                part = torch.cat([scale, shift], dim=0)
            out[f"{name}.{leaf}"] = part
    return out, unmapped


def config_from_shapes(shapes: dict) -> dict:
    """The transformer's config from a BFL-layout file's tensor shapes (rope axes: the published ones
    for 128-wide heads, else to be given)."""
    shapes = {_strip(k): v for k, v in shapes.items()}
    inner, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]

    def count(kind: str) -> int:
        return 1 + max((int(m.group(2)) for k in shapes if (m := _BLOCK.match(k)) and m.group(1) == kind), default=-1)

    config = {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "num_layers": count("double_blocks"),
        "num_single_layers": count("single_blocks"),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(inner) // int(head_dim),
        "joint_attention_dim": int(shapes["txt_in.weight"][1]),
        "pooled_projection_dim": int(shapes["vector_in.in_layer.weight"][1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
    }
    if head_dim == 128:
        config["axes_dims_rope"] = [16, 56, 56]
    return config
