"""``diffpipe serve``: an HTTP server around one loaded pipeline (OpenAI images and A1111 endpoints).

Importing this package is light; FastAPI is imported only when ``create_app`` is used.
"""

from __future__ import annotations

from .settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module 'diffpipe.serve' has no attribute {name!r}")
