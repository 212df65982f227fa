"""Writes that never leave a half-written checkpoint behind.

A save writes every file into a staging folder beside the target, then moves the files into place
with ``os.replace`` (atomic per file on POSIX) while holding an exclusive lock on the target folder.
An exception before the commit removes the staging folder and leaves the target as it was. Loads take
a shared lock on the folder while they choose and open files, so a reader never sees the middle of a
commit, and two writers never interleave their files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

try:  # POSIX only; elsewhere saves are still staged, just not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.getLogger(__name__)


def _usual_mode(path) -> None:
    """Give a file written through a private temporary name the mode a plain ``open`` would have
    (0666 less the umask): ``mkstemp`` makes it 0600, and a saved model must stay readable by others
    (a shared cache, a container) as the reference's saves are."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def as_os_error(path):
    """Re-raise the I/O failures of writers written in Rust (safetensors, tokenizers), which arrive as
    plain ``Exception("... (os error 28)")``, as the ``OSError`` they are (``ENOSPC`` for a full disk)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, f"{os.strerror(number)}: could not write {path}") from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """A temporary path beside ``path`` for a writer that takes a file name; renamed over ``path``
    (after an fsync) when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(Path(tmp))
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, *, shared: bool):
    """Hold a shared (readers) or exclusive (writers) ``flock`` on ``folder`` itself.

    Locking the folder's own descriptor leaves no lock file behind and works on read-only folders.
    """
    if fcntl is None or not os.path.isdir(folder):
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _commit_order(rel: str) -> tuple[int, str]:
    # Weights first, then shard indexes, then configs: a reader that finds a config finds its weights.
    name = rel.rsplit("/", 1)[-1]
    if name.endswith(".index.json") or ".index." in name:
        return (1, rel)
    if name.endswith(".json"):
        return (2, rel)
    return (0, rel)


class StagedFolder:
    """Stage files for ``target`` and move them all into place on success, none on failure.

    >>> with StagedFolder(out) as stage:
    ...     save_file(tensors, stage.path("unet/diffusion_pytorch_model.safetensors"))
    ...     stage.remove_stale("unet", ["diffusion_pytorch_model*.safetensors"])
    """

    def __init__(self, target: str | os.PathLike):
        self.target = Path(target)
        self._stale: list[tuple[str, list[str]]] = []

    def __enter__(self) -> "StagedFolder":
        if self.target.exists() and not self.target.is_dir():
            raise NotADirectoryError(f"cannot save into {self.target}: it is a file, expected a folder")
        self.target.mkdir(parents=True, exist_ok=True)
        target = self.target.resolve()
        prefix = f".{target.name}.staging-"
        # Beside the target, so nothing is left inside it if the process dies; inside it (a hidden
        # folder loaders skip) when the target is a mount point or its parent is not writable, since
        # os.replace cannot move files across file systems.
        try:
            if os.stat(target.parent).st_dev != os.stat(target).st_dev:
                raise OSError("the target is on another file system than its parent")
            self.stage = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        except OSError:
            self.stage = Path(tempfile.mkdtemp(prefix=prefix, dir=target))
        return self

    def path(self, relative: str) -> Path:
        """Where to write the file that will end up at ``target/relative``."""
        p = self.stage / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def folder(self, relative: str) -> Path:
        """A staging folder that will end up at ``target/relative`` (for writers that take a folder)."""
        p = self.stage / relative
        p.mkdir(parents=True, exist_ok=True)
        return p

    def remove_stale(self, subfolder: str | None, patterns: list[str]) -> None:
        """After the commit, delete files in ``target/subfolder`` that match ``patterns`` and were not written."""
        self._stale.append((subfolder or "", patterns))

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.stage, ignore_errors=True)

    def _commit(self) -> None:
        staged = sorted(
            (p.relative_to(self.stage).as_posix() for p in self.stage.rglob("*") if p.is_file()),
            key=_commit_order,
        )
        for rel in staged:
            _fsync_file(self.stage / rel)
            _usual_mode(self.stage / rel)
        with folder_lock(self.target, shared=False):
            for rel in staged:
                dest = self.target / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.stage / rel, dest)
            written = set(staged)
            for sub, patterns in self._stale:
                folder = self.target / sub if sub else self.target
                if not folder.is_dir():
                    continue
                for f in folder.iterdir():
                    rel = f"{sub}/{f.name}" if sub else f.name
                    if f.is_file() and rel not in written and any(fnmatch.fnmatch(f.name, p) for p in patterns):
                        f.unlink()
        _log_saved(self.target, staged)


_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _log_saved(target: Path, files: list[str]) -> None:
    """Say where each file of a save went, in the reference's words (tools and users read these lines)."""
    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        if name.endswith(_WEIGHT_SUFFIXES):
            logger.info("Model weights saved in %s", target / rel)
        elif name in ("config.json", "scheduler_config.json", "model_index.json", "preprocessor_config.json"):
            logger.info("Configuration saved in %s", target / rel)
        else:
            logger.info("Saved %s", target / rel)
