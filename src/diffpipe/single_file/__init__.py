"""Single-file checkpoints: the original (LDM / SGM) layout that web UIs and model sites publish as
one ``.safetensors`` or ``.ckpt`` file, read and written offline (configs shipped in ``configs/``)."""

from .build import load_model, load_pipeline
from .detect import Detection, detect

__all__ = ["Detection", "detect", "load_model", "load_pipeline"]
