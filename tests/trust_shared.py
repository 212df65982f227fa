"""Helpers shared by the trust suites (tests/trust/test_trust_*.py)."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import torch


@contextlib.contextmanager
def one_thread():
    """Tiny models run fast on one thread; two OpenMP threads on a shared 2-core machine can wait on
    each other for seconds per call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def sd_pipeline_folder() -> Path:
    """A tiny Stable Diffusion pipeline written by the reference, built once per test session.
    Read it only; copy it before changing anything."""
    from sd_factory import save_reference_pipeline

    base = Path(tempfile.mkdtemp(prefix="diffpipe-trust-sd-"))
    atexit.register(shutil.rmtree, base, True)
    with one_thread():
        return save_reference_pipeline(base / "sd")
