"""Test set-up: a local Hub-compatible server and a private Hugging Face cache for every run.

The server starts at import time, before anything imports ``huggingface_hub`` (which reads
``HF_ENDPOINT`` and the cache location once, at import). See tests/hubserver.py.
"""

import atexit
import os
import shutil
import tempfile

from hubserver import HubServer

_HF_TMP = tempfile.mkdtemp(prefix="diffpipe-hf-")
HUB = HubServer().start()
atexit.register(shutil.rmtree, _HF_TMP, True)
atexit.register(HUB.stop)
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_HOME"] = _HF_TMP
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_TMP, "hub")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _hub_endpoint():
    with HUB.patch_huggingface_hub(hub_cache=os.environ["HF_HUB_CACHE"]):
        yield HUB


@pytest.fixture
def hub(_hub_endpoint):
    HUB.set_down(False)
    HUB.clear_log()
    HUB.errors.clear()
    yield HUB
    HUB.set_down(False)
    assert not HUB.errors, HUB.errors


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A cache of this test's own (the constant is what huggingface_hub reads after import)."""
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"
