"""diffpipe batch: one PNG per JSONL row, resumable, order-independent, in-process and on Ray Data."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sd_factory import save_reference_pipeline

from diffpipe.batch import PipelineRunner, row_id, run_batch, run_in_process
from diffpipe.cli import main

ROWS = [
    {"id": "cat", "prompt": "a cat", "seed": 1, "steps": 2, "size": "32x32"},
    {"prompt": "a dog", "negative_prompt": "blurry", "steps": 2, "size": 32, "guidance_scale": 3.0},
    {"id": "fox", "prompt": "a fox", "seed": 7, "steps": 2, "size": "32x32", "guidance_scale": 1.0},
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_reference_pipeline(tmp_path_factory.mktemp("batch") / "sd", safety_checker=False))


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in extra_lines))
    return path


def run(path, model, out):
    return list(run_in_process(path, PipelineRunner(model, out_dir=out)))


def pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_in_process_writes_one_png_per_row_then_a_rerun_skips_all(model, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out"
    results = run(prompts, model, out)
    dog = row_id(ROWS[1])
    assert [r["status"] for r in results] == ["written"] * 3
    assert [r["id"] for r in results] == ["cat", dog, "fox"]
    first = pngs(out)
    assert sorted(first) == sorted(["cat.png", f"{dog}.png", "fox.png"])
    assert not [p for p in out.iterdir() if p.suffix != ".png"]  # no temporary files left
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run(prompts, model, out)
    assert [r["status"] for r in again] == ["skipped"] * 3
    assert pngs(out) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_a_rows_image_depends_only_on_the_row(model, tmp_path):
    runner_out = tmp_path / "all"
    batch = write_jsonl(tmp_path / "all.jsonl", ROWS)
    run(batch, model, runner_out)
    reversed_out = tmp_path / "reversed"
    run(write_jsonl(tmp_path / "rev.jsonl", ROWS[::-1]), model, reversed_out)
    alone = tmp_path / "alone"
    runner = PipelineRunner(model, out_dir=alone)
    for i, row in enumerate(ROWS):
        list(run_in_process(write_jsonl(tmp_path / f"one{i}.jsonl", [row]), runner))
    # and three rows in one Ray-style batch (columns), as map_batches with batch_size=3 would give them
    import numpy as np

    three = tmp_path / "three"
    columns = {k: np.array([r.get(k) for r in ROWS], dtype=object) for k in {k for r in ROWS for k in r}}
    result = PipelineRunner(model, out_dir=three)(columns)
    assert list(result["status"]) == ["written"] * 3
    assert pngs(runner_out) == pngs(reversed_out) == pngs(alone) == pngs(three)
    assert len(set(pngs(runner_out).values())) == 3  # different rows, different images


def test_bad_rows_are_reported_and_the_others_written(model, tmp_path, capsys):
    bad = [
        {"id": "noprompt", "seed": 1},
        {"id": "badsize", "prompt": "x", "size": "32xbig"},
        {"id": "odd", "prompt": "x", "size": 30},
        {"id": "../escape", "prompt": "x"},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", [ROWS[0], *bad, ROWS[2]], extra_lines=["{not json", "[1, 2]"])
    out = tmp_path / "out"
    code = run_batch(prompts, model=model, out_dir=out)
    lines = capsys.readouterr().out.splitlines()
    assert code == 1
    assert sorted(pngs(out)) == ["cat.png", "fox.png"]
    failed = [line for line in lines if line.startswith("failed")]
    assert len(failed) == 6
    assert any("noprompt" in line and "prompt" in line for line in failed)
    assert any("badsize" in line and "size must be" in line for line in failed)
    assert any("odd" in line and "multiples of 8" in line for line in failed)
    assert any("not a safe file name" in line for line in failed)
    assert any("invalid JSON" in line for line in failed)
    assert any("must be a JSON object" in line for line in failed)
    assert lines[-1] == "2 written, 0 skipped, 6 failed"


def test_derived_ids_are_stable():
    row = {"prompt": "a dog", "steps": 2, "size": 32}
    rid = row_id(row)
    assert len(rid) == 16 and int(rid, 16) >= 0
    assert row_id(dict(reversed(list(row.items())))) == rid  # key order does not matter
    assert row_id({**row, "seed": None, "id": ""}) == rid  # missing values do not matter
    assert row_id({**row, "steps": 2.0}) == rid  # a Ray float column gives the same id
    assert row_id({**row, "steps": 3}) != rid
    assert row_id({**row, "id": "mine"}) == "mine"
    # pinned: the id is the first 16 hex chars of sha256 of the canonical JSON
    assert rid == __import__("hashlib").sha256(b'{"prompt":"a dog","size":32,"steps":2}').hexdigest()[:16]


def test_cli_exit_codes(model, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a cat", "seed": 1}])
    out = tmp_path / "out"
    args = ["batch", str(good), "--model", model, "--out", str(out), "--steps", "2", "--size", "32x32"]
    assert main(args) == 0
    assert main(args) == 0  # rerun: skipped
    assert "0 written, 1 skipped, 0 failed" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a cat", "seed": 1}, {"seed": 2}])
    assert main(["batch", str(bad), "--model", model, "--out", str(out), "--steps", "2", "--size", "32"]) == 1
    assert main(["batch", str(tmp_path / "missing.jsonl"), "--model", model, "--out", str(out)]) == 1
    assert "no such prompts file" in capsys.readouterr().err
    assert main(["batch", str(good), "--model", model, "--out", str(out), "--size", "big"]) == 1
    assert "size must be" in capsys.readouterr().err


def test_importing_diffpipe_does_not_import_ray():
    code = "import sys, diffpipe, diffpipe.batch, diffpipe.cli; print('ray' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_ray_data_gives_the_same_pngs_as_in_process(model, tmp_path):
    import ray

    rows = [*ROWS, {"id": "bad", "prompt": "x", "size": "nope"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    local = tmp_path / "local"
    assert run_batch(prompts, model=model, out_dir=local, say=lambda *a: None) == 1

    lines = []
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        code = run_batch(prompts, model=model, out_dir=tmp_path / "ray", ray_address="auto", say=lines.append)
    finally:
        ray.shutdown()
    assert code == 1
    assert lines[-1] == "3 written, 0 skipped, 1 failed"
    assert pngs(tmp_path / "ray") == pngs(local)
