"""Model base class: config + weights, loaded onto the meta device and assigned from mmap'd files."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigMixin


class ModelMixin(nn.Module, ConfigMixin):
    config_name = "config.json"

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
