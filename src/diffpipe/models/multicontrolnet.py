"""MultiControlNetModel: several ControlNets used together, their residuals summed (the reference's
class of the same name, with its save layout: ``folder``, ``folder_1``, ``folder_2``, ...)."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
from torch import nn

from .controlnet import ControlNetModel
from .modeling import ModelMixin

logger = logging.getLogger(__name__)


class MultiControlNetModel(ModelMixin):
    """Several ControlNets used together: each gets its own conditioning image and scale, and their
    residuals are summed. ``forward`` returns ``(down_block_res_samples, mid_block_res_sample)``, a
    tuple whatever ``return_dict`` says (as the reference)."""

    _record_init = False  # no config of its own: each net has its config

    def __init__(self, controlnets: Sequence[ControlNetModel]):
        super().__init__()
        self.nets = nn.ModuleList(controlnets)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: Sequence[torch.Tensor],
        conditioning_scale: Sequence[float],
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        n = len(self.nets)
        if torch.is_tensor(controlnet_cond) or len(controlnet_cond) != n:
            found = "a tensor" if torch.is_tensor(controlnet_cond) else f"{len(controlnet_cond)} images"
            raise ValueError(
                f"MultiControlNetModel has {n} ControlNets: pass a list of {n} `controlnet_cond`; got {found}"
            )
        if isinstance(conditioning_scale, (int, float)):
            conditioning_scale = [conditioning_scale] * n
        if len(conditioning_scale) != n:
            raise ValueError(
                f"MultiControlNetModel has {n} ControlNets: pass {n} `conditioning_scale` values; "
                f"got {len(conditioning_scale)}"
            )
        down: tuple[torch.Tensor, ...] | None = None
        mid: torch.Tensor | None = None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets):
            d, m = net(
                sample,
                timestep,
                encoder_hidden_states,
                image,
                scale,
                class_labels=class_labels,
                timestep_cond=timestep_cond,
                attention_mask=attention_mask,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                guess_mode=guess_mode,
                return_dict=False,
            )
            if down is None:
                down, mid = d, m
            else:
                down = tuple(a + b for a, b in zip(down, d))
                mid = mid + m
        return down, mid

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Each net into its own folder: ``save_directory``, ``save_directory_1``, ``save_directory_2``, ..."""
        base = os.fspath(save_directory)
        for i, net in enumerate(self.nets):
            net.save_pretrained(base if i == 0 else f"{base}_{i}", **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_path: str | os.PathLike, **kwargs) -> "MultiControlNetModel":
        """The nets saved by :meth:`save_pretrained`: ``path``, then ``path_1``, ``path_2``, ... while they exist."""
        base = os.fspath(pretrained_model_path)
        nets = [ControlNetModel.from_pretrained(base, **kwargs)]
        while os.path.isdir(f"{base}_{len(nets)}"):
            nets.append(ControlNetModel.from_pretrained(f"{base}_{len(nets)}", **kwargs))
        logger.info("%d ControlNets loaded from %s", len(nets), base)
        return cls(nets)
