"""The traversal every UNet here runs: ``conv_in``, down blocks saving skips, the mid block, up blocks
consuming them, ``conv_out``, with ControlNet and T2I-Adapter residuals added where they belong.
Shared by the 2-D UNet and AnimateDiff's motion UNet. With DeepCache on (``runtime/deepcache.py``), a
skip step runs only the shallow blocks and takes the deep features from the last full step."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..runtime.deepcache import step_plan

logger = logging.getLogger(__name__)


def unet_body(
    unet: nn.Module,
    sample: torch.Tensor,
    emb: torch.Tensor,
    attn_kwargs: dict[str, Any],
    *,
    down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
    mid_block_additional_residual: torch.Tensor | None = None,
    down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
    block_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """``conv_in`` -> down blocks (saving skips) -> mid block -> up blocks -> ``conv_out``.

    ``unet`` is any model with the UNet's attributes (``conv_in``, ``down_blocks``, ``mid_block``,
    ``up_blocks``, ``conv_norm_out``/``conv_act``/``conv_out``, ``num_upsamplers``): the 2-D UNet, or
    AnimateDiff's motion UNet, whose blocks also take ``block_kwargs`` (``num_frames``).
    ``attn_kwargs`` go to the blocks with cross-attention.
    """
    block_kwargs = block_kwargs or {}
    # Sizes that are not a multiple of the total upsampling factor need explicit upsample sizes.
    factor = 2**unet.num_upsamplers
    forward_upsample_size = any(s % factor != 0 for s in sample.shape[-2:])

    plan = step_plan(unet)  # DeepCache: None (the default) runs every block

    sample = unet.conv_in(sample)

    # ControlNet gives both down and mid residuals; T2I-Adapters give intra-block residuals. The old
    # convention passed adapter residuals as down_block_additional_residuals without a mid residual.
    is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
    adapter = down_intrablock_additional_residuals
    if adapter is None and mid_block_additional_residual is None and down_block_additional_residuals is not None:
        logger.warning(
            "passing T2I-Adapter residuals as `down_block_additional_residuals` is deprecated; "
            "use `down_intrablock_additional_residuals`"
        )
        adapter = down_block_additional_residuals
    adapter = list(adapter) if adapter is not None else []  # consumed front to back; caller's list untouched

    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in unet.down_blocks if plan is None else unet.down_blocks[: plan.down]:
        if getattr(block, "has_cross_attention", False):
            extra = {"additional_residuals": adapter.pop(0)} if adapter else {}
            sample, res = block(sample, emb, **attn_kwargs, **extra, **block_kwargs)
        else:
            sample, res = block(sample, emb, **block_kwargs)
            if adapter:
                # the block's last skip is its output: the residual reaches both
                sample = sample + adapter.pop(0)
                res = res[:-1] + (sample,)
        skips += res

    if is_controlnet:
        skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
    if plan is not None:
        skips = plan.skips(skips)

    if unet.mid_block is not None and (plan is None or plan.runs_mid):
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, **attn_kwargs, **block_kwargs)
        else:
            sample = unet.mid_block(sample, emb, **block_kwargs)
        if adapter and sample.shape == adapter[0].shape:  # T2I-Adapter-XL has a mid residual
            sample = sample + adapter.pop(0)

    if is_controlnet and (plan is None or plan.runs_mid):
        sample = sample + mid_block_additional_residual

    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        if plan is not None and not plan.runs_up(i):
            continue
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        kwargs = {**attn_kwargs, **block_kwargs} if getattr(block, "has_cross_attention", False) else block_kwargs
        if plan is not None and i == plan.first_up:
            sample = plan.enter(block, sample, res, emb, upsample_size, kwargs)
        else:
            sample = block(sample, res, emb, upsample_size=upsample_size, **kwargs)

    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)
