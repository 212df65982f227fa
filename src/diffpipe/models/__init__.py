"""Models (nn.Modules whose parameter names are the checkpoint keys)."""

# Class name -> "module:attribute"; read by diffpipe.registry (the allow-list).
MODELS: dict[str, str] = {}
