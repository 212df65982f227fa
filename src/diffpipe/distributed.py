"""diffpipe on Ray: batch generation with Ray Data, online serving with Ray Serve.

- :class:`PipelineRunner` is the callable class for ``ray.data.Dataset.map_batches``: each actor holds
  one pipeline and writes one PNG per row (see :mod:`diffpipe.batch` for the row format and the seed
  contract). ``diffpipe batch --ray-address ...`` is built on it; so can your own Ray Data jobs be.
- :func:`serve_app` is a Ray Serve application with the same HTTP API as ``diffpipe serve`` (OpenAI
  images, A1111, jobs, the web page): each replica loads the pipeline once and runs its requests one at
  a time from its own bounded queue; Ray Serve spreads requests over the replicas.

Ray is imported only when :func:`serve_app` is called (and by Ray Data when it runs a runner).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .batch import PipelineRunner
from .serve.settings import Settings

__all__ = ["PipelineRunner", "serve_app"]


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
        def __init__(self, model: str, options: dict, load_kwargs: dict):
            from .serve.settings import load_served_pipeline

            self.pipe = load_served_pipeline(model, **load_kwargs)
            self.settings = Settings(**options)

        def __serve_build_asgi_app__(self):
            from .serve.app import create_app

            return create_app(self.pipe, self.settings)

    deployment = serve.deployment(
        DiffpipeServer,
        name="diffpipe",
        num_replicas=num_replicas,
        # one request at a time runs in a replica; the rest wait in its own queue (429 past max_queue)
        max_ongoing_requests=settings.max_queue + 8,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
    )
    return deployment.bind(model, options, load_kwargs)
