"""The error types diffpipe raises.

Every loading or saving failure ends in one of these. Each derives from the built-in exceptions the
reference raises in the same situation, so ``except`` clauses written for it keep working: where the
reference raises ``OSError`` for one case and ``ValueError`` for a neighbouring one (a missing local
folder is a ValueError there, a missing model file an OSError; an unreadable config.json an OSError,
a wrong value a ValueError), ours is both. And each derives from :class:`DiffpipeError`, so a caller
can catch all of ours at once.
Messages name the file or component, what was expected, what was found, and what to do.
"""

from __future__ import annotations


class DiffpipeError(Exception):
    """Base class of every error diffpipe raises on purpose."""


class ConfigError(DiffpipeError, ValueError, OSError):
    """A config file or config value is missing, malformed or inconsistent."""


class CheckpointNotFoundError(DiffpipeError, FileNotFoundError, ValueError):
    """The files a load needs are not there (no weights, no such variant, not in the cache)."""


class CorruptCheckpointError(DiffpipeError, ValueError):
    """A weight file exists but cannot be read as what its name says (truncated, bad header, LFS pointer)."""


class UnsafeCheckpointError(DiffpipeError, ValueError):
    """A file would need code execution to load (a pickle carrying a code payload, custom code)."""


class StateDictMismatchError(DiffpipeError, ValueError):
    """A checkpoint's tensors do not fit the module: missing keys or wrong shapes."""


class UnsupportedComponentError(DiffpipeError, ValueError):
    """A ``model_index.json`` names a library or class outside the allow-list."""


class UnsafePathError(DiffpipeError, ValueError):
    """A name from a checkpoint would point outside its folder (``..``, separators, absolute paths)."""


def summarize(names, limit: int = 5) -> str:
    """``'a', 'b', 'c' (+12 more)`` for error messages: the first few of a collection and a count."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f" (+{len(names) - limit} more)"
    return shown or "none"
