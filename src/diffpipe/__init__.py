"""diffpipe: load and run diffusion pipelines stored in the diffusers checkpoint format.

Public classes are imported lazily: ``import diffpipe`` is cheap, and ``from diffpipe import
DDIMScheduler`` imports only what that class needs.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402  (light: no torch)
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DiffpipeError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsafePathError,
    UnsupportedComponentError,
)

_EXTRA = {
    "ConfigMixin": "diffpipe.config:ConfigMixin",
    "ModelMixin": "diffpipe.models.modeling:ModelMixin",
    "AutoModel": "diffpipe.models.auto:AutoModel",  # not on the allow-list: no checkpoint names it
    "SchedulerMixin": "diffpipe.schedulers.base:SchedulerMixin",
    "load_image": "diffpipe.images:load_image",
    "export_to_gif": "diffpipe.images:export_to_gif",
    "export_to_video": "diffpipe.images:export_to_video",
    "make_image_grid": "diffpipe.images:make_image_grid",
    "GGUFQuantizationConfig": "diffpipe.quantization:GGUFQuantizationConfig",
}


def __getattr__(name: str):
    from .registry import class_table

    target = _EXTRA.get(name) or class_table().get(name)
    if target is None:
        raise AttributeError(f"module 'diffpipe' has no attribute {name!r}")
    import importlib

    module_name, _, attr = target.partition(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value
    return value


def __dir__():
    from .registry import class_table

    return sorted(set(globals()) | set(_EXTRA) | set(class_table()))
