"""Saved files get the mode a plain ``open`` gives (0666 less the umask), as the reference's saves do:
the private temporary names the atomic writes go through must not leave models readable only by their
owner (a shared Hub cache, a container running as another user)."""

from __future__ import annotations

import os
import stat

import diffpipe
from diffpipe.io.atomic import atomic_write_text
from diffpipe.single_file.save import save_single_file
from factories import TINY_MODELS


def test_saved_models_single_files_and_configs_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        vae = diffpipe.AutoencoderKL(**TINY_MODELS["AutoencoderKL"])
        vae.save_pretrained(tmp_path / "vae")
        save_single_file(vae, tmp_path / "vae.safetensors")
        atomic_write_text(tmp_path / "note.txt", "x")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
