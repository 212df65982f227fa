"""diffpipe serve's web page in headless Chromium (playwright driving the system's chromium): type a prompt,
press Generate, watch the progress bar move, find the image in the gallery; img2img from an upload; an
error shown in words; a phone-width screen with no sideways scrolling. Screenshots are saved."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from serve_helpers import SMALL, cli_image, live_server, pixels, slow_down

from diffpipe.serve import Settings, create_app

PHONE = {"width": 390, "height": 844}


def chromium() -> str:
    """The system's Chromium (Debian's package; the Makefile installs it): playwright's own browser
    download cannot be reached from these machines."""
    path = os.environ.get("DIFFPIPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("the web page test needs Chromium: `apt-get install chromium` (make install does it as root)")
    return path


@pytest.fixture(scope="module")
def page_url(folder):
    import diffpipe

    pipe = diffpipe.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    slow_down(pipe, 0.05)  # per UNet call: two per step with guidance
    with live_server(create_app(pipe, Settings(**SMALL, model_name="tiny-sd"))) as base:
        yield base


@pytest.fixture
def page(page_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=PHONE)
            page.goto(page_url + "/")
            yield page
        finally:
            browser.close()


def fill(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def wait_for_figures(page, count: int, timeout: float = 60.0) -> list[float]:
    """Wait until the gallery holds ``count`` images; returns the progress values seen meanwhile."""
    seen, end = [], time.monotonic() + timeout
    while page.locator("#gallery figure").count() < count:
        assert time.monotonic() < end, f"no image in the gallery; error shown: {page.inner_text('#error')!r}"
        seen.append(float(page.eval_on_selector("#progress", "e => e.value")))
        time.sleep(0.03)
    return seen


def gallery_pixels(page, index: int = 0) -> np.ndarray:
    src = page.locator("#gallery figure img").nth(index).get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    return pixels(src.split(",", 1)[1])


def test_generate_from_the_page(page, folder, tmp_path):
    page.wait_for_function("document.querySelectorAll('#scheduler option').length > 1")  # samplers listed
    fill(page, prompt="a red fox", width=32, height=32, steps=12, seed=5)
    page.click("#generate")
    seen = wait_for_figures(page, 1)
    assert any(0 < v < 1 for v in seen), f"the progress bar never moved: {sorted(set(seen))}"
    assert page.eval_on_selector("#progress", "e => e.value") == 1
    caption = page.inner_text("#gallery figure figcaption")
    assert "a red fox" in caption and "seed 5" in caption and "12 steps" in caption
    href = page.get_attribute("#gallery figure a", "href")
    assert href.startswith("data:image/png;base64,") and page.get_attribute("#gallery figure a", "download")
    expected = cli_image(folder, tmp_path / "cli.png", prompt="a red fox", steps=12, size="32x32", seed=5)
    np.testing.assert_array_equal(gallery_pixels(page), expected)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    shot = tmp_path / "web-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == PHONE["width"]
    print(f"screenshot: {shot}")


def test_img2img_from_an_upload_and_errors_in_words(page, folder, tmp_path):
    start = tmp_path / "start.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(start)
    fill(page, prompt="a cat", width=32, height=32, steps=4, seed=3, strength=0.5)
    page.set_input_files("#image", str(start))
    page.click("#generate")
    wait_for_figures(page, 1)
    assert "img2img 0.5" in page.inner_text("#gallery figure figcaption")
    options = dict(steps=4, size="32x32", seed=3, image=start, strength=0.5)
    expected = cli_image(folder, tmp_path / "i.png", prompt="a cat", **options)
    np.testing.assert_array_equal(gallery_pixels(page), expected)

    fill(page, steps=1000)
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "max_steps" in page.inner_text("#error")
    assert page.locator("#gallery figure").count() == 1
    page.screenshot(path=str(tmp_path / "web-page-error.png"), full_page=True)
