"""diffpipe.distributed.serve_app on Ray Serve (a local Ray on 127.0.0.1, 2 replicas): the same HTTP API as
``diffpipe serve``, images equal to ``diffpipe generate``, and jobs that any replica can report and cancel."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import pytest

from serve_helpers import SMALL, cli_image, live_server, pixels, wait_for

from diffpipe.serve import Settings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(folder):
    import ray
    from ray import serve

    from diffpipe.distributed import serve_app

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = Settings(**{**SMALL, "max_steps": 1000}, model_name="tiny-sd")  # room for a long job
        app = serve_app(str(folder), num_replicas=2, settings=settings)
        serve.run(app, name="diffpipe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_same_api_as_diffpipe_serve(url, folder, pipe, tmp_path):
    expected = cli_image(folder, tmp_path / "cli.png", steps=2, size="32x32", seed=4)
    body = {"prompt": "a cat", "size": "32x32", "steps": 2, "seed": 4}
    with live_server(create_app(pipe, Settings(**SMALL, model_name="tiny-sd"))) as local:
        with httpx.Client(timeout=120) as c:
            for path in ("/v1/models", "/sdapi/v1/samplers", "/sdapi/v1/sd-models", "/sdapi/v1/options"):  # same JSON
                assert c.get(url + path).json() == c.get(local + path).json(), path
            assert c.get(url + "/").text == c.get(local + "/").text
            for base in (url, local):
                r = c.post(base + "/v1/images/generations", json=body)
                assert r.status_code == 200, r.text
                np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), expected)
                a1111 = {"prompt": "a cat", "steps": 2, "width": 32, "height": 32, "seed": 4, "cfg_scale": 7.5}
                np.testing.assert_array_equal(
                    pixels(c.post(base + "/sdapi/v1/txt2img", json=a1111).json()["images"][0]), expected
                )
                bad = c.post(base + "/v1/images/generations", json={**body, "stpes": 3})
                assert bad.status_code == 400 and "'stpes'" in bad.json()["detail"]


def test_jobs_are_seen_and_cancelled_from_any_replica(url, folder, tmp_path):
    with httpx.Client(base_url=url, timeout=120) as c:
        ids = [
            c.post("/jobs", json={"prompt": "a cat", "size": "32x32", "steps": 2, "seed": s}).json()["id"]
            for s in range(4)
        ]
        seen = []

        def state(job_id):
            seen.append(c.get(f"/jobs/{job_id}").json()["state"])
            return seen[-1]

        for job_id in ids:  # requests land on either replica: every one of them answers for every job
            try:
                wait_for(lambda: state(job_id) == "done", 120)
            except AssertionError:
                raise AssertionError(f"job {job_id} never done; states seen: {seen[-10:]}") from None
            assert all(c.get(f"/jobs/{job_id}").json()["state"] == "done" for _ in range(6))
        expected = cli_image(folder, tmp_path / "s3.png", steps=2, size="32x32", seed=3)
        np.testing.assert_array_equal(pixels(c.get(f"/jobs/{ids[3]}").json()["images"][0]), expected)

        long = c.post("/jobs", json={"prompt": "a cat", "size": "64x64", "steps": 500, "seed": 1}).json()["id"]
        wait_for(lambda: c.get(f"/jobs/{long}").json()["state"] == "running", 60)
        assert c.delete(f"/jobs/{long}").json()["state"] in ("cancelling", "cancelled")
        wait_for(lambda: c.get(f"/jobs/{long}").json()["state"] not in ("running", "queued"), 60)
        assert c.get(f"/jobs/{long}").json()["state"] == "cancelled"
        assert c.get("/jobs/nope").status_code == 404


def test_the_cli_serves_on_ray_serve(folder, tmp_path):
    """``diffpipe serve --replicas 2``: the person's way to Ray Serve, no Python written."""
    import subprocess
    import sys
    import time

    port = free_port()
    command = [sys.executable, "-m", "diffpipe.cli", "serve", "--model", str(folder), "--port", str(port)]
    proc = subprocess.Popen([*command, "--replicas", "2", "--max-pixels", "4096"], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "diffpipe serve --replicas exited"
            assert time.monotonic() < end, "Ray Serve did not come up"
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        r = httpx.post(
            url + "/v1/images/generations",
            json={"prompt": "a cat", "size": "32x32", "steps": 2, "seed": 4},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(
            pixels(r.json()["data"][0]["b64_json"]),
            cli_image(folder, tmp_path / "c.png", steps=2, size="32x32", seed=4),
        )
        assert "max_pixels=4096" in httpx.post(url + "/v1/images/generations", json={"prompt": "a"}, timeout=60).text
    finally:
        proc.terminate()
        proc.wait(60)
