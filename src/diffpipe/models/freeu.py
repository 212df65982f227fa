"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): at inference, in the two
lowest-resolution up blocks of a UNet, scale half of the backbone's channels up (``b1``, ``b2``) and
damp the low frequencies of the skip features (``s1``, ``s2``) before they are joined. No weights
change; ``disable_freeu`` takes it away again. Suggested values per model are in the paper's
repository (SD 1.5: ``s1=0.9, s2=0.2, b1=1.5, b2=1.6``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..runtime.hooks import ModuleHook, add_hook, get_hook, remove_hook

HOOK = "freeu"


def fourier_filter(x: torch.Tensor, threshold: int, scale: float) -> torch.Tensor:
    """``x`` with the centre ``2 * threshold`` square of its (shifted) 2-d spectrum scaled by ``scale``
    (the lowest frequencies), computed in float32."""
    dtype = x.dtype
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones_like(freq.real)
    row, col = height // 2, width // 2
    mask[..., row - threshold : row + threshold, col - threshold : col + threshold] = scale
    freq = torch.fft.ifftshift(freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(freq, dim=(-2, -1)).real.to(dtype)


class FreeU(ModuleHook):
    """On an up block: what it does to (backbone features, skip features) before joining them."""

    def __init__(self, backbone_scale: float, skip_scale: float):
        self.backbone_scale, self.skip_scale = backbone_scale, skip_scale

    def apply(self, hidden_states: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = hidden_states.shape[1] // 2
        hidden_states = torch.cat([hidden_states[:, :half] * self.backbone_scale, hidden_states[:, half:]], dim=1)
        return hidden_states, fourier_filter(skip, threshold=1, scale=self.skip_scale)


def join_skip(block: nn.Module, hidden_states: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """An up block's resnet input: its features and one skip connection along the channels (through
    FreeU when it is on)."""
    freeu = get_hook(block, HOOK)
    if freeu is not None:
        hidden_states, skip = freeu.apply(hidden_states, skip)
    return torch.cat([hidden_states, skip], dim=1)


def enable(up_blocks, s1: float, s2: float, b1: float, b2: float) -> None:
    """FreeU on the first two up blocks (``resolution_idx`` 0 and 1): ``b1``/``s1`` and ``b2``/``s2``."""
    for value, name in ((s1, "s1"), (s2, "s2"), (b1, "b1"), (b2, "b2")):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"enable_freeu: {name} must be a number, got {value!r}")
    for block in up_blocks:
        index = getattr(block, "resolution_idx", None)
        if index in (0, 1):
            add_hook(block, HOOK, FreeU(backbone_scale=(b1, b2)[index], skip_scale=(s1, s2)[index]))


def disable(up_blocks) -> None:
    for block in up_blocks:
        remove_hook(block, HOOK)


class FreeUMixin:
    """``enable_freeu`` / ``disable_freeu`` for UNets (the image blocks a motion UNet runs included)."""

    def _freeu_blocks(self) -> list[nn.Module]:
        return [getattr(block, "_spatial", block) for block in self.up_blocks]

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """Turn FreeU on: ``b1``, ``b2`` scale the backbone features, ``s1``, ``s2`` the skip features'
        low frequencies, in the first and second up block."""
        enable(self._freeu_blocks(), s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        disable(self._freeu_blocks())
