"""``from_single_file``: pipelines and lone models built from one original-layout checkpoint file.

The file's header is read first (detection needs no weights); then each part's tensors are renamed
into our layout as views of the file's memory map (cast while reading for ``torch_dtype``) and
assigned to modules built on the meta device, so loading peaks near one copy of the weights.
Everything is checked before a pipeline is returned: a file that does not fit leaves nothing behind.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, ConfigError, StateDictMismatchError, summarize
from ..io.load_model import assign_weights, resolve_dtype
from ..nn.construction import empty_modules
from ..registry import find_class
from . import flux_keys, keymap
from .detect import Detection, detect
from .source import IGNORED_TOP_LEVEL, Configs, apply_overrides, from_folder_or_repo, locate, open_single_file, part
from .source import shipped

logger = logging.getLogger(__name__)
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token")
# the reference's keyword arguments that change nothing here (memory-mapped, cast-while-reading loading
# is what low_cpu_mem_usage / disable_mmap choose between there)
NO_OPS = ("low_cpu_mem_usage", "force_download", "resume_download", "proxies", "disable_mmap", "use_safetensors")
CONFIG_KWARGS = ("prediction_type", "image_size", "original_config")
MODEL_PARTS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "ControlNetModel": "controlnet"}


def load_pipeline(cls, pretrained_model_link_or_path, **kwargs):
    """The pipeline in one file (see :meth:`DiffusionPipeline.from_single_file`)."""
    for name in NO_OPS:
        kwargs.pop(name, None)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    dtype = resolve_dtype(kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None), what="from_single_file")
    config = kwargs.pop("config", None)
    overrides_config = {k: kwargs.pop(k) for k in CONFIG_KWARGS if k in kwargs}
    if "original_config_file" in kwargs:  # the reference's deprecated name
        warnings.warn(
            "`original_config_file` is deprecated and will be removed in version 1.0.0. Use `original_config`.",
            FutureWarning,
            stacklevel=3,
        )
        overrides_config.setdefault("original_config", kwargs.pop("original_config_file"))
    path = locate(pretrained_model_link_or_path, **hub)
    where = f"{cls.__name__}.from_single_file({path})"
    if path.name.lower().endswith(".gguf"):  # a quantized transformer (Flux), the rest from config=
        return _flux_pipeline(cls, path, config, dtype, hub, kwargs, where)
    source = open_single_file(path)
    if flux_keys.is_bfl(source.shapes):
        return _flux_pipeline(cls, path, config, dtype, hub, kwargs, where)
    found = detect(source.shapes, where)
    if found.kind in ("vae", "controlnet"):
        model, argument = ("AutoencoderKL", "vae") if found.kind == "vae" else ("ControlNetModel", "controlnet")
        what = "VAE" if found.kind == "vae" else "ControlNet"
        raise ConfigError(
            f"{where}: the file holds only a {what} ({len(source.shapes)} tensors); load it with "
            f"{model}.from_single_file(path) and pass it as {argument}= to a pipeline"
        )
    for note in found.notes:
        logger.info("%s: %s", where, note)
    configs = _configs(found, config, hub, where)
    apply_overrides(configs, **overrides_config)
    target = _pipeline_class(cls, configs, found, where)
    accepted = inspect.signature(target.__init__).parameters
    unknown = sorted(set(kwargs) - set(accepted) - set(configs.components) - set(configs.tokenizers))
    if unknown:  # before any weight is read
        raise TypeError(f"{where}: unexpected argument(s) {unknown}; components are {sorted(accepted)[1:]}")
    tensors = source.tensors(cast_to=None if dtype == "auto" else (dtype or torch.get_default_dtype()))
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in configs.components or k.startswith("tokenizer")}
    components, used = {}, set()
    for name, component_config in configs.components.items():
        if name in given:
            components[name] = given[name]
            continue
        components[name], keys = _component(name, component_config, tensors, found, where, dtype, path)
        used |= keys
    _report_unused(tensors, used, found, where)
    for name, spec in configs.tokenizers.items():
        components[name] = given[name] if name in given else _tokenizer(name, spec, configs.origin, where, hub)
    settings = {k: v for k, v in {**configs.settings, **kwargs}.items() if k in accepted}
    if "requires_safety_checker" in accepted and "safety_checker" not in components:
        settings.setdefault("requires_safety_checker", False)  # a single file has no safety checker
    parts = {k: v for k, v in components.items() if k in accepted}
    for name, parameter in accepted.items():  # a part the type has none of (the refiner's first encoder)
        if name != "self" and parameter.default is inspect.Parameter.empty and name not in parts:
            parts[name] = None
    pipe = target(**parts, **settings)
    pipe.register_to_config(_name_or_path=pretrained_model_link_or_path)
    object.__setattr__(pipe, "single_file_detection", found)
    return pipe


def load_model(cls, pretrained_model_link_or_path, **kwargs):
    """A lone UNet2DConditionModel or AutoencoderKL from a single file: a whole-pipeline file (its
    part is taken), a UNet-only file, or a standalone VAE file such as the ft-MSE VAE."""
    for name in NO_OPS:
        kwargs.pop(name, None)
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    dtype = resolve_dtype(kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None), what="from_single_file")
    config, subfolder = kwargs.pop("config", None), kwargs.pop("subfolder", None)
    overrides_config = {k: kwargs.pop(k) for k in CONFIG_KWARGS if k in kwargs}
    quantization = kwargs.pop("quantization_config", None)
    name = MODEL_PARTS.get(cls.__name__)
    path = locate(pretrained_model_link_or_path, **hub)
    where = f"{cls.__name__}.from_single_file({path})"
    if quantization is not None or path.name.lower().endswith(".gguf"):  # GGUF: see diffpipe.quantization
        from ..quantization.gguf_linear import load_single_file_gguf

        model = load_single_file_gguf(cls, path, quantization, config, subfolder, dtype, hub, kwargs, where)
        model.register_to_config(_name_or_path=pretrained_model_link_or_path)
        return model
    if cls.__name__ == "FluxTransformer2DModel":
        model = _load_flux(cls, path, config, subfolder, dtype, hub, where, kwargs)
        model.register_to_config(_name_or_path=pretrained_model_link_or_path)
        return model
    if name is None:
        raise ConfigError(f"{where}: single files load into UNet2DConditionModel, AutoencoderKL and pipelines")
    source = open_single_file(path)
    shapes = source.shapes
    if name == "unet" and not any(k.startswith(keymap.UNET_PREFIX) for k in shapes):
        shapes = {keymap.UNET_PREFIX + k: v for k, v in shapes.items()}  # a UNet-only file without the prefix
    found = detect(shapes, where)
    if name in ("unet", "controlnet") and name not in found.parts:
        raise ConfigError(f"{where}: the file holds no {name} (found {found.kind}: {', '.join(found.parts)})")
    configs = _configs(found, config, hub, where, subfolder=subfolder, only=name, shapes=shapes)
    apply_overrides(configs, **overrides_config)
    component_config = {**configs.components[name], **kwargs}
    tensors = source.tensors(cast_to=None if dtype == "auto" else (dtype or torch.get_default_dtype()))
    if shapes is not source.shapes:
        tensors = {keymap.UNET_PREFIX + k: v for k, v in tensors.items()}
    model, used = _component(name, component_config, tensors, found, where, dtype, path)
    rest = [k for k in tensors if k not in used and not IGNORED_TOP_LEVEL.match(k)]
    if found.family == "vae" and rest:
        logger.warning("%s: ignoring %d tensor(s) that are not the VAE's: %s", where, len(rest), summarize(rest))
    model.register_to_config(_name_or_path=pretrained_model_link_or_path)
    return model


# ------------------------------------------------------------------------------------------ parts
def _flux_pipeline(cls, path, config, dtype, hub, kwargs, where):
    """A Flux file holds the transformer only: the other components (two text encoders, the VAE, the
    scheduler) come from ``config=``, a Flux repo id or folder."""
    if cls.__name__ != "DiffusionPipeline" and not cls.__name__.startswith("Flux"):
        raise ConfigError(
            f"{where} looks like a Flux transformer, not a checkpoint for {cls.__name__}: load it with "
            "FluxPipeline.from_single_file(path, config='black-forest-labs/FLUX.1-dev') or "
            "FluxTransformer2DModel.from_single_file(path)"
        )
    if config is None:
        raise ConfigError(
            f"{where}: a Flux single file holds only the transformer; pass config= a Flux repo id or folder for "
            "the text encoders, VAE and scheduler (e.g. config='black-forest-labs/FLUX.1-dev')"
        )
    quantization = {k: kwargs.pop(k) for k in ("quantization_config",) if k in kwargs}
    transformer = find_class("FluxTransformer2DModel").from_single_file(
        path, config=config, subfolder="transformer", torch_dtype=dtype, **quantization, **hub
    )
    target = find_class("FluxPipeline") if cls.__name__ == "DiffusionPipeline" else cls
    return target.from_pretrained(config, transformer=transformer, torch_dtype=dtype, **hub, **kwargs)


def _load_flux(cls, path, config, subfolder, dtype, hub, where, overrides):
    """A Flux transformer file: the BFL layout (also under ComfyUI's ``model.diffusion_model.``) or the
    diffusers one; its config from ``config=`` (``subfolder="transformer"`` for a pipeline) or read from
    the shapes."""
    from . import flux_keys

    source = open_single_file(path)
    tensors = source.tensors(cast_to=None if dtype == "auto" else (dtype or torch.get_default_dtype()))
    original = flux_keys.is_bfl(source.shapes)
    if config is not None:
        model_config = dict(cls.load_config(config, subfolder=subfolder, **hub))
    elif original:
        model_config = flux_keys.config_from_shapes(source.shapes)
        if "axes_dims_rope" not in model_config and "axes_dims_rope" not in overrides:
            raise ConfigError(
                f"{where}: the rope axes of a transformer with {model_config['attention_head_dim']}-wide heads "
                "cannot be read from the file; pass config= a folder or repo id with its config"
            )
    else:
        raise ConfigError(
            f"{where}: a diffusers-layout Flux file holds no config; pass config= (subfolder='transformer')"
        )
    if original:
        tensors, unmapped = flux_keys.convert(tensors)
        if unmapped:
            logger.warning("%s: %d tensor(s) map to nothing: %s", where, len(unmapped), summarize(unmapped))
    else:
        tensors = {k[len("transformer.") :] if k.startswith("transformer.") else k: v for k, v in tensors.items()}
    origin = dict.fromkeys(tensors, str(path))
    return cls._from_state(
        {**model_config, **overrides}, tensors, origin=origin, where=where, dtype=dtype, allow_missing=False
    )


def _configs(found: Detection, config, hub, where, subfolder=None, only=None, shapes=None) -> Configs:
    if config is None:
        kind = found.kind
        if found.family == "vae" or (only == "vae" and not found.family.startswith("sdxl")):
            kind = "sd1"  # the SD VAE (scaling factor 0.18215); pass config= for another
        if kind == "controlnet":
            return _controlnet_config(found, shapes)
        return shipped(kind)
    try:
        if only is not None and subfolder is not None:  # config= a model folder or repo with subfolder=
            return _model_config(config, subfolder, only, hub)
        if only is not None and (Path(os.fspath(config)) / "config.json").is_file():
            return _model_config(config, None, only, hub)
        return from_folder_or_repo(config, **hub)
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"{where}: {e}") from e


def _controlnet_config(found: Detection, shapes) -> Configs:
    """An original-layout ControlNet's config: its family's UNet (the shipped one) with the hint
    block's widths read from the file (their convolutions' output channels)."""
    from .keymap import CONTROLNET_PREFIX

    unet = dict(shipped(found.family).components["unet"])
    cls = find_class("ControlNetModel")
    config = {k: v for k, v in unet.items() if k in cls.init_keys()}
    hint = sorted(
        (int(k.split(".")[2]), v[0])
        for k, v in shapes.items()
        if k.startswith(CONTROLNET_PREFIX + "input_hint_block.") and k.endswith(".weight")
    )
    widths = [width for _, width in hint[:-1]]  # conv_out's is the UNet's first width
    config["conditioning_embedding_out_channels"] = widths[0::2]
    config["_class_name"] = "ControlNetModel"
    return Configs("", {}, {"controlnet": config}, {}, f"the shipped {found.family} UNet config")


def _model_config(config, subfolder, name, hub) -> Configs:
    cls = find_class({v: k for k, v in MODEL_PARTS.items()}[name])
    data = dict(cls.load_config(config, subfolder=subfolder, **hub))
    data["_class_name"] = cls.__name__
    return Configs("", {}, {name: data}, {}, f"config={config}")


def _pipeline_class(cls, configs: Configs, found: Detection, where: str):
    if cls.__name__ != "DiffusionPipeline":
        return cls
    name = configs.pipeline or found.pipeline_class
    target = find_class(name)
    if target is None:
        raise ConfigError(f"{where}: the configs name the pipeline class {name!r}, which diffpipe does not implement")
    return target


def _component(name, config: dict, tensors, found: Detection, where, dtype, path):
    """(the component ``name`` built from its tensors in the file, the file keys it used)."""
    config = dict(config)
    class_name = config.pop("_class_name")
    library = config.pop("_library", None)
    label = f"{where}: {name} ({class_name})"
    cls = find_class(class_name) if library is None else None
    if library is None and cls is None:
        raise ConfigError(f"{label}: diffpipe has no class {class_name!r}")
    if cls is not None and not hasattr(cls, "_from_state"):  # a scheduler: config only
        return cls.from_config({**config, "_class_name": class_name}), set()
    if name == "controlnet":
        prefix = keymap.CONTROLNET_PREFIX
        state, unmapped = keymap.controlnet_to_ours(part(tensors, prefix), config)
    elif name == "unet":
        prefix = keymap.UNET_PREFIX
        state, unmapped = keymap.unet_to_ours(part(tensors, prefix), config)
    elif name == "vae":
        prefix = "" if found.family == "vae" else keymap.VAE_PREFIX
        state, unmapped = keymap.vae_to_ours(part(tensors, prefix), config)
        if found.family == "vae":
            unmapped = [k for k in unmapped if not IGNORED_TOP_LEVEL.match(k)]
    elif name in keymap.TEXT_PREFIXES.get(found.family, {}):
        prefix = keymap.TEXT_PREFIXES[found.family][name]
        state, unmapped = _text_state(part(tensors, prefix), config)
    else:
        raise ConfigError(f"{label}: this file has no {name} (its layout is {found.family}); pass {name}= yourself")
    if not state:
        raise StateDictMismatchError(
            f"{label}: the file has no tensors under {prefix!r}; pass {name}= (for example {name}="
            f"{class_name}.from_pretrained(...)) or use a complete checkpoint"
        )
    if unmapped:
        logger.warning(
            "%s: %d tensor(s) under %r map to nothing: %s", label, len(unmapped), prefix, summarize(unmapped)
        )
    used = {prefix + k for k in part(tensors, prefix)}
    origin = dict.fromkeys(state, str(path))
    if library == "transformers":
        return _transformers_model(class_name, config, state, origin, label, dtype), used
    try:
        return cls._from_state(config, state, origin=origin, where=label, dtype=dtype, allow_missing=False), used
    except StateDictMismatchError as e:
        raise StateDictMismatchError(
            f"{e} (the {name} config came from {origin_of_configs(found)}; a model of another size or layout "
            "needs config= a diffusers folder or repo id whose configs match the file)"
        ) from None


def origin_of_configs(found: Detection) -> str:
    return f"the {found.kind} configs shipped with diffpipe, unless config= was given"


def _text_state(state, config: dict):
    if any(k.startswith("transformer.resblocks.") for k in state):
        return keymap.openclip_to_ours(state, config["num_hidden_layers"], "projection_dim" in config)
    return keymap.clip_to_ours(state)


def _transformers_model(class_name: str, config: dict, state, origin, label: str, dtype):
    import transformers

    allowed = {"CLIPTextModel", "CLIPTextModelWithProjection"}
    if class_name not in allowed:
        raise ConfigError(f"{label}: single files hold CLIP text encoders, not {class_name}")
    model_cls = getattr(transformers, class_name)
    settings = {
        k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")
    }
    text_config = transformers.CLIPTextConfig(**settings)
    if class_name == "CLIPTextModel":
        state = {k: v for k, v in state.items() if not k.startswith("text_projection")}
    with empty_modules():
        model = model_cls(text_config)
    for module_name, module in model.named_modules():  # computed buffers (position ids) get real values
        for buffer_name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta and buffer_name == "position_ids":
                module.register_buffer(
                    buffer_name, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False
                )
    state = keymap.fit_text_model_keys(state, model.state_dict().keys())
    origin = dict.fromkeys(state, next(iter(origin.values()), ""))
    assign_weights(model, state, source=origin, where=label, dtype=dtype)
    return model.eval()


def _report_unused(tensors, used, found: Detection, where) -> None:
    rest = [k for k in tensors if k not in used and not IGNORED_TOP_LEVEL.match(k)]
    rest = [k for k in rest if not k.startswith(("cond_stage_model.", "conditioner.")) or not _text_unused(k)]
    if rest:
        logger.warning("%s: ignoring %d tensor(s) that belong to no component: %s", where, len(rest), summarize(rest))


def _text_unused(key: str) -> bool:
    return key.endswith(("logit_scale", "attn_mask", "position_ids"))


def _tokenizer(name: str, spec: dict, origin: str, where: str, hub: dict):
    """A tokenizer from a config folder, else the local Hub cache (or a download when the network
    is allowed); else the error that says exactly what to pass."""
    import transformers

    from ..hub import cached_snapshot, offline_mode

    cls = transformers.CLIPTokenizer
    if "folder" in spec:
        return cls.from_pretrained(spec["folder"], local_files_only=True)
    repo, subfolder = spec["repo"], spec.get("subfolder", name)
    snapshot = cached_snapshot(repo, None, hub.get("cache_dir"))
    if snapshot is not None and (snapshot / subfolder).is_dir():
        return cls.from_pretrained(snapshot / subfolder, local_files_only=True)
    if not (offline_mode() or hub.get("local_files_only")):
        try:
            return cls.from_pretrained(repo, subfolder=subfolder, cache_dir=hub.get("cache_dir"))
        except Exception as e:  # no network, no such repo: the error below says what to do
            logger.debug("%s: %s could not be downloaded: %s", where, name, e)
    raise CheckpointNotFoundError(
        f"{where}: a single file has no {name}, and {repo} ({subfolder}/) is not in the local Hub cache "
        f"({origin} names it). Pass config='{repo}' with network access once (only small config and tokenizer "
        f"files are fetched), or config= a local diffusers folder of the same model type, or {name}="
        f"CLIPTokenizer.from_pretrained(...)."
    )
