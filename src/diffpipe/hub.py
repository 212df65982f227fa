"""Repo id or local folder -> a local folder holding the files a load needs.

A local folder is used as it is (nothing is downloaded). A Hub repo id goes through
``huggingface_hub``: the repo's file list is read once, the caller's ``select`` function picks the
files it needs from that list, and ``snapshot_download`` fetches exactly those into the standard
cache (a second call finds them there and downloads nothing). With ``local_files_only=True`` or
``HF_HUB_OFFLINE=1`` no request is made: the cached snapshot is used, and a clear error says when
it lacks what is needed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable, Iterable

from .errors import CheckpointNotFoundError
from .io.files import check_relative_path

logger = logging.getLogger(__name__)

# select(files, read) -> the files to fetch; read(rel) returns a small file's bytes (fetching it
# first when it is remote), so a selection can depend on model_index.json.
Select = Callable[[set, Callable[[str], bytes]], Iterable[str]]

_TRUE = {"1", "on", "yes", "true"}


def offline_mode() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set now (read at call time, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def join_relative(subfolder: str | None, name: str) -> str:
    """``subfolder/name`` with ``subfolder`` checked to be a relative path of plain names."""
    if subfolder in (None, "", "."):
        return name
    return f"{check_relative_path(subfolder, 'subfolder')}/{name}"


def list_local_files(root: Path) -> set[str]:
    """Relative POSIX paths of the files under ``root``, skipping hidden folders (``.git``, caches)."""
    found: set[str] = set()
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            found.add(name if rel_dir == "." else f"{rel_dir}/{name}")
    return found


def _escape_pattern(name: str) -> str:
    # allow_patterns are fnmatch patterns; make a literal file name match only itself.
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` cannot be a Hub repo id (``name`` or ``owner/name``), so it meant a folder."""
    return not _REPO_ID.match(name) or ".." in name


def fetch(
    name_or_path: str | os.PathLike,
    select: Select,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    what: str = "checkpoint",
    hashes: dict[str, str] | None = None,
) -> Path:
    """Return the local root folder of ``name_or_path`` holding the files ``select`` picks.

    ``select(files, read)`` receives the set of all file paths in the repo (relative, POSIX) and a
    function that returns the bytes of one of them (a small file such as ``model_index.json``,
    fetched on demand), and returns the files to fetch; it may raise to report that what it needs
    is absent. For a local folder nothing
    is fetched and the folder itself is returned. The caller checks the files it then opens.

    ``hashes``: a dict to fill with ``{repo path: sha256}`` from the Hub's LFS metadata (for
    ``verify=True``); it stays empty for a local folder and when the Hub is not asked (offline).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        select(list_local_files(path), lambda rel: (path / rel).read_bytes())
        return path
    name = os.fspath(name_or_path)
    if path.exists():
        raise CheckpointNotFoundError(
            f"{what}: {name} is a file; expected a folder in the diffusers layout or a Hub repo id such as 'owner/name'"
        )
    if looks_like_local_path(name):
        raise CheckpointNotFoundError(
            f"{what}: no folder at {name}. Expected a local folder in the diffusers layout or a Hub repo id "
            "such as 'owner/name'."
        )
    offline = bool(local_files_only) or offline_mode()
    if offline:
        if hashes is not None:
            logger.warning("%s: offline, so file hashes cannot be checked against the Hub", what)
        return _from_cache(name, select, revision=revision, cache_dir=cache_dir, token=token, what=what)
    return _download(name, select, revision=revision, cache_dir=cache_dir, token=token, what=what, hashes=hashes)


def cached_snapshot(repo_id: str, revision: str | None, cache_dir) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (a branch, tag or commit), if any.

    Looked up in the cache's own layout (``models--owner--name/refs`` and ``snapshots``) rather than
    with ``snapshot_download(local_files_only=True)``, which refuses snapshots that earlier calls
    filled only partly (exactly what fetching only the needed files leaves).
    """
    from huggingface_hub import constants

    cache = Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    ref = revision or "main"
    ref_file = repo_dir / "refs" / ref
    try:
        commit = ref_file.read_text().strip() if ref_file.is_file() else ref
    except OSError:
        return None
    snapshot = repo_dir / "snapshots" / commit
    if re.fullmatch(r"[0-9a-f]{40}", commit) and snapshot.is_dir():
        return snapshot
    return None


def _from_cache(repo_id, select, *, revision, cache_dir, token, what, reason=None) -> Path:
    why = reason or "offline mode is on (local_files_only=True or HF_HUB_OFFLINE=1)"
    root = cached_snapshot(repo_id, revision, cache_dir)
    if root is None:
        raise CheckpointNotFoundError(
            f"{what}: {repo_id}"
            + (f" at revision {revision!r}" if revision else "")
            + f" is not in the local cache and {why}. Load it once with network access, "
            "or pass a local folder."
        )
    files = list_local_files(root)
    try:
        needed = list(select(files, lambda rel: (root / rel).read_bytes()))
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"{e} (looked in the cached snapshot {root}; {why})") from e
    missing = [f for f in needed if f not in files]
    if missing:
        raise CheckpointNotFoundError(
            f"{what}: the cached snapshot of {repo_id} ({root}) lacks {', '.join(missing[:5])}"
            f"{' (+%d more)' % (len(missing) - 5) if len(missing) > 5 else ''} and {why}. "
            "Load once with network access to fetch them."
        )
    return root


def _download(repo_id, select, *, revision, cache_dir, token, what, hashes=None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo_id, revision=revision, token=token, files_metadata=hashes is not None)
    except GatedRepoError as e:
        raise CheckpointNotFoundError(
            f"{what}: {repo_id} is gated: accept its terms on the Hub and pass token= (or log in)"
        ) from e
    except RevisionNotFoundError as e:
        raise CheckpointNotFoundError(f"{what}: {repo_id} has no revision {revision!r}") from e
    except RepositoryNotFoundError as e:
        raise CheckpointNotFoundError(
            f"{what}: no repo {repo_id!r} on the Hub (or it is private: pass token=), and no local folder of that name"
        ) from e
    except Exception as e:  # network down, DNS, timeouts: use the cache if it has the files
        if not _is_connection_error(e):
            raise
        logger.warning(
            "could not reach the Hub for %s (%s); trying the local cache%s",
            repo_id,
            e,
            "; file hashes are not checked" if hashes is not None else "",
        )
        return _from_cache(
            repo_id,
            select,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            what=what,
            reason=f"the Hub could not be reached ({type(e).__name__})",
        )
    files = {s.rfilename for s in (info.siblings or [])}
    if hashes is not None:
        hashes.update({s.rfilename: s.lfs.sha256 for s in (info.siblings or []) if s.lfs is not None})

    def read(rel: str) -> bytes:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, rel, revision=revision, cache_dir=cache_dir, token=token)).read_bytes()

    try:
        needed = sorted(set(select(files, read)))
    except CheckpointNotFoundError as e:
        raise CheckpointNotFoundError(f"{e} (in Hub repo {repo_id}, revision {info.sha})") from e
    root = snapshot_download(
        repo_id,
        revision=revision,
        allow_patterns=[_escape_pattern(f) for f in needed] or ["\0"],
        cache_dir=cache_dir,
        token=token,
    )
    return Path(root)


def _is_connection_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(
        names
        & {
            "ConnectionError",
            "ConnectTimeout",
            "ReadTimeout",
            "TimeoutException",
            "ConnectError",
            "NetworkError",
            "OfflineModeIsEnabled",
            "TimeoutError",
        }
    )
