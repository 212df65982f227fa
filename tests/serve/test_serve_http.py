"""diffpipe serve over real HTTP (uvicorn on 127.0.0.1): every endpoint's image equals ``diffpipe generate``
with the same seed and settings; the OpenAI python client and an A1111 client's payload; load against a
small queue; disconnecting clients; bad input."""

from __future__ import annotations

import base64
import collections
import io
import json
import socket
import threading
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import SMALL, GatedPipe, cli_image, live_server, pixels, wait_for

from diffpipe.serve import Settings, create_app

SEED = 5
BODY = {"prompt": "a", "size": "32x32", "steps": 2}
SAME = dict(steps=2, size="32x32", seed=SEED, guidance=7.5)  # the CLI's settings for the served requests


@pytest.fixture(scope="module")
def url(pipe):
    with live_server(create_app(pipe, Settings(**SMALL, model_name="tiny-sd"))) as base:
        yield base


@pytest.fixture(scope="module")
def start_image(tmp_path_factory):
    path = tmp_path_factory.mktemp("start") / "start.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------ equal to generate
def test_openai_and_a1111_txt2img_and_jobs_equal_diffpipe_generate(url, folder, tmp_path):
    expected = cli_image(folder, tmp_path / "cli.png", **SAME)
    body = {"prompt": "a cat", "size": "32x32", "steps": 2, "seed": SEED, "guidance_scale": 7.5}
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), expected)

        a1111 = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": SEED, "cfg_scale": 7.5}
        r = c.post("/sdapi/v1/txt2img", json=a1111)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), expected)

        job = c.post("/jobs", json=body).json()
        wait_for(lambda: c.get(f"/jobs/{job['id']}").json()["state"] == "done", 60)
        np.testing.assert_array_equal(pixels(c.get(f"/jobs/{job['id']}").json()["images"][0]), expected)


def test_the_openai_python_client(url, folder, tmp_path, start_image):
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny-sd"]
    result = client.images.generate(
        model="tiny-sd",
        prompt="a cat",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": SEED, "steps": 2, "guidance_scale": 7.5},
    )
    assert len(result.data) == 2
    np.testing.assert_array_equal(pixels(result.data[0].b64_json), cli_image(folder, tmp_path / "a.png", **SAME))
    second = cli_image(folder, tmp_path / "b.png", **{**SAME, "seed": SEED + 1})
    np.testing.assert_array_equal(pixels(result.data[1].b64_json), second)

    with open(start_image, "rb") as image:
        edit = client.images.edit(
            image=image, prompt="a cat", extra_body={"seed": SEED, "steps": 2, "strength": 0.6, "guidance_scale": 7.5}
        )
    expected = cli_image(folder, tmp_path / "e.png", **SAME, image=start_image, strength=0.6)
    np.testing.assert_array_equal(pixels(edit.data[0].b64_json), expected)


def test_a1111_client_payloads_with_their_usual_fields(url, folder, tmp_path, start_image):
    """What A1111 clients send: many fields of A1111's own features, at values that ask for nothing."""
    usual = {
        "styles": [], "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
        "restore_faces": False, "tiling": False, "enable_hr": False, "do_not_save_samples": True,
        "do_not_save_grid": True, "override_settings": {}, "send_images": True, "save_images": False,
        "alwayson_scripts": {}, "script_args": [], "scheduler": "Automatic", "eta": 0,
    }  # fmt: skip
    with httpx.Client(base_url=url, timeout=60) as c:
        body = {**usual, "prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": SEED, "cfg_scale": 7.5}
        r = c.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a"})
        assert r.status_code == 200, r.text
        expected = cli_image(folder, tmp_path / "t.png", **SAME, scheduler="EulerAncestralDiscreteScheduler")
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), expected)
        assert json.loads(r.json()["info"])["all_seeds"] == [SEED]

        img2img = {
            **body, "init_images": [b64(start_image)], "denoising_strength": 0.6, "resize_mode": 0,
            "inpainting_fill": 1, "mask_blur": 4, "include_init_images": False,
        }  # fmt: skip
        r = c.post("/sdapi/v1/img2img", json=img2img)
        assert r.status_code == 200, r.text
        expected = cli_image(folder, tmp_path / "i.png", **SAME, image=start_image, strength=0.6)
        np.testing.assert_array_equal(pixels(r.json()["images"][0]), expected)

        # the same edit through the OpenAI multipart endpoint
        files = {"image": ("start.png", start_image.read_bytes(), "image/png")}
        data = {"prompt": "a cat", "seed": SEED, "steps": 2, "strength": 0.6, "guidance_scale": 7.5}
        r = c.post("/v1/images/edits", files=files, data=data)
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), expected)


def test_a_running_job_has_a_preview_of_its_latents(pipe):
    gated = GatedPipe(pipe)
    with live_server(create_app(gated, Settings(**SMALL))) as base, httpx.Client(base_url=base, timeout=60) as c:
        job = c.post("/jobs", json={"prompt": "a", "size": "32x32", "steps": 3, "seed": 1}).json()
        assert gated.reached.wait(30)
        wait_for(lambda: c.get(f"/jobs/{job['id']}").json()["preview"] is not None)
        status = c.get(f"/jobs/{job['id']}").json()
        assert status["state"] == "running" and status["step"] == 1 and status["steps"] == 3
        side = 32 // pipe.vae_scale_factor  # one preview pixel per latent pixel
        assert Image.open(io.BytesIO(base64.b64decode(status["preview"]))).size == (side, side)
        gated.gate.set()
        wait_for(lambda: c.get(f"/jobs/{job['id']}").json()["state"] == "done")


# ------------------------------------------------------------------------------------ load, disconnects
def test_twenty_clients_against_a_queue_of_four(pipe):
    """One runs, four wait, fifteen get 429 with Retry-After at once; then the five finish and the server
    goes on serving. Every client has a timeout, and every thread must end."""
    gated = GatedPipe(pipe)
    app = create_app(gated, Settings(**SMALL))
    results: dict[int, httpx.Response] = {}
    with live_server(app) as base:

        def client(i):
            with httpx.Client(base_url=base, timeout=120) as c:
                results[i] = c.post("/v1/images/generations", json={**BODY, "seed": i})

        threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        wait_for(lambda: len(results) == 15, 60)  # the refused ones answer while the first job is held
        assert app.state.server.worker.waiting() == 4
        gated.gate.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        codes = collections.Counter(r.status_code for r in results.values())
        assert codes == {200: 5, 429: 15}
        for r in results.values():
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "max_queue=4" in r.json()["error"]["message"]
        served = sorted(i for i, r in results.items() if r.status_code == 200)
        with httpx.Client(base_url=base, timeout=60) as c:  # the server is unharmed and idle
            again = c.post("/v1/images/generations", json={**BODY, "seed": served[0]})
            assert again.status_code == 200
            assert again.json()["data"][0]["b64_json"] == results[served[0]].json()["data"][0]["b64_json"]
            assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def _send_and_close(base: str, body: dict, path: str = "/v1/images/generations"):
    """Send a POST on a raw socket and return the socket: closing it is the client going away."""
    parts = urlsplit(base)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    data = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def test_a_client_that_disconnects_cancels_its_job(pipe):
    gated = GatedPipe(pipe)
    app = create_app(gated, Settings(**SMALL))
    worker = app.state.server.worker
    with live_server(app) as base:
        running = _send_and_close(base, {"prompt": "a", "size": "32x32", "steps": 40, "seed": 1})
        assert gated.reached.wait(30)
        queued = _send_and_close(base, {"prompt": "b", "size": "32x32", "steps": 2, "seed": 2})
        wait_for(lambda: worker.waiting() == 1)
        queued.close()  # a queued job whose client left never starts
        wait_for(lambda: worker.waiting() == 0)
        running.close()  # a running one stops between steps
        wait_for(lambda: worker.progress()["state"]["interrupted"])
        gated.gate.set()
        wait_for(lambda: worker.running_job() is None)
        assert gated.calls == 1 and gated.steps <= 3  # of 40 steps, and job "b" never ran
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.post("/v1/images/generations", json=BODY).status_code == 200


# ------------------------------------------------------------------------------------ bad input
BAD_JSON = [
    ("/v1/images/generations", {"prompt": "a", "stpes": 2}, 400, ["'stpes'", "'steps'"]),
    ("/v1/images/generations", {"prompt": "a", "size": "33x32"}, 400, ["multiples of 8", "width=33"]),
    ("/v1/images/generations", {"prompt": "a", "size": "big"}, 400, ["size", "WIDTHxHEIGHT"]),
    ("/v1/images/generations", {"prompt": "a", "size": "100000x100000"}, 400, ["max_pixels"]),
    ("/v1/images/generations", {"prompt": "a", "size": "32x32", "steps": 10**9}, 400, ["max_steps"]),
    ("/v1/images/generations", {"prompt": "a", "size": "32x32", "n": 1000}, 400, ["n=1000", "max_n"]),
    ("/v1/images/generations", {"prompt": "a", "n": "many"}, 422, ["n:"]),
    ("/v1/images/generations", {"size": "32x32"}, 422, ["prompt:"]),
    ("/v1/images/generations", {"prompt": "a", "model": "/etc/passwd"}, 400, ["/etc/passwd", "tiny-sd"]),
    ("/v1/images/generations", {"prompt": "a", "size": "32x32", "scheduler": "../x"}, 400, ["sampler", "'../x'"]),
    ("/sdapi/v1/txt2img", {"prompt": "a", "cfg": 7}, 400, ["'cfg'"]),
    ("/sdapi/v1/txt2img", {"prompt": "a", "enable_hr": True}, 400, ["enable_hr", "hires"]),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 100, "height": 32}, 400, ["width=100"]),
    ("/sdapi/v1/txt2img", {"prompt": "a", "width": 32, "height": 32, "cfg_scale": 1e9}, 400, ["guidance_scale"]),
    ("/sdapi/v1/img2img", {"prompt": "a", "init_images": ["bm90IGFuIGltYWdl"]}, 400, ["init_images[0]", "image"]),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"}, 400, ["one model", "etc/passwd"]),
    ("/jobs", {"prompt": "a", "size": "32x32", "image": "AAAA"}, 400, ["'image'"]),
    ("/jobs", {"prompt": "a", "size": "32x32", "mask": "AAAA"}, 400, ["'image'"]),
]


@pytest.mark.parametrize("path, body, status, words", BAD_JSON, ids=[f"{p}:{list(b)[-1]}" for p, b, _, _ in BAD_JSON])
def test_bad_requests_get_a_4xx_naming_the_field(url, path, body, status, words):
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post(path, json=body)
        assert r.status_code == status, r.text
        message = r.json()["detail"]
        for word in words:
            assert word in message, message
        assert c.get("/v1/models").status_code == 200  # unharmed


def test_malformed_bodies_wrong_files_and_paths(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/images/generations", content=b'{"prompt": "a", ', headers={"content-type": "application/json"})
        assert r.status_code == 422 and "JSON" in r.json()["detail"]
        r = c.post("/v1/images/generations", content=b"[1, 2]", headers={"content-type": "application/json"})
        assert r.status_code == 422
        files = {"image": ("notes.txt", b"hello, not a picture", "text/plain")}
        r = c.post("/v1/images/edits", files=files, data={"prompt": "a"})
        assert r.status_code == 400 and "'image' is not a readable image" in r.json()["detail"]
        r = c.post("/v1/images/generations", json={"prompt": "a", "negative_prompt": "x" * 70000})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        for path in ("/../../etc/passwd", "/static/../../../etc/passwd", "/jobs/..%2F..%2Fetc%2Fpasswd", "/etc/passwd"):
            r = c.get(path)
            assert r.status_code == 404 and "root:" not in r.text
        assert c.post("/v1/images/generations", json={"prompt": "a", "size": "32x32", "steps": 1}).status_code == 200


def test_missing_or_wrong_api_key(pipe):
    with live_server(create_app(pipe, Settings(**SMALL, api_key="k3y"))) as base:
        with httpx.Client(base_url=base, timeout=60) as c:
            body = {"prompt": "a", "size": "32x32", "steps": 1}
            wrong = ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k3y"}, {"Authorization": "Basic k3y"})
            for headers in wrong:
                r = c.post("/v1/images/generations", json=body, headers=headers)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
                assert "API key" in r.json()["detail"]
            assert c.get("/").status_code == 200
            ok = c.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer k3y"})
            assert ok.status_code == 200


def test_served_png_carries_its_parameters(url):
    from diffpipe.serve.pngmeta import read_parameters

    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/images/generations", json={"prompt": "a fox", "size": "32x32", "steps": 2, "seed": 9})
    text = read_parameters(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert text.startswith("a fox\n") and "Steps: 2" in text and "Seed: 9" in text and "Size: 32x32" in text
