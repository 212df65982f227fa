"""``AutoModel``: load whatever model (or scheduler) a folder's config names, as the reference's does.

The config's ``_class_name`` picks one of diffpipe's classes through the allow-list; a
``transformers`` config (``architectures``) picks one of the allow-listed transformers classes. Nothing
outside the allow-list is ever imported.
"""

from __future__ import annotations

import json
import os

from .. import hub
from ..errors import ConfigError, UnsupportedComponentError
from ..registry import find_class

_CONFIG_NAMES = ("config.json", "scheduler_config.json")
_HUB_KEYWORDS = ("revision", "cache_dir", "local_files_only", "token")


class AutoModel:
    """Not instantiated: ``AutoModel.from_pretrained(path, subfolder=...)`` or ``AutoModel.from_config(config)``."""

    def __init__(self, *args, **kwargs):
        raise OSError(
            "AutoModel is not instantiated: use AutoModel.from_pretrained(path_or_repo_id, subfolder=...) or "
            "AutoModel.from_config(config), which return the class the config names"
        )

    @classmethod
    def from_config(cls, config: dict, **kwargs):
        """An instance of the class ``config["_class_name"]`` names, built from ``config``."""
        name = config.get("_class_name") if isinstance(config, dict) else None
        target = find_class(name) if isinstance(name, str) else None
        if target is None or not hasattr(target, "from_config"):
            raise UnsupportedComponentError(
                f"AutoModel.from_config: the config names {name!r}, which is not a class diffpipe implements"
            )
        return target.from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
        """The model in ``pretrained_model_or_path`` (``subfolder``), of the class its config names; the
        keyword arguments are that class's ``from_pretrained``'s."""
        source = os.fspath(pretrained_model_or_path)
        where = f"AutoModel from {source}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        found: dict = {}

        def select(files, read):
            for config_name in _CONFIG_NAMES:
                rel = hub.join_relative(subfolder, config_name)
                if rel in files:
                    try:
                        found["config"] = json.loads(read(rel))
                    except (ValueError, UnicodeDecodeError) as e:
                        raise ConfigError(f"{where}: {rel} is not valid JSON ({e})") from e
                    return [rel]
            raise ConfigError(
                f"{where}: no {' or '.join(_CONFIG_NAMES)} there; pass the folder (or subfolder=) of one model"
            )

        hub.fetch(source, select, what=where, **{k: kwargs.get(k) for k in _HUB_KEYWORDS})
        target, kwargs = _target(found["config"], kwargs, where)
        return target.from_pretrained(source, subfolder=subfolder, **kwargs)


def _target(config, kwargs: dict, where: str):
    """(the class to load with, its keyword arguments)."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: the config is not a JSON object")
    name = config.get("_class_name")
    if isinstance(name, str):
        target = find_class(name)
        if target is None:
            raise UnsupportedComponentError(f"{where}: the config names {name!r}, which diffpipe does not implement")
        return target, kwargs
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        from ..io.components import _transformers_dtype_keyword, resolve

        spec = resolve("transformers", architectures[0], component="model", where=where)
        if "torch_dtype" in kwargs:
            kwargs = {**kwargs, _transformers_dtype_keyword(): kwargs.pop("torch_dtype")}
        return spec.cls, kwargs
    raise ConfigError(f"{where}: the config names no class ('_class_name', or transformers' 'architectures')")
