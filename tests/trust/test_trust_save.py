"""Trustworthy loading, saves and caches (issue 11): a save that fails midway (a really full disk)
leaves the previous save loadable and no temporary files; processes loading and saving one folder at
once never see a mix; an offline load with an empty cache fails fast with no request; a read-only
cache serves loads and is never written to, checked as root (file tree and mtimes) and as an
unprivileged user.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch

from diffpipe import DiffusionPipeline
from diffpipe.errors import CheckpointNotFoundError
from diffpipe.io.atomic import folder_lock

from factories import TinyModel, same_weights, tiny_model
from trust_shared import sd_pipeline_folder

TESTS = Path(__file__).resolve().parents[1]  # tests/, where the helpers are


def tree(root: Path) -> dict:
    """Every path under ``root`` with its type, size, mode, mtime and (for files) bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
        out[path.relative_to(root).as_posix()] = (stat.S_IFMT(st.st_mode), st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out


def leftovers(*folders: Path) -> list[str]:
    """Staging folders or temporary files a save may have left in or beside its target."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            if "staging" in path.name or path.name.endswith(".tmp"):
                found.append(str(path))
    return found


# ---------------------------------------------------------------------- 22. a save that fails midway
@pytest.fixture
def small_disk(tmp_path):
    """(mount point, size in KiB) of a real tmpfs mounted for the test, or (None, 0) when this
    sandbox refuses mounts."""
    mounts = []

    def mount(kib: int) -> Path | None:
        point = tmp_path / f"disk-{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            return None
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


def partial_write_then_enospc(tensors, path, metadata=None):
    """What a full disk does to a writer: part of the file lands, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pickle"])
def test_a_model_save_on_a_full_disk_keeps_the_previous_save(small_disk, tmp_path, monkeypatch, safe):
    """A real full disk: a 96 KiB tmpfs, a 132 KB model saved over a 1 KB one, into a folder on the
    disk and into the mount point itself (where the staging folder cannot sit beside the target).
    If this sandbox refuses to mount, ENOSPC is emulated instead: the weights writer is patched to
    write part of the file and raise OSError(ENOSPC)."""
    import diffpipe.models.modeling as modeling

    disk = small_disk(96)
    emulated = disk is None
    print("full disk:", "emulated (mount refused)" if emulated else "a real 96 KiB tmpfs")
    if emulated:
        disk = tmp_path / "emulated-disk"
    for target in (disk / "model", disk):
        before = tiny_model(seed=0)
        before.save_pretrained(target, safe_serialization=safe)
        saved = tree(target)
        with monkeypatch.context() as patch, pytest.raises(OSError) as err:
            if emulated:
                patch.setattr(
                    modeling,
                    "save_safetensors" if safe else "save_pickle",
                    lambda tensors, path, metadata=None: partial_write_then_enospc(tensors, path),
                )
            tiny_model(seed=1, width=128).save_pretrained(target, safe_serialization=safe)
        assert err.value.errno == errno.ENOSPC
        assert tree(target) == saved  # nothing written, nothing lost
        assert leftovers(disk, disk.parent) == []
        assert same_weights(TinyModel.from_pretrained(target), before)


@pytest.fixture(scope="module")
def sd_folder():
    return sd_pipeline_folder()


def test_a_pipeline_save_on_a_full_disk_keeps_the_previous_save(small_disk, sd_folder, tmp_path, monkeypatch):
    """A tmpfs with room for one copy of the pipeline but not two: the second save runs out of space
    in whichever component it reaches (our models, or a transformers model or tokenizer, whose
    writers report it as a bare Exception) and must end in OSError(ENOSPC). If mounting is refused,
    the safetensors writer is patched to write part of a file and raise OSError(ENOSPC)."""
    pipe = DiffusionPipeline.from_pretrained(sd_folder)
    disk = small_disk(1200)
    emulated = disk is None
    print("full disk:", "emulated (mount refused)" if emulated else "a real 1200 KiB tmpfs")
    if emulated:
        disk = tmp_path / "emulated-disk"
    pipe.save_pretrained(disk / "p")
    if emulated:
        import diffpipe.models.modeling as modeling

        monkeypatch.setattr(modeling, "save_safetensors", partial_write_then_enospc)
    saved = tree(disk / "p")
    with pytest.raises(OSError) as err:
        pipe.save_pretrained(disk / "p")
    assert err.value.errno == errno.ENOSPC
    assert tree(disk / "p") == saved and leftovers(disk, disk.parent) == []
    again = DiffusionPipeline.from_pretrained(disk / "p")
    assert same_weights(again.unet, pipe.unet) and same_weights(again.text_encoder, pipe.text_encoder)


# ------------------------------------------------------------ 23. processes loading and saving at once
SEEDS = {"start": 0, "writer-a": 1, "writer-b": 2}
SHARD = 600  # bytes: a width-16 TinyModel becomes several shards, so a mixed read would show


def _child(role: str, folder: str, rounds: int, errors) -> None:
    try:
        torch.set_num_threads(1)
        if role.startswith("writer"):
            model = tiny_model(seed=SEEDS[role], width=16)
            for _ in range(rounds):
                model.save_pretrained(folder, max_shard_size=SHARD)
        else:
            candidates = [tiny_model(seed=s, width=16) for s in SEEDS.values()]
            for _ in range(rounds):
                loaded = TinyModel.from_pretrained(folder)
                if not any(same_weights(loaded, c) for c in candidates):
                    raise AssertionError("a load returned weights that no single save wrote")
    except BaseException:
        errors.put(f"{role}: {traceback.format_exc()}")
        errors.close()
        errors.join_thread()  # flush before os._exit, which skips the queue's own clean-up
        os._exit(1)
    os._exit(0)


def test_processes_loading_and_saving_one_folder_never_see_a_mix(tmp_path):
    folder = tmp_path / "shared"
    tiny_model(seed=SEEDS["start"], width=16).save_pretrained(folder, max_shard_size=SHARD)
    expected = {}
    for role in ("writer-a", "writer-b"):  # what each writer's save looks like on its own
        tiny_model(seed=SEEDS[role], width=16).save_pretrained(tmp_path / role, max_shard_size=SHARD)
        expected[role] = tree(tmp_path / role)
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(role, str(folder), rounds, errors))
        for role, rounds in (("writer-a", 6), ("writer-b", 6), ("reader-1", 12), ("reader-2", 12))
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], messages
    final = {k: v[4] for k, v in tree(folder).items()}
    assert final in [{k: v[4] for k, v in t.items()} for t in expected.values()]  # exactly one writer's files
    assert leftovers(tmp_path) == []


def test_a_subfolder_load_waits_for_a_save_into_the_root(tmp_path):
    """A pipeline save into ``root`` holds root's lock while it moves files; a model loading
    ``root/unet`` must wait for it, or it could read the old config with the new weights."""
    tiny_model().save_pretrained(tmp_path / "unet")
    result = {}

    def load():
        result["model"] = TinyModel.from_pretrained(tmp_path, subfolder="unet")

    with folder_lock(tmp_path, shared=False):  # a save committing into the root
        reader = threading.Thread(target=load)
        reader.start()
        reader.join(0.5)
        assert reader.is_alive(), "the load did not wait for the save into the root"
    reader.join(30)
    assert same_weights(result["model"], tiny_model())


# ------------------------------------------------------------------ 24. offline, read-only caches
def pipeline_repo(hub, sd_folder, name):
    hub.add_repo(name, sd_folder)
    return name


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only", "hub down"])
def test_offline_with_an_empty_cache_fails_fast_without_network(hub, sd_folder, hf_cache, monkeypatch, how):
    repo = pipeline_repo(hub, sd_folder, "trust/offline-empty")
    kwargs = {}
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "local_files_only":
        kwargs["local_files_only"] = True
    else:
        hub.set_down(True)
    hub.clear_log()
    start = time.monotonic()
    with pytest.raises(CheckpointNotFoundError) as err:
        DiffusionPipeline.from_pretrained(repo, **kwargs)
    assert time.monotonic() - start < 3
    assert repo in str(err.value) and "not in the local cache" in str(err.value)
    assert hub.requests == [] and not hf_cache.exists()


@pytest.fixture
def shared_cache(monkeypatch):
    """A cache in a folder any user can read (pytest's tmp folders are root-only), made read-only
    by the test; restored to writable and removed afterwards."""
    import huggingface_hub.constants as constants

    base = Path(tempfile.mkdtemp(prefix="diffpipe-ro-cache-"))
    base.chmod(0o755)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(base / "hub"))
    yield base / "hub"
    for path in [base, *base.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    shutil.rmtree(base)


def make_read_only(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o555 if path.is_dir() else 0o444)


UNPRIVILEGED_LOAD = textwrap.dedent("""
    import json, os, sys
    import torch
    from factories import TinyModel, same_weights, tiny_model
    repo, cache, warm = sys.argv[1], sys.argv[2], sys.argv[3]
    import huggingface_hub.constants as constants
    # the first load, as root into a scratch cache, imports every module a load needs: after
    # setuid this user cannot read the interpreter's own library folder under /root
    constants.HF_HUB_CACHE = warm
    TinyModel.from_pretrained(repo)
    TinyModel.from_pretrained(repo, local_files_only=True)
    constants.HF_HUB_CACHE = cache
    os.setgid(65534)
    os.setuid(65534)
    assert os.geteuid() == 65534
    try:
        open(os.path.join(cache, "probe"), "w")
    except PermissionError:
        pass
    else:
        raise SystemExit("the cache is writable for this user")
    online = TinyModel.from_pretrained(repo)
    offline = TinyModel.from_pretrained(repo, local_files_only=True)
    assert same_weights(online, tiny_model(seed=5)) and same_weights(offline, tiny_model(seed=5))
    print("UNPRIVILEGED-OK")
""")


def test_a_read_only_cache_serves_loads_and_is_never_written(hub, shared_cache, tmp_path, monkeypatch):
    folder = tmp_path / "repo"
    tiny_model(seed=5).save_pretrained(folder)
    repo = "trust/read-only-cache"
    hub.add_repo(repo, folder)
    TinyModel.from_pretrained(repo)  # fills the cache
    make_read_only(shared_cache)
    before = tree(shared_cache)
    time.sleep(0.01)  # so that a rewrite would show in the mtimes
    # as root (chmod does not stop root's writes: the tree and mtimes are compared instead)
    assert same_weights(TinyModel.from_pretrained(repo), tiny_model(seed=5))
    assert same_weights(TinyModel.from_pretrained(repo, local_files_only=True), tiny_model(seed=5))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert same_weights(TinyModel.from_pretrained(repo), tiny_model(seed=5))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert tree(shared_cache) == before
    # as an unprivileged user, for whom the cache really is read-only
    warm = tempfile.mkdtemp(prefix="diffpipe-warm-cache-")
    os.chmod(warm, 0o777)
    try:
        env = {**os.environ, "PYTHONPATH": str(TESTS), "HOME": warm, "HF_HOME": warm}
        done = subprocess.run(
            [sys.executable, "-c", UNPRIVILEGED_LOAD, repo, str(shared_cache), warm],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        shutil.rmtree(warm)
    assert "UNPRIVILEGED-OK" in done.stdout, done.stdout + done.stderr
    assert tree(shared_cache) == before
