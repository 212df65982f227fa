"""The asynchronous job API: ``POST /jobs`` queues a generation and answers with its id at once,
``GET /jobs/{id}`` reports its state (queued; running with its step and a preview of its latents as
a small PNG; done with the images; failed; cancelled),
``DELETE /jobs/{id}`` cancels it (a queued job never starts; a running one stops between
steps). Finished jobs are kept for the most recent ``KEEP`` only.

(No ``from __future__ import annotations`` here: FastAPI reads the request model from the endpoint's
annotation, which must be the class itself, not a string naming a closure's variable.)"""

import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict

from fastapi import HTTPException

KEEP = 256
logger = logging.getLogger(__name__)


class JobRecord:
    def __init__(self, gen):
        self.id = uuid.uuid4().hex
        self.gen = gen
        self.created = int(time.time())
        self.future = None
        self.job = None  # the worker's Job while it runs
        self.cancel_requested = False  # a running job stopped by DELETE ends "cancelled", not "done"

    def state(self) -> str:
        future = self.future
        if future.cancelled() or (future.done() and self.cancel_requested):
            return "cancelled"
        if not future.done():
            return "running" if self.job is not None else "queued"
        if future.exception() is not None:
            return "failed"
        return "done"


def register_jobs(app, server, request_model, generation_of, book=None) -> None:
    """Add the job endpoints to ``app``; ``generation_of(body)`` turns a request into a Generation.

    ``book`` (optional) shares job statuses between the replicas of one deployment (see
    :mod:`diffpipe.distributed`). Then every replica answers ``GET /jobs/{id}`` from the book, so all
    of them tell one story: the replica that runs a job publishes it when queued, every ``PUBLISH_S``
    while it runs, and the moment it ends; it also takes the cancellations other replicas asked for."""
    from .preview import Previewer

    previewer = Previewer(server.pipe.vae) if getattr(server.pipe, "vae", None) is not None else None
    records: OrderedDict[str, JobRecord] = OrderedDict()
    lock = threading.Lock()
    publisher = None  # set below, once status_of exists

    def find(job_id: str) -> JobRecord | None:
        with lock:
            return records.get(job_id)

    def missing(job_id: str) -> HTTPException:
        return HTTPException(404, f"no job {job_id!r} (finished jobs are kept for the last {KEEP} only)")

    def status_of(record: JobRecord) -> dict:
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
        if book is not None:
            book.publish(record.id, status_of(record))  # queued: before the publisher knows of it
            publisher.watch(record)
        return {"id": record.id, "state": record.state(), "created": record.created}

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str):
        if book is not None:
            status = book.fetch(job_id)
        else:
            record = find(job_id)
            status = status_of(record) if record is not None else None
        if status is None:
            raise missing(job_id)
        return status

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        record = find(job_id)
        if record is None:
            if book is not None and book.request_cancel(job_id):  # another replica runs it
                return {"id": job_id, "state": "cancelling"}
            raise missing(job_id)
        if server.worker.cancel(record.future):
            record.cancel_requested = True
            return {"id": record.id, "state": "cancelled" if record.future.cancelled() else "cancelling"}
        return {"id": record.id, "state": record.state()}

    if book is not None:
        publisher = Publisher(book, status_of, server.worker)


PUBLISH_S = 0.25


class Publisher:
    """The one thread that publishes this replica's jobs to the shared book after their first status, so
    the statuses arrive in order: while a job runs, every ``PUBLISH_S``; when it ends, at once (a done
    callback wakes the thread), and that last status before the job is dropped. It also applies the
    cancellations other replicas recorded in the book."""

    FINAL = ("done", "failed", "cancelled")

    def __init__(self, book, status_of, worker):
        self.book, self.status_of, self.worker = book, status_of, worker
        self.active: dict[str, JobRecord] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        threading.Thread(target=self._loop, name="diffpipe-job-publisher", daemon=True).start()

    def watch(self, record: JobRecord) -> None:
        with self.lock:
            self.active[record.id] = record
        record.future.add_done_callback(lambda _: self.wake.set())

    def _loop(self) -> None:
        while True:
            self.wake.wait(PUBLISH_S)
            self.wake.clear()
            with self.lock:
                active = dict(self.active)
            if not active:
                continue
            try:
                for job_id in self.book.take_cancels(list(active)):
                    if self.worker.cancel(active[job_id].future):
                        active[job_id].cancel_requested = True
                for job_id, record in active.items():
                    if record.job is None and not record.future.done():
                        continue  # still queued: its status has not changed
                    status = self.status_of(record)
                    self.book.publish(job_id, status)
                    if status["state"] in self.FINAL:
                        with self.lock:
                            self.active.pop(job_id, None)
            except Exception as e:  # the book is unreachable for now: try again next time
                logger.warning("could not publish job statuses to the shared book: %s", e)
