"""The HTTP server, end to end: a real uvicorn server on 127.0.0.1 and a real HTTP client (httpx);
nothing between the client and the engine is replaced."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import FAST_STEPS
from tests.serve_helpers import Gate, free_port, running_server

GEN = "/v1/images/generations"
WAIT = 120  # client timeout: never reached when the server works


def wait_for(condition, what: str, seconds: float = WAIT) -> None:
    """Poll until `condition()` holds; a bounded wait."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def pixels(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB"))


@pytest.fixture(scope="module")
def server(tiny_pipeline):
    with running_server(tiny_pipeline) as (url, state):
        yield url, state


def test_generation_follows_openais_images_api(server):
    url, _ = server
    response = httpx.post(url + GEN, json={"prompt": "a red circle", "n": 2, "size": "32x32", "seed": 7,
                                           "response_format": "b64_json", "model": "tiny", **FAST_STEPS},
                          timeout=WAIT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "seed"} and body["seed"] == 7
    assert [pixels(item).shape for item in body["data"]] == [(32, 32, 3)] * 2
    assert response.headers["x-unclip-replica"] == "test-replica" and response.headers["x-request-id"]
    assert int(response.headers["x-unclip-batch-images"]) >= 2
    again = httpx.post(url + GEN, json={"prompt": "a red circle", "n": 2, "seed": 7, **FAST_STEPS},
                       timeout=WAIT)
    assert [item["b64_json"] for item in again.json()["data"]] == [item["b64_json"] for item in body["data"]]


MALFORMED = [
    # (what, body as bytes or JSON-able, expected status, expected param)
    ("not JSON", b"{prompt: 'a'}", 400, None),
    ("JSON but not an object", b'["a red circle"]', 400, None),
    ("empty body", b"", 400, None),
    ("missing prompt", {"n": 1}, 400, "prompt"),
    ("empty prompt", {"prompt": "   "}, 400, "prompt"),
    ("prompt is a list", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt is a number", {"prompt": 5}, 400, "prompt"),
    ("n as a string", {"prompt": "a", "n": "2"}, 400, "n"),
    ("n is zero", {"prompt": "a", "n": 0}, 400, "n"),
    ("huge n", {"prompt": "a", "n": 100000}, 400, "n"),
    ("n as a float", {"prompt": "a", "n": 2.5}, 400, "n"),
    ("unknown size", {"prompt": "a", "size": "1024x1024"}, 400, "size"),
    ("url response format", {"prompt": "a", "response_format": "url"}, 400, "response_format"),
    ("unknown response format", {"prompt": "a", "response_format": "png"}, 400, "response_format"),
    ("unknown field", {"prompt": "a", "quality": "hd"}, 400, "quality"),
    ("seed as a string", {"prompt": "a", "seed": "42"}, 400, "seed"),
    ("negative seed", {"prompt": "a", "seed": -1}, 400, "seed"),
    ("seed beyond 64 bits", {"prompt": "a", "seed": 2**64}, 400, "seed"),
    ("one step", {"prompt": "a", "decoder_steps": 1}, 400, "decoder_steps"),
    ("steps beyond the schedule", {"prompt": "a", "prior_steps": 5000}, 400, "prior_steps"),
    ("guidance as a word", {"prompt": "a", "decoder_guidance": "high"}, 400, "decoder_guidance"),
    ("huge guidance", {"prompt": "a", "decoder_guidance": 1e30}, 400, "decoder_guidance"),
    ("NaN guidance", b'{"prompt": "a", "prior_guidance": NaN}', 400, "prior_guidance"),
    ("use_prior as 1", {"prompt": "a", "use_prior": 1}, 400, "use_prior"),
    ("huge body", {"prompt": "a" * 100_000}, 413, None),
]


@pytest.mark.parametrize("what,body,status,param", MALFORMED, ids=[m[0].replace(" ", "-") for m in MALFORMED])
def test_malformed_requests_get_a_4xx_envelope(server, what, body, status, param):
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url + GEN, content=content, headers={"content-type": "application/json"},
                          timeout=WAIT)
    assert response.status_code == status, (what, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and "\n" not in error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, (what, error)


def test_wrong_route_and_method_get_envelopes(server):
    url, _ = server
    for response, status in [(httpx.get(url + GEN), 405), (httpx.get(url + "/v1/nothing"), 404)]:
        assert response.status_code == status and response.json()["error"]["code"] in ("method_not_allowed",
                                                                                       "not_found")


def test_health_and_metrics(server):
    url, _ = server
    assert httpx.get(url + "/health/live").json() == {"status": "live"}
    assert httpx.get(url + "/health/ready").status_code == 200
    httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS}, timeout=WAIT)
    text = httpx.get(url + "/metrics").text
    for name in ("unclip_requests_total", "unclip_request_duration_seconds_bucket",
                 "unclip_queue_duration_seconds_bucket", "unclip_compute_duration_seconds_bucket",
                 "unclip_batch_images_bucket", "unclip_queue_depth", "unclip_in_flight_requests",
                 "unclip_images_total", "unclip_http_requests_total"):
        assert name in text, name
    series = 'unclip_http_requests_total{code="200",replica="test-replica",route="/v1/images/generations"}'
    assert series in text


def test_same_seed_same_images_as_the_cli(demo_pipeline, tmp_path):
    """A request's images equal `unclip generate` with the same prompt, seed, n and settings."""
    settings = dict(prior_steps=5, decoder_steps=5, super_res_steps=3)
    prompt, seed, n = "a yellow square on a black background", 31, 2
    with running_server(demo_pipeline, model="demo") as (url, _):
        response = httpx.post(url + GEN, json={"prompt": prompt, "n": n, "seed": seed, **settings},
                              timeout=WAIT)
    served = [pixels(item) for item in response.json()["data"]]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    subprocess.run(["unclip", "generate", prompt, "--seed", str(seed), "--num-images", str(n), *flags,
                    "--out", str(tmp_path / "cli")], check=True, capture_output=True, timeout=600)
    cli = [np.asarray(Image.open(tmp_path / "cli" / f"{k:04d}.png").convert("RGB")) for k in range(n)]
    for a, b in zip(served, cli, strict=True):
        assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 1  # 1/255: see tests/test_batching.py


class FailOn:
    """A real pipeline that fails the batch holding `prompt` as a non-finite stage would."""

    def __init__(self, pipeline, prompt: str):
        self._pipeline, self.prompt = pipeline, prompt

    def __getattr__(self, name):  # settings, limits, dims: the real pipeline's
        return getattr(self._pipeline, name)

    def generate_requests(self, requests, **kw):
        if any(self.prompt in r.prompts for r in requests):
            from unclip.errors import GenerationError

            raise GenerationError("the decoder stage produced non-finite values (precision fp16, batch 1); "
                                  "use --dtype fp32 or a smaller guidance scale")
        return self._pipeline.generate_requests(requests, **kw)


def test_a_failed_batch_is_a_500_envelope_and_the_server_keeps_serving(tiny_pipeline, caplog):
    """The client gets a generic message with its request id; the cause (here: non-finite output,
    with the precision) goes to the server's log under that id, never to the client."""
    with running_server(FailOn(tiny_pipeline, "poison")) as (url, _):
        bad = httpx.post(url + GEN, json={"prompt": "poison", **FAST_STEPS}, timeout=WAIT)
        good = httpx.post(url + GEN, json={"prompt": "fine", **FAST_STEPS}, timeout=WAIT)
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed"
    request_id = bad.headers["x-request-id"]
    message = bad.json()["error"]["message"]
    assert f"request id {request_id}" in message
    assert "non-finite" not in message and "precision" not in message and "Traceback" not in bad.text
    logged = [r.getMessage() for r in caplog.records if request_id in r.getMessage()]
    assert any("non-finite" in line for line in logged), logged
    assert good.status_code == 200


def test_warm_up_freezes_the_models_objects_out_of_the_garbage_collector(tiny_pipeline):
    """A full collection walking the model's objects stalls the event loop (a 429 took 280 ms)."""
    import gc

    gc.unfreeze()
    try:
        with running_server(tiny_pipeline, warmup=True) as (_, state):
            assert state.ready and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_full_queue_gets_429_with_retry_after(tiny_pipeline):
    gate = Gate(tiny_pipeline)  # the first batch runs until the gate opens: the scheduler stays busy
    with running_server(gate, max_queue=1, max_batch_images=1, max_wait_ms=0) as (url, state):
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS}, timeout=WAIT))) for _ in range(2)]
        threads[0].start()
        wait_for(lambda: state.engine.in_flight == 1, "the first request to run")
        threads[1].start()
        wait_for(lambda: state.engine.queue_depth == 1, "the second request to queue")
        refused = httpx.post(url + GEN, json={"prompt": "b", **FAST_STEPS}, timeout=WAIT)
        gate.open.set()
        for t in threads:
            t.join(WAIT)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in results] == [200, 200]


def test_client_that_disconnects_frees_its_rows_within_one_step(demo_pipeline):
    """Two requests share a batch; one client gives up mid-decoder. From the step after the server
    saw the disconnect, the batch computes only the other request's rows, and its images are
    those it gives alone."""
    settings = dict(prior_steps=4, decoder_steps=40, super_res_steps=2, decoder_guidance=2.0)
    with running_server(demo_pipeline, model="demo", max_batch_images=3, max_wait_ms=5000) as (url, state):
        engine, kept = state.engine, {}

        def patient():
            kept["response"] = httpx.post(url + GEN, json={"prompt": "a red circle", "seed": 1, **settings},
                                          timeout=WAIT)

        thread = threading.Thread(target=patient)
        thread.start()
        wait_for(lambda: engine.queue_depth == 1, "the first request to queue")
        # the second client (2 images: the batch of 3 starts at once) speaks HTTP on a raw socket,
        # so that it can hang up at a chosen moment: once the decoder has run a step
        body = json.dumps({"prompt": "a green square", "n": 2, "seed": 2, **settings}).encode()
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as leaving:
            head = f"POST {GEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            leaving.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: any(stage == "decoder" for _, stage, *_ in list(engine.steps)), "the decoder")
        thread.join(WAIT)
    assert kept["response"].status_code == 200
    [(_, cancelled_at, reason, where)] = list(engine.dropped)
    assert (reason, where) == ("cancelled", "running")
    steps = [(t, rows) for t, stage, _, rows, _ in engine.steps if stage == "decoder"]
    assert steps[0][1] == 6  # guided: [uncond; cond] of 3 images
    after = [rows for t, rows in steps if t > cancelled_at]
    assert after and after[0] in (6, 2) and all(rows == 2 for rows in after[1:])  # the running step finishes
    alone = demo_pipeline.generate("a red circle", seed=1, output_type="np", **settings)[0]
    served = pixels(kept["response"].json()["data"][0])
    assert int(np.abs(served.astype(int) - (alone * 255).round().astype(int)).max()) <= 1


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path):
    """SIGTERM while requests run: readiness 503 and new requests 503 at once, every accepted
    request answered 200, exit status 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "serve", "--model", "tiny",
                             "--port", str(port), "--max-batch-images", "2", "--drain-s", "120",
                             "--max-steps", "300"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + WAIT
        while time.monotonic() < end:
            try:
                if httpx.get(url + "/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        slow = dict(prior_steps=3, decoder_steps=300, super_res_steps=2)
        results: list = []
        threads = [threading.Thread(target=lambda k=k: results.append(
            httpx.post(url + GEN, json={"prompt": f"p{k}", **slow}, timeout=WAIT))) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # all four accepted (two running, two queued)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(url + "/health/ready")
        late = httpx.post(url + GEN, json={"prompt": "late", **FAST_STEPS}, timeout=WAIT)
        for t in threads:
            t.join(WAIT)
        code = proc.wait(WAIT)
    finally:
        proc.kill()
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert sorted(r.status_code for r in results) == [200] * 4
    assert code == 0, proc.stderr.read()[-2000:]
