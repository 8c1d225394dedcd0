"""The playground in a real browser: headless Chromium (Debian's chromium and chromium-driver, which
.ci/run installs) driven by Selenium, against a real `unclip serve` on 127.0.0.1 with an API key.
What a person does: give the key, type a prompt, generate (previews, then the image: the API's for
that seed), reuse the seed, make a variation of an uploaded image, interpolate, and read the server's
message for an empty prompt; on a phone's width nothing runs off the side."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import free_port

pytestmark = pytest.mark.browser
KEY = "sk-browser-test"
WAIT = 120  # seconds for any one thing the page waits for: never reached when it works
STEPS = {"prior_steps": "3", "decoder_steps": "6", "super_res_steps": "2"}


def chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`unclip serve --model tiny` with an API key, as a user starts it."""
    yield from serve("tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def stable_server(tmp_path_factory):
    """The same for a Stable unCLIP model (text to image)."""
    yield from serve("sd-unclip-tiny", tmp_path_factory)


def serve(model: str, tmp_path_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("serve") / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "serve", "--model", model,
                             "--port", str(port), "--api-key", KEY], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            assert proc.poll() is None, f"unclip serve exited ({proc.returncode}); see {log.name}"
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser():
    found = chromium()
    if found is None:
        pytest.skip("needs Chromium and its driver: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1300",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, read by the test
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def fill(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def data_url_pixels(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    return np.asarray(image.convert("RGB")).astype(int)


def api_pixels(url: str, path: str, **kw) -> np.ndarray:
    response = httpx.post(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT, **kw)
    assert response.status_code == 200, response.text
    return data_url_pixels("data:image/png;base64," + response.json()["data"][0]["b64_json"])


def cards(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery img.result")


def test_generate_vary_interpolate_in_the_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(server + "/")
    # the server has a key: the page asks for it, keeps it, and then shows the model's defaults
    wait_until(d, lambda d: d.find_element(By.ID, "key-panel").is_displayed(), "the key panel")
    fill(d, "api-key", KEY)
    d.find_element(By.ID, "key-save").click()
    wait_until(d, lambda d: "tiny" in d.find_element(By.ID, "model").text, "the model's name")
    info = httpx.get(server + "/v1/unclip/info", headers={"Authorization": f"Bearer {KEY}"}).json()
    shown_default = d.find_element(By.ID, "decoder_steps").get_attribute("value")
    assert shown_default == str(info["defaults"]["decoder_steps"])

    # generate: previews, then the image, equal to the API's for the seed
    fill(d, "prompt", "a red circle")
    fill(d, "seed", "11")
    for k, v in STEPS.items():
        fill(d, k, v)
    fill(d, "partial_images", "2")
    d.find_element(By.ID, "generate").click()
    wait_until(d, lambda d: len(cards(d)) == 1, "the generated image")
    assert d.find_element(By.ID, "preview").get_attribute("data-partials") == "2"
    shown = data_url_pixels(cards(d)[0].get_attribute("src"))
    api = api_pixels(server, "/v1/images/generations",
                     json={"prompt": "a red circle", "seed": 11, **{k: int(v) for k, v in STEPS.items()}})
    assert int(np.abs(shown - api).max()) <= 1
    download = d.find_element(By.CSS_SELECTOR, "#gallery .card a[download]")
    # the download is the server's PNG as sent, its metadata kept
    assert download.get_attribute("href") == cards(d)[0].get_attribute("src")
    # reuse seed: a new seed typed, then the card's button puts 11 back
    fill(d, "seed", "99")
    d.find_element(By.CSS_SELECTOR, "#gallery .card button.reuse").click()
    assert d.find_element(By.ID, "seed").get_attribute("value") == "11"

    # an empty prompt: the server's own message on the page
    fill(d, "prompt", " ")
    d.find_element(By.ID, "generate").click()
    message = httpx.post(server + "/v1/images/generations", headers={"Authorization": f"Bearer {KEY}"},
                         json={"prompt": " ", "stream": True, "partial_images": 2, "seed": 11,
                               **{k: int(v) for k, v in STEPS.items()}}).json()["error"]["message"]
    wait_until(d, lambda d: d.find_element(By.ID, "error").is_displayed(), "the error")
    assert d.find_element(By.ID, "error").text == message

    # variations of an uploaded image
    image = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    d.find_element(By.CSS_SELECTOR, "[data-tab=vary]").click()
    d.find_element(By.ID, "vary-image").send_keys(str(image))
    fill(d, "vary-seed", "5")
    fill(d, "vary-n", "1")
    fill(d, "vary-decoder_steps", "4")
    fill(d, "vary-super_res_steps", "2")
    d.find_element(By.ID, "vary").click()
    wait_until(d, lambda d: len(cards(d)) == 2, "the variation")
    assert not d.find_element(By.ID, "error").is_displayed()
    shown = data_url_pixels(cards(d)[0].get_attribute("src"))  # the newest card comes first
    api = api_pixels(server, "/v1/images/variations", files={"image": ("upload.png", image.read_bytes())},
                     data={"seed": "5", "n": "1", "decoder_steps": "4", "super_res_steps": "2"})
    assert int(np.abs(shown - api).max()) <= 1

    # an interpolation between two prompts, frame by frame with the slider
    d.find_element(By.CSS_SELECTOR, "[data-tab=interpolate]").click()
    fill(d, "a-prompt", "a red circle")
    fill(d, "b-prompt", "a blue square")
    fill(d, "frames", "3")
    fill(d, "interp-seed", "2")
    fill(d, "interp-decoder_steps", "4")
    d.find_element(By.ID, "interpolate").click()
    wait_until(d, lambda d: d.find_element(By.ID, "frames-view").is_displayed(), "the frames")
    slider = d.find_element(By.ID, "frame-slider")
    assert slider.get_attribute("max") == "2"
    first = d.find_element(By.ID, "frame").get_attribute("src")
    d.execute_script("arguments[0].value = 2; arguments[0].dispatchEvent(new Event('input'))", slider)
    assert d.find_element(By.ID, "frame-label").text == "3 of 3"
    assert d.find_element(By.ID, "frame").get_attribute("src") != first
    # the status line reads the server's queue and recent latency
    wait_until(d, lambda d: "recent latency" in d.find_element(By.ID, "status").text, "the status line")
    logs = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "/v1/" not in e["message"]]
    assert not logs, logs  # no script error, no CSP violation (the API's own 4xx are expected)


def test_the_page_fits_a_phone(server, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.set_window_size(390, 844)
    try:
        d.get(server + "/")
        d.execute_script("localStorage.setItem('unclip-api-key', arguments[0])", KEY)
        d.refresh()
        wait_until(d, lambda d: "tiny" in d.find_element(By.ID, "model").text, "the model's name")
        width = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width  # no horizontal scrolling
        button = d.find_element(By.ID, "generate").size["width"]
        assert button >= 0.8 * width[1] - 40  # the main button spans the narrow screen
    finally:
        d.set_window_size(1100, 1300)


def test_a_stable_unclip_model_gets_its_own_fields(stable_server, browser):
    """A Stable unCLIP server: the page shows noise level and sampler, hides super-resolution, offers no
    variations (a text model) or interpolations, and its generation (previews, then the image) is the
    API's for the seed and settings; a noise level past the schedule is stopped by the field's range."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(stable_server + "/")
    d.execute_script("localStorage.setItem('unclip-api-key', arguments[0])", KEY)
    d.refresh()
    wait_until(d, lambda d: "sd-unclip-tiny" in d.find_element(By.ID, "model").text, "the model's name")
    assert all(d.find_element(By.ID, k).is_displayed() for k in ("noise_level", "scheduler"))
    assert not d.find_element(By.ID, "super_res_steps").is_displayed()
    assert "noise level 0" in d.find_element(By.ID, "defaults").text
    tabs = {t: d.find_element(By.CSS_SELECTOR, f"[data-tab={t}]").is_enabled()
            for t in ("vary", "interpolate")}
    assert tabs == {"vary": False, "interpolate": False}
    settings = {"prior_steps": "2", "decoder_steps": "4", "noise_level": "100"}
    fill(d, "prompt", "a red circle")
    fill(d, "seed", "7")
    for k, v in settings.items():
        fill(d, k, v)
    Select(d.find_element(By.ID, "scheduler")).select_by_value("ddim")
    fill(d, "partial_images", "2")
    d.find_element(By.ID, "generate").click()
    wait_until(d, lambda d: len(cards(d)) == 1, "the generated image")
    assert d.find_element(By.ID, "preview").get_attribute("data-partials") == "2"
    shown = data_url_pixels(cards(d)[0].get_attribute("src"))
    body = {"prompt": "a red circle", "seed": 7, "scheduler": "ddim",
            **{k: int(v) for k, v in settings.items()}}
    assert int(np.abs(shown - api_pixels(stable_server, "/v1/images/generations", json=body)).max()) <= 1
    # past the model's noising schedule: the field's range (from /v1/unclip/info) stops the form in the
    # browser, which says why, and nothing is sent
    fill(d, "noise_level", "1000")
    d.find_element(By.ID, "generate").click()
    field = d.find_element(By.ID, "noise_level")
    assert d.execute_script("return arguments[0].validity.rangeOverflow", field)
    assert "999" in field.get_attribute("validationMessage")
    assert len(cards(d)) == 1 and not d.find_element(By.ID, "error").is_displayed()
