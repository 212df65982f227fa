"""DiffusionPipeline: a set of named components described by ``model_index.json``.

``from_pretrained`` reads ``model_index.json``, picks the pipeline class from ``_class_name`` (or
uses the class it was called on), resolves every component through the allow-list, fetches only the
files those components need in one snapshot, and loads each from its subfolder. ``from_pipe`` builds
another pipeline class around the same component objects; ``save_pretrained`` writes a folder that
both diffpipe and the reference load, atomically.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from .. import hub
from ..config import ConfigMixin, _init_params
from ..errors import (
    CheckpointNotFoundError,
    ConfigError,
    UnsafeCheckpointError,
    UnsupportedComponentError,
)
from ..io.atomic import StagedFolder, folder_lock
from ..io.files import check_plain_name
from ..io.load_model import check_hashes, resolve_dtype
from ..runtime.collector import gc_paused
from ..io import components as loading
from ..io.components import ComponentSpec, LoadReport
from .call import CallPathMixin
from ..runtime.compile import CompileMixin
from .memory import MemorySwitchesMixin
from .offload import OffloadMixin

logger = logging.getLogger(__name__)

_ACCEPTED_NO_OPS = (
    "low_cpu_mem_usage",
    "force_download",
    "resume_download",
    "proxies",
    "mirror",
    "output_loading_info",
    "device_map",
)


def _check_loading_kwargs(kwargs: dict, custom_pipeline, trust_remote_code) -> None:
    """Refuse remote code; drop the reference's keyword arguments that change nothing here."""
    if custom_pipeline is not None or trust_remote_code:
        raise UnsafeCheckpointError(
            "diffpipe never runs code from a checkpoint: custom_pipeline= and trust_remote_code= are "
            "not supported. Use one of diffpipe's pipeline classes."
        )
    for name in _ACCEPTED_NO_OPS:
        kwargs.pop(name, None)


def _dtype_for(spec, name: str):
    if isinstance(spec, dict):
        return spec.get(name, spec.get("default"))
    return spec


class DiffusionPipeline(ConfigMixin, CallPathMixin, OffloadMixin, MemorySwitchesMixin, CompileMixin):
    """Base of all pipelines. Subclasses declare their components as ``__init__`` parameters."""

    config_name = "model_index.json"
    _record_init = False
    # constructor parameters that are settings, not components (written into model_index.json too)
    _config_keys: tuple[str, ...] = ()
    # components that may be None / absent from model_index.json
    _optional_components: tuple[str, ...] = ()
    # the order models run in, for offloading ("text_encoder->unet->vae")
    model_cpu_offload_seq: str = ""
    # What each conventional slot holds, as class names one of which must be in the object's MRO (so
    # subclasses fit); ``text_encoder_2`` uses the entry of ``text_encoder``. A checkpoint or override
    # that puts another class in a slot (a VAE as the UNet, a scheduler as the tokenizer) is refused.
    # Slots not listed take any allow-listed class.
    _slot_classes: dict[str, tuple[str, ...]] = {
        "unet": ("UNet2DConditionModel", "UNetMotionModel"),
        "vae": ("AutoencoderKL", "AutoencoderTiny", "AsymmetricAutoencoderKL"),
        "scheduler": ("SchedulerMixin",),
        "text_encoder": ("PreTrainedModel",),
        "image_encoder": ("PreTrainedModel",),
        "safety_checker": ("StableDiffusionSafetyChecker",),
        "tokenizer": ("PreTrainedTokenizerBase",),
        "feature_extractor": ("ImageProcessingMixin",),
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # the reference's name for the tensors a step-end callback may ask for
        cls._callback_tensor_inputs = list(getattr(cls, "callback_tensor_inputs", ()))

    # ------------------------------------------------------------------ components
    @classmethod
    def component_names(cls) -> list[str]:
        return [p.name for p in _init_params(cls.__init__) if p.name not in cls._config_keys]

    def register_modules(self, **components) -> None:
        for name, obj in components.items():
            entry = [None, None] if obj is None else list(loading.library_of(obj))
            self.register_to_config(**{name: entry})
            object.__setattr__(self, name, obj)

    def __setattr__(self, name: str, value) -> None:
        # `pipe.scheduler = DDIMScheduler.from_config(...)` keeps model_index.json's entry in step
        if name in self.__dict__ and name in self.config and name in type(self).component_names():
            self.register_to_config(**{name: [None, None] if value is None else list(loading.library_of(value))})
        object.__setattr__(self, name, value)

    @classmethod
    def _slot_mismatch(cls, name: str, klass: type) -> tuple[str, ...] | None:
        """The classes slot ``name`` wants when ``klass`` is none of them; None when it fits."""
        wanted = cls._slot_classes.get(re.sub(r"_\d+$", "", name))
        if wanted is None or any(base.__name__ in wanted for base in klass.__mro__):
            return None
        return wanted

    @property
    def components(self) -> dict:
        return {name: getattr(self, name, None) for name in self.component_names()}

    def _modules_in_order(self) -> list[tuple[str, torch.nn.Module]]:
        mods = [(n, c) for n, c in self.components.items() if isinstance(c, torch.nn.Module)]
        order = [n for n in self.model_cpu_offload_seq.split("->") if n]
        return sorted(mods, key=lambda nc: order.index(nc[0]) if nc[0] in order else len(order))

    @property
    def device(self) -> torch.device:
        for _, module in self._modules_in_order():
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for _, module in self._modules_in_order():
            for p in module.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    def to(self, *args, **kwargs) -> "DiffusionPipeline":
        """Move every model component to a device and/or dtype: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``,
        and the reference's keywords ``pipe.to(torch_device="cuda", torch_dtype=torch.float16)``."""
        kwargs.pop("silence_dtype_warnings", None)
        for ours, theirs in (("device", "torch_device"), ("dtype", "torch_dtype")):
            if theirs in kwargs:
                kwargs[ours] = kwargs.pop(theirs)
        for _, module in self._modules_in_order():
            module.to(*args, **kwargs)
        return self

    def memory_footprint(self) -> dict:
        """Bytes per component and dtype (see :func:`memory_footprint` for several pipelines)."""
        return memory_footprint(self)

    @staticmethod
    def numpy_to_pil(images):
        """``[B, H, W, C]`` (or ``[H, W, C]``) numbers in ``[0, 1]`` -> a list of PIL images."""
        from ..images import numpy_to_pil

        return numpy_to_pil(images)

    # ------------------------------------------------------------------ progress bars
    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable=None, total=None):
        from tqdm.auto import tqdm

        config = dict(getattr(self, "_progress_bar_config", {}))
        return tqdm(iterable, total=total, **config)

    # ------------------------------------------------------------------ loading
    @classmethod
    @gc_paused
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        torch_dtype=None,
        dtype=None,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        allow_missing_keys: bool = False,
        verify: bool = False,
        custom_pipeline: str | None = None,
        trust_remote_code: bool = False,
        **kwargs,
    ):
        """Load a pipeline from a Hub repo id or a local folder in the diffusers layout.

        - ``torch_dtype`` (alias ``dtype``): one dtype for every model, or a dict per component
          with a ``"default"`` (``{"unet": torch.float16, "default": torch.float32}``).
        - ``variant``: weight files of that variant for every component that has them; a component
          without them falls back to its original weights (reported in ``pipeline.loading_report``
          and a warning); no component having them is an error.
        - ``use_safetensors``, ``revision``, ``cache_dir``, ``local_files_only``, ``token``,
          ``allow_missing_keys``, ``verify``: as for models; ``verify`` checks every weight file the
          pipeline uses against the Hub's sha256 and scans every model's tensors for NaN/Inf.
        - any component name as a keyword overrides it (``scheduler=obj``, ``safety_checker=None``);
          pipeline settings such as ``requires_safety_checker`` are accepted too.
        """
        _check_loading_kwargs(kwargs, custom_pipeline, trust_remote_code)
        dtypes = cls._resolve_dtypes(torch_dtype, dtype)
        if variant is not None:
            check_plain_name(variant, "variant")
        source = os.fspath(pretrained_model_name_or_path)
        where = f"pipeline {source}"
        plan: dict = {}

        def select(files, read):
            plan.clear()
            plan.update(
                cls._plan_listing(
                    files, read, kwargs, dtypes, variant=variant, use_safetensors=use_safetensors, where=where
                )
            )
            return plan["files"]

        hashes: dict[str, str] | None = {} if verify else None
        root = hub.fetch(
            source,
            select,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            what=where,
            hashes=hashes,
        )
        components = dict(plan["given"])
        with folder_lock(root, shared=True):
            if verify:
                check_hashes({f: root / f for f in plan["files"]}, hashes, where=where)
            for name, (spec, fell_back) in plan["specs"].items():
                components[name] = loading.load_component(
                    spec,
                    root,
                    variant=None if fell_back else variant,
                    dtype=_dtype_for(dtypes, name),
                    use_safetensors=use_safetensors,
                    where=where,
                    allow_missing_keys=allow_missing_keys,
                    verify=verify,
                    local_files_only=bool(local_files_only),
                )
        pipeline = plan["class"](**components, **plan["settings"])
        pipeline.register_to_config(_name_or_path=pretrained_model_name_or_path)  # as given, as the reference
        object.__setattr__(pipeline, "loading_report", plan["report"])
        object.__setattr__(pipeline, "snapshot_folder", root)  # where the files are on disk
        return pipeline

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """A pipeline from one checkpoint file in the original layout (``.safetensors`` or ``.ckpt``, as
        web UIs and model sites publish them), offline: the model type is told from the tensors and its
        configs are shipped with diffpipe. On ``DiffusionPipeline`` the class is picked from the file.

        Keywords as the reference's: ``torch_dtype``, ``config`` (a diffusers folder or repo id to take
        configs and tokenizers from), ``original_config`` (the training YAML), ``prediction_type``,
        ``image_size``, component overrides (``vae=``, ``scheduler=``, ``tokenizer=``, ...), and
        ``revision`` / ``cache_dir`` / ``local_files_only`` / ``token`` for a Hub file.
        """
        from ..single_file import load_pipeline

        return load_pipeline(cls, pretrained_model_link_or_path, **kwargs)

    def save_single_file(self, path, *, dtype=None, metadata=None):
        """Write this pipeline as one ``.safetensors`` file in the original layout (what web UIs and the
        original training code load), atomically; ``dtype`` converts the weights (``torch.float16``)."""
        from ..single_file.save import save_single_file

        return save_single_file(self, path, dtype=dtype, metadata=metadata)

    @classmethod
    def _plan_listing(cls, files: set, read, overrides: dict, dtypes, *, variant, use_safetensors, where) -> dict:
        """The plan (see :meth:`_plan`) for a repo or folder with these files; ``read(name)`` gives a
        small file's bytes (model_index.json)."""
        if "model_index.json" not in files:
            raise ConfigError(
                f"{where}: no model_index.json; a pipeline in the diffusers layout has one at its top "
                "level (a single model folder has config.json instead: load it with the model's class)"
            )
        index = loading.parse_model_index_bytes(read("model_index.json"), where=where)
        plan = cls._plan(index, files, overrides, variant=variant, use_safetensors=use_safetensors, where=where)
        names = plan["class"].component_names()
        unknown = sorted(k for k in dtypes if k != "default" and k not in names) if isinstance(dtypes, dict) else []
        if unknown:  # a typo would silently leave that component in the default dtype
            raise TypeError(
                f"{where}: torch_dtype names {unknown}, which {plan['class'].__name__} does not have; its "
                f"components are {names} (and 'default' for the rest)"
            )
        return plan

    @classmethod
    def _resolve_dtypes(cls, torch_dtype, dtype):
        """One dtype (or None / "auto"), or ``{component or "default": dtype}``."""
        if isinstance(torch_dtype, dict) or isinstance(dtype, dict):
            if torch_dtype is not None and dtype is not None:
                raise TypeError("pass either torch_dtype= or dtype= (they mean the same), not both")
            return {k: resolve_dtype(v, None, what=f"torch_dtype[{k!r}]") for k, v in (torch_dtype or dtype).items()}
        return resolve_dtype(torch_dtype, dtype, what=f"{cls.__name__}.from_pretrained")

    @classmethod
    def _choose_class(cls, index: dict, where: str) -> type["DiffusionPipeline"]:
        if cls is not DiffusionPipeline:
            return cls  # a task class may load another task's folder
        name = index.get("_class_name")
        if isinstance(name, (list, tuple)):  # ["module_in_the_repo", "Class"]: the reference's custom code
            raise UnsafeCheckpointError(
                f"{where}: model_index.json names the pipeline class {name!r}, custom code shipped in the "
                "checkpoint. diffpipe never runs code from a checkpoint (custom code is not supported); "
                "load the folder with one of diffpipe's pipeline classes explicitly if the layout fits."
            )
        if not isinstance(name, str):
            raise ConfigError(f"{where}: model_index.json has no '_class_name' naming the pipeline class")
        from ..registry import find_class

        found = find_class(name)
        if found is None or not (isinstance(found, type) and issubclass(found, DiffusionPipeline)):
            raise UnsupportedComponentError(
                f"{where}: model_index.json names the pipeline class {name!r}, which diffpipe does not "
                "implement. Load it with one of diffpipe's pipeline classes explicitly if the layout fits."
            )
        return found

    @classmethod
    def _plan(cls, index: dict, files: set, overrides: dict, *, variant, use_safetensors, where) -> dict:
        """Decide the class, each component's source, the settings and the files to fetch."""
        pipeline_cls = cls._choose_class(index, where)
        names = pipeline_cls.component_names()
        unknown = sorted(k for k in overrides if k not in names and k not in pipeline_cls._config_keys)
        if unknown:
            raise TypeError(
                f"{pipeline_cls.__name__}.from_pretrained got unexpected argument(s) {unknown}; components are "
                f"{names}" + (f", settings {list(pipeline_cls._config_keys)}" if pipeline_cls._config_keys else "")
            )
        for key in index:
            if not key.startswith("_"):
                check_plain_name(key, f"component name in {where}/model_index.json")
        report = LoadReport()
        given, specs = {}, {}
        needed = ["model_index.json"]
        with_weights, fell_back_names = [], []
        for name in names:
            entry = index.get(name)
            if name in overrides:
                obj = overrides[name]
                spec = None
                if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None:
                    try:
                        spec = loading.resolve(*entry, component=name, where=where)
                    except UnsupportedComponentError:
                        spec = None  # overriding is how one replaces a component we don't implement
                pipeline_cls._check_override(name, obj, spec)
                given[name] = obj
                report.overridden.append(name)
                continue
            if entry is None or (isinstance(entry, (list, tuple)) and list(entry) == [None, None]):
                if name not in pipeline_cls._optional_components:
                    raise CheckpointNotFoundError(
                        f"{where}: {pipeline_cls.__name__} needs the component {name!r} but model_index.json "
                        f"does not provide it; pass it as {name}=obj"
                    )
                given[name] = None
                continue
            spec, in_folder, choice, fell_back = pipeline_cls._plan_component(
                name, entry, files, variant=variant, use_safetensors=use_safetensors, where=where
            )
            needed += [f"{name}/{f}" for f in loading.non_weight_files(in_folder)]
            if choice is not None:
                needed += [f"{name}/{f}" for f in choice.all_files]
                report.files[name] = [f"{name}/{f}" for f in choice.all_files]
                with_weights.append(name)
                if fell_back:
                    fell_back_names.append(name)
            specs[name] = (spec, fell_back)
        if variant is not None and with_weights and len(fell_back_names) == len(with_weights):
            raise CheckpointNotFoundError(
                f"{where}: no component has weights of the variant {variant!r} "
                f"(checked {', '.join(with_weights)}). Drop variant= to load the original weights."
            )
        for name in fell_back_names:
            logger.warning("%s: component %r has no %r variant; loading its original weights", where, name, variant)
            report.variant_fallbacks.append(name)
        settings = {k: index[k] for k in pipeline_cls._config_keys if k in index}
        settings.update({k: overrides[k] for k in pipeline_cls._config_keys if k in overrides})
        return {
            "class": pipeline_cls,
            "specs": specs,
            "given": given,
            "settings": settings,
            "files": needed,
            "report": report,
        }

    @classmethod
    def _plan_component(cls, name: str, entry, files: set, *, variant, use_safetensors, where):
        """(spec, the component folder's files, the weight choice or None, whether it fell back to the
        original weights) for the model_index.json entry of component ``name``."""
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ConfigError(
                f'{where}: model_index.json entry {name!r} is {entry!r}; expected ["library", "ClassName"]'
            )
        spec = loading.resolve(entry[0], entry[1], component=name, where=where)
        wanted = cls._slot_mismatch(name, spec.cls)
        if wanted is not None:
            raise UnsupportedComponentError(
                f"{where}: model_index.json puts {entry[0]}.{entry[1]} in the slot {name!r} of "
                f"{cls.__name__}, which holds a {' or '.join(wanted)}; the checkpoint is "
                "mislabelled or meant for another pipeline"
            )
        in_folder = loading.files_in(files, name)
        if not in_folder:
            raise CheckpointNotFoundError(
                f"{where}: model_index.json lists component {name!r} ({entry[0]}.{entry[1]}) but the "
                f"checkpoint has no files under {name}/"
            )
        choice, fell_back = loading.component_file_choice(
            spec, in_folder, variant=variant, use_safetensors=use_safetensors, where=where
        )
        return spec, in_folder, choice, fell_back

    @classmethod
    def _check_override(cls, name: str, obj, spec: ComponentSpec | None) -> None:
        if obj is None:  # as in the reference: e.g. unet=None, vae=None to load only the text parts
            return
        expected = _expected_base(spec)
        if expected is not None and not isinstance(obj, expected):
            wanted = spec.class_name if spec is not None else expected.__name__
            raise TypeError(
                f"{cls.__name__}: the override {name}= must be a {wanted} (or another {expected.__name__}), "
                f"got {type(obj).__name__}"
            )
        slot = cls._slot_mismatch(name, type(obj))
        if slot is not None:
            raise TypeError(
                f"{cls.__name__}: the override {name}= must be a {' or '.join(slot)}, got {type(obj).__name__}"
            )

    # ------------------------------------------------------------------ reuse
    @classmethod
    def from_pipe(cls, pipeline: "DiffusionPipeline", **kwargs):
        """A ``cls`` pipeline holding the same component objects as ``pipeline`` (no copies).

        Keyword arguments add or replace components (``motion_adapter=adapter``) and settings;
        ``torch_dtype=`` converts the models of the new pipeline (and so of the shared ones).
        """
        torch_dtype = kwargs.pop("torch_dtype", None)
        names = cls.component_names()
        unknown = sorted(k for k in kwargs if k not in names and k not in cls._config_keys)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipe got unexpected argument(s) {unknown}; components are {names}")
        source = pipeline.components
        components = {}
        for name in names:
            if name in kwargs:
                cls._check_override(name, kwargs[name], None)
                components[name] = kwargs[name]
            elif source.get(name) is not None:
                components[name] = source[name]
            elif name in cls._optional_components:
                components[name] = None
            else:
                raise TypeError(
                    f"{cls.__name__}.from_pipe: {type(pipeline).__name__} has no component {name!r}; pass it as "
                    f"{name}=obj"
                )
        settings = {k: pipeline.config[k] for k in cls._config_keys if k in pipeline.config}
        settings.update({k: kwargs[k] for k in cls._config_keys if k in kwargs})
        new = cls(**components, **settings)
        if "_name_or_path" in pipeline.config:
            new.register_to_config(_name_or_path=pipeline.config["_name_or_path"])
        if torch_dtype is not None:
            new.to(resolve_dtype(torch_dtype, None, what=f"{cls.__name__}.from_pipe"))
        if hasattr(pipeline, "_progress_bar_config"):
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        new._inherit_offload(pipeline)
        return new

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
        **unused,
    ) -> None:
        """Write the pipeline (``model_index.json`` and one folder per component) atomically.

        With ``variant``, weights go to ``*.<variant>.safetensors`` beside any other variant already
        in the folder, so one folder can hold the original and an fp16 variant.
        """
        if variant is not None:
            check_plain_name(variant, "variant")
        with StagedFolder(save_directory) as stage:
            for name, obj in self.components.items():
                if obj is not None:
                    loading.save_component(
                        obj,
                        stage,
                        name,
                        variant=variant,
                        safe_serialization=safe_serialization,
                        max_shard_size=max_shard_size,
                    )
            stage.path(self.config_name).write_text(self.to_json_string(), encoding="utf-8")


def _expected_base(spec: ComponentSpec | None):
    """The base class an override for ``spec`` must be an instance of (None: anything goes)."""
    if spec is None:
        return None
    if spec.kind == "model":
        from ..models.modeling import ModelMixin

        return ModelMixin
    if spec.kind == "config":
        for base in spec.cls.__mro__[::-1]:
            if base.__name__ == "SchedulerMixin":
                return base
        return spec.cls
    import transformers

    if spec.kind == "transformers-model":
        return transformers.PreTrainedModel
    for base in (transformers.PreTrainedTokenizerBase, transformers.ImageProcessingMixin):
        if issubclass(spec.cls, base):
            return base
    return None


def memory_footprint(*pipelines: DiffusionPipeline) -> dict:
    """Bytes of parameters and buffers per component and dtype, each tensor counted once.

    With several pipelines (say one made by ``from_pipe``), shared components and tensors are
    counted once, so the total is what the process actually holds for them.
    """
    seen: set = set()
    components: dict[str, dict] = {}
    by_dtype: dict[str, int] = {}
    for pipe in pipelines:
        for name, component in pipe.components.items():
            if not isinstance(component, torch.nn.Module):
                continue
            entry = components.setdefault(name, {"bytes": 0, "parameters": 0, "dtypes": {}})
            for t in list(component.parameters()) + list(component.buffers()):
                key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
                if key in seen or t.is_meta:
                    continue
                seen.add(key)
                n = t.numel() * t.element_size()
                dtype = str(t.dtype).removeprefix("torch.")
                entry["bytes"] += n
                entry["parameters"] += t.numel()
                entry["dtypes"][dtype] = entry["dtypes"].get(dtype, 0) + n
                by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    components = {k: v for k, v in components.items() if v["bytes"]}
    return {"components": components, "by_dtype": by_dtype, "total": sum(by_dtype.values())}
