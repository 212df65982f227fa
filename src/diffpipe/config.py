"""Configs: constructor arguments <-> ``config.json`` / ``scheduler_config.json``.

A class that mixes in :class:`ConfigMixin` gets its ``__init__`` arguments recorded as its config,
with the reference's JSON fields (``_class_name``, ``_diffusers_version``) so the reference reads our
folders and we read its folders. The rules follow the reference's observable behaviour:

- ``cls.from_config(config, **overrides)`` passes the config keys that ``cls.__init__`` takes, with
  ``overrides`` winning; keys the class does not know are kept in the new config (a compatible class
  may need them later) and reported each time in the reference's words; keys that the source only had as defaults
  (``_use_default_values``) are dropped so that the new class uses its own defaults.
- ``config`` is a read-only mapping with attribute access (``scheduler.config.num_train_timesteps``).

Legacy-config migrations live in this module and only here (``fix_scheduler_for_sd``, ``fix_unet_for_sd``).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import warnings
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

# The reference version whose format we write. The reference reads `_diffusers_version` to decide on
# some legacy handling, so we write the version whose format we match (and no key of our own: a saved
# config has exactly the reference's keys).
FORMAT_VERSION = "0.42.1"

# Keys that describe a loaded object and never belong in a saved file (``_name_or_path``, where a model
# or pipeline was loaded from, is written as the reference writes it).
_NOT_SAVED = ("_use_default_values", "_ignore_files", "_pre_quantization_dtype")


class Config(dict):
    """A read-only ``dict`` with attribute access; what ``obj.config`` returns."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("a config is read-only; build a new object with `Class.from_config(obj.config, key=value)`")

    __setattr__ = __setitem__ = __delitem__ = _readonly
    pop = popitem = clear = update = setdefault = _readonly

    def __reduce__(self):
        return (Config, (dict(self),))


def _init_params(init) -> list[inspect.Parameter]:
    """The named parameters of an ``__init__`` (without ``self``, ``*args``, ``**kwargs``)."""
    params = list(inspect.signature(init).parameters.values())[1:]
    return [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _recording_init(init):
    """Wrap ``__init__`` so that the most-derived call records its arguments as the config."""

    params = _init_params(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if type(self).__init__ is wrapper:  # only the outermost __init__ records
            ignore = set(type(self).ignore_for_config)
            private = {k: v for k, v in kwargs.items() if k.startswith("_")}
            public = {k: v for k, v in kwargs.items() if not k.startswith("_")}
            recorded: dict[str, Any] = {}
            named = [p for p in params if p.name not in ignore]
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            for p, value in zip(positional, args):
                if p.name not in ignore:
                    recorded[p.name] = value
            defaulted = []
            for p in named:
                if p.name in recorded:
                    continue
                if p.name in public:
                    recorded[p.name] = public[p.name]
                elif p.default is not inspect.Parameter.empty:
                    recorded[p.name] = p.default
                    defaulted.append(p.name)
            if defaulted:
                recorded["_use_default_values"] = defaulted
            object.__setattr__(self, "_internal_dict", Config({**private, **recorded}))
            kwargs = public
        init(self, *args, **kwargs)

    wrapper.__wrapped_config_init__ = True
    return wrapper


def _to_json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays, tensors
        return value.tolist()
    return value


def read_json_file(path: Path, *, what: str) -> dict:
    """Read a JSON object from ``path``; errors name the file and what it was for."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text ({e})") from e
    except IsADirectoryError:
        raise ConfigError(f"{what}: {path} is a folder, expected a JSON file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid JSON: {e}") from e
    except (RecursionError, ValueError) as e:  # nesting too deep, an integer of thousands of digits
        raise ConfigError(f"{what}: {path} cannot be read as a config: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def config_attribute(obj, name: str) -> Any:
    """A config value read as an attribute (``scheduler.num_train_timesteps``): deprecated in the
    reference, which still answers it with this FutureWarning; anything else is an AttributeError."""
    config = obj.__dict__.get("_internal_dict")
    if config is None or name.startswith("__") or name not in config:
        raise AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}'")
    cls = type(obj).__name__
    example = "unet" if hasattr(type(obj), "load_state_dict") else "scheduler"  # the reference's wording
    warnings.warn(
        f"Accessing config attribute `{name}` directly via '{cls}' object attribute is deprecated. Please access "
        f"'{name}' over '{cls}'s config object instead, e.g. '{example}.config.{name}'.",
        FutureWarning,
        stacklevel=3,
    )
    return config[name]


class ConfigMixin:
    """Mixin giving a class a config recorded from its constructor arguments.

    Class attributes a subclass may set:
    - ``config_name``: the file name (``config.json``, ``scheduler_config.json``);
    - ``ignore_for_config``: constructor arguments that are not part of the config;
    - ``_compatibles``: names of classes that can be built from this class's config.
    """

    config_name: str = "config.json"
    ignore_for_config: tuple[str, ...] = ()
    _compatibles: tuple[str, ...] = ()
    # keys ``__init__`` derives and registers itself (written to saved configs, so no surprise in one)
    _derived_config_keys: tuple[str, ...] = ()
    _record_init: bool = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if not cls._record_init:  # pipelines register their components themselves
            return
        if init is not None and not getattr(init, "__wrapped_config_init__", False):
            cls.__init__ = _recording_init(init)

    # ---------------------------------------------------------------- the config itself
    @property
    def config(self) -> Config:
        return self.__dict__.get("_internal_dict", Config())

    def __getattr__(self, name: str) -> Any:
        return config_attribute(self, name)

    def register_to_config(self, **kwargs) -> None:
        object.__setattr__(self, "_internal_dict", Config({**self.config, **kwargs}))

    @classmethod
    def init_keys(cls) -> set[str]:
        return {p.name for p in _init_params(cls.__init__)} - set(cls.ignore_for_config)

    @classmethod
    def _compatible_keys(cls) -> set[str]:
        """Constructor keys of the classes that can be built from this class's config."""
        from .registry import find_class

        classes = (find_class(n) for n in cls._compatibles)
        return set().union(*(c.init_keys() for c in classes if c is not None and hasattr(c, "init_keys")))

    @property
    def compatibles(self) -> list[type]:
        """Classes that can be built from this object's config (those diffpipe implements)."""
        from .registry import find_class

        names = dict.fromkeys((type(self).__name__, *self._compatibles))
        return [c for c in (find_class(n) for n in names) if c is not None]

    # ---------------------------------------------------------------- building from a config
    @classmethod
    def from_config(cls, config: dict | None = None, return_unused_kwargs: bool = False, **overrides):
        """Build an instance from ``config`` (a dict or another object's ``.config``) and overrides."""
        if config is None:
            config = {}
        elif isinstance(config, ConfigMixin):
            config = config.config
        elif not isinstance(config, dict):
            raise TypeError(
                f"{cls.__name__}.from_config expects a config dict (for example `other.config`), "
                f"got {type(config).__name__}"
            )
        init_kwargs, kept = cls._split_config(config, overrides)
        # Keyword arguments the class does not take are ignored, as the reference ignores them: configs
        # and their overrides move between scheduler classes all the time. They are said in a warning
        # with the reference's wording (log filters look for it) and returned as unused.
        ignored = {k: v for k, v in overrides.items() if k not in init_kwargs}
        if ignored:
            logger.warning(
                "The config attributes %s were passed to %s, but are not expected and will be ignored. "
                "Please verify your %s configuration file. (%s takes %s)",
                ignored,
                cls.__name__,
                cls.config_name,
                cls.__name__,
                sorted(cls.init_keys()),
            )
        obj = cls(**init_kwargs)
        if "_class_name" in kept:
            kept["_class_name"] = cls.__name__
        obj.register_to_config(**kept)
        if return_unused_kwargs:
            return obj, {**{k: v for k, v in kept.items() if not k.startswith("_")}, **ignored}
        return obj

    @classmethod
    def _split_config(cls, config: dict, overrides: dict) -> tuple[dict, dict]:
        """(constructor kwargs, other keys to keep in the new config)."""
        defaulted = set(config.get("_use_default_values", ()))
        source = {k: v for k, v in config.items() if k not in defaulted and k != "_use_default_values"}
        expected = cls.init_keys()
        init_kwargs = {k: v for k, v in source.items() if k in expected}
        init_kwargs.update({k: v for k, v in overrides.items() if k in expected})
        kept = {k: v for k, v in source.items() if k not in init_kwargs}
        # The reference's two messages, in its words (its test suite and users' log filters look for
        # them), each time a config is read: keys no class of this family takes (a compatible class's
        # keys are expected in a config that moves between schedulers), and keys left to defaults.
        unknown = {k: v for k, v in kept.items() if not k.startswith("_") and k not in cls._derived_config_keys}
        if unknown:  # (only then: finding the compatible classes imports their modules)
            compatible = cls._compatible_keys()
            unknown = {k: v for k, v in unknown.items() if k not in compatible}
        if unknown:
            logger.warning(
                "The config attributes %s were passed to %s, but are not expected and will be ignored. "
                "Please verify your %s configuration file.",
                unknown,
                cls.__name__,
                cls.config_name,
            )
        missing = expected - set(init_kwargs)
        if missing:
            logger.info("%s was not found in config. Values will be initialized to default values.", missing)
        return init_kwargs, kept

    # ---------------------------------------------------------------- files
    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        return_unused_kwargs: bool = False,
        **unused,
    ) -> dict:
        """Read ``[subfolder/]config_name`` from a local folder or a Hub repo (downloaded and cached)."""
        from . import hub

        name = cls.config_name
        rel = hub.join_relative(subfolder, name)
        root = hub.fetch(
            pretrained_model_name_or_path,
            lambda files, read: [rel] if rel in files else [],
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            what=f"{cls.__name__} config",
        )
        path = root / rel
        if not path.is_file():
            where = f"{pretrained_model_name_or_path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise ConfigError(
                f"{cls.__name__}: no {name} in {where}; expected the file {rel}. "
                "Check the path or repo id and the subfolder name."
            )
        data = read_json_file(path, what=f"{cls.__name__} config")
        return (data, unused) if return_unused_kwargs else data

    def to_json_string(self) -> str:
        data = {k: v for k, v in self.config.items() if k not in _NOT_SAVED}
        data["_class_name"] = type(self).__name__
        data["_diffusers_version"] = FORMAT_VERSION
        return json.dumps(_to_json_value(data), indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: str | os.PathLike, **unused) -> Path:
        """Write ``config_name`` into ``save_directory`` atomically; returns the file's path."""
        from .io.atomic import atomic_write_text

        save_directory = Path(save_directory)
        if save_directory.is_file():
            raise ConfigError(f"cannot save a config into {save_directory}: it is a file, expected a folder")
        save_directory.mkdir(parents=True, exist_ok=True)
        path = save_directory / self.config_name
        atomic_write_text(path, self.to_json_string())
        return path

    def __repr__(self) -> str:  # the reference prints the class and its JSON config
        return f"{type(self).__name__} {self.to_json_string()}"


def fix_scheduler_for_sd(scheduler):
    """Old Stable Diffusion scheduler configs: ``steps_offset`` must be 1 and ``clip_sample`` off.

    Checkpoints from before these keys settled (SD 1.x repos) carry ``steps_offset: 0`` or
    ``clip_sample: true``, which shift or clip the schedule the UNet was trained on. The scheduler's
    config is mended in place (with the reference's FutureWarning), as the reference does, so every pipeline sharing
    the object sees the same schedule.
    """
    config = getattr(scheduler, "config", None)
    if config is None:
        return scheduler
    changes = {}
    if "steps_offset" in config and config["steps_offset"] != 1:
        changes["steps_offset"] = 1
    if config.get("clip_sample") is True:
        changes["clip_sample"] = False
    if not changes:
        return scheduler
    for key, value in changes.items():  # the reference's FutureWarning (its opening words), one per key
        warnings.warn(
            f"The configuration file of this scheduler: {type(scheduler).__name__} is outdated. `{key}` should be set "
            f"to {value} instead of {config[key]}, which an old Stable Diffusion checkpoint carries; it is used as "
            f"{value} now. Update the checkpoint's scheduler/scheduler_config.json to silence this.",
            FutureWarning,
            stacklevel=4,
        )
    defaulted = [k for k in config.get("_use_default_values", ()) if k not in changes]
    scheduler.register_to_config(**changes, _use_default_values=defaulted)  # now explicit values
    return scheduler


def _version_tuple(text) -> tuple[int, ...]:
    parts = []
    for piece in str(text or "0").split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def fix_unet_for_sd(unet) -> None:
    """SD 1.x UNet configs written before diffusers 0.9 say ``sample_size: 32`` for 512px models.

    The reference rewrites it to 64 in the pipeline (so default image sizes come out right) when the
    config records a version below 0.9; this does the same, in place, with its FutureWarning.
    """
    config = getattr(unet, "config", None)
    if config is None or not isinstance(config.get("sample_size"), int) or config["sample_size"] >= 64:
        return
    version = config.get("_diffusers_version")
    if version is None or _version_tuple(version) >= (0, 9, 0):
        return  # a model built in code (no version recorded) keeps what it was given, as in the reference
    warnings.warn(  # the reference's FutureWarning (its opening words)
        "The configuration file of the unet has set the default `sample_size` to smaller than 64 which seems "
        f"highly unlikely: sample_size={config['sample_size']} in a config from diffusers "
        f"{config.get('_diffusers_version')}, an old value for 512px Stable Diffusion; 64 is used now. If the "
        "checkpoint is a fine-tune of Stable Diffusion 1.x, change 'sample_size' to 64 in its unet/config.json.",
        FutureWarning,
        stacklevel=4,
    )
    unet.register_to_config(sample_size=64)
