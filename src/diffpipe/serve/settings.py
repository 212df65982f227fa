"""What a server allows: its key, its limits, its address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass
class Settings:
    api_key: str | None = None  # when set, every endpoint but GET / needs `Authorization: Bearer KEY`
    max_pixels: int = 1024 * 1024  # width * height of one image
    max_steps: int = 150
    max_n: int = 4  # images in one request
    max_queue: int = 8  # requests waiting behind the running one; more get HTTP 429
    max_body_bytes: int = 20_000_000  # base64 images in JSON bodies: a 1024x1024 PNG is a few MB
    host: str = "127.0.0.1"
    model_name: str | None = None  # the name the model is listed under (default: where it was loaded from)


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_served_pipeline(model: str, **load_kwargs):
    """The pipeline a server holds: loaded once, progress bars off (the server reports progress)."""
    from .. import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, **load_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe
