"""Pausing Python's cyclic garbage collector around work that makes no garbage cycles (loading)."""

from __future__ import annotations

import functools
import gc


def gc_paused(fn):
    """Run ``fn`` with Python's cyclic garbage collector paused (restored afterwards, also on error).

    Building a full-size UNet allocates some ten thousand container objects; in a process that has
    imported torch, that triggers full collections over every object torch created, which measured
    60-95 ms of a 100-140 ms load. Loading makes no garbage cycles worth collecting midway.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not gc.isenabled():  # nested call or the caller's own choice: leave it as it is
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return run
