"""What the serve tests share: a real uvicorn server on 127.0.0.1, pipelines that wait or slow down per
step, and the ``diffpipe generate`` oracle a served image must equal."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time

import numpy as np
from PIL import Image

SMALL = dict(max_pixels=64 * 64, max_steps=60, max_n=3, max_queue=4, max_body_bytes=65536)


@contextlib.contextmanager
def live_server(app, host: str = "127.0.0.1"):
    """``app`` served by uvicorn on a free loopback port; yields the base URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 30)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def pixels(data: bytes | str) -> np.ndarray:
    """A PNG (bytes, base64 or a file path) -> its RGB pixels."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def cli_image(folder, out_path, prompt="a cat", **options) -> np.ndarray:
    """``diffpipe generate`` with ``--key value`` options: the image a served request must equal."""
    from diffpipe.cli import main

    argv = ["--quiet", "generate", prompt, "--model", str(folder), "--output", str(out_path)]
    for key, value in options.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert main(argv) == 0
    return np.asarray(Image.open(out_path).convert("RGB"))


class GatedPipe:
    """The real pipeline, but each step, once reported to the server, waits for ``gate``."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.reached = threading.Event()
        self.gate = threading.Event()
        self.steps = 0
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kw):
        inner = kw["callback_on_step_end"]
        self.calls += 1

        def callback(pipe, i, t, tensors):
            self.steps += 1
            out = inner(pipe, i, t, tensors)
            self.reached.set()
            assert self.gate.wait(60)
            return out

        return self._pipe(**{**kw, "callback_on_step_end": callback})


def slow_down(pipe, delay: float):
    """Make every UNet call of ``pipe`` (and of the pipelines sharing its UNet) ``delay`` seconds slower,
    so a page can watch the progress; returns the hook's handle."""
    return pipe.unet.register_forward_pre_hook(lambda module, args: time.sleep(delay))
