"""Requests run one at a time: a single worker thread takes jobs from a bounded queue.

A job is a function of a :class:`Job`; it passes ``job.step_callback(image_index)`` to the pipeline as
``callback_on_step_end``, which is where progress comes from and where an interrupt takes effect (the
callback sets ``pipe._interrupt``, so the pipeline skips its remaining steps).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests already."""


class Job:
    def __init__(self, worker: "Worker", total_steps: int):
        self.worker = worker
        self.total_steps = max(1, int(total_steps))

    @property
    def interrupted(self) -> bool:
        return self.worker._interrupted

    def step_callback(self, image_index: int, steps_per_image: int):
        """A ``callback_on_step_end`` for image ``image_index``; each image has ``steps_per_image`` steps."""
        worker = self.worker

        def callback(pipe, i, t, tensors):
            with worker._lock:
                worker._step = image_index * steps_per_image + i + 1
                stop = worker._interrupted
            if stop:
                object.__setattr__(pipe, "_interrupt", True)
            return {}

        return callback


class Worker:
    def __init__(self, max_queue: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(0, int(max_queue)) or 1)
        self._lock = threading.Lock()
        self._running: Job | None = None
        self._step = 0
        self._started = 0.0
        self._interrupted = False
        self._thread = threading.Thread(target=self._loop, name="diffpipe-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, fn, *, total_steps: int) -> Future:
        """Queue ``fn(job)``; its result (or exception) arrives in the returned future."""
        future: Future = Future()
        try:
            self._queue.put_nowait((fn, total_steps, future))
        except queue.Full:
            raise QueueFull(
                f"the queue is full: max_queue={self._queue.maxsize} requests are waiting; try again later"
            ) from None
        return future

    def interrupt(self) -> bool:
        """Stop the running job between steps; False when nothing runs."""
        with self._lock:
            if self._running is None:
                return False
            self._interrupted = True
            return True

    def waiting(self) -> int:
        return self._queue.qsize()

    def progress(self) -> dict:
        with self._lock:
            job, step, started, interrupted = self._running, self._step, self._started, self._interrupted
        job_count = self._queue.qsize() + (1 if job is not None else 0)
        if job is None:
            fraction, eta = 0.0, 0.0
        else:
            fraction = min(1.0, step / job.total_steps)
            elapsed = time.monotonic() - started
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        return {
            "progress": fraction,
            "eta_relative": eta,
            "state": {
                "job_count": job_count,
                "sampling_step": step,
                "sampling_steps": job.total_steps if job is not None else 0,
                "interrupted": interrupted,
            },
            "current_image": None,
        }

    def close(self) -> None:
        self._queue.put((None, 0, None))  # blocks only while the queue is full
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            fn, total_steps, future = self._queue.get()
            if fn is None:
                return
            if not future.set_running_or_notify_cancel():
                continue
            job = Job(self, total_steps)
            with self._lock:
                self._running, self._step, self._started, self._interrupted = job, 0, time.monotonic(), False
            try:
                future.set_result(fn(job))
            except BaseException as e:  # the request sees it; the worker goes on
                future.set_exception(e)
            finally:
                with self._lock:
                    self._running = None
