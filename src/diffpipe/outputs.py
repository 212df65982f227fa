"""The base of every output object (model, scheduler step, pipeline), as the reference's outputs are:
a dataclass that is also an ordered ``dict`` of its fields that are set (not ``None``).

``out.images`` and ``out["images"]`` read a field; ``out[0]`` / ``out[0:2]`` / ``out.to_tuple()`` read the
set fields in declaration order (what ``return_dict=False`` returns); ``keys() / values() / items()``,
``len``, ``in`` and iteration (over the names, as any dict) see the set fields. Assigning a set field,
by attribute or by key, changes both views. Removing fields (``pop``, ``del``, ``update``,
``setdefault``) is refused: the object keeps the fields its class declares.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields
from typing import Any


class BaseOutput(OrderedDict):
    """Subclasses are ``@dataclass``es; see the module docstring."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                super().__setitem__(f.name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self[k] for k in self.keys())

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def _refuse(self, method: str):
        raise TypeError(f"You cannot use ``{method}`` on a {type(self).__name__} instance: its fields are fixed")

    def __delitem__(self, key) -> None:
        self._refuse("__delitem__")

    def pop(self, *args, **kwargs):
        self._refuse("pop")

    def popitem(self, *args, **kwargs):
        self._refuse("popitem")

    def setdefault(self, *args, **kwargs):
        self._refuse("setdefault")

    def update(self, *args, **kwargs):
        self._refuse("update")
