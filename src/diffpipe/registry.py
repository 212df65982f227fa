"""The allow-list: class names a checkpoint may name, and where diffpipe implements them.

A ``model_index.json`` or a config's ``_class_name`` can only ever reach the classes listed here;
nothing else is imported because a file said so. Each subpackage owns its table (``SCHEDULERS`` in
``diffpipe.schedulers``, ``MODELS`` in ``diffpipe.models``, ``PIPELINES`` in ``diffpipe.pipelines``),
imported here directly. A table maps a class name to ``"module.path:attribute"`` rather than to the
class itself so that ``import diffpipe`` and ``from diffpipe import DDIMScheduler`` import only the
module the class lives in (the import-time benchmark); :func:`find_class` imports it on first use.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from .models import MODELS
from .pipelines import PIPELINES
from .schedulers import SCHEDULERS


@lru_cache(maxsize=None)
def class_table() -> dict[str, str]:
    """All class names diffpipe implements, mapped to ``module:attribute``."""
    return {**SCHEDULERS, **MODELS, **PIPELINES}


def find_class(name: str):
    """The diffpipe class called ``name``, or ``None`` when diffpipe has no such class."""
    target = class_table().get(name) if isinstance(name, str) else None
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
