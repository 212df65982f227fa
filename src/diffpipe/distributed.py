"""diffpipe on Ray: batch generation with Ray Data, online serving with Ray Serve.

- :class:`PipelineRunner` is the callable class for ``ray.data.Dataset.map_batches``: each actor holds
  one pipeline and writes one PNG per row (see :mod:`diffpipe.batch` for the row format and the seed
  contract). ``diffpipe batch --ray-address ...`` is built on it; so can your own Ray Data jobs be.
- :func:`serve_app` is a Ray Serve application with the same HTTP API as ``diffpipe serve`` (OpenAI
  images, A1111, jobs, the web page): each replica loads the pipeline once and runs its requests one at
  a time from its own bounded queue; Ray Serve spreads requests over the replicas. A job's status lives
  in a small shared deployment (:class:`JobBook`), so ``GET``/``DELETE /jobs/{id}`` work on whichever
  replica a request reaches. ``/sdapi/v1/progress`` and ``/interrupt`` speak for the replica reached.

Ray is imported only when :func:`serve_app` is called (and by Ray Data when it runs a runner).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict
from typing import Any

from .batch import PipelineRunner
from .serve.settings import Settings

__all__ = ["JobBook", "PipelineRunner", "serve_app"]


class JobBook:
    """Job statuses shared by a deployment's replicas (the last ``keep``), and the cancellations asked of
    a job by a replica that does not run it. Deployed with one replica by :func:`serve_app`."""

    def __init__(self, keep: int = 1024):
        self.keep = keep
        self.statuses: OrderedDict[str, dict] = OrderedDict()
        self.cancels: set[str] = set()

    def publish(self, job_id: str, status: dict) -> None:
        self.statuses[job_id] = status
        self.statuses.move_to_end(job_id)
        while len(self.statuses) > self.keep:
            old, _ = self.statuses.popitem(last=False)
            self.cancels.discard(old)

    def fetch(self, job_id: str) -> dict | None:
        return self.statuses.get(job_id)

    def request_cancel(self, job_id: str) -> bool:
        status = self.statuses.get(job_id)
        if status is None or status["state"] not in ("queued", "running"):
            return False
        self.cancels.add(job_id)
        return True

    def take_cancels(self, job_ids: list[str]) -> list[str]:
        taken = [job_id for job_id in job_ids if job_id in self.cancels]
        self.cancels.difference_update(taken)
        return taken


class _BookClient:
    """A replica's blocking view of the JobBook deployment (called from worker threads, never the loop)."""

    def __init__(self, handle):
        self.handle = handle

    def __getattr__(self, method: str):
        def call(*args):
            return getattr(self.handle, method).remote(*args).result(timeout_s=30)

        return call


def serve_app(
    model: str,
    *,
    num_replicas: int = 1,
    settings: Settings | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    **load_kwargs,
):
    """A Ray Serve application serving ``model`` with ``diffpipe serve``'s HTTP API.

    ``settings`` are the limits and API key of every replica (its ``max_queue`` is per replica);
    ``load_kwargs`` go to ``DiffusionPipeline.from_pretrained`` in each replica; ``ray_actor_options``
    to each replica's actor (e.g. ``{"num_cpus": 4}`` or ``{"num_gpus": 1}``). Run it with
    ``ray.serve.run(serve_app(...), route_prefix="/")``.
    """
    from ray import serve

    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    settings = settings or Settings(model_name=model)
    options = asdict(settings)

    @serve.ingress()
    class DiffpipeServer:
        def __init__(self, model: str, options: dict, load_kwargs: dict, book):
            from .serve.settings import load_served_pipeline

            self.pipe = load_served_pipeline(model, **load_kwargs)
            self.settings = Settings(**options)
            self.book = _BookClient(book)

        def __serve_build_asgi_app__(self):
            from .serve.app import create_app

            return create_app(self.pipe, self.settings, job_book=self.book)

    deployment = serve.deployment(
        DiffpipeServer,
        name="diffpipe",
        num_replicas=num_replicas,
        # one request at a time runs in a replica; the rest wait in its own queue (429 past max_queue)
        max_ongoing_requests=settings.max_queue + 8,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    )
    book = serve.deployment(JobBook, name="diffpipe-jobs", num_replicas=1, ray_actor_options={"num_cpus": 0})
    return deployment.bind(model, options, load_kwargs, book.bind())
