"""What every serve test module builds once: a tiny reference-written SD folder and our pipeline on it."""

from __future__ import annotations

import pytest

from sd_factory import save_reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_reference_pipeline(tmp_path_factory.mktemp("serve") / "sd", safety_checker=False)


@pytest.fixture(scope="module")
def pipe(folder):
    import diffpipe

    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
