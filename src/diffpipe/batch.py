"""Offline batch generation: one PNG per JSONL row, resumable, in-process or on Ray Data.

Each row is ``{"prompt": ..., "seed"?, "negative_prompt"?, "steps"?, "size"?, "guidance_scale"?, "id"?}``.
The image of a row depends only on the row: one pipeline call per row with its own
``torch.Generator().manual_seed(seed)``, the seed given or derived from the row's id, so neither the
batch order, the worker nor the batch size changes it. (Pixel for pixel on workers of one kind with the
same torch thread count, ``threads``: a different count sums in another order, which can move a
channel of a rare pixel by 1/255.) Outputs are ``OUT/<id>.png``, written through a
temporary file and a rename; a rerun skips rows whose PNG exists.

``PipelineRunner`` is the Ray Data callable class (``map_batches(PipelineRunner, ...)``); the in-process
mode runs the rows through the same class. Ray is imported only when the Ray path runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .images import parse_image_size
from .io.atomic import atomic_write_bytes

FIELDS = ("id", "prompt", "seed", "negative_prompt", "steps", "size", "guidance_scale")
RESULT_COLUMNS = ("id", "status", "path", "error")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# ------------------------------------------------------------------------------------ rows
def _plain(value: Any) -> Any:
    """A JSON value as Python gives it, whatever column type it came through (numpy scalars, NaN for a
    missing number in a Ray column, integral floats)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return int(value)
    return value


def normalize_row(row: dict) -> dict:
    """The row without missing values (None/NaN), in plain Python types: the form ids are derived from."""
    out = {}
    for key, value in row.items():
        value = _plain(value)
        if value is not None:
            out[str(key)] = value
    return out


def row_id(row: dict) -> str:
    """The row's ``id``, or a stable one from its content: 16 hex chars of the sha256 of its canonical
    JSON (sorted keys, no spaces, missing values dropped)."""
    row = normalize_row(row)
    given = row.get("id")
    if given is not None and str(given) != "":
        given = str(given)
        if not _SAFE_ID.match(given):
            raise ValueError(f"id {given!r} is not a safe file name (letters, digits, '.', '_', '-')")
        return given
    row.pop("id", None)
    canonical = json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def row_seed(row: dict, rid: str) -> int:
    """The row's seed, or one derived from its id (the first 8 bytes of sha256(id), below 2**63)."""
    seed = _plain(row.get("seed"))
    if seed is None:
        return int(hashlib.sha256(rid.encode("utf-8")).hexdigest()[:16], 16) & (2**63 - 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return seed


def parse_size(value: Any) -> tuple[int, int]:
    """``"WxH"``, ``"N"`` or ``N`` -> (height, width), both positive multiples of 8."""
    value = _plain(value)
    h, w = parse_image_size(value)
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise ValueError(f"size {value!r}: width and height must be positive multiples of 8")
    return h, w


def _batch_rows(batch: dict) -> list[dict]:
    """Ray Data's column dict -> a list of row dicts. A ``text`` column (``read_text``) holds raw JSON lines."""
    columns = {k: list(v) for k, v in batch.items()}
    n = len(next(iter(columns.values()))) if columns else 0
    rows = [{k: columns[k][i] for k in columns} for i in range(n)]
    if "text" in columns and "prompt" not in columns:
        return [_parse_line(str(r["text"])) for r in rows]
    return rows


def _parse_line(line: str) -> dict:
    """A JSONL line -> its row; a line that is not a JSON object -> a row that fails with the reason."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        row = {"__error__": f"invalid JSON: {e}"}
    if not isinstance(row, dict):
        row = {"__error__": f"a row must be a JSON object, got {type(row).__name__}"}
    if "__error__" in row:
        row["__line__"] = line
    return row


def read_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield _parse_line(line.strip())


# ------------------------------------------------------------------------------------ runner
class PipelineRunner:
    """Holds one loaded pipeline and generates the rows of a batch, writing ``out_dir/<id>.png``.

    ``PipelineRunner(model, out_dir=..., steps=None, size=None, guidance_scale=None, threads=None,
    **load_kwargs)``: ``load_kwargs`` go to ``DiffusionPipeline.from_pretrained``; ``steps``/``size``/
    ``guidance_scale`` are the defaults for rows that do not give them; ``threads`` sets torch's thread
    count in this process (None leaves it). Called with a Ray Data batch (a dict of column
    arrays), it returns the batch with ``id``, ``status`` (written/skipped/failed), ``path`` and ``error``.
    """

    def __init__(
        self,
        model: str,
        *,
        out_dir: str | Path,
        steps: int | None = None,
        size: str | int | None = None,
        guidance_scale: float | None = None,
        threads: int | None = None,
        **load_kwargs,
    ):
        import torch

        from . import DiffusionPipeline

        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.steps = steps
        self.size = parse_size(size) if size is not None else None
        self.guidance_scale = guidance_scale
        self.pipe = DiffusionPipeline.from_pretrained(model, **load_kwargs)
        self.pipe.set_progress_bar_config(disable=True)

    def run_row(self, row: dict) -> dict:
        """Generate one row (or skip it); never raises for a bad row."""
        rid = ""
        try:
            if "__error__" in row:
                rid = hashlib.sha256(str(row.get("__line__", "")).encode("utf-8")).hexdigest()[:16]
                raise ValueError(row["__error__"])
            rid = row_id(row)
            path = self.out_dir / f"{rid}.png"
            if path.exists():
                return {"id": rid, "status": "skipped", "path": str(path), "error": ""}
            image = self.generate(row, rid)
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(path, buf.getvalue())
            return {"id": rid, "status": "written", "path": str(path), "error": ""}
        except Exception as e:  # a bad row is reported, the others go on
            message = " ".join(str(e).split()) or type(e).__name__
            return {"id": rid, "status": "failed", "path": "", "error": message}

    def generate(self, row: dict, rid: str):
        import torch

        row = normalize_row(row)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("missing or empty 'prompt'")
        unknown = sorted(set(row) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(FIELDS)}")
        call: dict[str, Any] = {"prompt": prompt}
        negative = row.get("negative_prompt")
        if negative is not None:
            if not isinstance(negative, str):
                raise ValueError(f"negative_prompt must be a string, got {negative!r}")
            call["negative_prompt"] = negative
        steps = row.get("steps", self.steps)
        if steps is not None:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive integer, got {steps!r}")
            call["num_inference_steps"] = steps
        size = parse_size(row["size"]) if "size" in row else self.size
        if size is not None:
            call["height"], call["width"] = size
        guidance = row.get("guidance_scale", self.guidance_scale)
        if guidance is not None:
            if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
                raise ValueError(f"guidance_scale must be a number, got {guidance!r}")
            call["guidance_scale"] = float(guidance)
        call["generator"] = torch.Generator().manual_seed(row_seed(row, rid))
        return self.pipe(**call).images[0]

    def __call__(self, batch: dict) -> dict:
        results = [self.run_row(row) for row in _batch_rows(batch)]
        out = {k: v for k, v in batch.items() if k not in RESULT_COLUMNS}
        for column in RESULT_COLUMNS:
            out[column] = np.array([r[column] for r in results], dtype=object)
        return out


# ------------------------------------------------------------------------------------ drivers
def _one_row_batch(row: dict) -> dict:
    return {k: np.array([v], dtype=object) for k, v in row.items()} or {"prompt": np.array([None], dtype=object)}


def run_in_process(path: str | Path, runner: PipelineRunner) -> Iterator[dict]:
    """Each row of the file through ``runner``, one at a time, as the Ray path does with batch_size=1."""
    for row in read_rows(path):
        if "__error__" in row:  # keep the raw line: the same id as the Ray path gives it
            batch = {"text": np.array([row["__line__"]], dtype=object)}
        else:
            batch = _one_row_batch(row)
        out = runner(batch)
        yield {column: str(out[column][0]) for column in RESULT_COLUMNS}


def run_on_ray(
    path: str | Path,
    *,
    model: str,
    out_dir: str | Path,
    address: str,
    workers: int = 1,
    threads: int = 1,
    runner_kwargs: dict | None = None,
) -> list[dict]:
    """``ray.data.read_text(path).map_batches(PipelineRunner, ...)`` on the cluster at ``address``
    (``"local"`` starts one here), ``workers`` actors of ``threads`` CPUs each; returns the per-row results.

    The rows travel as raw JSON lines (``read_text``) rather than ``read_json``'s Arrow columns: Arrow
    would refuse a file whose ``size`` is sometimes ``"WxH"`` and sometimes ``N``, turn a missing seed
    into NaN in a float column, and fail the whole read on one malformed line."""
    import ray

    runner_kwargs = runner_kwargs or {}
    started = False
    if not ray.is_initialized():
        if address == "local":  # a cluster of this machine alone: it talks over loopback only
            ray.init(num_cpus=max(1, workers) * threads, include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            ray.init(address=address)
        started = True
    try:
        # The read is cheap: it takes no CPU, so pipeline actors filling the cluster cannot starve it.
        ds = ray.data.read_text(str(Path(path).resolve()), num_cpus=0)
        ds = ds.map_batches(
            PipelineRunner,
            fn_constructor_args=(model,),
            fn_constructor_kwargs={"out_dir": str(Path(out_dir).resolve()), "threads": threads, **runner_kwargs},
            compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
            num_cpus=threads,
            batch_size=1,
            batch_format="numpy",
        )
        return [{column: str(r[column]) for column in RESULT_COLUMNS} for r in ds.take_all()]
    finally:
        if started:
            ray.shutdown()


def report(results, say=print) -> dict[str, int]:
    """A line per row and a summary line; returns the counts."""
    counts = {"written": 0, "skipped": 0, "failed": 0}
    for r in results:
        counts[r["status"]] += 1
        if r["status"] == "failed":
            say(f"failed  {r['id'] or '?'}: {r['error']}")
        else:
            say(f"{r['status']:<7} {r['id']} {r['path']}")
    say(f"{counts['written']} written, {counts['skipped']} skipped, {counts['failed']} failed")
    return counts


def run_batch(
    path: str | Path,
    *,
    model: str,
    out_dir: str | Path,
    ray_address: str | None = None,
    workers: int = 1,
    threads: int | None = None,
    steps: int | None = None,
    size: str | None = None,
    say=print,
    **load_kwargs,
) -> int:
    """The ``diffpipe batch`` command: 0 when no row failed, 1 otherwise. ``threads``: torch threads per
    worker (in-process: torch's default when None; on Ray: 1 when None, the CPUs each actor reserves)."""
    if size is not None:
        parse_size(size)  # a bad --size fails before any model loads
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such prompts file: {path}")
    kwargs = {"steps": steps, "size": size, **load_kwargs}
    if ray_address:
        results = run_on_ray(
            path,
            model=model,
            out_dir=out_dir,
            address=ray_address,
            workers=workers,
            threads=threads or 1,
            runner_kwargs=kwargs,
        )
        counts = report(results, say)
    else:
        import torch

        before = torch.get_num_threads()  # the runner sets this process's count: give the caller's back
        try:
            runner = PipelineRunner(model, out_dir=out_dir, threads=threads, **kwargs)
            counts = report(run_in_process(path, runner), say)
        finally:
            torch.set_num_threads(before)
    return 1 if counts["failed"] else 0
