"""bf16 / fp16 on CPUs without instructions for them: run the heavy kernels in fp32.

On a CPU without AVX512-BF16 or AMX (AMD before Zen 4, most Intel before Sapphire Rapids), PyTorch's
bf16 and fp16 convolutions fall back to reference code: measured on an AVX2 EPYC, a 3x3 convolution
at 320 channels is 146x slower in bf16 than in fp32, a linear layer 8x, a batched matmul 5x. A
full-size UNet step that takes 13-15 s in fp32 there would take an estimated 15-20 minutes in bf16,
which is what a user who asks for ``torch_dtype=torch.bfloat16`` to save memory gets from the
reference.

Those kernels accumulate in fp32 and round the result to bf16 anyway, so running them on the exact
fp32 upcast of their inputs and rounding the result computes the same thing (up to summation
order) at fp32 speed. Weights stay stored in the low-precision dtype; only the operands of one
kernel at a time are upcast. Elementwise ops, norms and attention (whose CPU kernels already compute
in fp32) are left alone.

``DIFFPIPE_CPU_FLOAT32_KERNELS``: ``auto`` (default: upcast only where the CPU lacks the
instructions), ``1`` (always upcast on CPU), ``0`` (never; PyTorch's own kernels).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .hooks import OFFLOAD, get_hook

LOW_PRECISION = (torch.bfloat16, torch.float16)

# The kernels worth upcasting: their cost is arithmetic, which is what these CPUs lack for bf16/fp16.
_KERNELS = frozenset(
    {
        torch.conv1d,
        torch.conv2d,
        torch.conv3d,
        torch.conv_transpose1d,
        torch.conv_transpose2d,
        torch.conv_transpose3d,
        F.linear,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.einsum,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.Tensor.addmm,
        torch.Tensor.baddbmm,
    }
)


def _cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has instructions for ``dtype`` matmuls and convolutions (oneDNN uses them)."""
    cpu = torch.cpu
    try:
        if dtype == torch.bfloat16:
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        return bool(cpu._is_amx_fp16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: keep its own kernels
        return True


@functools.cache
def _upcast_native_default(dtype: torch.dtype) -> bool:
    return not _cpu_has_native(dtype)


def upcast_wanted(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` kernels on the CPU should run in fp32 (see the module docstring)."""
    if dtype not in LOW_PRECISION:
        return False
    setting = os.environ.get("DIFFPIPE_CPU_FLOAT32_KERNELS", "auto").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return _upcast_native_default(dtype)


def _floating_tensors(values):
    for v in values:
        if isinstance(v, (list, tuple)):  # einsum's operand list
            yield from _floating_tensors(v)
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            yield v


def _operand_dtype(values) -> torch.dtype | None:
    """The one low-precision dtype all floating CPU tensors among ``values`` share, else None (mixed
    dtypes or devices go to PyTorch unchanged, errors included)."""
    kinds = {(t.device.type, t.dtype) for t in _floating_tensors(values)}
    if len(kinds) != 1:
        return None
    device, dtype = kinds.pop()
    return dtype if device == "cpu" and dtype in LOW_PRECISION else None


# Operands up to 64 MiB in fp32 (every weight of an SD/SDXL UNet but a few) reuse scratch memory; the
# scratch lives as long as the mode (a whole pipeline call), so larger ones, which would keep that much
# memory through the rest of the call (a VAE encode's activations during the denoising loop), do not.
_SCRATCH_MAX_ELEMENTS = 16 * 2**20


class Float32Kernels(TorchFunctionMode):
    """Inside this mode, the kernels above run in fp32 when their operands are bf16/fp16 CPU tensors
    that :func:`upcast_wanted` says to upcast; the result is rounded back to the operands' dtype.

    The fp32 operands are written into scratch buffers kept for the life of the mode, one per operand
    position: a fresh fp32 copy of each weight would cost a page fault per 4 KiB (measured 8x slower
    than converting into memory already mapped), which at small latents is most of a step.
    """

    def __init__(self):
        super().__init__()
        self._scratch: list[torch.Tensor] = []
        self._upcast = frozenset(d for d in LOW_PRECISION if upcast_wanted(d))  # decided once per mode

    def _float32(self, value, slots: list[int]):
        if isinstance(value, (list, tuple)):
            return type(value)(self._float32(v, slots) for v in value)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return value
        if value.numel() > _SCRATCH_MAX_ELEMENTS:  # big activations: their compute dwarfs the faults
            return value.float()
        slot = slots[0]
        slots[0] += 1
        if slot == len(self._scratch):
            self._scratch.append(torch.empty(0))
        if self._scratch[slot].numel() < value.numel():
            self._scratch[slot] = torch.empty(value.numel())
        return self._scratch[slot][: value.numel()].view(value.shape).copy_(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KERNELS and "out" not in kwargs:
            dtype = _operand_dtype(list(args) + list(kwargs.values()))
            if dtype in self._upcast:
                slots = [0]
                args = self._float32(args, slots)
                kwargs = {k: self._float32(v, slots) for k, v in kwargs.items()}
                return func(*args, **kwargs).to(dtype)
        return func(*args, **kwargs)


_state = threading.local()  # torch's mode stack is per thread; so is whether ours is on


def _needs_mode(modules) -> bool:
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        # a model offloaded to an accelerator waits on the CPU but runs its kernels elsewhere
        runs_on = getattr(get_hook(module, OFFLOAD), "device", None)
        if runs_on is not None and torch.device(runs_on).type != "cpu":
            continue
        for p in module.parameters():
            if p.device.type == "cpu" and upcast_wanted(p.dtype):
                return True
            break  # one parameter tells the model's dtype; per-component dtypes are separate modules
    return False


@contextlib.contextmanager
def float32_kernels_for(*modules):
    """Enter :class:`Float32Kernels` for the duration if any of ``modules`` holds low-precision CPU
    weights that need it and the mode is not already on."""
    if getattr(_state, "on", False) or not _needs_mode(modules):
        yield
        return
    _state.on = True
    try:
        with Float32Kernels():
            yield
    finally:
        _state.on = False


def with_float32_kernels(modules_of):
    """Decorator for a method: run it inside :func:`float32_kernels_for` ``(*modules_of(self))``."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            with float32_kernels_for(*modules_of(self)):
                return method(self, *args, **kwargs)

        return run

    return wrap
