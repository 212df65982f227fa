"""LyCORIS networks (LoHa, LoKr) and DoRA, as layers the LoRA hooks of ``lora.py`` run.

Each layer builds a full weight update ``dW`` of the target's shape from its factors and adds
``op(x, scale * dW)`` to the target's output (``op`` is the target's linear / conv2d, with its stride,
padding, dilation and groups), so the hooks, weights, fusing and unfusing work as for a LoRA pair:

- LoHa (``hada_w1_a [out, r]``, ``hada_w1_b [r, in*kh*kw]``, ``hada_w2_a``, ``hada_w2_b``):
  ``dW = (w1_a @ w1_b) * (w2_a @ w2_b)`` (a Hadamard product), reshaped to the layer. For a conv with
  CP/Tucker factors (``hada_t1``, ``hada_t2`` of shape ``[r, r, kh, kw]``) the ``_a`` factors are
  ``[r, out]`` and the ``_b`` ones ``[r, in]``, and each term is
  ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``. Scale ``alpha / r`` with ``r`` the rows
  of ``hada_w1_b`` (no alpha: scale 1).
- LoKr: ``w1`` is ``lokr_w1 [a, c]`` or ``lokr_w1_a @ lokr_w1_b``; ``w2`` is ``lokr_w2 [b, d(, kh, kw)]``,
  ``lokr_w2_a @ lokr_w2_b`` (reshaped to ``[b, d, kh, kw]`` for a conv) or the Tucker form with
  ``lokr_t2``; ``dW = kron(w1, w2)`` with ``w1`` as ``[a, c, 1, 1]`` for a conv, giving
  ``[a*b, c*d(, kh, kw)]``. Scale: LyCORIS scales only low-rank factors, so ``alpha / r`` where ``r`` is
  the factorised dimension (the rows of ``lokr_w2_b``, else of ``lokr_w1_b``), and 1 when both factors
  are full matrices or the file has no alpha.
- DoRA: ``W' = m * (W + s*dW) / ||W + s*dW||`` wraps any of these (and a plain LoRA pair). peft's
  ``lora_magnitude_vector`` (``[out]``) and LyCORIS's ``dora_scale`` of shape ``[out, 1(, 1, 1)]`` take
  the norm per output channel, over the input dimensions (keepdim); a ``dora_scale`` of shape
  ``[1, in(, 1, 1)]`` (LyCORIS's older, input-wise decomposition) takes it per input channel over the
  output dimensions. The norm is of the merged weight and is not trained through (peft detaches it).
  The hook adds ``op(x, W' - W)``; fusing stores exactly that difference, so unfusing restores ``W``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora_formats import LoraWeights

_NEEDS = {
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
}


def lycoris_missing(w: LoraWeights) -> str:
    """What a LoHa / LoKr layer lacks ('' when complete)."""
    kind = w.kind
    if kind == "mixed" or w.down is not None or w.up is not None:
        return "it mixes LoRA, LoHa and LoKr keys on one layer"
    if kind == "loha":
        absent = [k for k in _NEEDS["loha"][0] if k not in w.lycoris]
        if ("hada_t1" in w.lycoris) != ("hada_t2" in w.lycoris):
            absent.append("hada_t2" if "hada_t1" in w.lycoris else "hada_t1")
        return f"missing {', '.join(absent)}" if absent else ""
    absent = []
    for n in (1, 2):
        full, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
        if full not in w.lycoris and not (a in w.lycoris and b in w.lycoris):
            absent.append(f"{full} or {a} + {b}")
    return f"missing {'; '.join(absent)}" if absent else ""


def lycoris_rank_alpha(w: LoraWeights) -> tuple[int, float]:
    """(rank, alpha) with ``alpha / rank`` the layer's scale, by the rules in the module docstring."""
    f = w.lycoris
    if w.kind == "loha":
        rank = int(f["hada_w1_b"].shape[0])
        return rank, float(rank if w.alpha is None else w.alpha)
    factor = f.get("lokr_w2_b", f.get("lokr_w1_b"))
    if factor is None or w.alpha is None:
        return 1, 1.0  # full Kronecker factors (or no alpha): no scaling
    return int(factor.shape[0]), float(w.alpha)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def lycoris_delta(kind: str, f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """``dW`` (unscaled) in ``shape``; ValueError naming the shapes when the factors do not fit it."""
    try:
        if kind == "loha":
            if "hada_t1" in f:
                w1 = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
                w2 = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
            else:
                w1 = f["hada_w1_a"] @ f["hada_w1_b"]
                w2 = f["hada_w2_a"] @ f["hada_w2_b"]
            delta = w1 * w2
            if delta.shape[0] != shape[0] or delta.numel() != torch.Size(shape).numel():
                raise ValueError(f"gives {tuple(delta.shape)}")
            return delta.reshape(shape)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if len(shape) == 4:
            w1 = w1.reshape(*w1.shape[:2], 1, 1)
            if w2.ndim == 2:
                w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        delta = torch.kron(w1.contiguous(), w2.contiguous())
        if tuple(delta.shape) != tuple(shape):
            raise ValueError(f"gives kron {tuple(w1.shape)} x {tuple(w2.shape)} = {tuple(delta.shape)}")
        return delta
    except (RuntimeError, ValueError) as e:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(f.items()))
        raise ValueError(f"{kind} factors ({shapes}) do not make the layer's weight {tuple(shape)}: {e}") from None


def lycoris_problems(where: str, target: nn.Module, w: LoraWeights) -> list[str]:
    """Shape problems of a LoHa / LoKr (and its DoRA magnitude) for ``target``; checked on the meta device."""
    shape = tuple(target.weight.shape)
    out = []
    if w.kind != "lora":
        try:
            lycoris_delta(w.kind, {k: v.to("meta") for k, v in w.lycoris.items()}, shape)
        except ValueError as e:
            out.append(f"{where}: {e}")
    if w.magnitude is not None:
        try:
            _magnitude_layout(w.magnitude, shape, w.magnitude_from)
        except ValueError as e:
            out.append(f"{where}: {e}")
        if w.up_bias is not None:
            out.append(f"{where}: DoRA with a LoRA bias (lora_B.bias) is not supported")
    return out


def _op(target: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(target, nn.Conv2d):
        return F.conv2d(x, weight, None, target.stride, target.padding, target.dilation, target.groups)
    return F.linear(x, weight)


class _DeltaModule(nn.Module):
    """What the hooks need of a layer besides ``delta_weight``: output, merge / unmerge, device."""

    lora_bias = None

    def _follow(self, x: torch.Tensor) -> None:
        p = next(self.parameters())
        if p.device != x.device:  # the layer moved with another model sharing the target
            self.to(x.device)

    def output_delta(self, target: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
        self._follow(x)
        delta = self.merge_delta(target.weight.float(), scale, keep=False)
        return _op(target, x, delta.to(x.dtype))

    def merge_delta(self, weight: torch.Tensor, scale: float, keep: bool = True) -> torch.Tensor:
        return scale * self.delta_weight().to(weight.device)

    def unmerge_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        return -self.merge_delta(weight, scale)


class LycorisLayer(_DeltaModule):
    """A LoHa or LoKr update for one target layer."""

    def __init__(self, target: nn.Module, w: LoraWeights):
        super().__init__()
        self.kind = w.kind
        self.shape = tuple(target.weight.shape)
        self.factors = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone(), requires_grad=False) for k, v in w.lycoris.items()}
        )
        self.rank, self.alpha = lycoris_rank_alpha(w)

    def delta_weight(self) -> torch.Tensor:
        return lycoris_delta(self.kind, {k: v.float() for k, v in self.factors.items()}, self.shape)


def _magnitude_layout(m: torch.Tensor, shape: tuple, source: str) -> tuple[tuple[int, ...], bool]:
    """(the shape to broadcast ``m`` to, per output channel?) for a weight of ``shape``."""
    out_ch, in_ch, rest = shape[0], shape[1], [1] * (len(shape) - 2)
    per_input = source == "lycoris" and m.ndim >= 2 and m.shape[0] == 1 and m.numel() == in_ch and out_ch != 1
    if per_input:
        return (1, in_ch, *rest), False
    if m.numel() == out_ch and (m.ndim == 1 or m.shape[0] == out_ch or source == "peft"):
        return (out_ch, 1, *rest), True  # peft keeps a conv's magnitude as [1, out, 1, 1]
    raise ValueError(
        f"DoRA magnitude {tuple(m.shape)} fits neither the output channels ({out_ch}) nor, for LyCORIS's "
        f"dora_scale [1, in], the input channels ({in_ch}) of the weight {tuple(shape)}"
    )


class DoraLayer(_DeltaModule):
    """DoRA around a LoRA / LoHa / LoKr update: ``W' = m * (W + s*dW) / ||W + s*dW||``."""

    def __init__(self, target: nn.Module, inner: nn.Module, magnitude: torch.Tensor, source: str):
        super().__init__()
        self.inner = inner
        layout, self.per_output = _magnitude_layout(magnitude, tuple(target.weight.shape), source)
        self.magnitude = nn.Parameter(magnitude.detach().reshape(layout).clone(), requires_grad=False)
        self.rank, self.alpha = inner.rank, inner.alpha
        self._fused: torch.Tensor | None = None

    def delta_weight(self) -> torch.Tensor:
        return self.inner.delta_weight()

    def merge_delta(self, weight: torch.Tensor, scale: float, keep: bool = True) -> torch.Tensor:
        merged = weight + scale * self.inner.delta_weight().to(weight.device)
        if self.per_output:  # norm over the input dims of each output channel
            norm = merged.flatten(1).norm(dim=1).reshape(self.magnitude.shape)
        else:  # LyCORIS's input-wise form: norm over the output dims of each input channel
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(self.magnitude.shape)
        delta = merged * (self.magnitude.float().to(weight.device) / norm.detach()) - weight
        if keep:
            self._fused = delta
        return delta

    def unmerge_delta(self, weight: torch.Tensor, scale: float) -> torch.Tensor:
        delta, self._fused = self._fused, None
        return -delta


def build_layer(target: nn.Module, w: LoraWeights, plain: nn.Module | None) -> nn.Module:
    """The layer for ``w``: ``plain`` (the LoRA pair lora.py built) or a LoHa/LoKr, DoRA-wrapped
    when ``w`` has a magnitude; on the target's device and dtype."""
    layer = plain if plain is not None else LycorisLayer(target, w)
    if w.magnitude is not None:
        layer = DoraLayer(target, layer, w.magnitude, w.magnitude_from)
    ref = target.weight
    return layer.to(device=ref.device, dtype=ref.dtype)
