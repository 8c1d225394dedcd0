"""Streamed partial images (issue 23): the engine's previews, OpenAI's `stream` / `partial_images` on
a real server read by OpenAI's own client, errors and disconnects mid-stream, interpolations over
HTTP, and the playground's routes."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FAST_STEPS
from tests.serve_helpers import Gate, running_server
from unclip.engine.batch import Request, partial_steps
from unclip.errors import UnclipError

GEN = "/v1/images/generations"
VARIATIONS = "/v1/images/variations"
INTERPOLATIONS = "/v1/unclip/interpolations"
WAIT = 120  # client timeout: never reached when the server works
STEPS = dict(prior_steps=3, decoder_steps=6, super_res_steps=2)
# The same request twice on the same thread: oneDNN's first call can differ from the next in the last
# float bit (measured 6e-7 on [0, 1] images; test_preview_does_not_change_the_images), far below the
# 1/510 that would move a PNG level.
SAME = 1e-5


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")).astype(int)


def levels(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """The Server-Sent Events of a whole response: (event, data)."""
    out = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def png(seed: int = 0, size: int = 24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, "PNG")
    return buffer.getvalue()


# -- the engine -----------------------------------------------------------------------------------

def test_partial_steps_come_early_distinct_and_inside_the_loop():
    assert partial_steps(25, 0) == [] and partial_steps(25, 1) == []  # k = 1: the decoder's output only
    assert partial_steps(25, 2) == [7]  # after 8 of 25 steps (1/3)
    assert partial_steps(25, 3) == [5, 11]  # after 6 and 12 (1/4, 1/2)
    for steps in range(1, 60):
        for k in range(4):
            got = partial_steps(steps, k)
            assert got == sorted(set(got)) and all(0 <= s < steps - 1 for s in got)
            assert len(got) == (k - 1 if steps >= k and k else 0) or steps < k


def test_preview_does_not_change_the_images(tiny_pipeline):
    """Each partial_images gives that many previews (the last: the decoder's output at the output
    size), in order, and the same final images as without them."""
    kw = dict(seed=5, output_type="pt", **STEPS)
    tiny_pipeline.generate("a warm-up", **kw)
    plain = tiny_pipeline.generate(["a red circle", "a blue square"], num_images=2, **kw)
    size = tiny_pipeline.dims.super_res_size
    for k in range(4):
        got: list = []
        streamed = tiny_pipeline.generate(["a red circle", "a blue square"], num_images=2, partial_images=k,
                                          on_partial=lambda i, x, got=got: got.append((i, x.clone())), **kw)
        assert float((streamed - plain).abs().max()) <= SAME
        assert [i for i, _ in got] == list(range(k))
        for _, x in got:
            assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
            assert float(x.min()) >= 0 and float(x.max()) <= 1
        if k >= 2:  # an early prediction is not the decoder's final output
            assert float((got[0][1] - got[-1][1]).abs().max()) > 0.01


def test_streamed_and_plain_requests_share_a_batch(tiny_pipeline):
    """A streaming request batches with one that does not stream; each gets what it gets alone."""
    s = tiny_pipeline.settings(**STEPS)
    seen = []
    a = Request(["a red circle"], s, torch.Generator().manual_seed(1), partial_images=2,
                on_partial=lambda i, x: seen.append((i, x.shape[0])))
    b = Request(["a blue square"], s, torch.Generator().manual_seed(2))
    out = tiny_pipeline.generate_requests([a, b])
    assert seen == [(0, 1), (1, 1)]
    for prompt, seed, images in (("a red circle", 1, out[0]), ("a blue square", 2, out[1])):
        alone = tiny_pipeline.generate(prompt, seed=seed, output_type="pt", **STEPS)
        assert float((images - alone).abs().max()) <= SAME


@pytest.mark.parametrize("bad", [4, -1, True, "2", 1.0])
def test_bad_partial_images_is_refused_naming_the_field(tiny_pipeline, bad):
    with pytest.raises(UnclipError, match="partial_images must be an integer from 0 to 3") as info:
        tiny_pipeline.generate("a red circle", partial_images=bad, on_partial=print, **STEPS)
    assert info.value.param == "partial_images"
    with pytest.raises(UnclipError, match="partial_images needs on_partial"):
        tiny_pipeline.generate("a red circle", partial_images=2, **STEPS)


def test_a_failing_callback_stops_its_previews_not_the_batch(tiny_pipeline):
    calls = []

    def broken(i, x):
        calls.append(i)
        raise RuntimeError("the caller's bug")

    images = tiny_pipeline.generate("a red circle", seed=3, output_type="pt", partial_images=3,
                                    on_partial=broken, **STEPS)
    assert calls == [0] and images.shape[0] == 1


# -- HTTP -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_pipeline):
    with running_server(tiny_pipeline, max_upload_bytes=256 * 1024) as (url, state):
        yield url, state


def test_openai_client_streams_partial_images_then_the_image(server):
    """OpenAI's client, stream=True, partial_images=2: two partial events, then one completed event
    whose image equals the unstreamed request's for the seed; partial_images=0: one completed."""
    from openai import OpenAI

    url, state = server
    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    extra = {"seed": 7, **STEPS}
    plain = httpx.post(url + GEN, json={"prompt": "a red circle", **extra}, timeout=WAIT).json()
    stream = client.images.generate(prompt="a red circle", model="tiny", stream=True, partial_images=2,
                                    extra_body=extra)
    got = list(stream)
    assert [e.type for e in got] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in got[:2]] == [0, 1]
    assert got[0].size == state.size and got[-1].output_format == "png"
    difference = np.abs(decode(got[-1].b64_json) - decode(plain["data"][0]["b64_json"]))
    assert int(difference.max()) <= 1
    assert decode(got[0].b64_json).shape == decode(got[-1].b64_json).shape  # previews at the output size
    only = list(client.images.generate(prompt="a red circle", stream=True, partial_images=0,
                                       extra_body=extra))
    assert [e.type for e in only] == ["image_generation.completed"]


def test_stream_with_several_images_and_the_events_on_the_wire(server):
    url, _ = server
    response = httpx.post(url + GEN, json={"prompt": "a red circle", "n": 2, "stream": True,
                                           "partial_images": 3, "seed": 1, **STEPS}, timeout=WAIT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    kinds = [(e, d["partial_image_index"] if "partial" in e else None, d["image_index"]) for e, d in got]
    partial = "image_generation.partial_image"
    assert kinds == [(partial, i, k) for i in range(3) for k in range(2)] + [
        ("image_generation.completed", None, 0), ("image_generation.completed", None, 1)]
    assert all(e == d["type"] for e, d in got) and got[-1][1]["seed"] == 1


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a red circle", "partial_images": 2}, "partial_images"),  # without stream
    ({"prompt": "a red circle", "stream": True, "partial_images": 4}, "partial_images"),
    ({"prompt": "a red circle", "stream": True, "partial_images": "2"}, "partial_images"),
    ({"prompt": "", "stream": True, "partial_images": 2}, "prompt"),
    ({"prompt": "a red circle", "stream": "yes"}, "stream"),
])
def test_a_stream_refused_before_it_starts_is_an_ordinary_400(server, body, param):
    url, _ = server
    response = httpx.post(url + GEN, json={**body, **STEPS}, timeout=WAIT)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json()["error"]["param"] == param


def test_a_failure_after_the_stream_began_is_an_error_event(tiny_pipeline):
    """The deadline passes while the request's batch is held: the stream ends with an `error` event
    carrying the envelope, which OpenAI's client raises as an APIError."""
    from openai import APIError, OpenAI

    gate = Gate(tiny_pipeline)
    with running_server(gate, timeout_s=1.0) as (url, state):
        response = httpx.post(url + GEN, json={"prompt": "a red circle", "stream": True, "partial_images": 1,
                                               **STEPS}, timeout=WAIT)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(APIError, match="deadline passed"):
            list(client.images.generate(prompt="a red circle", stream=True, partial_images=1,
                                        extra_body=STEPS))
        gate.open.set()
    assert response.status_code == 200
    [(event, data)] = events(response)
    assert event == "error" and data["error"]["code"] == "deadline_exceeded"
    assert data["error"]["type"] == "timeout_error"


def test_a_client_that_leaves_mid_stream_frees_its_rows_at_the_next_step(tiny_pipeline):
    """A streaming client reads its first preview and hangs up: the server cancels the request, and
    from the step after the cancellation its rows are no longer computed."""
    settings = dict(prior_steps=3, decoder_steps=120, super_res_steps=2)
    with running_server(tiny_pipeline) as (url, state):
        engine = state.engine
        body = json.dumps({"prompt": "a red circle", "stream": True, "partial_images": 3,
                           **settings}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as leaving:
            head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            leaving.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            while b"image_generation.partial_image" not in received:
                chunk = leaving.recv(65536)
                assert chunk, "the server closed the stream before a preview"
                received += chunk
        wait = threading.Event()
        for _ in range(600):
            if engine.dropped:
                break
            wait.wait(0.05)
        [(job_id, cancelled_at, reason, where)] = list(engine.dropped)
    assert (reason, where) == ("cancelled", "running")
    decoder = [(t, ids) for t, stage, _, rows, ids in engine.steps if stage == "decoder" and job_id in ids]
    assert len(decoder) < 120  # it stopped early
    assert sum(1 for t, _ in decoder if t > cancelled_at) <= 1  # at most the step that was running


def test_variations_stream_too(server):
    url, _ = server
    response = httpx.post(url + VARIATIONS, files={"image": ("i.png", png(), "image/png")},
                          data={"stream": "true", "partial_images": "1", "n": "2", "seed": "3",
                                "decoder_steps": "4", "super_res_steps": "2"}, timeout=WAIT)
    assert response.status_code == 200
    got = [(e, d["image_index"]) for e, d in events(response)]
    assert got == [("image_generation.partial_image", 0), ("image_generation.partial_image", 1),
                   ("image_generation.completed", 0), ("image_generation.completed", 1)]
    plain = httpx.post(url + VARIATIONS, files={"image": ("i.png", png(), "image/png")},
                       data={"n": "2", "seed": "3", "decoder_steps": "4", "super_res_steps": "2"},
                       timeout=WAIT)
    for (_, data), item in zip(events(response)[2:], plain.json()["data"], strict=True):
        assert int(np.abs(decode(data["b64_json"]) - decode(item["b64_json"])).max()) <= 1


# -- interpolations, info, status, the playground's files -----------------------------------------

def test_interpolation_between_a_prompt_and_an_image(server, tiny_pipeline):
    """The frames equal Pipeline.interpolate's for the seed (the same endpoints, the same noise)."""
    url, _ = server
    fields = {"a": "a red circle", "frames": "3", "seed": "4", "decoder_steps": "4", "super_res_steps": "2",
              "prior_steps": "3"}
    response = httpx.post(url + INTERPOLATIONS, files={"b": ("b.png", png(1), "image/png")}, data=fields,
                          timeout=WAIT)
    assert response.status_code == 200, response.text
    served = [decode(d["b64_json"]) for d in response.json()["data"]]
    b = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png(1))), dtype=np.float32) / 255).permute(2, 0, 1)
    direct = tiny_pipeline.interpolate("a red circle", b, 3, seed=4, output_type="pt", decoder_steps=4,
                                       super_res_steps=2, prior_steps=3)
    assert len(served) == 3
    for got, want in zip(served, levels(direct), strict=True):
        assert int(np.abs(got - want).max()) <= 1


@pytest.mark.parametrize("fields, files, param", [
    ({"a": "a red circle"}, {}, "b"),
    ({"a": "a red circle", "b": "a blue square", "frames": "1"}, {}, "frames"),
    ({"a": "a red circle", "b": "a blue square", "n": "2"}, {}, "n"),
    ({"b": "a blue square"}, {"a": ("a.png", b"not an image", "image/png")}, "a"),
    ({"a": "a red circle", "b": "a blue square", "stream": "true"}, {}, "stream"),
])
def test_interpolation_mistakes_are_400_naming_the_field(server, fields, files, param):
    url, _ = server
    fields = {**fields, "decoder_steps": "4"}
    if files:
        response = httpx.post(url + INTERPOLATIONS, data=fields, files=files, timeout=WAIT)
    else:  # text fields only, still multipart (as the page sends them; httpx would urlencode them)
        body = "".join(f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in fields.items()) + "--b--\r\n"
        response = httpx.post(url + INTERPOLATIONS, content=body.encode(), timeout=WAIT,
                              headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_info_status_and_the_page_with_an_api_key(tiny_pipeline):
    """The page and its files load without a key (they hold no data; their CSP keeps them to this
    server); the model's info and the queue's status need the key like every API route."""
    from unclip.options import digest

    with running_server(tiny_pipeline, key_digests=(digest("sk-test"),)) as (url, state):
        page = httpx.get(url + "/")
        files = [httpx.get(url + f"/playground/{name}") for name in ("app.js", "style.css")]
        refused = httpx.get(url + "/v1/unclip/info")
        auth = {"Authorization": "Bearer sk-test"}
        info = httpx.get(url + "/v1/unclip/info", headers=auth).json()
        httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS}, headers=auth, timeout=WAIT)
        status = httpx.get(url + "/v1/unclip/status", headers=auth).json()
        missing = httpx.get(url + "/playground/secret.txt")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/playground/app.js"' in page.text
    assert [f.status_code for f in files] == [200, 200]
    assert refused.status_code == 401 and missing.status_code in (401, 404)
    assert info["model"] == "tiny" and info["size"] == state.size
    assert info["defaults"]["decoder_steps"] == tiny_pipeline.defaults.decoder_steps
    assert set(info["image_defaults"]) == {"decoder_steps", "super_res_steps", "decoder_guidance"}
    assert info["limits"]["max_partial_images"] == 3 and info["variations"] is True
    assert status["queue_depth"] == 0 and status["recent"]["requests"] == 1
