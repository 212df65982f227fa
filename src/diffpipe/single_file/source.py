"""Reading a single checkpoint file, and the configs its parts are built from.

A file is opened once: its header (names, shapes, dtypes, ``__metadata__``) answers detection and
``inspect`` without reading a weight; the tensors are then memory-mapped views, cast while reading
when a ``torch_dtype`` is asked for, so that loading peaks near one copy of the weights. Pickles
(``.ckpt``) are read only with ``torch.load(weights_only=True)``.

Configs come from ``config=`` (a local diffusers folder or a Hub repo id of the same model type),
else from the JSON files shipped in ``single_file/configs/`` (written from the published configs), so
that nothing needs the network.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError, ConfigError
from ..io.state_dict import load_pickle, load_safetensors, read_safetensors_header

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_URL = re.compile(
    r"^https?://(?:www\.)?huggingface\.co/(?P<repo>[^/]+/[^/]+)/(?:blob|resolve)/(?P<rev>[^/]+)/(?P<file>.+)$"
)
# LDM training-time buffers and EMA copies a whole-pipeline file may carry: not part of any component
IGNORED_TOP_LEVEL = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_alphas_cumprod|posterior_.*|logvar|model_ema\..*|"
    r"loss\..*|lvlb_weights|scale_factor|denoiser\..*|model\.model_ema\..*)$"
)


@dataclass
class SingleFile:
    """One checkpoint file: where it is, its tensors' names -> shapes and dtypes, its metadata."""

    path: Path
    shapes: dict[str, tuple]
    dtypes: Counter
    metadata: dict[str, str] = field(default_factory=dict)
    _pickled: dict | None = None

    def tensors(self, cast_to: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors (views of a memory map; floating ones cast to ``cast_to`` as they are read)."""
        if self._pickled is not None:
            state = self._pickled
            if cast_to is not None:
                state = {k: v.to(cast_to) if v.is_floating_point() else v for k, v in state.items()}
            return state
        return load_safetensors(self.path, cast_to=cast_to)

    @property
    def is_pickle(self) -> bool:
        return self._pickled is not None


def locate(path_or_url, *, revision=None, cache_dir=None, local_files_only=None, token=None) -> Path:
    """The local path of ``path_or_url``: a file here, a Hub file URL, or ``owner/repo/file`` (downloaded
    once into the Hub cache; with ``HF_HUB_OFFLINE=1`` only the cache is read)."""
    text = os.fspath(path_or_url)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise CheckpointNotFoundError(
            f"{text} is a folder: from_single_file reads one checkpoint file (.safetensors or .ckpt); for a "
            "diffusers folder use from_pretrained"
        )
    match = HUB_URL.match(text)
    parts = text.split("/")
    if match:
        repo, filename, revision = match["repo"], match["file"], revision or match["rev"]
    elif len(parts) >= 3 and not text.startswith(("/", ".")) and text.endswith((SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)):
        repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    else:
        raise CheckpointNotFoundError(
            f"{text}: no such file. from_single_file takes a local .safetensors / .ckpt file, a Hub file URL "
            "(https://huggingface.co/owner/repo/blob/main/file.safetensors) or 'owner/repo/file.safetensors'"
        )
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(
            repo,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            token=token,
        )
    except Exception as e:  # offline and not cached, a missing repo or file: say which
        raise CheckpointNotFoundError(f"{text}: could not get {filename} from the Hub repo {repo}: {e}") from e
    return Path(local)


def open_single_file(path: Path) -> SingleFile:
    """Read ``path``'s header (safetensors) or its tensors (a pickle, through ``weights_only=True``)."""
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIX):
        header, metadata, _ = read_safetensors_header(path)
        shapes = {k: tuple(v[1]) for k, v in header.items()}
        return SingleFile(path, shapes, Counter(str(v[0]).replace("torch.", "") for v in header.values()), metadata)
    if name.endswith(PICKLE_SUFFIXES):
        state = load_pickle(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        return SingleFile(path, shapes, Counter(str(v.dtype).replace("torch.", "") for v in state.values()), {}, state)
    raise CheckpointNotFoundError(
        f"{path}: not a checkpoint file diffpipe reads (expected {SAFETENSORS_SUFFIX} or one of {PICKLE_SUFFIXES}); "
        "GGUF and other formats are not single files of this kind"
    )


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with it removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------ configs
@dataclass
class Configs:
    """What a pipeline is built from besides the weights: its class, settings, each component's
    config (``_class_name`` inside), and where each tokenizer comes from."""

    pipeline: str
    settings: dict
    components: dict[str, dict]
    tokenizers: dict[str, dict]  # name -> {"folder": path} or {"repo": id, "subfolder": name}
    origin: str  # where the configs came from (for messages)


def shipped(kind: str) -> Configs:
    """The configs shipped for a detected type (see ``single_file/configs/``)."""
    try:
        text = resources.files(__package__).joinpath("configs", f"{kind}.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no shipped configs for the model type {kind!r}; pass config= a folder or repo id") from None
    data = json.loads(text)
    return Configs(
        data["pipeline"], dict(data["settings"]), data["components"], data["tokenizers"], f"diffpipe's {kind} configs"
    )


def from_folder_or_repo(config, *, revision=None, cache_dir=None, local_files_only=None, token=None) -> Configs:
    """The configs of a diffusers folder or Hub repo (``config=``): model_index.json, each component's
    config file, and its tokenizers (no weights are read or fetched)."""
    from .. import hub

    def select(files, read):
        wanted = [f for f in files if f == "model_index.json" or f.endswith(("config.json", ".txt"))]
        wanted += [f for f in files if f.split("/")[0].startswith("tokenizer") and f.endswith((".json", ".model"))]
        if "model_index.json" not in files:
            raise CheckpointNotFoundError(f"config={config}: no model_index.json; expected a diffusers pipeline folder")
        return sorted(set(wanted))

    root = hub.fetch(
        config,
        select,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        what=f"config={config}",
    )
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    components, tokenizers, settings = {}, {}, {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            settings[name] = value
            continue
        library, class_name = value
        if class_name is None or not (name.startswith(("unet", "vae", "text_encoder", "scheduler", "tokenizer"))):
            continue  # what a single file cannot hold (a safety checker, an image encoder) is not built
        if name.startswith("tokenizer"):
            tokenizers[name] = {"folder": str(root / name)}
            continue
        files = [root / name / "config.json", root / name / "scheduler_config.json"]
        found = next((f for f in files if f.is_file()), None)
        if found is None:
            continue  # a component without a config here (a safety checker, a feature extractor)
        data = json.loads(found.read_text(encoding="utf-8"))
        data["_class_name"] = class_name
        if library == "transformers":
            data["_library"] = "transformers"
        components[name] = data
    return Configs(index.get("_class_name", ""), settings, components, tokenizers, f"config={config}")


def apply_overrides(configs: Configs, *, prediction_type=None, image_size=None, original_config=None) -> None:
    """The reference's keyword arguments that change configs: ``prediction_type`` (the scheduler's),
    ``image_size`` (the UNet's sample size, in pixels) and an ``original_config`` YAML's facts."""
    if original_config is not None:
        facts = _original_config_facts(original_config)
        prediction_type = prediction_type or facts.get("prediction_type")
        if "scaling_factor" in facts and "vae" in configs.components:
            configs.components["vae"]["scaling_factor"] = facts["scaling_factor"]
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        configs.components["scheduler"]["prediction_type"] = prediction_type
    if image_size is not None and "unet" in configs.components:
        factor = 2 ** (len(configs.components.get("vae", {}).get("block_out_channels", [0] * 4)) - 1)
        configs.components["unet"]["sample_size"] = int(image_size) // factor


def _original_config_facts(original_config) -> dict:
    """What diffpipe takes from an original training YAML (a path, YAML text or a dict):
    ``parameterization: v`` and the VAE ``scale_factor``."""
    data = original_config
    if not isinstance(data, dict):
        import yaml  # transformers' own dependency

        text = Path(data).read_text(encoding="utf-8") if Path(str(data)).is_file() else str(data)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"original_config: not a YAML config: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"original_config: expected a YAML mapping (the training config), got {type(data).__name__}")
    params = (data.get("model") or {}).get("params") or {}
    facts = {}
    if params.get("parameterization") == "v":
        facts["prediction_type"] = "v_prediction"
    if isinstance(params.get("scale_factor"), (int, float)):
        facts["scaling_factor"] = float(params["scale_factor"])
    return facts
