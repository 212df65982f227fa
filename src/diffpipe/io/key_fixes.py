"""Renames for checkpoint keys written by old versions of the format.

Only legacy layouts live here; diffpipe's own modules use the current names directly.
"""

from __future__ import annotations

import re
from typing import MutableMapping

import torch

# Old VAE mid-block attention names -> current ones.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NEW_ATTENTION_NAMES = tuple(_OLD_ATTENTION_NAMES.values())


def rename_old_vae_attention(state_dict: MutableMapping[str, torch.Tensor]) -> MutableMapping[str, torch.Tensor]:
    """Map ``{encoder,decoder}.mid_block.attentions.N.{query,key,value,proj_attn}.{weight,bias}`` to
    ``to_q``/``to_k``/``to_v``/``to_out.0``, in place, and return the dict (see :func:`rename_old_attention`)."""
    return rename_old_attention(state_dict, r"(?:.+\.)?(?:encoder|decoder)\.mid_block\.attentions\.\d+")


def rename_old_attention(
    state_dict: MutableMapping[str, torch.Tensor], layer: str
) -> MutableMapping[str, torch.Tensor]:
    """Map the old ``{query,key,value,proj_attn}.{weight,bias}`` of the attention layers whose paths
    match the regex ``layer`` to ``to_q``/``to_k``/``to_v``/``to_out.0``, in place, and return the dict.

    Old checkpoints stored these projections as 1x1 convolutions (``[C, C, 1, 1]``); such weights
    become the ``[C, C]`` Linear weights of the current layout (also when they already carry the new
    names). Keys of current checkpoints pass through untouched, so the function is idempotent.
    """
    pattern = re.compile(
        rf"^(?P<path>{layer})\."
        r"(?P<name>query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(?P<kind>weight|bias)$"
    )
    for key in list(state_dict):
        match = pattern.match(key)
        if match is None:
            continue
        name = _OLD_ATTENTION_NAMES.get(match["name"], match["name"])
        tensor = state_dict[key]
        conv_shaped = match["kind"] == "weight" and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1)
        if name == match["name"] and not conv_shaped:
            continue  # already current
        new_key = f"{match['path']}.{name}.{match['kind']}"
        if new_key != key and new_key in state_dict:
            raise ValueError(f"checkpoint has both {key!r} and {new_key!r}; cannot tell which one to use")
        del state_dict[key]
        state_dict[new_key] = tensor[:, :, 0, 0] if conv_shaped else tensor
    return state_dict
