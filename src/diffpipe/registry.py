"""The allow-list: class names a checkpoint may name, and where diffpipe implements them.

A ``model_index.json`` or a config's ``_class_name`` can only ever reach the classes listed here;
nothing else is imported because a file said so. Each subpackage owns its table (``SCHEDULERS`` in
``diffpipe.schedulers``, ``MODELS`` in ``diffpipe.models``, ``PIPELINES`` in ``diffpipe.pipelines``)
as ``{"ClassName": "module.path:attribute"}`` so that nothing heavy is imported until a class is used.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

_TABLE_OWNERS = (
    ("diffpipe.schedulers", "SCHEDULERS"),
    ("diffpipe.models", "MODELS"),
    ("diffpipe.pipelines", "PIPELINES"),
)


@lru_cache(maxsize=None)
def class_table() -> dict[str, str]:
    """All class names diffpipe implements, mapped to ``module:attribute``."""
    table: dict[str, str] = {}
    for module_name, attr in _TABLE_OWNERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:  # a subpackage that does not exist yet
            if e.name != module_name:
                raise
            continue
        table.update(getattr(module, attr, {}))
    return table


def find_class(name: str):
    """The diffpipe class called ``name``, or ``None`` when diffpipe has no such class."""
    target = class_table().get(name) if isinstance(name, str) else None
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
