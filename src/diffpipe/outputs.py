"""The base of every output object (model, scheduler step, pipeline): a dataclass read as an object
(``out.sample``), as a tuple of the fields that are set (``out[0]``, ``out.to_tuple()``, what
``return_dict=False`` returns) and by field name (``out["sample"]``), as the reference's outputs are."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class BaseOutput:
    """Subclasses are dataclasses. Integer indexing, iteration and ``len`` see only the fields that
    are not ``None``, in declaration order; string indexing reads a field that is set."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())
