"""OpenAI's `POST /v1/images/variations` on a real server: a multipart form with the image file,
seed-exact images, and every client mistake as a 4xx error envelope naming the field."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve_helpers import running_server

VARIATIONS = "/v1/images/variations"
WAIT = 120  # client timeout: never reached when the server works
STEPS = {"decoder_steps": "3", "super_res_steps": "2"}


def png(seed: int = 0, size: tuple[int, int] = (24, 24)) -> bytes:
    buffer = io.BytesIO()
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


def post(url: str, image: bytes | None = png(), **fields) -> httpx.Response:
    """A multipart form (image None: the text fields only, still multipart)."""
    fields = {**STEPS, **fields}
    if image is not None:
        files = {"image": ("image.png", image, "image/png")}
        return httpx.post(url + VARIATIONS, files=files, data=fields, timeout=WAIT)
    body = "".join(f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in fields.items())
    return httpx.post(url + VARIATIONS, content=(body + "--b--\r\n").encode(), timeout=WAIT,
                      headers={"content-type": "multipart/form-data; boundary=b"})


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    with running_server(tiny_pipeline, max_upload_bytes=64 * 1024) as (url, state):
        yield url, state


def test_variations_follow_openais_images_api(server, tiny_pipeline):
    url, _ = server
    response = post(url, n="2", seed="7", size="32x32", response_format="b64_json", model="tiny")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "seed"} and body["seed"] == 7
    got = [pixels(item) for item in body["data"]]
    expected = tiny_pipeline.vary(Image.open(io.BytesIO(png())), seed=7, num_images=2, decoder_steps=3,
                                  super_res_steps=2)
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(got, expected, strict=True))
    meta = Image.open(io.BytesIO(base64.b64decode(body["data"][1]["b64_json"]))).text
    assert meta["mode"] == "variation" and meta["seed"] == "7" and meta["image_index"] == "1"
    assert meta["steps"] == "decoder 3, super-res 2"


@pytest.mark.parametrize("what,image,fields,status,param", [
    ("no image", None, {}, 400, "image"),
    ("not an image", b"GIF89a but not really", {}, 400, "image"),
    ("truncated PNG", png()[:50], {}, 400, "image"),
    ("too many pixels", huge_png(5000, 5000), {}, 400, "image"),
    ("a decompression bomb", huge_png(100_000, 100_000), {}, 400, "image"),
    ("too many bytes", png(size=(200, 200)), {}, 413, None),
    ("n as a fraction", png(), {"n": "2.5"}, 400, "n"),
    ("n is zero", png(), {"n": "0"}, 400, "n"),
    ("huge n", png(), {"n": "1000"}, 400, "n"),
    ("unknown field", png(), {"prompt": "a cat"}, 400, "prompt"),
    ("unknown size", png(), {"size": "1024x1024"}, 400, "size"),
    ("url response format", png(), {"response_format": "url"}, 400, "response_format"),
    ("bad guidance", png(), {"decoder_guidance": "0.5"}, 400, "decoder_guidance"),
    ("negative seed", png(), {"seed": "-1"}, 400, "seed"),
])
def test_client_mistakes_are_4xx_envelopes(server, what, image, fields, status, param):
    url, _ = server
    response = post(url, image, **fields)
    assert response.status_code == status, (what, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, (what, error)
    assert "Traceback" not in response.text and "\n" not in error["message"]


def test_a_json_body_is_refused_with_415(server):
    url, _ = server
    response = httpx.post(url + VARIATIONS, json={"image": "a.png"}, timeout=WAIT)
    assert response.status_code == 415 and response.json()["error"]["code"] == "invalid_content_type"


def test_image_sent_as_text_is_refused(server):
    url, _ = server
    response = httpx.post(url + VARIATIONS, data={"image": "a.png"},
                          files={"unused": ("x", b"x", "text/plain")}, timeout=WAIT)
    assert response.status_code == 400 and response.json()["error"]["param"] in ("image", "unused")


def test_model_without_an_image_encoder(tiny_components):
    from dataclasses import replace

    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.pipeline import Pipeline
    from unclip.models.networks import model_dims

    c = replace(tiny_components, image_encoder=None, image_preprocess=None)
    pipe = Pipeline(TorchBackend(c), c.tokenizer, model_dims(c), c.schedulers, model_name="no-eyes")
    with running_server(pipe) as (url, _):
        response = post(url)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "image" and "needs a CLIP image encoder" in error["message"]
