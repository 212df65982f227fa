"""Tiny models and folders the tests build (random weights, a few KB)."""

from __future__ import annotations

import torch
from torch import nn

from diffpipe.models.modeling import ModelMixin


class TinyModel(ModelMixin):
    """The smallest ModelMixin with the parts that matter to I/O: nested names, a norm, a buffer-free body."""

    def __init__(self, width: int = 8, depth: int = 2, groups: int = 2):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.norm = nn.GroupNorm(groups, width)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x.unsqueeze(-1)).squeeze(-1)


def tiny_model(seed: int = 0, **config) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
