"""A small Hugging Face Hub look-alike HTTP server for offline tests.

The test machines cannot reach the internet, so the tests drive the REAL ``huggingface_hub``
client (``snapshot_download``, ``hf_hub_download``, ``HfApi().model_info`` ...) against this
server, bound to 127.0.0.1 on a free port. Only the standard library is used
(``http.server.ThreadingHTTPServer`` served from daemon threads).

Repos are snapshots of local folders (or of ``{path: bytes}`` mappings) taken when they are
added: the bytes are read into memory at once, so later edits to the folder do not leak in
(``.git/`` and a top-level ``.cache/`` -- huggingface_hub's local_dir metadata -- are skipped).

Quick use::

    from hubserver import HubServer          # tests/ is on sys.path under pytest

    with HubServer() as hub:                 # or hub = HubServer().start(); ...; hub.stop()
        hub.add_repo("org/tiny", folder)                  # branch "main"
        hub.add_repo("org/tiny", folder_v2, revision="v2")
        with hub.patch_huggingface_hub():    # only needed if huggingface_hub was imported before
            snapshot_download("org/tiny", allow_patterns=["unet/*"], cache_dir=tmp)
        assert hub.downloads() == ["unet/config.json", ...]

How huggingface_hub 2.4.0 finds the endpoint (checked against the installed source)
-----------------------------------------------------------------------------------
``HF_ENDPOINT`` is NOT read lazily. ``huggingface_hub/constants.py`` reads it once, at import,
into ``constants.ENDPOINT`` and ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (used by
``hf_hub_url``, hence ``hf_hub_download``, ``get_hf_file_metadata``, ``file_exists``, safetensors
metadata), and also bakes it into ``constants.HF_URL_HOSTS``, ``utils._http._HUB_ORIGINS`` and the
module-level ``huggingface_hub.hf_api.api = HfApi()`` whose bound methods ARE the top-level
functions ``huggingface_hub.model_info``, ``list_repo_files``, ``get_safetensors_metadata`` ...
A fresh ``HfApi()`` reads ``constants.ENDPOINT`` when it is constructed, and ``snapshot_download``
builds a fresh one on each call. Setting ``os.environ["HF_ENDPOINT"]`` after the import changes
nothing (``test_hubserver.py::test_documented_conftest_pattern_in_subprocess`` proves it).
The same holds for ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and
``HF_HUB_DISABLE_TELEMETRY``: all are read at import into ``huggingface_hub.constants``.

So either set the environment BEFORE anything imports ``huggingface_hub`` (the conftest pattern
below), or patch these attributes afterwards; ``HubServer.patch_huggingface_hub()`` (a context
manager) does the latter and restores everything on exit:

* ``huggingface_hub.constants.ENDPOINT``                      -> server endpoint
* ``huggingface_hub.constants.HUGGINGFACE_CO_URL_TEMPLATE``   -> endpoint + "/{repo_id}/resolve/{revision}/{filename}"
* ``huggingface_hub.hf_api.api.endpoint``                     -> endpoint (the top-level functions)
* ``huggingface_hub.constants.HF_URL_HOSTS`` and ``huggingface_hub.utils._http._HUB_ORIGINS``
  get the server's host / origin added (what the env var would have done; only matters for
  redirects and for parsing web URLs)
* ``huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY``      -> True (see "agent registry" below)
* ``huggingface_hub.constants.HF_HUB_CACHE``                  -> ``hub_cache`` if given
* ``os.environ["HF_ENDPOINT"]``                               -> endpoint (for subprocesses)

``HfApi`` objects built before the patch keep their old endpoint. ``utils._cache_manager``
(``scan_cache_dir``) imported ``HF_HUB_CACHE`` by value, so pass ``cache_dir`` to it explicitly.
To simulate ``HF_HUB_OFFLINE=1`` in-process, patch ``huggingface_hub.constants.HF_HUB_OFFLINE``
(``is_offline_mode()`` returns that constant); setting the env var alone is not seen.

Agent registry: unless telemetry is disabled, the first request builds a user agent that fetches
``GET {ENDPOINT}/api/agent-harnesses`` once per process (3 s timeout) and writes
``$HF_HOME/.agent_harnesses.json``. The server answers it with an empty registry, but set
``HF_HUB_DISABLE_TELEMETRY=1`` so no such request or write happens.

Wiring in tests/conftest.py (start the server at conftest import time, module level)
-----------------------------------------------------------------------------------
Pytest imports ``tests/conftest.py`` before any test module, so this runs before the tests
import ``huggingface_hub`` (or ``diffpipe.hub``, which imports it lazily)::

    # tests/conftest.py -- at the very top, before anything that may import huggingface_hub
    import atexit, os, shutil, tempfile

    from hubserver import HubServer

    _HF_TMP = tempfile.mkdtemp(prefix="diffpipe-hf-")
    HUB = HubServer().start()
    atexit.register(shutil.rmtree, _HF_TMP, True)
    atexit.register(HUB.stop)                       # runs first (LIFO)
    os.environ["HF_ENDPOINT"] = HUB.endpoint        # e.g. http://127.0.0.1:40123
    os.environ["HF_HOME"] = _HF_TMP                 # token file, agent registry, xet cache...
    os.environ["HF_HUB_CACHE"] = os.path.join(_HF_TMP, "hub")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"     # optional, quieter
    for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        os.environ.pop(_var, None)                  # a developer's shell must not change results

    import pytest

    @pytest.fixture(scope="session", autouse=True)
    def _hub_endpoint():
        # Belt and braces: if a plugin imported huggingface_hub before this conftest ran, the env
        # vars above came too late; this patches the import-time constants (no-op otherwise).
        with HUB.patch_huggingface_hub(hub_cache=os.environ["HF_HUB_CACHE"]):
            yield HUB

    @pytest.fixture
    def hub(_hub_endpoint):
        HUB.set_down(False)
        HUB.clear_log()
        HUB.errors.clear()
        yield HUB
        HUB.set_down(False)
        assert not HUB.errors, HUB.errors          # no handler crashed

    @pytest.fixture
    def hf_cache(tmp_path, monkeypatch):
        # per-test cache: the constant, not the env var, is what huggingface_hub reads now
        import huggingface_hub.constants as c
        monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        return tmp_path / "hf-cache"

Repos persist on a session-wide server: give each test its own repo id (or call ``hub.reset()``,
which also forgets repos added by other fixtures).

Endpoints (what the installed client calls)
-------------------------------------------
* ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}`` -- ModelInfo JSON
  (``id``, ``modelId``, ``sha``, ``siblings`` ...; ``?blobs=true`` adds sizes / LFS info).
  ``snapshot_download`` calls this first (``repo_info``) unless given a 40-hex commit.
* ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...&expand=...`` -- list of
  ``{"type": "file"|"directory", "oid", "size", "path", "lfs"?}``; paginated with a ``Link: <...>;
  rel="next"`` header every ``tree_page_size`` entries (default 1000, like the Hub).
  ``snapshot_download`` calls it recursively at the commit sha, then caches it on disk.
* ``POST /api/models/{repo_id}/paths-info/{revision}`` (``get_paths_info``), ``GET
  /api/models/{repo_id}/refs`` (``list_repo_refs``), ``GET /api/agent-harnesses``.
* ``HEAD``/``GET /{repo_id}/resolve/{revision}/{path}`` -- the file, with ``X-Repo-Commit``,
  ``ETag`` (quoted git blob sha1 for regular files, quoted sha256 for LFS files, which also get
  ``X-Linked-Etag``/``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges: bytes``; single
  ``Range: bytes=a-b`` / ``a-`` / ``-n`` requests get ``206`` + ``Content-Range`` (``416`` when
  unsatisfiable). No ``X-Xet-*`` headers are ever sent, so the client always uses plain HTTP.
  With ``HubServer(lfs_redirect=True)`` LFS files answer ``302`` to a second listener (a "CDN" on
  another port, i.e. another origin) like the real Hub does; the client then reads the metadata
  from the 302 and drops the auth header for the CDN.
* Revisions: branch/tag names (``main``, ``v2``, ``refs/pr/1`` -- URL-encoded as ``refs%2Fpr%2F1``
  or not), full 40-hex commit shas, or a unique sha prefix of >= 7 chars.

Errors (status, ``X-Error-Code`` -> exception raised by the client)
-------------------------------------------------------------------
* unknown repo: 404 ``RepoNotFound`` -> ``RepositoryNotFoundError``
* unknown revision: 404 ``RevisionNotFound`` -> ``RevisionNotFoundError``
* unknown file / tree path: 404 ``EntryNotFound`` (+ ``X-Repo-Commit``) -> ``RemoteEntryNotFoundError``
  (an ``EntryNotFoundError``; ``hf_hub_download`` also caches the miss under ``.no_exist/``)
* gated repo (``set_gated``) file access: 401 (no token) / 403 (token not allowed) ``GatedRepo``
  -> ``GatedRepoError``; model info and tree listing stay readable, as on the Hub.

Down / offline simulation (``set_down``)
----------------------------------------
* ``set_down(True)`` (``mode="refuse"``, the default) closes the listening socket(s) so every
  connect fails with ``ECONNREFUSED`` -> ``httpx2.ConnectError``. That is the case huggingface_hub
  explicitly treats as "connection is down": ``snapshot_download`` / ``hf_hub_download`` fall
  back to the cache (``LocalEntryNotFoundError`` when it is not there), while direct API calls
  (``HfApi().model_info``) raise ``httpx2.ConnectError`` (diffpipe's ``_is_connection_error``
  recognises it). ``set_down(False)`` listens again on the SAME port (so ``endpoint`` and the
  already-imported constants stay valid).
* ``set_down(True, mode="503")`` keeps listening and answers every request ``503``. The download
  helpers also fall back to the cache on it (an ``HfHubHTTPError`` with status >= 500), but API
  calls raise ``HfHubHTTPError`` (not a connection error).
* Cost to know about: when the server is down AND the file is not cached, ``hf_hub_download``
  retries the HEAD with exponential backoff (1+2+4+8+8 s ~= 23 s of ``time.sleep``) before it
  raises ``LocalEntryNotFoundError``; a direct ``list_repo_tree`` / ``list_repo_files`` call
  retries the same way in both modes (``http_backoff`` retries connection errors and 503).
  Fast in both modes: ``snapshot_download`` (its first call, ``repo_info``, does not retry),
  ``model_info``, ``file_exists``, and ``hf_hub_download`` of a file that IS cached. Tests that
  need a slow path should patch ``huggingface_hub.utils._http.time.sleep``.

Request log
-----------
``requests`` lists every request as ``Request(method, path, range)`` (a NamedTuple, equal to a
plain ``(method, path, range_or_None)`` tuple; ``path`` is the raw request target, query string
included). ``downloads()`` lists the repo file paths whose full body was sent by a GET on
``/resolve/`` (or on the CDN when ``lfs_redirect``) -- not HEADs, not ranges, not redirects.
``range_reads()`` lists ``(file path, Range header)`` for 206 answers. ``errors`` collects
tracebacks of handler crashes (should stay empty).

Limitations: model repos only (no datasets/spaces: those URLs get a plain 404), no
uploads/commits API, no xet, no ``expand=`` filtering of model info fields, no private repos,
no auth except the per-repo gated token list. ``set_down(False)`` after ``mode="refuse"`` rebinds
the same port; if another process grabbed it meanwhile (very unlikely) it raises RuntimeError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socketserver
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubServer", "Request", "patch_huggingface_hub", "LFS_SUFFIXES", "LFS_SIZE_THRESHOLD"]

# Files stored in git-lfs on the Hub: the default .gitattributes of a new Hub repo, plus anything
# at least LFS_SIZE_THRESHOLD bytes big (the Hub rejects larger non-LFS files).
LFS_SUFFIXES = (
    ".7z",
    ".arrow",
    ".bin",
    ".bz2",
    ".ckpt",
    ".ftz",
    ".gguf",
    ".gz",
    ".h5",
    ".joblib",
    ".mlmodel",
    ".model",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".parquet",
    ".pb",
    ".pickle",
    ".pkl",
    ".pt",
    ".pth",
    ".rar",
    ".safetensors",
    ".tar",
    ".tflite",
    ".tgz",
    ".wasm",
    ".xz",
    ".zip",
    ".zst",
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_EPOCH = datetime(2024, 1, 1, tzinfo=timezone.utc)
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX_PREFIX = re.compile(r"^[0-9a-f]{7,40}$")
_API_MARKERS = {"revision", "tree", "paths-info", "refs", "commits", "safetensors-metadata"}


class Request(NamedTuple):
    method: str
    path: str
    range: str | None


# --------------------------------------------------------------------------------------------
# Repo model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    data: bytes
    size: int
    sha256: str
    blob_id: str  # git oid of the blob as stored in git: the content, or the LFS pointer
    lfs: bool
    pointer_size: int

    @classmethod
    def make(cls, path: str, data: bytes) -> "_Blob":
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = path.lower().endswith(LFS_SUFFIXES) or len(data) >= LFS_SIZE_THRESHOLD
        if lfs:
            pointer = (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n").encode()
            stored = pointer
        else:
            pointer = b""
            stored = data
        blob_id = hashlib.sha1(b"blob %d\0" % len(stored) + stored).hexdigest()
        return cls(data, len(data), sha256, blob_id, lfs, len(pointer))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Commit:
    sha: str
    files: dict[str, _Blob]
    date: datetime
    title: str

    def dirs(self) -> set[str]:
        out: set[str] = set()
        for p in self.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return out

    def tree_oid(self, directory: str) -> str:
        prefix = directory + "/" if directory else ""
        listing = "".join(f"{p}\0{b.blob_id}\n" for p, b in sorted(self.files.items()) if p.startswith(prefix))
        return hashlib.sha1(f"tree\0{directory}\0{listing}".encode()).hexdigest()


@dataclass
class _Repo:
    repo_id: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # name -> commit sha (insertion ordered)
    tags: set[str] = field(default_factory=set)
    gated: bool | str = False
    tokens: frozenset[str] = frozenset()

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        rev = revision.lower()
        if _HEX40.match(rev):
            return self.commits.get(rev)
        if _HEX_PREFIX.match(rev):
            hits = [c for sha, c in self.commits.items() if sha.startswith(rev)]
            if len(hits) == 1:
                return hits[0]
        return None

    def default_commit(self) -> _Commit | None:
        if "main" in self.refs:
            return self.commits[self.refs["main"]]
        for sha in self.refs.values():
            return self.commits[sha]
        return None


def _read_folder(folder: str | os.PathLike | Mapping[str, bytes]) -> dict[str, bytes]:
    if isinstance(folder, Mapping):
        files = {}
        for name, data in folder.items():
            name = str(name).replace("\\", "/").strip("/")
            if isinstance(data, str):
                data = data.encode()
            files[name] = bytes(data)
        return files
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"add_repo: {root} is not a folder")
    files = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        top = Path(dirpath) == root
        dirnames[:] = sorted(d for d in dirnames if d != ".git" and not (top and d == ".cache"))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            files[rel] = full.read_bytes()
    return files


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, hub: "HubServer", *, cdn: bool):
        self.hub = hub
        self.cdn = cdn
        super().__init__(address, _Handler)

    def server_bind(self):
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse-DNS lookup that can hang on a
        # machine without DNS: bind without it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address):
        # A client that hangs up early is not a server bug; anything else is recorded.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            self.hub._record_error(traceback.format_exc())


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format, *args):  # silence the default stderr access log
        pass

    # every method goes through _dispatch
    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def _dispatch(self):
        hub = self.server.hub
        self.close_connection = True
        rng = self.headers.get("Range")
        hub._record_request(Request(self.command, self.path, rng))
        body = b""
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        try:
            if hub._down_mode == "503":
                raise _HTTPError(503, "Service Unavailable (HubServer.set_down)")
            if self.server.cdn:
                self._cdn()
            else:
                self._route(body)
        except _HTTPError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            hub._record_error(traceback.format_exc())
            with contextlib.suppress(Exception):
                self._send_error(_HTTPError(500, "Internal Server Error (HubServer bug)"))

    # ---------------------------------------------------------------- responses

    def _send(self, status: int, headers: dict, body: bytes = b"", *, length: int | None = None):
        self.send_response(status)
        headers = dict(headers)
        headers.setdefault("Content-Length", str(len(body) if length is None else length))
        headers["Connection"] = "close"
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj, headers: dict | None = None, status: int = 200):
        data = json.dumps(obj).encode()
        self._send(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, data)

    def _send_error(self, e: _HTTPError):
        message = e.message.encode("ascii", "replace").decode("ascii")
        headers = {"Content-Type": "application/json; charset=utf-8", "X-Error-Message": message}
        if e.code:
            headers["X-Error-Code"] = e.code
        headers.update(e.headers)
        self._send(e.status, headers, json.dumps({"error": e.message}).encode())

    # ---------------------------------------------------------------- routing

    def _route(self, body: bytes):
        hub = self.server.hub
        parts = urlsplit(self.path)
        segs = parts.path.split("/")[1:]
        while segs and segs[-1] == "":
            segs.pop()
        query = parse_qs(parts.query, keep_blank_values=True)
        if segs == ["api", "agent-harnesses"]:
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
            return self._api_models(segs[2:], query, body)
        if "resolve" in segs and self.command in ("GET", "HEAD"):
            n = hub._split_repo(segs, {"resolve"})
            if n is not None:
                return self._resolve(unquote("/".join(segs[:n])), segs[n + 1 :])
        raise _HTTPError(404, f"Not Found: {parts.path}")

    def _api_models(self, segs: list[str], query: dict, body: bytes):
        hub = self.server.hub
        if len(segs) <= 2 and hub._has_repo(unquote("/".join(segs))):
            n, action, rest = len(segs), None, []
        else:
            n = hub._split_repo(segs, _API_MARKERS)
            if n is None:
                if len(segs) > 2:
                    raise _HTTPError(404, "Not Found")
                n = len(segs)
            action, rest = (segs[n], segs[n + 1 :]) if len(segs) > n else (None, [])
        repo_id = unquote("/".join(segs[:n]))
        repo = hub._get_repo(repo_id)
        if action is None and self.command == "GET":
            commit = repo.default_commit()
            if commit is None:
                raise _HTTPError(404, f"Revision Not Found for {repo_id}", "RevisionNotFound")
            return self._send_json(hub._model_info(repo, commit, query))
        if action == "revision" and rest and self.command == "GET":
            commit, _ = self._commit_from(repo, rest, min_left=0)
            return self._send_json(hub._model_info(repo, commit, query))
        if action == "tree" and rest and self.command == "GET":
            commit, left = self._commit_from(repo, rest, min_left=0)
            path = unquote("/".join(left))
            return self._tree(repo, commit, path, query)
        if action == "paths-info" and rest and self.command == "POST":
            commit, _ = self._commit_from(repo, rest, min_left=0)
            form = parse_qs(body.decode(), keep_blank_values=True)
            expand = _truthy(form.get("expand", ["false"])[-1])
            out = []
            for p in form.get("paths", []):
                p = p.strip("/")
                entry = hub._entry(repo, commit, p, expand)
                if entry is not None:
                    out.append(entry)
            return self._send_json(out)
        if action == "refs" and not rest and self.command == "GET":
            return self._send_json(hub._refs(repo, include_prs=_truthy(query.get("include_prs", ["0"])[-1])))
        raise _HTTPError(404, "Not Found")

    def _commit_from(self, repo: _Repo, rest: list[str], *, min_left: int) -> tuple[_Commit, list[str]]:
        """Resolve the revision at the head of ``rest``; a name may span segments (refs/pr/1)."""
        for n in range(1, len(rest) - min_left + 1):
            commit = repo.resolve(unquote("/".join(rest[:n])))
            if commit is not None:
                return commit, rest[n:]
        raise _HTTPError(
            404,
            f"Invalid rev id: {unquote(rest[0]) if rest else ''}",
            "RevisionNotFound",
        )

    def _tree(self, repo: _Repo, commit: _Commit, path: str, query: dict):
        hub = self.server.hub
        path = path.strip("/")
        recursive = _truthy(query.get("recursive", ["false"])[-1])
        expand = _truthy(query.get("expand", ["false"])[-1])
        dirs = commit.dirs()
        if path and path not in dirs:
            raise _HTTPError(
                404, f"{path} does not exist on {commit.sha}", "EntryNotFound", {"X-Repo-Commit": commit.sha}
            )
        prefix = path + "/" if path else ""
        names: set[str] = set()
        for p in list(commit.files) + sorted(dirs):
            if not p.startswith(prefix) or p == path:
                continue
            if recursive or "/" not in p[len(prefix) :]:
                names.add(p)
        # directories first, then files, each sorted (like the Hub)
        ordered = sorted(n for n in names if n in dirs) + sorted(n for n in names if n not in dirs)
        entries = [hub._entry(repo, commit, n, expand) for n in ordered]
        page_size = max(1, hub.tree_page_size if not expand else min(hub.tree_page_size, 50))
        cursor = int(query.get("cursor", ["0"])[-1] or 0)
        page = entries[cursor : cursor + page_size]
        headers = {"X-Repo-Commit": commit.sha}
        if cursor + page_size < len(entries):
            parts = urlsplit(self.path)
            q = {k: v[-1] for k, v in query.items() if k != "cursor"}
            q["cursor"] = str(cursor + page_size)
            qs = "&".join(f"{quote(k)}={quote(v)}" for k, v in q.items())
            headers["Link"] = f'<{hub.endpoint}{parts.path}?{qs}>; rel="next"'
        self._send_json(page, headers)

    def _resolve(self, repo_id: str, rest: list[str]):
        hub = self.server.hub
        repo = hub._get_repo(repo_id)
        if repo.gated:
            auth = self.headers.get("Authorization") or ""
            token = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if token not in repo.tokens:
                msg = (
                    f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in."
                )
                raise _HTTPError(403 if token else 401, msg, "GatedRepo")
        if len(rest) < 2:  # no revision or no file path
            raise _HTTPError(404, "Entry not found", "EntryNotFound")
        commit, left = self._commit_from(repo, rest, min_left=1)
        path = unquote("/".join(left))
        blob = commit.files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
            if hub.lfs_redirect:
                headers["ETag"] = f'"{blob.blob_id}"'  # the pointer's oid, as on the Hub
                headers["Location"] = hub._cdn_url(repo_id, commit.sha, path)
                return self._send(302, headers, b"", length=0)
        self._send_body(repo_id, path, blob, headers)

    def _cdn(self):
        hub = self.server.hub
        if self.command not in ("GET", "HEAD"):
            raise _HTTPError(405, "Method Not Allowed")
        segs = urlsplit(self.path).path.split("/")[1:]
        # /repos/{repo_id...}/{commit}/{path...}
        if len(segs) < 4 or segs[0] != "repos":
            raise _HTTPError(404, "Not Found")
        idx = next((i for i in (2, 3) if i < len(segs) - 1 and _HEX40.match(segs[i])), None)
        if idx is None:
            raise _HTTPError(404, "Not Found")
        repo_id = unquote("/".join(segs[1:idx]))
        with hub._lock:
            repo = hub._repos.get(repo_id)
            commit = repo.commits.get(segs[idx]) if repo else None
        path = unquote("/".join(segs[idx + 1 :]))
        blob = commit.files.get(path) if commit else None
        if blob is None:
            raise _HTTPError(404, "NoSuchKey")
        headers = {
            "ETag": f'"{blob.sha256}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        self._send_body(repo_id, path, blob, headers)

    def _send_body(self, repo_id: str, path: str, blob: _Blob, headers: dict):
        hub = self.server.hub
        rng = self.headers.get("Range")
        span = _parse_range(rng, blob.size) if rng else None
        if span == "unsatisfiable":
            raise _HTTPError(416, "Range Not Satisfiable", None, {"Content-Range": f"bytes */{blob.size}"})
        if span is None:
            if self.command == "GET":
                hub._record_fetch(repo_id, path, None)
            return self._send(200, headers, blob.data)
        start, end = span
        if self.command == "GET":
            hub._record_fetch(repo_id, path, rng)
        headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        return self._send(206, headers, blob.data[start : end + 1])


def _truthy(value: str) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _parse_range(header: str, size: int):
    """(start, end) inclusive for a single satisfiable byte range, "unsatisfiable", or None
    (header ignored: malformed or multi-range, so the full body is sent, as RFC 9110 allows)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


# --------------------------------------------------------------------------------------------
# Public server
# --------------------------------------------------------------------------------------------


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lfs_redirect: bool = False,
        tree_page_size: int = 1000,
    ):
        self.host = host
        self._port = port
        self.lfs_redirect = lfs_redirect
        self.tree_page_size = tree_page_size
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._requests: list[Request] = []
        self._fetches: list[tuple[str, str, str | None]] = []  # (repo_id, path, range or None)
        self.errors: list[str] = []
        self._down_mode: str | None = None
        self._httpd: _HTTPServer | None = None
        self._cdn: _HTTPServer | None = None
        self._cdn_port = 0
        self._threads: list[threading.Thread] = []
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "HubServer":
        with self._lock:
            if self._started:
                return self
            self._listen()
            self._started = True
        return self

    def stop(self) -> None:
        with self._lock:
            self._unlisten()
            self._started = False
            self._down_mode = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        if not self._port:
            raise RuntimeError("HubServer not started")
        return f"http://{self.host}:{self._port}"

    @property
    def cdn_endpoint(self) -> str | None:
        return f"http://{self.host}:{self._cdn_port}" if self.lfs_redirect and self._cdn_port else None

    def _serve(self, httpd: _HTTPServer, name: str) -> None:
        t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _listen(self) -> None:
        try:
            self._httpd = _HTTPServer((self.host, self._port), self, cdn=False)
        except OSError as e:
            raise RuntimeError(f"HubServer: cannot listen on {self.host}:{self._port}: {e}") from e
        self._port = self._httpd.server_address[1]
        self._serve(self._httpd, f"hubserver-{self._port}")
        if self.lfs_redirect:
            self._cdn = _HTTPServer((self.host, self._cdn_port), self, cdn=True)
            self._cdn_port = self._cdn.server_address[1]
            self._serve(self._cdn, f"hubserver-cdn-{self._cdn_port}")

    def _unlisten(self) -> None:
        for httpd in (self._httpd, self._cdn):
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
        self._httpd = self._cdn = None
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []

    # ------------------------------------------------------------------ down / offline

    def set_down(self, down: bool = True, *, mode: str = "refuse") -> None:
        """Simulate an unreachable Hub. ``mode="refuse"``: connections are refused
        (``httpx2.ConnectError`` on the client); ``mode="503"``: every request gets a 503.
        ``set_down(False)`` serves again on the same port."""
        if mode not in ("refuse", "503"):
            raise ValueError("mode must be 'refuse' or '503'")
        with self._lock:
            if not self._started:
                raise RuntimeError("HubServer not started")
            if self._down_mode == "refuse" and (not down or mode != "refuse"):
                self._listen()
            if down and mode == "refuse" and self._down_mode != "refuse":
                self._unlisten()
            self._down_mode = mode if down else None

    @property
    def is_down(self) -> bool:
        return self._down_mode is not None

    # ------------------------------------------------------------------ repos

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike | Mapping[str, bytes],
        revision: str = "main",
        *,
        branch_alias: str | list[str] | tuple[str, ...] | None = None,
    ) -> str:
        """Snapshot ``folder`` (a folder, or a ``{relative path: bytes}`` mapping) as a new commit
        of ``repo_id`` and point the ref ``revision`` -- and every name in ``branch_alias`` -- at
        it. Adding again under an existing ref moves the ref (older commits stay reachable by
        sha). ``revision`` may also be a tag-like name or ``refs/pr/N``. Returns the commit sha
        (40 hex chars, deterministic: sha1 of repo id, revision and the sorted content listing)."""
        _check_repo_id(repo_id)
        if not revision or _HEX40.match(revision):
            raise ValueError(f"add_repo: revision must be a ref name, got {revision!r}")
        files = _read_folder(folder)
        blobs = {p: _Blob.make(p, d) for p, d in sorted(files.items())}
        listing = "".join(f"{p}\0{b.sha256}\n" for p, b in blobs.items())
        sha = hashlib.sha1(f"{repo_id}\0{revision}\0{listing}".encode()).hexdigest()
        aliases = [branch_alias] if isinstance(branch_alias, str) else list(branch_alias or [])
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id))
            if sha not in repo.commits:
                date = _EPOCH + timedelta(minutes=len(repo.commits))
                repo.commits[sha] = _Commit(sha, blobs, date, f"Upload {revision}")
            for name in [revision, *aliases]:
                repo.refs[name] = sha
        return sha

    def add_ref(self, repo_id: str, name: str, revision: str, *, tag: bool = False) -> str:
        """Point ref ``name`` (branch, or tag with ``tag=True``) at the commit ``revision``
        resolves to. Returns the commit sha."""
        with self._lock:
            repo = self._repos.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            if commit is None:
                raise KeyError(f"{repo_id}@{revision} not found")
            repo.refs[name] = commit.sha
            if tag:
                repo.tags.add(name)
            return commit.sha

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        with self._lock:
            repo = self._repos.get(repo_id)
            commit = repo.resolve(revision) if repo else None
            if commit is None:
                raise KeyError(f"{repo_id}@{revision} not found")
            return commit.sha

    def remove_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def set_gated(self, repo_id: str, gated: bool | str = True, *, tokens=()) -> None:
        """Gate file downloads: requests without ``Authorization: Bearer <t>`` for a ``t`` in
        ``tokens`` get 401/403 ``GatedRepo``. ``gated`` may be ``"auto"``/``"manual"`` (what model
        info reports; ``True`` means ``"manual"``)."""
        with self._lock:
            repo = self._repos[repo_id]
            repo.gated = "manual" if gated is True else gated
            repo.tokens = frozenset(tokens)

    def repo_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._repos)

    def reset(self) -> None:
        """Forget all repos, clear the logs and errors, come back up."""
        with self._lock:
            self._repos.clear()
            if self._started and self.is_down:
                self.set_down(False)
            self.clear_log()
            self.errors.clear()

    # ------------------------------------------------------------------ logs

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def clear_log(self) -> None:
        with self._lock:
            self._requests.clear()
            self._fetches.clear()

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Repo file paths whose full content was sent by a GET (in request order)."""
        with self._lock:
            return [p for r, p, rng in self._fetches if rng is None and repo_id in (None, r)]

    def range_reads(self, repo_id: str | None = None) -> list[tuple[str, str]]:
        """``(path, Range header)`` for every partial (206) read (in request order)."""
        with self._lock:
            return [(p, rng) for r, p, rng in self._fetches if rng is not None and repo_id in (None, r)]

    def _record_request(self, req: Request) -> None:
        with self._lock:
            self._requests.append(req)

    def _record_fetch(self, repo_id: str, path: str, rng: str | None) -> None:
        with self._lock:
            self._fetches.append((repo_id, path, rng))

    def _record_error(self, text: str) -> None:
        with self._lock:
            self.errors.append(text)

    # ------------------------------------------------------------------ huggingface_hub patching

    def patch_huggingface_hub(self, *, hub_cache: str | os.PathLike | None = None):
        """Context manager pointing an already-imported huggingface_hub at this server."""
        return patch_huggingface_hub(self.endpoint, hub_cache=hub_cache)

    # ------------------------------------------------------------------ internals used by handlers

    def _has_repo(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    def _get_repo(self, repo_id: str) -> _Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _split_repo(self, segs: list[str], markers: set[str]) -> int | None:
        """How many leading segments form the repo id ('name' or 'owner/name') before a marker."""
        candidates = [n for n in (2, 1) if len(segs) > n and segs[n] in markers]
        for n in candidates:
            if self._has_repo(unquote("/".join(segs[:n]))):
                return n
        return candidates[0] if candidates else None

    def _cdn_url(self, repo_id: str, sha: str, path: str) -> str:
        return f"{self.cdn_endpoint}/repos/{repo_id}/{sha}/{quote(path)}?X-Amz-Signature=fake"

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict | None:
        blob = commit.files.get(path)
        if blob is not None:
            entry: dict = {"type": "file", "oid": blob.blob_id, "size": blob.size, "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": blob.pointer_size}
        elif path in commit.dirs():
            entry = {"type": "directory", "oid": commit.tree_oid(path), "size": 0, "path": path}
        else:
            return None
        if expand:
            entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": _iso(commit.date)}
            if blob is not None:
                entry["securityFileStatus"] = {"status": "safe", "avScan": None, "pickleImportScan": None}
        return entry

    def _model_info(self, repo: _Repo, commit: _Commit, query: dict) -> dict:
        blobs = _truthy(query.get("blobs", ["false"])[-1])
        siblings = []
        for path, blob in sorted(commit.files.items()):
            s: dict = {"rfilename": path}
            if blobs:
                s["size"] = blob.size
                s["blobId"] = blob.blob_id
                if blob.lfs:
                    s["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": blob.pointer_size}
            siblings.append(s)
        first = min(c.date for c in repo.commits.values())
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(first),
            "private": False,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "library_name": None,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(b.size for b in commit.files.values()),
        }

    def _refs(self, repo: _Repo, include_prs: bool) -> dict:
        def item(name: str) -> dict:
            kind = "tags" if name in repo.tags else "heads"
            ref = name if name.startswith("refs/") else f"refs/{kind}/{name}"
            return {"name": name, "ref": ref, "targetCommit": repo.refs[name]}

        names = list(repo.refs)
        out = {
            "branches": [item(n) for n in names if n not in repo.tags and not n.startswith("refs/")],
            "converts": [item(n) for n in names if n.startswith("refs/convert/")],
            "tags": [item(n) for n in names if n in repo.tags],
        }
        if include_prs:
            out["pullRequests"] = [item(n) for n in names if n.startswith("refs/pr/")]
        return out


def _iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?", repo_id or ""):
        raise ValueError(f"add_repo: invalid repo id {repo_id!r} (expected 'name' or 'owner/name')")


# --------------------------------------------------------------------------------------------
# Pointing an already-imported huggingface_hub at a server
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patch_huggingface_hub(endpoint: str, *, hub_cache: str | os.PathLike | None = None) -> Iterator[None]:
    """Point ``huggingface_hub`` (imported now if needed) at ``endpoint`` for the duration of the
    block, restoring every patched attribute and ``HF_ENDPOINT`` afterwards. See the module
    docstring for the list of attributes and why they are needed."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api
    import huggingface_hub.utils._http as hf_http

    endpoint = endpoint.rstrip("/")
    split = urlsplit(endpoint)
    host = (split.hostname or "").lower()
    origin = (split.scheme, host, split.port or {"http": 80, "https": 443}.get(split.scheme, 0))
    saved: list[tuple[object, str, object]] = []

    def setattr_saved(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    old_env = os.environ.get("HF_ENDPOINT")
    try:
        setattr_saved(constants, "ENDPOINT", endpoint)
        setattr_saved(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        if hasattr(constants, "HF_URL_HOSTS"):
            setattr_saved(constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {host}))
        if hasattr(hf_http, "_HUB_ORIGINS"):
            setattr_saved(hf_http, "_HUB_ORIGINS", frozenset(hf_http._HUB_ORIGINS | {origin}))
        if hasattr(hf_api, "api"):
            setattr_saved(hf_api.api, "endpoint", endpoint)
        setattr_saved(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        if hub_cache is not None:
            setattr_saved(constants, "HF_HUB_CACHE", os.fspath(hub_cache))
        os.environ["HF_ENDPOINT"] = endpoint
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        if old_env is None:
            os.environ.pop("HF_ENDPOINT", None)
        else:
            os.environ["HF_ENDPOINT"] = old_env
