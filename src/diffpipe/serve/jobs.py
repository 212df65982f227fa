"""The asynchronous job API: ``POST /jobs`` queues a generation and answers with its id at once,
``GET /jobs/{id}`` reports its state (queued; running with its step and a preview of its latents as
a small PNG; done with the images; failed; cancelled),
``DELETE /jobs/{id}`` cancels it (a queued job never starts; a running one stops between
steps). Finished jobs are kept for the most recent ``KEEP`` only.

(No ``from __future__ import annotations`` here: FastAPI reads the request model from the endpoint's
annotation, which must be the class itself, not a string naming a closure's variable.)"""

import itertools
import threading
import time
import uuid
from collections import OrderedDict

from fastapi import HTTPException

KEEP = 256


class JobRecord:
    def __init__(self, gen):
        self.id = uuid.uuid4().hex
        self.gen = gen
        self.created = int(time.time())
        self.future = None
        self.job = None  # the worker's Job while it runs

    def state(self) -> str:
        future = self.future
        if future.cancelled():
            return "cancelled"
        if not future.done():
            return "running" if self.job is not None else "queued"
        if future.exception() is not None:
            return "failed"
        return "done"


def register_jobs(app, server, request_model, generation_of) -> None:
    """Add the job endpoints to ``app``; ``generation_of(body)`` turns a request into a Generation."""
    from .preview import Previewer

    previewer = Previewer(server.pipe.vae) if getattr(server.pipe, "vae", None) is not None else None
    records: OrderedDict[str, JobRecord] = OrderedDict()
    lock = threading.Lock()

    def get(job_id: str) -> JobRecord:
        with lock:
            record = records.get(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for the last {KEEP} only)")
        return record

    @app.post("/jobs")
    def create_job(body: request_model):
        gen = generation_of(body)
        record = JobRecord(gen)

        def run(job):
            record.job = job
            try:
                return server.run(gen, job)
            finally:
                record.job = None

        record.future = server.submit(gen, run)
        with lock:
            records[record.id] = record
            for old in list(itertools.islice(records, max(0, len(records) - KEEP))):
                if records[old].future.done():
                    del records[old]
        return {"id": record.id, "state": record.state(), "created": record.created}

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str):
        record = get(job_id)
        state = record.state()
        out = {"id": record.id, "state": state, "created": record.created, "preview": None}
        total = record.gen.n * record.gen.steps
        if state == "running":
            job = record.job
            out.update(step=server.worker.progress()["state"]["sampling_step"], steps=total)
            if previewer is not None and job is not None and job.latents is not None:
                out["preview"] = previewer.png_base64(job.latents)
        elif state == "done":
            images = record.future.result()
            out.update(steps=total, images=[b64 for b64, _, _ in images], seeds=[s for _, s, _ in images])
        elif state == "failed":
            out["error"] = " ".join(str(record.future.exception()).split())
        return out

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        record = get(job_id)
        if server.worker.cancel(record.future):
            return {"id": record.id, "state": "cancelled" if record.future.cancelled() else "cancelling"}
        return {"id": record.id, "state": record.state()}
