"""Model base class: config + weights, built on the meta device and assigned from mmap'd files."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .. import hub
from ..config import ConfigMixin, config_attribute, read_json_file
from ..errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, UnsafeCheckpointError
from ..io.atomic import StagedFolder, folder_lock
from ..nn.construction import empty_modules
from ..runtime.collector import gc_paused
from ..runtime.cpu_kernels import float32_kernels_for
from ..io.files import (
    PICKLE,
    SAFETENSORS,
    choose_weights,
    check_plain_name,
    index_file_name,
    shard_file_name,
    single_file_name,
)
from ..io.load_model import assign_weights, check_finite, check_hashes, read_weights, resolve_dtype
from ..io.state_dict import parse_size, plain_tensors, save_pickle, save_safetensors, split_shards

logger = logging.getLogger(__name__)

# Arguments the reference accepts that mean nothing here (we always load without a second copy).
_ACCEPTED_NO_OPS = ("low_cpu_mem_usage", "force_download", "resume_download", "proxies", "mirror")


class _ModelFiles:
    """Which files a model's ``from_pretrained`` needs (its config and one set of weights in
    ``subfolder``), and reading them once they are local."""

    def __init__(self, cls, subfolder: str | None, *, variant, use_safetensors, where: str):
        self.cls, self.variant, self.use_safetensors, self.where = cls, variant, use_safetensors, where
        self.config_rel = hub.join_relative(subfolder, cls.config_name)
        self.prefix = self.config_rel[: -len(cls.config_name)]
        self.prefixes = {SAFETENSORS: cls.weights_prefix, PICKLE: cls.weights_prefix}

    def _choose(self, files: set[str]):
        return choose_weights(
            files, prefixes=self.prefixes, variant=self.variant, use_safetensors=self.use_safetensors, where=self.where
        )

    def select(self, files, read) -> list[str]:
        """The repo files to fetch (``hub.fetch``'s selector)."""
        if self.config_rel not in files:
            raise ConfigError(
                f"{self.where}: no {self.cls.config_name}; expected the file {self.config_rel}. Check the path or "
                "repo id and the subfolder."
            )
        prefix = self.prefix
        own = {f[len(prefix) :] for f in files if f.startswith(prefix) and "/" not in f[len(prefix) :]}
        return [self.config_rel, *(prefix + f for f in self._choose(own).all_files)]

    def read(self, root: Path, *, hashes, cast_to):
        """(config, tensors, their files, folder, weight choice), read under the folders' shared locks."""
        folder = root / self.prefix if self.prefix else root
        where = self.where
        # A save into the root (a whole pipeline) or into the folder itself holds that folder's lock
        # while it moves files into place: hold both, so the config and weights come from one save.
        with contextlib.ExitStack() as locks:
            for locked in dict.fromkeys((root, folder)):
                locks.enter_context(folder_lock(locked, shared=True))
            choice = self._choose({p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set())
            config = read_json_file(root / self.config_rel, what=f"{where} config")
            self.cls._check_config_class(config, root / self.config_rel, where)
            if hashes is not None:
                check_hashes({self.prefix + f: folder / f for f in choice.all_files}, hashes, where=where)
            try:
                state, origin = read_weights(folder, choice, cast_to=cast_to)
            except (CorruptCheckpointError, UnsafeCheckpointError, CheckpointNotFoundError) as e:
                raise type(e)(f"{where}: {e}") from e  # name the model; the file's own error is the cause
        return config, state, origin, folder, choice


class ModelMixin(nn.Module, ConfigMixin):
    """Base of diffpipe's models: ``from_pretrained`` / ``save_pretrained`` in the diffusers format."""

    config_name = "config.json"
    weights_prefix = "diffusion_pytorch_model"

    def __getattr__(self, name: str):
        try:
            return nn.Module.__getattr__(self, name)  # parameters, buffers, submodules
        except AttributeError:
            return config_attribute(self, name)

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def __call__(self, *args, **kwargs):
        # bf16/fp16 weights on a CPU without instructions for them: heavy kernels in fp32
        with float32_kernels_for(self):
            return super().__call__(*args, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def compile_repeated_blocks(self, *args, **kwargs) -> None:
        """``torch.compile`` each of the model's repeated blocks (``_repeated_blocks``) in place: far less
        to trace and compile than the whole model, for about the same speed."""
        from ..runtime.compile import compile_repeated_blocks

        compile_repeated_blocks(self, *args, **kwargs)

    # ------------------------------------------------------------------ loading
    @classmethod
    @gc_paused
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        variant: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
        use_safetensors: bool | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        allow_missing_keys: bool = False,
        verify: bool = False,
        **kwargs,
    ):
        """Load a model from a folder or Hub repo in the diffusers layout.

        - ``subfolder``: the component folder inside the repo (``"unet"``).
        - ``variant``: load ``diffusion_pytorch_model.<variant>.safetensors`` (and its shards).
        - ``torch_dtype`` (alias ``dtype``): the dtype floating weights are converted to; the default
          is torch's default dtype (fp32), ``"auto"`` keeps the checkpoint's dtype.
        - ``use_safetensors``: ``True`` only safetensors, ``False`` only ``.bin``, ``None`` prefer
          safetensors. ``.bin`` files are read with ``weights_only=True``.
        - ``allow_missing_keys``: load even when the checkpoint lacks some parameters (they are
          randomly initialised and listed in a warning); by default that is an error.
        - ``verify``: check each weight file's sha256 against the Hub's metadata (when loaded from
          the Hub online) and refuse weights holding NaN or Inf.
        - other keyword arguments override config values (``in_channels=9``).
        """
        for name in _ACCEPTED_NO_OPS:
            kwargs.pop(name, None)
        target_dtype = resolve_dtype(torch_dtype, dtype, what=f"{cls.__name__}.from_pretrained")
        if variant is not None:  # before anything is read or fetched
            check_plain_name(variant, "variant")
        source = os.fspath(pretrained_model_name_or_path)
        where = f"{cls.__name__} from {source}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        files = _ModelFiles(cls, subfolder, variant=variant, use_safetensors=use_safetensors, where=where)
        hashes: dict[str, str] | None = {} if verify else None
        root = hub.fetch(
            source,
            files.select,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            what=where,
            hashes=hashes,
        )
        # cast while reading unless the NaN scan must see the file's own values first
        cast_to = None if verify or target_dtype == "auto" else (target_dtype or torch.get_default_dtype())
        config, state, origin, folder, choice = files.read(root, hashes=hashes, cast_to=cast_to)
        if verify:
            check_finite(state, origin, where=where)
        model = cls._from_state(
            config,
            state,
            origin=origin,
            where=where,
            dtype=target_dtype,
            allow_missing=allow_missing_keys,
            overrides=kwargs,
        )
        model.register_to_config(_name_or_path=pretrained_model_name_or_path)  # as given, as the reference
        model.loaded_from = [str(folder / f) for f in choice.all_files]
        logger.debug("%s: loaded %s", where, ", ".join(choice.all_files))
        return model

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path, **kwargs):
        """This model from one checkpoint file in the original layout: a whole-pipeline file (its part
        is taken), a UNet-only file, or a standalone VAE file (UNet2DConditionModel, AutoencoderKL).
        Keywords: ``torch_dtype``, ``config`` (+ ``subfolder``) to take the config from, ``original_config``,
        ``image_size``, and config overrides."""
        from ..single_file import load_model

        return load_model(cls, pretrained_model_link_or_path, **kwargs)

    @classmethod
    def _check_config_class(cls, config: dict, path: Path, where: str) -> None:
        """Refuse a config written for another class (the reference loads it with a warning and
        random weights)."""
        name = config.get("_class_name")
        fits = {base.__name__ for base in cls.__mro__} | set(cls._compatibles)
        if isinstance(name, str) and name not in fits:
            raise ConfigError(
                f"{where}: {path} describes a {name}, not a {cls.__name__}; load it with {name}'s class, or "
                "check the folder (a component in the wrong subfolder?)"
            )

    @classmethod
    def _from_state(
        cls,
        config: dict,
        state: dict,
        *,
        origin: dict,
        where: str,
        dtype,
        allow_missing: bool,
        overrides: dict | None = None,
    ):
        """Build from ``config`` on the meta device and assign ``state`` (after legacy key fixes)."""
        convert = getattr(cls, "_convert_legacy_state_dict", None)
        if convert is not None:
            state = convert(dict(state))
            files = ", ".join(sorted(set(origin.values())))
            origin = {k: origin.get(k, files) for k in state}
        with empty_modules():
            model = cls.from_config(config, **(overrides or {}))
        assign_weights(model, state, source=origin, where=where, dtype=dtype, allow_missing=allow_missing)
        model.eval()
        return model

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        variant: str | None = None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
        is_main_process: bool = True,
        **unused,
    ) -> None:
        """Write ``config.json`` and the weights into ``save_directory``, atomically.

        Files of the same variant left by an earlier save (say, shards where there is now one file)
        are removed; other variants in the folder are kept.
        """
        if not is_main_process:
            return
        if variant is not None:
            check_plain_name(variant, "variant")
        with StagedFolder(save_directory) as stage:
            self.write_files(
                stage, "", variant=variant, safe_serialization=safe_serialization, max_shard_size=max_shard_size
            )

    def write_files(
        self,
        stage: StagedFolder,
        subfolder: str,
        *,
        variant: str | None,
        safe_serialization: bool = True,
        max_shard_size: int | str = "10GB",
    ) -> None:
        """Stage this model's config and weights under ``subfolder`` of a :class:`StagedFolder`."""
        sub = f"{subfolder}/" if subfolder else ""
        stage.path(sub + self.config_name).write_text(self.to_json_string(), encoding="utf-8")
        fmt = SAFETENSORS if safe_serialization else PICKLE
        prefix = self.weights_prefix
        tensors = plain_tensors(self.state_dict())
        shards = split_shards(tensors, parse_size(max_shard_size))
        write = save_safetensors if fmt == SAFETENSORS else save_pickle
        if len(shards) == 1:
            write(shards[0], stage.path(sub + single_file_name(prefix, fmt, variant)))
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = shard_file_name(prefix, fmt, variant, i, len(shards))
                write(shard, stage.path(sub + name))
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            import json

            stage.path(sub + index_file_name(prefix, fmt, variant)).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
                + "\n",
                encoding="utf-8",
            )
        # An earlier save of this variant and format may have been sharded differently; other
        # variants and the other format stay (what a user had is not lost).
        base = f"{prefix}.{variant}" if variant else prefix
        stale = [
            single_file_name(prefix, fmt, variant),
            index_file_name(prefix, fmt, variant),
            f"{base}-?????-of-?????.{fmt}",
        ]
        stage.remove_stale(subfolder, stale)
