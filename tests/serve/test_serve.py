"""diffpipe serve: the OpenAI images and A1111 endpoints around a tiny Stable Diffusion pipeline."""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serve_helpers import GatedPipe, wait_for

from diffpipe.serve import Settings, create_app
from diffpipe.serve.pngmeta import read_parameters

SMALL = dict(max_pixels=64 * 64, max_steps=60, max_n=3, max_queue=4, max_body_bytes=4096)  # a small body limit


@pytest.fixture(scope="module")
def client(pipe):
    with TestClient(create_app(pipe, Settings(**SMALL, model_name="tiny-sd"))) as c:
        yield c


def openai(client, **kw):
    return client.post("/v1/images/generations", json={"prompt": "a cat", "size": "32x32", "steps": 2, **kw})


def png(b64: str) -> bytes:
    return base64.b64decode(b64)


# ------------------------------------------------------------------------------------ OpenAI
def test_openai_generation_is_a_png_with_its_parameters(client):
    r = openai(client, seed=7, negative_prompt="blurry")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 1
    data = png(body["data"][0]["b64_json"])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == (32, 32)
    text = read_parameters(data)
    assert text.startswith("a cat\nNegative prompt: blurry\nSteps: 2, Sampler: ")
    assert "Seed: 7," in text and "Size: 32x32" in text and "Model: tiny-sd" in text


def test_same_seed_same_bytes_and_image_i_is_seed_plus_i(client):
    first = openai(client, seed=11, n=3).json()["data"]
    again = openai(client, seed=11, n=3).json()["data"]
    assert [d["b64_json"] for d in first] == [d["b64_json"] for d in again]
    assert len({d["b64_json"] for d in first}) == 3
    alone = openai(client, seed=13).json()["data"][0]["b64_json"]
    assert alone == first[2]["b64_json"]


def test_models_lists_the_model(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    assert r.json() == {"object": "list", "data": [{"id": "tiny-sd", "object": "model", "owned_by": "diffpipe"}]}


def test_url_response_format_is_refused(client):
    r = openai(client, response_format="url")
    assert r.status_code == 400
    assert "url" in r.json()["error"]["message"] and "b64_json" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(size="128x128"), ["max_pixels=4096", "16384"]),
        (dict(steps=61), ["max_steps=60", "steps=61"]),
        (dict(n=4), ["max_n=3", "n=4"]),
        (dict(size="big"), ["WIDTHxHEIGHT", "big"]),
    ],
)
def test_limits_are_refused_with_a_message(client, kw, words):
    r = openai(client, **kw)
    assert r.status_code == 400
    assert all(w in r.json()["detail"] for w in words), r.json()


def test_a_body_over_the_limit_is_413(client):
    r = openai(client, negative_prompt="x" * 5000)
    assert r.status_code == 413
    assert "max_body_bytes=4096" in r.json()["detail"]


# ------------------------------------------------------------------------------------ A1111
def test_txt2img_returns_images_parameters_and_seeds(client):
    request = dict(prompt="a dog", negative_prompt="", steps=2, cfg_scale=5, width=32, height=32, seed=3)
    r = client.post("/sdapi/v1/txt2img", json={**request, "batch_size": 2, "n_iter": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 2 and body["parameters"]["prompt"] == "a dog"
    info = json.loads(body["info"])
    assert info["seed"] == 3 and info["all_seeds"] == [3, 4]
    assert "Seed: 4," in info["infotexts"][1] and "CFG scale: 5," in info["infotexts"][0]
    assert read_parameters(png(body["images"][1])) == info["infotexts"][1]
    random_seed = json.loads(client.post("/sdapi/v1/txt2img", json={**request, "seed": -1}).json()["info"])["seed"]
    assert random_seed >= 0


def test_txt2img_with_a_sampler(client):
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    other = next(n for n in names if n != "PNDMScheduler")
    r = client.post(
        "/sdapi/v1/txt2img", json=dict(prompt="a", steps=2, width=32, height=32, seed=1, sampler_name=other)
    )
    assert r.status_code == 200, r.text
    assert f"Sampler: {other}," in json.loads(r.json()["info"])["infotexts"][0]
    assert type(client.app.state.server.pipe.scheduler).__name__ == "PNDMScheduler"  # restored
    r = client.post("/sdapi/v1/txt2img", json=dict(prompt="a", steps=2, width=32, height=32, sampler_name="Nope"))
    assert r.status_code == 400 and "Nope" in r.json()["detail"]


def test_a1111_listing_endpoints(client, pipe):
    progress = client.get("/sdapi/v1/progress").json()
    assert set(progress) == {"progress", "eta_relative", "state", "current_image"}
    assert set(progress["state"]) == {"job_count", "sampling_step", "sampling_steps", "interrupted"}
    assert progress["current_image"] is None and 0 <= progress["progress"] <= 1
    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["title"] == "tiny-sd" and set(models[0]) == {"title", "model_name", "filename"}
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {s["name"] for s in samplers} == {c.__name__ for c in pipe.scheduler.compatibles} | {"PNDMScheduler"}
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd"
    assert client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert r.status_code == 400 and "other" in r.json()["detail"]
    assert client.post("/sdapi/v1/interrupt").status_code == 200


def test_web_page_is_served_with_its_form(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for field in ('id="prompt"', 'id="negative_prompt"', 'id="width"', 'id="steps"', 'id="seed"', "Generate"):
        assert field in r.text
    for field in ('id="scheduler"', 'id="image"', 'type="file"', 'id="strength"', 'id="progress"', 'id="gallery"'):
        assert field in r.text
    assert '"/jobs"' in r.text and "/sdapi/v1/samplers" in r.text
    assert 'name="viewport"' in r.text


# ------------------------------------------------------------------------------------ auth, worker
def test_api_key_is_required_everywhere_but_the_page(pipe):
    with TestClient(create_app(pipe, Settings(**SMALL, api_key="s3cret"))) as c:
        assert c.get("/").status_code == 200
        for path in ("/v1/models", "/sdapi/v1/progress", "/sdapi/v1/options"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/images/generations", json={"prompt": "a", "size": "32x32", "steps": 1})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        ok = c.post(
            "/v1/images/generations",
            json={"prompt": "a", "size": "32x32", "steps": 1},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200


def test_interrupt_stops_the_job_between_steps(pipe):
    gated = GatedPipe(pipe)
    with TestClient(create_app(gated, Settings(**SMALL))) as c:
        result = {}
        body = {"prompt": "a", "steps": 50, "width": 32, "height": 32, "seed": 1, "batch_size": 3}
        thread = threading.Thread(target=lambda: result.update(r=c.post("/sdapi/v1/txt2img", json=body)))
        thread.start()
        assert gated.reached.wait(30)
        progress = c.get("/sdapi/v1/progress").json()
        assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 150
        assert c.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
        gated.gate.set()
        thread.join(60)
        assert result["r"].status_code == 200
        assert gated.steps <= 2  # of 150: the next step's callback saw the interrupt
        assert len(result["r"].json()["images"]) == 1  # the other images were not started
        assert c.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True


def test_a_full_queue_gives_429(pipe):
    gated = GatedPipe(pipe)
    app = create_app(gated, Settings(**{**SMALL, "max_queue": 1}))
    with TestClient(app) as c:
        results = []
        body = {"prompt": "a", "size": "32x32", "steps": 2, "seed": 1}

        def post():
            results.append(c.post("/v1/images/generations", json=body))

        threads = [threading.Thread(target=post) for _ in range(2)]
        threads[0].start()
        assert gated.reached.wait(30)  # the first one runs
        threads[1].start()
        wait_for(lambda: app.state.server.worker.waiting() == 1)  # the second one waits
        r = c.post("/v1/images/generations", json=body)
        assert r.status_code == 429 and "max_queue=1" in r.json()["error"]["message"]
        assert c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2
        gated.gate.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]


# ------------------------------------------------------------------------------------ CLI, imports
def test_cli_refuses_a_public_host_without_a_key(capsys, monkeypatch):
    from diffpipe.cli import main

    monkeypatch.delenv("DIFFPIPE_API_KEY", raising=False)
    assert main(["serve", "--model", "nowhere", "--host", "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "api key" in err.lower() and "0.0.0.0" in err and "--insecure" in err


def test_import_diffpipe_does_not_import_fastapi():
    import subprocess

    code = "import sys, diffpipe, diffpipe.serve; assert 'fastapi' not in sys.modules, 'fastapi imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------ image to image
def encoded(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def roomy(pipe):
    """A client whose body limit takes an uploaded image."""
    with TestClient(create_app(pipe, Settings(**{**SMALL, "max_body_bytes": 1 << 20}, model_name="tiny-sd"))) as c:
        yield c


def direct(pipe, task: str, seed: int, **kw):
    """The same call made on the task pipeline directly (the server's result must equal it)."""
    import numpy as np
    import torch

    import diffpipe

    auto = diffpipe.AutoPipelineForInpainting if task == "inpaint" else diffpipe.AutoPipelineForImage2Image
    other = auto.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    image = other(generator=torch.Generator().manual_seed(seed), **kw).images[0]
    return np.asarray(image)


def test_a1111_img2img_and_inpainting_equal_the_task_pipelines(roomy, pipe):
    import numpy as np

    start = Image.effect_noise((32, 32), 40).convert("RGB")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    common = dict(prompt="a cat", steps=2, width=32, height=32, seed=11, cfg_scale=7.0)
    for mask_b64, task in ((None, "image"), (base64.b64encode(encoded(mask)).decode(), "inpaint")):
        body = {**common, "init_images": [base64.b64encode(encoded(start)).decode()], "denoising_strength": 0.6}
        if mask_b64:
            body["mask"] = mask_b64
        r = roomy.post("/sdapi/v1/img2img", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(png(r.json()["images"][0]))).convert("RGB"))
        call = dict(prompt="a cat", image=start, strength=0.6, num_inference_steps=2, height=32, width=32,
                    guidance_scale=7.0)  # fmt: skip
        if task == "inpaint":
            call["mask_image"] = mask
        np.testing.assert_array_equal(got, direct(pipe, task, 11, **call))
        assert json.loads(r.json()["info"])["all_seeds"] == [11]


def test_openai_edits_take_a_transparent_mask(roomy):
    image = Image.effect_noise((32, 32), 40).convert("RGB")
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (4, 4, 20, 20))  # transparent: repaint here
    files = {"image": ("i.png", encoded(image), "image/png"), "mask": ("m.png", encoded(mask), "image/png")}
    r = roomy.post(
        "/v1/images/edits", files=files, data={"prompt": "a dog", "size": "32x32", "steps": "2", "seed": "3"}
    )
    assert r.status_code == 200, r.text
    with Image.open(io.BytesIO(png(r.json()["data"][0]["b64_json"]))) as out:
        assert out.size == (32, 32)
    bad = roomy.post("/v1/images/edits", files={"image": ("i.png", b"not an image", "image/png")}, data={"prompt": "x"})
    assert bad.status_code == 400 and "'image' is not a readable image" in bad.json()["detail"]
    missing = roomy.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "width": 32, "height": 32})
    assert missing.status_code == 400 and "init_images" in missing.text


# ------------------------------------------------------------------------------------ jobs
def test_jobs_queue_report_and_return_the_images(client):
    r = client.post("/jobs", json={"prompt": "a cat", "size": "32x32", "steps": 2, "seed": 5, "n": 2})
    assert r.status_code == 200, r.text
    job = r.json()["id"]
    for _ in range(200):
        status = client.get(f"/jobs/{job}").json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert status["state"] == "done" and status["seeds"] == [5, 6] and len(status["images"]) == 2
    alone = openai(client, seed=6)
    assert png(status["images"][1]) == png(alone.json()["data"][0]["b64_json"])
    assert client.get("/jobs/nope").status_code == 404


def test_a_queued_job_is_cancelled_and_a_running_one_stops_between_steps(pipe):
    gated = GatedPipe(pipe)
    with TestClient(create_app(gated, Settings(**SMALL, model_name="tiny-sd"))) as c:
        args = {"prompt": "a cat", "size": "32x32", "steps": 20}
        first = c.post("/jobs", json=args).json()["id"]
        assert gated.reached.wait(30)
        second = c.post("/jobs", json=args).json()["id"]
        assert c.get(f"/jobs/{second}").json()["state"] == "queued"
        assert c.delete(f"/jobs/{second}").json()["state"] == "cancelled"
        assert c.get(f"/jobs/{first}").json()["state"] == "running"
        assert c.delete(f"/jobs/{first}").json()["state"] == "cancelling"
        gated.gate.set()
        wait_for(lambda: c.get(f"/jobs/{first}").json()["state"] != "running")
        assert c.get(f"/jobs/{first}").json()["state"] == "cancelled"  # stopped, not "done" with a half image
        assert gated.steps < 20
