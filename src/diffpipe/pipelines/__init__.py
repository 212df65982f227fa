"""Pipelines: thin task files over shared stages."""

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
PIPELINES: dict[str, str] = {}
