"""``pipe.compile()``: the denoiser and the VAE decoder through ``torch.compile`` (inductor), opt-in.

- **In place.** Each module is compiled with ``nn.Module.compile``, so its parameters, ``state_dict``
  keys and ``save_pretrained`` output do not change, and the pipeline keeps working with offload,
  LoRA and ``from_pipe`` (the compiled modules are the shared ones).
- **Cached on disk.** Inductor's generated and built kernels are kept in ``DIFFPIPE_COMPILE_CACHE``
  (default ``$XDG_CACHE_HOME/diffpipe/inductor``, i.e. ``~/.cache/diffpipe/inductor``; a
  ``TORCHINDUCTOR_CACHE_DIR`` the user set wins), with inductor's FX-graph and AOTAutograd caches on,
  so a second process with the same model and shapes loads them instead of generating and building C++.
  Compilation happens at the first call of each shape (and of each graph variant, such as DeepCache's
  skip steps); :attr:`CompileMixin.compile_seconds` adds up the time compiling took, as a report.
- **Regional by default.** A model that names its repeated blocks (``_repeated_blocks``: the UNet's
  ``ResnetBlock2D`` and ``Transformer2DModel``, Flux's transformer blocks) has each of those blocks
  compiled, not the whole model: blocks of one shape share one graph, so a new process traces 16 graphs
  for SD 1.5's 38 blocks instead of the whole UNet. Measured at SD 1.5 size in bf16: compiling from
  nothing 54 s instead of 79 s, the first call of a process with a warm cache 6.9 s of overhead
  instead of 11.3 s, at 1-2% more time per step; DeepCache's skip steps run blocks already compiled.
  ``pipe.compile(regional=False)`` compiles the whole denoiser.
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


class _CompileClock:
    """Seconds spent compiling in this process: dynamo's compile-start/compile-end callbacks (tracing,
    and generating or loading kernels) add up here. ``None`` where this torch lacks the callbacks."""

    def __init__(self):
        self.total = 0.0
        self._started: float | None = None
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            self.available = False
            return
        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)
        self.available = True

    def _start(self, *args) -> None:
        self._started = time.perf_counter()

    def _end(self, *args) -> None:
        if self._started is not None:
            self.total += time.perf_counter() - self._started
            self._started = None


_CLOCK: _CompileClock | None = None


def _clock() -> _CompileClock:
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = _CompileClock()
    return _CLOCK


class _CompileTimer:
    """Adds to ``owner.compile_seconds`` what compiling cost during each call of ``module``: the compile
    clock's advance over the call (every recompile counts: a new shape, or a new graph variant such as
    DeepCache's skip steps). Without the clock, the wall time of the first call per input shape.

    The hooks run inside the compiled ``_call_impl``, so dynamo is told to leave them alone."""

    def __init__(self, owner, module: torch.nn.Module):
        self.owner, self.clock = owner, _clock()
        self.seen: set = set()
        self.started: list = []
        module.register_forward_pre_hook(torch.compiler.disable(self.before), with_kwargs=True)
        module.register_forward_hook(torch.compiler.disable(self.after), with_kwargs=True, always_call=True)

    @staticmethod
    def _key(args, kwargs):
        first = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        return tuple(first.shape) if isinstance(first, torch.Tensor) else None

    def before(self, module, args, kwargs):
        now = self.clock.total if self.clock.available else time.perf_counter()
        self.started.append((self._key(args, kwargs), now))

    def after(self, module, args, kwargs, output):
        key, then = self.started.pop()
        if self.clock.available:
            self.owner.compile_seconds += self.clock.total - then
        elif key not in self.seen:
            self.owner.compile_seconds += time.perf_counter() - then
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
        regional: bool = True,
    ):
        """Compile the denoiser (``unet`` or ``transformer``) and, with ``vae=True``, the VAE decoder,
        in place; ``mode``/``fullgraph``/``dynamic`` go to ``torch.compile``. Returns the pipeline.
        ``regional=True`` compiles a denoiser's repeated blocks (:func:`compile_repeated_blocks`) where it
        names them, ``False`` the whole denoiser.

        The first call of each new shape compiles (or loads the compiled kernels from the disk cache:
        see :func:`compile_cache_dir`); ``pipe.compile_seconds`` adds up the time spent compiling."""
        cache = _enable_disk_cache()
        options = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic}
        if channels_last:
            for name in CONV_MODELS:
                module = getattr(self, name, None)
                if isinstance(module, torch.nn.Module):
                    module.to(memory_format=torch.channels_last)
        denoisers = [getattr(self, name, None) for name in DENOISERS]
        targets = [m for m in denoisers if not (regional and _repeated_block_names(m))]
        vae_model = getattr(self, "vae", None)
        if vae and vae_model is not None and isinstance(getattr(vae_model, "decoder", None), torch.nn.Module):
            targets.append(vae_model.decoder)
        compiled = [m for m in denoisers + targets if isinstance(m, torch.nn.Module)]
        if not compiled:
            raise ValueError(f"{type(self).__name__} has no unet, transformer or VAE decoder to compile")
        for module in compiled:
            if getattr(module, "_diffpipe_compiled", False):
                continue
            if module in targets:
                module.compile(**options)
            else:
                compile_repeated_blocks(module, **options)
            _CompileTimer(self, module)  # on the model itself: its own call runs eager when regional
            module._diffpipe_compiled = True
        self.compile_cache = cache
        return self


def _repeated_block_names(model) -> tuple[str, ...]:
    return tuple(getattr(model, "_repeated_blocks", ()) or ()) if isinstance(model, torch.nn.Module) else ()


def compile_repeated_blocks(model: torch.nn.Module, *args, **kwargs) -> None:
    """``torch.compile`` (in place, ``nn.Module.compile``) every block of ``model`` whose class is named
    in ``model._repeated_blocks`` (the outermost, where one contains another); ``args``/``kwargs`` go
    to ``torch.compile``. Raises ``ValueError`` when the model names none or has none of them."""
    names = _repeated_block_names(model)
    if not names:
        raise ValueError(
            f"{type(model).__name__} names no repeated blocks (`_repeated_blocks`) to compile; "
            "compile the whole model with `model.compile()` instead"
        )
    blocks = []

    def visit(module: torch.nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in names:
                blocks.append(child)
            else:
                visit(child)

    visit(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has none of its repeated blocks {list(names)} to compile")
    # blocks of one class and shape share compiled code; models have more shapes than dynamo's default
    # limit of 8 variants per code object
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    for block in blocks:
        block.compile(*args, **kwargs)
