"""Pipeline components: which class a ``model_index.json`` entry means, which files it needs, and
how it is loaded and saved.

The (library, class) pairs a checkpoint may name are an allow-list: diffpipe's own classes (under the
library names the reference writes: ``"diffusers"`` or a pipeline module such as
``"stable_diffusion"``) and a fixed set of ``transformers`` classes. Nothing else is ever imported.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigMixin
from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    UnsupportedComponentError,
    summarize,
)
from .atomic import as_os_error
from .files import PICKLE, SAFETENSORS, WeightChoice, choose_weights
from .load_model import check_finite, describe_mismatch
from ..registry import find_class

logger = logging.getLogger(__name__)

# Library names the reference writes for its own classes: "diffusers" and its pipeline modules.
OWN_LIBRARIES = {
    "diffusers",
    "stable_diffusion",
    "stable_diffusion_xl",
    "stable_diffusion_sag",
    "animatediff",
    "stable_diffusion_safe",
}

# transformers classes a checkpoint may name; old names map to their current class.
TRANSFORMERS_CLASSES = {
    "CLIPTextModel": "CLIPTextModel",
    "CLIPTextModelWithProjection": "CLIPTextModelWithProjection",
    "CLIPVisionModel": "CLIPVisionModel",
    "CLIPVisionModelWithProjection": "CLIPVisionModelWithProjection",
    "CLIPTokenizer": "CLIPTokenizer",
    "CLIPTokenizerFast": "CLIPTokenizerFast",
    "CLIPImageProcessor": "CLIPImageProcessor",
    "CLIPImageProcessorPil": "CLIPImageProcessorPil",  # transformers 5 without torchvision
    "CLIPImageProcessorFast": "CLIPImageProcessorFast",
    "CLIPFeatureExtractor": "CLIPImageProcessor",  # the old name of the same processor
    "T5EncoderModel": "T5EncoderModel",
    "T5Tokenizer": "T5Tokenizer",
    "T5TokenizerFast": "T5TokenizerFast",
}

TRANSFORMERS_WEIGHT_PREFIXES = {SAFETENSORS: "model", PICKLE: "pytorch_model"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".h5", ".onnx", ".ckpt", ".pt", ".pth", ".pb", ".gguf")


@dataclass
class ComponentSpec:
    """One ``model_index.json`` entry, resolved."""

    name: str
    library: str
    class_name: str
    cls: type
    kind: str  # "model" (ours), "config" (ours, config only), "transformers-model", "transformers-other"

    @property
    def weight_prefixes(self) -> dict[str, str] | None:
        if self.kind == "model":
            return getattr(self.cls, "weight_prefixes", None) or {
                SAFETENSORS: self.cls.weights_prefix,
                PICKLE: self.cls.weights_prefix,
            }
        if self.kind == "transformers-model":
            return TRANSFORMERS_WEIGHT_PREFIXES
        return None


@dataclass
class LoadReport:
    """What a pipeline load used, per component (``pipeline.loading_report``)."""

    files: dict[str, list[str]] = field(default_factory=dict)
    variant_fallbacks: list[str] = field(default_factory=list)
    overridden: list[str] = field(default_factory=list)


def _transformers():
    return importlib.import_module("transformers")


def resolve(library, class_name, *, component: str, where: str) -> ComponentSpec:
    """The class for a ``[library, class]`` entry, from the allow-list only."""
    if not (isinstance(library, str) and isinstance(class_name, str)):
        raise UnsupportedComponentError(
            f"{where}: component {component!r} is {[library, class_name]!r}; expected "
            '["library", "ClassName"] or [null, null]'
        )
    if library in OWN_LIBRARIES:
        cls = find_class(class_name)
        if cls is None:
            raise UnsupportedComponentError(
                f"{where}: component {component!r} names {library}.{class_name}, which diffpipe does not "
                "implement. Pass the component yourself (from_pretrained(..., "
                f"{component}=obj)) or set it to None if it is optional."
            )
        from ..models.modeling import ModelMixin

        if issubclass(cls, ModelMixin):
            kind = "model"
        elif any(base.__name__ == "PreTrainedModel" for base in cls.__mro__):
            kind = "transformers-model"  # ours, built on transformers (the safety checker)
        else:
            kind = "config"
        return ComponentSpec(component, library, class_name, cls, kind)
    if library == "transformers":
        real = TRANSFORMERS_CLASSES.get(class_name)
        if real is None:
            raise UnsupportedComponentError(
                f"{where}: component {component!r} names transformers.{class_name}, which is not on "
                f"diffpipe's allow-list ({', '.join(sorted(TRANSFORMERS_CLASSES))}). Load it yourself and "
                f"pass it as {component}=obj."
            )
        cls = getattr(_transformers(), real, None)
        if cls is None and real.startswith("CLIPImageProcessor"):
            cls = _transformers().CLIPImageProcessor  # one processor under another backend's name
        if cls is None:
            raise UnsupportedComponentError(
                f"{where}: component {component!r} names transformers.{class_name}, which the installed "
                f"transformers {_transformers().__version__} does not have"
            )
        kind = "transformers-model" if issubclass(cls, _transformers().PreTrainedModel) else "transformers-other"
        return ComponentSpec(component, library, class_name, cls, kind)
    raise UnsupportedComponentError(
        f"{where}: component {component!r} names the library {library!r}; diffpipe only loads classes of "
        "'diffusers' (its own implementations) and a fixed set of 'transformers' classes, and never "
        "imports other modules a checkpoint names. Pass the component yourself as "
        f"{component}=obj."
    )


def library_of(obj) -> tuple[str, str]:
    """The ``[library, class]`` pair written for a component object (the names the reference reads)."""
    module = type(obj).__module__
    if module.startswith("diffpipe."):
        return (getattr(type(obj), "_library_name", "diffusers"), type(obj).__name__)
    return (module.split(".")[0], type(obj).__name__)


def component_file_choice(
    spec: ComponentSpec, files: set[str], *, variant, use_safetensors, where: str
) -> tuple[WeightChoice | None, bool]:
    """(weights chosen in the component folder, whether the variant fell back to the original)."""
    prefixes = spec.weight_prefixes
    if prefixes is None:
        return None, False
    label = f"{where}, component {spec.name!r}"
    try:
        return choose_weights(
            files, prefixes=prefixes, variant=variant, use_safetensors=use_safetensors, where=label
        ), False
    except CheckpointNotFoundError:
        if variant is None:
            raise
    choice = choose_weights(files, prefixes=prefixes, variant=None, use_safetensors=use_safetensors, where=label)
    return choice, True


def files_in(folder_files: set[str], name: str) -> set[str]:
    """Direct file names inside ``name/`` from a repo-wide listing."""
    prefix = name + "/"
    return {f[len(prefix) :] for f in folder_files if f.startswith(prefix) and "/" not in f[len(prefix) :]}


def non_weight_files(names: set[str]) -> list[str]:
    return sorted(
        n for n in names if not n.endswith(WEIGHT_SUFFIXES) and not n.endswith(".index.json") and ".index." not in n
    )


def load_component(
    spec: ComponentSpec,
    root: Path,
    *,
    variant,
    dtype,
    use_safetensors,
    where: str,
    allow_missing_keys: bool = False,
    verify: bool = False,
    local_files_only: bool = False,
):
    """Load one component from ``root/spec.name`` (already on disk; ``local_files_only`` is the
    caller's, which a tokenizer records in the tokenizer_config.json it saves, as the reference's)."""
    folder = root / spec.name
    if not folder.is_dir():
        raise CheckpointNotFoundError(
            f"{where}: model_index.json lists component {spec.name!r} but there is no folder {folder}"
        )
    if spec.kind == "model":
        model = spec.cls.from_pretrained(
            root,
            subfolder=spec.name,
            variant=variant,
            torch_dtype=dtype,
            use_safetensors=use_safetensors,
            allow_missing_keys=allow_missing_keys,
            verify=verify,
        )
        model.register_to_config(_name_or_path=str(folder))  # where a pipeline's part came from, as the reference
        return model
    if spec.kind == "config":
        config = spec.cls.load_config(root, subfolder=spec.name)
        return spec.cls.from_config(config)
    kwargs = {"local_files_only": True}
    if spec.kind == "transformers-model":
        # mismatched shapes and missing keys come back in the loading info, to be refused below:
        # transformers itself would re-initialise them with only a log line
        kwargs.update(use_safetensors=use_safetensors, output_loading_info=True, ignore_mismatched_sizes=True)
        if variant is not None:
            kwargs["variant"] = variant
        target = None if dtype == "auto" else (dtype or torch.get_default_dtype())
        if target is not None:
            kwargs[_transformers_dtype_keyword()] = target
    label = f"{where}: component {spec.name!r} ({spec.library}.{spec.class_name})"
    if spec.kind == "transformers-model" and not (folder / "config.json").is_file():
        # transformers would build the class's default config and report every weight as mismatched
        raise ConfigError(f"{label}: no config.json; expected the file {folder / 'config.json'}")
    try:
        obj = spec.cls.from_pretrained(folder, **kwargs)
    except pickle.UnpicklingError as e:  # weights_only=True refused a pickle that carries more than tensors
        raise UnsafeCheckpointError(
            f"{label}: a pickle file in {folder} was refused: it needs more than tensors to load (it may carry "
            f"code), and pickles are only read with weights_only=True. Detail: {str(e).splitlines()[0]}"
        ) from e
    except (OSError, ValueError, EnvironmentError) as e:
        raise CheckpointNotFoundError(f"{label} could not be loaded from {folder}: {e}") from e
    if spec.kind == "transformers-model":
        obj, info = obj
        check_loading_info(info, label=label, folder=folder, allow_missing_keys=allow_missing_keys)
        if verify:
            check_finite(obj.state_dict(), {}, where=f"{label} in {folder}")
    if spec.kind == "transformers-other":
        check_tokenizer(obj, folder, spec.name, where)
        recorded = getattr(obj, "init_kwargs", None)
        if isinstance(recorded, dict) and "local_files_only" in recorded:
            recorded["local_files_only"] = local_files_only  # not the True this reads the folder with
    return obj


def check_loading_info(info: dict, *, label: str, folder: Path, allow_missing_keys: bool) -> None:
    """Hold a transformers model to diffpipe's rules: wrong shapes and (unless allowed) missing keys
    are errors, unexpected keys a warning."""
    missing = sorted(info.get("missing_keys") or ())
    wrong = sorted(info.get("mismatched_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    if wrong or (missing and not allow_missing_keys):
        raise StateDictMismatchError(
            f"{label}: the weights in {folder} do not fit: {describe_mismatch(missing, wrong, unexpected)}"
        )
    if missing:
        logger.warning(
            "%s: %d key(s) were not in the checkpoint and are randomly initialised: %s",
            label,
            len(missing),
            summarize(missing),
        )
    if unexpected:
        logger.warning(
            "%s: ignoring %d key(s) in %s that the model does not have: %s",
            label,
            len(unexpected),
            folder,
            summarize(unexpected),
        )


def _transformers_dtype_keyword() -> str:
    major, minor = (int(x) for x in _transformers().__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def check_tokenizer(obj, folder: Path, name: str, where: str) -> None:
    """Refuse a tokenizer that transformers only half loaded (offline it can return a near-empty one)."""
    vocab_size = getattr(obj, "vocab_size", None)
    if vocab_size is None or not hasattr(obj, "convert_tokens_to_ids"):
        return
    if vocab_size < 10:
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise CheckpointNotFoundError(
            f"{where}: the tokenizer in {folder} loaded with only {vocab_size} tokens, so its vocabulary files "
            f"were not found or not read (folder holds: {present}). A CLIP tokenizer needs vocab.json and "
            "merges.txt (or tokenizer.json)."
        )


def save_component(obj, stage, name: str, *, variant, safe_serialization: bool, max_shard_size) -> None:
    """Stage one component's files under ``name/``."""
    from ..models.modeling import ModelMixin

    if isinstance(obj, ModelMixin):
        obj.write_files(
            stage, name, variant=variant, safe_serialization=safe_serialization, max_shard_size=max_shard_size
        )
        return
    if isinstance(obj, ConfigMixin):
        stage.path(f"{name}/{obj.config_name}").write_text(obj.to_json_string(), encoding="utf-8")
        return
    save = getattr(obj, "save_pretrained", None)
    if save is None:
        raise TypeError(f"component {name!r} ({type(obj).__name__}) cannot be saved: it has no save_pretrained")
    target = stage.folder(name)
    kwargs = {}
    if hasattr(obj, "state_dict"):  # a transformers model
        kwargs = {"max_shard_size": max_shard_size}
        if "safe_serialization" in inspect.signature(save).parameters:
            kwargs["safe_serialization"] = safe_serialization
        if variant is not None:
            kwargs["variant"] = variant
    with as_os_error(target):  # tokenizers and safetensors report a full disk as a bare Exception
        save(target, **kwargs)
    if variant is not None and hasattr(obj, "state_dict") and _has_original_weights(stage.target / name):
        # transformers writes the variant's dtype into config.json, and the reference loads transformers
        # models with dtype "auto": the folder's fp32 weights would then load as fp16 beside an fp32
        # UNet. The config already there describes the original weights (as on published repos): keep it.
        (target / "config.json").unlink(missing_ok=True)
    if hasattr(obj, "state_dict"):  # stale shards of this variant from an earlier save
        v = f".{variant}" if variant else ""
        stage.remove_stale(
            name, [f"model{v}.safetensors", f"model.safetensors.index{v}.json", f"model{v}-?????-of-?????.safetensors"]
        )


def _has_original_weights(folder: Path) -> bool:
    """Whether a transformers component folder already holds its config and non-variant weights."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return (folder / "config.json").is_file() and any((folder / n).is_file() for n in names)


def parse_model_index_bytes(data: bytes, *, where: str) -> dict:
    """The JSON object of a ``model_index.json``; errors name the checkpoint."""
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, bad JSON, an over-long integer, too deep
        raise ConfigError(f"{where}: model_index.json is not valid JSON ({e})") from e
    if not isinstance(index, dict):
        raise ConfigError(f"{where}: model_index.json holds a JSON {type(index).__name__}, expected an object")
    return index
