"""Activation layers named as in configs (``act_fn``, ``activation_fn``) and the feed-forward gates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Config name -> module factory. "swish" is the old name of SiLU and still appears in configs.
_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """A fresh activation module for a config's activation name (case-insensitive)."""
    factory = _ACTIVATIONS.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return factory()


class GELU(nn.Module):
    """``proj`` (Linear) followed by GELU, optionally the tanh approximation."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none", bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class GEGLU(nn.Module):
    """Gated GELU: ``proj`` maps to twice the width; the second half, through GELU, gates the first."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return value * F.gelu(gate)


class ApproximateGELU(nn.Module):
    """``proj`` followed by the sigmoid approximation ``x * sigmoid(1.702 x)``."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.proj(hidden_states)
        return hidden_states * torch.sigmoid(1.702 * hidden_states)


class FeedForward(nn.Module):
    """Transformer MLP. Parameter names: ``net.0.proj`` (input projection inside the gate), ``net.2``."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        dropout: float = 0.0,
        activation_fn: str = "geglu",
        final_dropout: bool = False,
        inner_dim: int | None = None,
        bias: bool = True,
    ):
        super().__init__()
        inner_dim = int(dim * mult) if inner_dim is None else inner_dim
        dim_out = dim if dim_out is None else dim_out
        if activation_fn == "geglu":
            gate: nn.Module = GEGLU(dim, inner_dim, bias=bias)
        elif activation_fn == "gelu":
            gate = GELU(dim, inner_dim, bias=bias)
        elif activation_fn == "gelu-approximate":
            gate = GELU(dim, inner_dim, approximate="tanh", bias=bias)
        elif activation_fn == "geglu-approximate":
            gate = ApproximateGELU(dim, inner_dim, bias=bias)
        else:
            raise NotImplementedError(
                f"feed-forward activation {activation_fn!r} is not implemented; "
                "supported: 'geglu', 'gelu', 'gelu-approximate', 'geglu-approximate'"
            )
        layers = [gate, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out, bias=bias)]
        if final_dropout:
            layers.append(nn.Dropout(dropout))
        self.net = nn.ModuleList(layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            hidden_states = layer(hidden_states)
        return hidden_states
