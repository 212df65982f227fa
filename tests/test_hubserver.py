"""The Hub test server (tests/hubserver.py) driven by the REAL huggingface_hub client.

Each test points the already-imported huggingface_hub at a module-scoped server through
``HubServer.patch_huggingface_hub()`` (constants are read at import, see hubserver's docstring),
so the tests do not depend on what conftest or other test modules did before; one test runs the
documented conftest pattern (environment set before the import) in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx2
import numpy as np
import pytest
from safetensors.numpy import save as st_save

import huggingface_hub
import huggingface_hub.constants as hf_constants
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo, RepoFile, RepoFolder
from huggingface_hub.utils import get_session

from hubserver import HubServer, Request

HERE = Path(__file__).resolve().parent
REPO = "org/tiny-pipe"


def _unet_weights() -> bytes:
    return st_save(
        {
            "conv_in.weight": np.arange(4 * 3 * 3 * 3, dtype=np.float32).reshape(4, 3, 3, 3),
            "conv_in.bias": np.zeros((4,), dtype=np.float16),
        }
    )


V1 = {
    "model_index.json": json.dumps({"_class_name": "TinyPipeline", "unet": ["diffpipe", "UNet"]}).encode(),
    "README.md": b"# tiny pipe\n",
    "scheduler/scheduler_config.json": b'{"num_train_timesteps": 10}',
    "unet/config.json": b'{"sample_size": 8}',
    "unet/diffusion_pytorch_model.safetensors": _unet_weights(),
    "vae/config.json": b'{"latent_channels": 4}',
    "vae/diffusion_pytorch_model.safetensors": st_save({"decoder.w": np.ones((2, 2), dtype=np.float32)}),
}
V2 = {
    **V1,
    "model_index.json": json.dumps({"_class_name": "TinyPipeline", "version": 2}).encode(),
    "unet/extra.json": b'{"v2": true}',
}


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def _resolve_requests(hub: HubServer) -> list[Request]:
    return [r for r in hub.requests if "/resolve/" in r.path]


@pytest.fixture(scope="module")
def server():
    with HubServer() as s:
        yield s


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    server.reset()
    # a developer's HF_HUB_OFFLINE=1 (read at import) must not turn these tests into cache-only ones
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with server.patch_huggingface_hub(hub_cache=tmp_path / "default-hf-cache"):
        yield server
    if server.is_down:
        server.set_down(False)
    assert not server.errors, server.errors


@pytest.fixture
def tiny(hub, tmp_path):
    """REPO with main = V1 (added from a folder) and v2 = V2 (added from a mapping)."""
    hub.add_repo(REPO, _write_folder(tmp_path / "src-v1", V1))
    hub.add_repo(REPO, V2, revision="v2")
    hub.clear_log()
    return hub


# ----------------------------------------------------------------------------------------------
# snapshot_download / hf_hub_download
# ----------------------------------------------------------------------------------------------


def test_snapshot_download_fetches_only_allowed_files_then_uses_the_cache(tiny, tmp_path):
    hub = tiny
    cache = tmp_path / "cache"
    allow = ["model_index.json", "unet/*"]

    path = Path(snapshot_download(REPO, allow_patterns=allow, cache_dir=cache))

    assert sorted(hub.downloads()) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert path.name == hub.commit_sha(REPO, "main")
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"):
        assert (path / rel).read_bytes() == V1[rel]
    assert not (path / "vae").exists() and not (path / "README.md").exists()
    assert hub.requests[0] == ("GET", f"/api/models/{REPO}/revision/main", None)
    assert any(r.path.startswith(f"/api/models/{REPO}/tree/") and "recursive=true" in r.path for r in hub.requests)

    # second identical call: one repo_info call, the tree comes from the on-disk cache, no file traffic
    hub.clear_log()
    assert Path(snapshot_download(REPO, allow_patterns=allow, cache_dir=cache)) == path
    assert hub.downloads() == []
    assert _resolve_requests(hub) == []
    assert [r.method for r in hub.requests] == ["GET"]

    # cache only: nothing reaches the server
    hub.clear_log()
    assert Path(snapshot_download(REPO, allow_patterns=allow, cache_dir=cache, local_files_only=True)) == path
    # without the same allow_patterns, huggingface_hub 2.4 reports the partial snapshot as incomplete
    # (IncompleteSnapshotError is a LocalEntryNotFoundError)
    with pytest.raises(IncompleteSnapshotError):
        snapshot_download(REPO, cache_dir=cache, local_files_only=True)
    with pytest.raises(LocalEntryNotFoundError):
        snapshot_download(REPO, allow_patterns=allow, cache_dir=tmp_path / "empty", local_files_only=True)
    assert hub.requests == []


def test_revisions_branches_shas_and_pr_refs(tiny, tmp_path):
    hub = tiny
    cache = tmp_path / "cache"
    sha1, sha2 = hub.commit_sha(REPO, "main"), hub.commit_sha(REPO, "v2")
    assert sha1 != sha2 and len(sha2) == 40 and int(sha2, 16) >= 0

    p2 = Path(snapshot_download(REPO, revision="v2", cache_dir=cache))
    assert p2.name == sha2
    assert (p2 / "model_index.json").read_bytes() == V2["model_index.json"]
    assert (p2 / "unet/extra.json").read_bytes() == V2["unet/extra.json"]
    assert sorted(hub.downloads()) == sorted(V2)

    p1 = Path(snapshot_download(REPO, cache_dir=cache))
    assert p1.name == sha1
    assert (p1 / "model_index.json").read_bytes() == V1["model_index.json"]
    assert not (p1 / "unet/extra.json").exists()

    # a full commit sha, and a unique sha prefix
    got = hf_hub_download(REPO, "model_index.json", revision=sha2, cache_dir=tmp_path / "c2")
    assert Path(got).read_bytes() == V2["model_index.json"]
    assert HfApi().model_info(REPO, revision=sha2[:10]).sha == sha2

    # a PR ref: the client URL-encodes it as refs%2Fpr%2F1
    pr = hub.add_repo(REPO, {**V1, "model_index.json": b'{"pr": 1}'}, revision="refs/pr/1")
    hub.clear_log()
    got = hf_hub_download(REPO, "model_index.json", revision="refs/pr/1", cache_dir=tmp_path / "c3")
    assert Path(got).read_bytes() == b'{"pr": 1}'
    assert any("/resolve/refs%2Fpr%2F1/" in r.path for r in hub.requests)
    assert Path(snapshot_download(REPO, revision="refs/pr/1", cache_dir=tmp_path / "c3")).name == pr
    assert HfApi().list_repo_refs(REPO, include_pull_requests=True).pull_requests[0].target_commit == pr

    # re-adding under "main" moves the branch (branch_alias too); old commits stay reachable by sha
    sha3 = hub.add_repo(REPO, {"model_index.json": b"{}"}, revision="v3", branch_alias="main")
    assert HfApi().model_info(REPO).sha == sha3
    assert HfApi().model_info(REPO, revision=sha1).sha == sha1
    refs = HfApi().list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": sha3, "v2": sha2, "v3": sha3}


def test_add_repo_snapshots_the_folder(hub, tmp_path):
    src = _write_folder(tmp_path / "src", {"a.json": b"one", "sub/b.txt": b"two"})
    sha = hub.add_repo("solo", src)  # a repo id without namespace works too
    (src / "a.json").write_bytes(b"changed")
    (src / "new.txt").write_bytes(b"new")
    info = HfApi().model_info("solo")
    assert info.sha == sha and sorted(s.rfilename for s in info.siblings) == ["a.json", "sub/b.txt"]
    got = hf_hub_download("solo", "a.json", cache_dir=tmp_path / "cache")
    assert Path(got).read_bytes() == b"one"
    # deterministic commit ids
    assert HubServer().add_repo("solo", {"a.json": b"one", "sub/b.txt": b"two"}) == sha


# ----------------------------------------------------------------------------------------------
# API endpoints
# ----------------------------------------------------------------------------------------------


def test_model_info_siblings_and_file_metadata(tiny):
    info = HfApi().model_info(REPO)
    assert isinstance(info, ModelInfo)
    assert info.id == REPO and info.sha == tiny.commit_sha(REPO)
    assert sorted(s.rfilename for s in info.siblings) == sorted(V1)
    assert info.private is False and info.gated is False and info.disabled is False
    assert info.last_modified is not None and isinstance(info.tags, list)

    # the module-level helpers are bound to huggingface_hub.hf_api.api (patched too)
    assert huggingface_hub.model_info(REPO, revision="v2").sha == tiny.commit_sha(REPO, "v2")

    detailed = {s.rfilename: s for s in HfApi().model_info(REPO, files_metadata=True).siblings}
    weights = detailed["unet/diffusion_pytorch_model.safetensors"]
    assert weights.size == len(V1["unet/diffusion_pytorch_model.safetensors"])
    assert weights.lfs.sha256 == hashlib.sha256(V1["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    config = detailed["unet/config.json"]
    assert config.lfs is None and config.blob_id == _git_blob_sha1(V1["unet/config.json"])


def test_list_repo_files_tree_pagination_and_paths_info(tiny):
    api = HfApi()
    assert api.list_repo_files(REPO) == sorted(V1)
    assert huggingface_hub.list_repo_files(REPO, revision="v2") == sorted(V2)

    top = {e.path: type(e) for e in api.list_repo_tree(REPO)}
    assert top == {
        "scheduler": RepoFolder,
        "unet": RepoFolder,
        "vae": RepoFolder,
        "README.md": RepoFile,
        "model_index.json": RepoFile,
    }
    unet = {e.path: e for e in api.list_repo_tree(REPO, path_in_repo="unet")}
    assert sorted(unet) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert unet["unet/diffusion_pytorch_model.safetensors"].lfs is not None
    assert unet["unet/config.json"].lfs is None
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, path_in_repo="nope"))

    # pagination (Link: rel="next"), as the Hub does every 1000 entries
    tiny.tree_page_size = 2
    try:
        tiny.clear_log()
        assert api.list_repo_files(REPO) == sorted(V1)
        # 7 files + 3 folders, 2 per page
        assert len([r for r in tiny.requests if "/tree/" in r.path]) == 5
    finally:
        tiny.tree_page_size = 1000

    infos = {e.path: e for e in api.get_paths_info(REPO, ["unet", "model_index.json", "missing"])}
    assert isinstance(infos["unet"], RepoFolder) and isinstance(infos["model_index.json"], RepoFile)
    assert "missing" not in infos


def test_resolve_headers_etags_and_ranges(tiny):
    sha = tiny.commit_sha(REPO)
    small = get_hf_file_metadata(hf_hub_url(REPO, "unet/config.json"))
    assert small.commit_hash == sha
    assert small.etag == _git_blob_sha1(V1["unet/config.json"])
    assert small.size == len(V1["unet/config.json"])
    big = get_hf_file_metadata(hf_hub_url(REPO, "unet/diffusion_pytorch_model.safetensors", revision="v2"))
    assert big.commit_hash == tiny.commit_sha(REPO, "v2")
    assert big.etag == hashlib.sha256(V1["unet/diffusion_pytorch_model.safetensors"]).hexdigest()
    assert big.xet_file_data is None  # no X-Xet-* headers: plain HTTP downloads
    assert tiny.downloads() == []

    url = hf_hub_url(REPO, "README.md")
    data = V1["README.md"]
    session = get_session()
    r = session.get(url, headers={"Range": "bytes=2-5"})
    assert r.status_code == 206 and r.content == data[2:6]
    assert r.headers["Content-Range"] == f"bytes 2-5/{len(data)}"
    assert r.headers["X-Repo-Commit"] == sha
    r = session.get(url, headers={"Range": "bytes=-3"})
    assert r.status_code == 206 and r.content == data[-3:]
    r = session.get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert tiny.range_reads() == [("README.md", "bytes=2-5"), ("README.md", "bytes=-3")]
    assert tiny.downloads() == []
    r = session.get(url)
    assert r.status_code == 200 and r.content == data
    assert tiny.downloads() == ["README.md"]


def test_errors_map_to_the_client_exceptions(tiny, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RemoteEntryNotFoundError) as err:
        hf_hub_download(REPO, "no/such/file.json", cache_dir=cache)
    assert isinstance(err.value, EntryNotFoundError) and not isinstance(err.value, LocalEntryNotFoundError)
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("org/missing", "model_index.json", cache_dir=cache)
    assert not isinstance(err.value, GatedRepoError)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "model_index.json", revision="v9", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="v9", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/missing", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="v9")
    assert HfApi().file_exists(REPO, "unet/config.json")
    assert not HfApi().file_exists(REPO, "unet/nope.json")
    assert not HfApi().repo_exists("org/missing")

    tiny.remove_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO)
    assert tiny.downloads() == []


def test_gated_repo(tiny, tmp_path):
    tiny.set_gated(REPO, tokens=["hf_allowed"])
    assert HfApi().model_info(REPO, token=False).gated == "manual"  # info stays public
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(REPO, "model_index.json", cache_dir=tmp_path / "c", token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(REPO, "model_index.json", cache_dir=tmp_path / "c", token="hf_wrong")
    assert err.value.response.status_code == 403
    got = hf_hub_download(REPO, "model_index.json", cache_dir=tmp_path / "c", token="hf_allowed")
    assert Path(got).read_bytes() == V1["model_index.json"]


# ----------------------------------------------------------------------------------------------
# safetensors metadata by range reads
# ----------------------------------------------------------------------------------------------


def test_safetensors_metadata_is_read_by_ranges_only(hub):
    big_header = st_save(
        {"w": np.zeros((3, 5), dtype=np.float32)}, metadata={"note": "x" * 150_000}
    )  # header > the 100 kB first read => a second range read
    hub.add_repo(
        "org/weights",
        {
            "model.safetensors": st_save(
                {"linear.weight": np.zeros((8, 4), dtype=np.float16), "linear.bias": np.zeros((8,), dtype=np.float32)}
            ),
            "unet/diffusion_pytorch_model.safetensors": big_header,
        },
    )
    hub.clear_log()

    meta = huggingface_hub.get_safetensors_metadata("org/weights")
    tensors = meta.files_metadata["model.safetensors"].tensors
    assert {k: (t.dtype, t.shape) for k, t in tensors.items()} == {
        "linear.weight": ("F16", [8, 4]),
        "linear.bias": ("F32", [8]),
    }
    assert hub.downloads() == []
    assert hub.range_reads() == [("model.safetensors", "bytes=0-100000")]

    hub.clear_log()
    info = HfApi().parse_safetensors_file_metadata("org/weights", "unet/diffusion_pytorch_model.safetensors")
    assert info.tensors["w"].shape == [3, 5] and info.tensors["w"].dtype == "F32"
    assert info.metadata["note"] == "x" * 150_000
    reads = hub.range_reads()
    assert [p for p, _ in reads] == ["unet/diffusion_pytorch_model.safetensors"] * 2
    assert reads[0][1] == "bytes=0-100000" and reads[1][1].startswith("bytes=8-")
    assert hub.downloads() == []


# ----------------------------------------------------------------------------------------------
# down / offline
# ----------------------------------------------------------------------------------------------


def _warm_cache(cache: Path) -> tuple[Path, Path]:
    snap = Path(snapshot_download(REPO, allow_patterns=["unet/*"], cache_dir=cache))
    single = Path(hf_hub_download(REPO, "model_index.json", cache_dir=cache))
    return snap, single


def test_down_refuse_connections_falls_back_to_the_cache(tiny, tmp_path):
    cache = tmp_path / "cache"
    snap, single = _warm_cache(cache)
    port, endpoint = tiny.port, tiny.endpoint
    tiny.set_down(True)  # mode="refuse"
    tiny.clear_log()
    assert tiny.is_down

    started = time.monotonic()
    assert Path(snapshot_download(REPO, allow_patterns=["unet/*"], cache_dir=cache)) == snap
    assert Path(hf_hub_download(REPO, "model_index.json", cache_dir=cache)) == single
    with pytest.raises(httpx2.ConnectError):
        HfApi().model_info(REPO)
    with pytest.raises(LocalEntryNotFoundError):  # not cached: fails fast (repo_info has no retry)
        snapshot_download(REPO, cache_dir=tmp_path / "other")
    assert time.monotonic() - started < 10
    assert tiny.requests == []  # nothing got through

    tiny.set_down(False)
    assert (tiny.port, tiny.endpoint) == (port, endpoint)
    assert HfApi().model_info(REPO).sha == tiny.commit_sha(REPO)


def test_down_503_falls_back_to_the_cache_but_api_calls_raise(tiny, tmp_path):
    cache = tmp_path / "cache"
    snap, single = _warm_cache(cache)
    tiny.set_down(True, mode="503")
    tiny.clear_log()

    assert Path(snapshot_download(REPO, allow_patterns=["unet/*"], cache_dir=cache)) == snap
    assert Path(hf_hub_download(REPO, "model_index.json", cache_dir=cache)) == single
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().model_info(REPO)
    assert err.value.response.status_code == 503
    assert [r.method for r in tiny.requests] == ["GET", "HEAD", "GET"]
    assert tiny.downloads() == []

    tiny.set_down(False)
    assert HfApi().model_info(REPO).sha == tiny.commit_sha(REPO)


# ----------------------------------------------------------------------------------------------
# LFS redirects to a "CDN" on another origin
# ----------------------------------------------------------------------------------------------


def test_lfs_files_redirect_to_a_cdn_origin(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubServer(lfs_redirect=True) as hub, hub.patch_huggingface_hub():
        hub.add_repo(REPO, V1)
        hub.set_gated(REPO, tokens=["hf_allowed"])
        assert hub.cdn_endpoint and hub.cdn_endpoint != hub.endpoint

        path = Path(snapshot_download(REPO, cache_dir=tmp_path / "c", token="hf_allowed"))
        for rel, data in V1.items():
            assert (path / rel).read_bytes() == data
        assert sorted(hub.downloads()) == sorted(V1)
        cdn_gets = [r for r in hub.requests if r.path.startswith("/repos/")]
        assert len(cdn_gets) == 2  # the two .safetensors files, fetched from the CDN

        meta = get_hf_file_metadata(hf_hub_url(REPO, "unet/diffusion_pytorch_model.safetensors"), token="hf_allowed")
        assert meta.location.startswith(hub.cdn_endpoint)
        assert meta.etag == hashlib.sha256(V1["unet/diffusion_pytorch_model.safetensors"]).hexdigest()

        hub.clear_log()
        info = HfApi().parse_safetensors_file_metadata(
            REPO, "unet/diffusion_pytorch_model.safetensors", token="hf_allowed"
        )
        assert info.tensors["conv_in.weight"].shape == [4, 3, 3, 3]
        assert hub.downloads() == [] and len(hub.range_reads()) == 1
        assert not hub.errors, hub.errors


# ----------------------------------------------------------------------------------------------
# the documented conftest wiring, in a fresh interpreter
# ----------------------------------------------------------------------------------------------

_SUBPROCESS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    sys.path.insert(0, sys.argv[1])
    assert "huggingface_hub" not in sys.modules

    from hubserver import HubServer                       # as in the conftest docstring
    tmp = tempfile.mkdtemp()
    hub = HubServer().start()
    os.environ["HF_ENDPOINT"] = hub.endpoint
    os.environ["HF_HOME"] = tmp
    os.environ["HF_HUB_CACHE"] = os.path.join(tmp, "hub")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ.pop("HF_HUB_OFFLINE", None)
    hub.add_repo("org/sub", {"model_index.json": b"{}", "unet/w.safetensors": b"0123"})

    from huggingface_hub import HfApi, constants, hf_hub_download, hf_hub_url
    path = hf_hub_download("org/sub", "unet/w.safetensors")   # no cache_dir: HF_HUB_CACHE
    out = {
        "const": constants.ENDPOINT,
        "cache_ok": path.startswith(os.environ["HF_HUB_CACHE"]),
        "content": open(path).read(),
        "downloads": hub.downloads(),
        "requests": [list(r) for r in hub.requests],
    }
    # HF_ENDPOINT is not re-read after the import (2.4.0): nothing follows the new value
    os.environ["HF_ENDPOINT"] = "http://changed.invalid"
    out["url_after"] = hf_hub_url("org/sub", "x")
    out["api_after"] = HfApi().endpoint
    out["endpoint"] = hub.endpoint
    hub.stop()
    print(json.dumps(out))
    """
)


def test_documented_conftest_pattern_in_subprocess(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT, str(HERE)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    endpoint = out["endpoint"]
    assert out["const"] == endpoint
    assert out["cache_ok"] and out["content"] == "0123"
    assert out["downloads"] == ["unet/w.safetensors"]
    assert out["requests"] == [
        ["HEAD", "/org/sub/resolve/main/unet/w.safetensors", None],
        ["GET", "/org/sub/resolve/main/unet/w.safetensors", None],
    ]
    assert out["url_after"].startswith(endpoint + "/org/sub/resolve/main/")
    assert out["api_after"] == endpoint
