"""diffpipe batch on Ray Data at the scale the issue names: 50 prompts on 2 workers equal the in-process run
pixel for pixel; a worker killed mid-run, then a rerun, gives every row exactly once; a rerun after
completion does nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sd_factory import save_reference_pipeline

from diffpipe.batch import run_batch

ROWS = [{"id": f"row{i:02d}", "prompt": f"prompt {i}", "seed": i, "steps": 3, "size": "32x32"} for i in range(50)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_reference_pipeline(tmp_path_factory.mktemp("ray50") / "sd", safety_checker=False))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def in_process(model, prompts, tmp_path_factory):
    """The oracle: the same rows, one process, no Ray, one torch thread as each Ray worker has."""
    out = tmp_path_factory.mktemp("local")
    assert run_batch(prompts, model=model, out_dir=out, threads=1, say=lambda *a: None) == 0
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fifty_prompts_on_two_ray_workers_equal_the_in_process_run(model, prompts, in_process, tmp_path):
    lines = []
    assert run_batch(prompts, model=model, out_dir=tmp_path, ray_address="local", workers=2, say=lines.append) == 0
    assert lines[-1] == "50 written, 0 skipped, 0 failed"
    assert len(in_process) == 50
    assert files(tmp_path) == in_process  # byte for byte, and nothing else in the folder


def _runner_processes() -> list[psutil.Process]:
    """Ray's actor processes holding a PipelineRunner (their title names the class)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "PipelineRunner" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_a_worker_killed_mid_run_then_a_rerun_gives_every_row_once(model, prompts, in_process, tmp_path):
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "diffpipe.cli", "batch", str(prompts), "--model", model, "--out", str(out)]
    first = subprocess.Popen([*cli, "--ray-address", "local", "--workers", "2"], stdout=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 180
        while not (out.exists() and len(list(out.glob("*.png"))) >= 3):
            assert first.poll() is None and time.monotonic() < end, "the batch ended or stalled before any output"
            time.sleep(0.02)
        victims = _runner_processes()
        assert len(victims) == 2, [p.info["cmdline"] for p in victims]
        os.kill(victims[0].pid, signal.SIGKILL)
        done_mid_run = len(list(out.glob("*.png")))
        assert done_mid_run < 50, "the run ended before the kill"
        first_output, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # Ray restarts the actor and retries its rows, or the run fails: either way the rerun completes it.
    second = subprocess.run([*cli, "--ray-address", "local", "--workers", "2"], capture_output=True, text=True)
    assert second.returncode == 0, second.stdout + second.stderr

    assert files(out) == in_process  # every row once, no temporary or partial file left

    def ids(text: str, status: str) -> list[str]:
        return [line.split()[1] for line in text.splitlines() if line.startswith(status + " ")]

    written = ids(first_output, "written") + ids(second.stdout, "written")
    assert len(written) == len(set(written)), "a row was written twice"
    assert set(written) | set(ids(second.stdout, "skipped")) == {row["id"] for row in ROWS}

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    third = subprocess.run(cli, capture_output=True, text=True)  # in-process this time: nothing left to do
    assert third.returncode == 0 and third.stdout.splitlines()[-1] == "0 written, 50 skipped, 0 failed"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
