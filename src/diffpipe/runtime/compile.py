"""``pipe.compile()``: the denoiser and the VAE decoder through ``torch.compile`` (inductor), opt-in.

- **In place.** Each module is compiled with ``nn.Module.compile``, so its parameters, ``state_dict``
  keys and ``save_pretrained`` output do not change, and the pipeline keeps working with offload,
  LoRA and ``from_pipe`` (the compiled modules are the shared ones).
- **Cached on disk.** Inductor's generated and built kernels are kept in ``DIFFPIPE_COMPILE_CACHE``
  (default ``$XDG_CACHE_HOME/diffpipe/inductor``, i.e. ``~/.cache/diffpipe/inductor``; a
  ``TORCHINDUCTOR_CACHE_DIR`` the user set wins), with inductor's FX-graph and AOTAutograd caches on,
  so a second process with the same model and shapes loads them instead of generating and building C++.
  Compilation happens at the first call of each shape; :attr:`CompileMixin.compile_seconds` adds up
  the time the first calls took, as a report.
- **Channels-last.** Convolutional models get their weights in channels-last (NHWC) memory format,
  the layout oneDNN's CPU convolutions run fastest in; results are equal up to summation order.

Compiling changes no result beyond float summation order (the tests hold compiled images within
2/255 of eager ones).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

DENOISERS = ("unet", "transformer")
CONV_MODELS = ("unet", "vae", "controlnet")


def compile_cache_dir() -> Path:
    """Where inductor's compiled artefacts are kept (see the module docstring)."""
    given = os.environ.get("DIFFPIPE_COMPILE_CACHE") or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffpipe" / "inductor"


def _enable_disk_cache() -> Path:
    folder = compile_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # read by inductor when it first needs the cache
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):  # an older torch: the FX-graph cache alone
        pass
    return folder


class _FirstCallTimer:
    """Adds the wall time of a module's first call per input shape to ``owner.compile_seconds``."""

    def __init__(self, owner, module: torch.nn.Module):
        self.owner = owner
        self.seen: set = set()
        self.started: dict = {}
        module.register_forward_pre_hook(self.before, with_kwargs=True)
        module.register_forward_hook(self.after, with_kwargs=True)

    @staticmethod
    def _key(args, kwargs):
        first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        return tuple(first.shape) if isinstance(first, torch.Tensor) else None

    def before(self, module, args, kwargs):
        key = self._key(args, kwargs)
        if key not in self.seen:
            self.started[key] = time.perf_counter()

    def after(self, module, args, kwargs, output):
        key = self._key(args, kwargs)
        if key in self.started:
            self.owner.compile_seconds += time.perf_counter() - self.started.pop(key)
            self.seen.add(key)


class CompileMixin:
    """``compile()`` on every pipeline."""

    compile_seconds: float = 0.0

    def compile(
        self,
        *,
        mode: str | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = False,
        vae: bool = True,
        channels_last: bool = True,
    ):
        """Compile the denoiser (``unet`` or ``transformer``) and, with ``vae=True``, the VAE decoder,
        in place; ``mode``/``fullgraph``/``dynamic`` go to ``torch.compile``. Returns the pipeline.

        The first call of each new shape compiles (or loads the compiled kernels from the disk cache:
        see :func:`compile_cache_dir`); ``pipe.compile_seconds`` adds up what those first calls took."""
        cache = _enable_disk_cache()
        options = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic}
        if channels_last:
            for name in CONV_MODELS:
                module = getattr(self, name, None)
                if isinstance(module, torch.nn.Module):
                    module.to(memory_format=torch.channels_last)
        targets = [getattr(self, name, None) for name in DENOISERS]
        vae_model = getattr(self, "vae", None)
        if vae and vae_model is not None and isinstance(getattr(vae_model, "decoder", None), torch.nn.Module):
            targets.append(vae_model.decoder)
        compiled = [m for m in targets if isinstance(m, torch.nn.Module)]
        if not compiled:
            raise ValueError(f"{type(self).__name__} has no unet, transformer or VAE decoder to compile")
        for module in compiled:
            if getattr(module, "_diffpipe_compiled", False):
                continue
            module.compile(**options)
            _FirstCallTimer(self, module)
            module._diffpipe_compiled = True
        self.compile_cache = cache
        return self
