"""Requests run one at a time: a single worker thread takes jobs from a bounded queue.

A job is a function of a :class:`Job`; it passes ``job.step_callback(image_index)`` to the pipeline as
``callback_on_step_end``, which is where progress comes from, where the latest latents are kept for a
preview, and where an interrupt takes effect (the callback sets ``pipe._interrupt``, so the pipeline
skips its remaining steps).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests already."""


class Closed(Exception):
    """The server is shutting down: no new jobs."""


class Job:
    def __init__(self, worker: "Worker", total_steps: int, future: Future):
        self.worker = worker
        self.total_steps = max(1, int(total_steps))
        self.future = future
        self.latents = None  # the latest step's latents (for a preview)

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
            latents = tensors.get("latents") if isinstance(tensors, dict) else None
            if latents is not None:
                self.latents = latents.detach()
            if stop:
                object.__setattr__(pipe, "_interrupt", True)
            return {}

        return callback


class Worker:
    def __init__(self, max_queue: int):
        self.max_queue = max(1, int(max_queue))
        self._queue: deque = deque()  # (fn, total_steps, future); a cancelled one is taken out at once
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._running: Job | None = None
        self._step = 0
        self._started = 0.0
        self._interrupted = False
        self._seconds_per_job = 0.0  # a running mean, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="diffpipe-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, fn, *, total_steps: int) -> Future:
        """Queue ``fn(job)``; its result (or exception) arrives in the returned future."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise Closed("the server is shutting down; try again later")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full: max_queue={self.max_queue} requests are waiting; try again later")
            self._queue.append((fn, total_steps, future))
            self._wake.notify()
        return future

    def interrupt(self) -> bool:
        """Stop the running job between steps; False when nothing runs."""
        with self._lock:
            if self._running is None:
                return False
            self._interrupted = True
            return True

    def cancel(self, future: Future) -> bool:
        """Cancel the job of ``future``: a queued one leaves the queue and never starts, a running one stops
        between steps. False when it is neither (finished, or already cancelled)."""
        with self._lock:
            for entry in self._queue:
                if entry[2] is future:
                    self._queue.remove(entry)
                    future.cancel()
                    return True
            if self._running is None or self._running.future is not future:
                return False
            self._interrupted = True
            return True

    def running_job(self) -> Job | None:
        with self._lock:
            return self._running

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue's expected drain time, at least 1."""
        with self._lock:
            return max(1, round(self._seconds_per_job * (len(self._queue) + 1)))

    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    def progress(self) -> dict:
        with self._lock:
            job, step, started, interrupted = self._running, self._step, self._started, self._interrupted
            job_count = len(self._queue) + (1 if job is not None else 0)
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
        """Refuse new jobs, cancel the waiting ones, let the running one finish (up to 5 s)."""
        with self._lock:
            self._closed = True
            for _, _, future in self._queue:
                future.cancel()
            self._queue.clear()
            self._wake.notify()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                fn, total_steps, future = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            job = Job(self, total_steps, future)
            started = time.monotonic()
            with self._lock:
                self._running, self._step, self._started, self._interrupted = job, 0, started, False
            try:
                future.set_result(fn(job))
            except BaseException as e:  # the request sees it; the worker goes on
                future.set_exception(e)
            finally:
                with self._lock:
                    self._running = None
                    took = time.monotonic() - started
                    mean = self._seconds_per_job
                    self._seconds_per_job = took if not mean else 0.7 * mean + 0.3 * took
