"""Schedulers: one algorithm per file, shared math in base.py, prediction.py and sigmas.py."""

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
SCHEDULERS: dict[str, str] = {}
