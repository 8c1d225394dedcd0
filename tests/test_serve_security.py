"""Safe to expose (issue 22): API keys, admission before work, per-request caps, connection limits,
health that tells the truth, no internals to clients. Each against a real uvicorn server on
127.0.0.1 with the settings `unclip serve` runs (tests/serve_helpers.py), and real clients (httpx,
OpenAI's client, raw sockets for what a client library will not send); nothing mocked between the
client and the engine. Waits are bounded; no test asserts a duration."""

from __future__ import annotations

import io
import json
import os
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

GEN, VAR = "/v1/images/generations", "/v1/images/variations"
WAIT = 120  # client timeout: never reached when the server works
KEY = "sk-test-key-1"


def digests(*keys: str) -> tuple[str, ...]:
    from unclip.options import digest

    return tuple(digest(k) for k in keys)


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def wait_for(condition, what: str, seconds: float = WAIT) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served_pipeline():
    """tiny, loaded with the caps `unclip serve` puts on a request by default."""
    import unclip
    from unclip.options import ServeOptions
    from unclip.serve.cli import limits_for

    return unclip.load("tiny", limits=limits_for(ServeOptions()))


# -- API keys ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(served_pipeline):
    with running_server(served_pipeline, key_digests=digests(KEY, "sk-other")) as (url, state):
        yield url, state


def test_api_key_required_on_every_route_but_health(keyed):
    url, _ = keyed
    missing = httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS}, timeout=WAIT)
    wrong = httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS}, headers=auth("sk-wrong"),
                       timeout=WAIT)
    basic = httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS},
                       headers={"Authorization": f"Basic {KEY}"}, timeout=WAIT)
    for response in (missing, wrong, basic):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.headers["www-authenticate"] == "Bearer"
    for key in (KEY, "sk-other"):
        ok = httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS}, headers=auth(key),
                        timeout=WAIT)
        assert ok.status_code == 200, ok.text
    assert httpx.get(url + "/health/live").status_code == 200
    assert httpx.get(url + "/health/ready").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 401
    metrics = httpx.get(url + "/metrics", headers=auth())
    assert metrics.status_code == 200 and "unclip_requests_total" in metrics.text
    assert httpx.post(url + VAR, files={"image": ("a.png", b"x", "image/png")}).status_code == 401
    assert httpx.get(url + "/nowhere").status_code == 401  # no route list for strangers


def test_openai_client_with_its_api_key(keyed):
    import openai

    url, _ = keyed
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT)
    result = client.images.generate(prompt="a red circle", n=2, extra_body=FAST_STEPS)
    assert len(result.data) == 2 and all(item.b64_json for item in result.data)
    stranger = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0, timeout=WAIT)
    with pytest.raises(openai.AuthenticationError) as caught:
        stranger.images.generate(prompt="a red circle", extra_body=FAST_STEPS)
    assert caught.value.code == "invalid_api_key"


def test_keys_are_compared_as_digests_in_constant_time():
    """Every configured digest is compared (no early exit on a match), with hmac.compare_digest."""
    import inspect

    from unclip.serve.server import ApiKeyAuth

    source = inspect.getsource(ApiKeyAuth.__call__)
    assert "hmac.compare_digest(given, d) for d in digests]" in source and "any(matches)" in source


def serve_process(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`unclip serve --model tiny` on a free 127.0.0.1 port; (process, url) once ready (or exited)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "serve", "--model", "tiny", "--port",
                             str(port), *args], env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return httpx.get(url + "/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, "unclip serve to be ready")
    return proc, url


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        proc.wait(60)
    finally:
        proc.kill()
    return proc.stderr.read()


@pytest.mark.slow
def test_cli_keys_from_the_environment_and_a_file_the_metrics_port_and_the_served_name(tmp_path, tiny_folder):
    """`unclip serve` itself: keys from $UNCLIP_API_KEY and --api-key-file, /metrics on its own port
    without a key, a cap from the command line, and the served name (never the folder's path) in
    readiness and in the PNGs."""
    keys = tmp_path / "keys.txt"
    keys.write_text("# the team's keys\nsk-from-file\n\n")
    metrics_port = free_port()
    proc, url = serve_process("--model", str(tiny_folder), "--served-model-name", "shapes-v1",
                              "--api-key-file", str(keys), "--metrics-port", str(metrics_port),
                              "--max-steps", "30", env={"UNCLIP_API_KEY": "sk-from-env"})
    try:
        assert proc.poll() is None, proc.stderr.read()
        body = {"prompt": "a red circle", **FAST_STEPS}
        assert httpx.post(url + GEN, json=body, timeout=WAIT).status_code == 401
        for key in ("sk-from-env", "sk-from-file"):
            assert httpx.post(url + GEN, json=body, headers=auth(key), timeout=WAIT).status_code == 200
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")  # its own port: no key
        assert scraped.status_code == 200 and "unclip_requests_total" in scraped.text
        assert httpx.get(url + "/metrics").status_code == 401
        over = httpx.post(url + GEN, json={**body, "decoder_steps": 31}, headers=auth("sk-from-env"),
                          timeout=WAIT)
        assert over.status_code == 400 and over.json()["error"]["param"] == "decoder_steps"
        ready = httpx.get(url + "/health/ready").json()
        image = httpx.post(url + GEN, json=body, headers=auth("sk-from-file"), timeout=WAIT).json()
    finally:
        log = stop(proc)
    assert "sk-from-env" not in log and "sk-from-file" not in log  # keys never logged
    import base64

    png = Image.open(io.BytesIO(base64.b64decode(image["data"][0]["b64_json"])))
    assert ready["model"] == "shapes-v1" and png.text["model"] == "shapes-v1"
    assert str(tiny_folder) not in json.dumps(ready) and str(tiny_folder) not in json.dumps(png.text)


@pytest.mark.parametrize("args,message", [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 exposes the server to the network without an API key"),
    (["--host", "10.1.2.3"], "give --api-key (or $UNCLIP_API_KEY, or --api-key-file)"),
    (["--api-key-file", "/nonexistent/keys"], "--api-key-file /nonexistent/keys: cannot be read"),
    (["--replicas", "2"], "are Ray Serve settings; add --ray"),
    (["--max-steps", "1"], "--max-steps"),
])
def test_serve_refuses_unsafe_or_wrong_options_in_one_line(args, message, monkeypatch):
    """Refused before anything loads or listens (nothing binds a non-loopback address here)."""
    from click.testing import CliRunner

    from unclip.cli import cli

    monkeypatch.delenv("UNCLIP_API_KEY", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--model", "tiny", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.strip().splitlines() if line.strip()]) <= 3


def test_loopback_hosts_need_no_key():
    from unclip.options import ServeOptions, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    ServeOptions(host="::1").check()
    ServeOptions(host="0.0.0.0", api_key=("k",)).check()
    ServeOptions(host="0.0.0.0", allow_unauthenticated=True).check()


def test_a_missing_server_dependency_fails_at_start(monkeypatch):
    # Starlette's form parser imports python_multipart once: imported here before it is hidden, it
    # does not remember it missing for the rest of the session
    import starlette.formparsers  # noqa: F401
    from click.testing import CliRunner

    from unclip.cli import cli

    monkeypatch.setitem(sys.modules, "python_multipart", None)  # python-multipart not installed
    result = CliRunner().invoke(cli, ["serve", "--model", "tiny"])
    assert result.exit_code == 1
    assert "python-multipart" in result.output and "pip install 'unclip[serve]'" in result.output


def test_the_serve_and_ray_extras_declare_what_the_routes_import():
    """A fresh `pip install "unclip[serve]"` (or `[ray]`) has every package the start-up check asks
    for (the variations route once failed on a fresh install: python-multipart was not declared)."""
    import re
    from pathlib import Path

    import tomllib

    from unclip.serve.cli import SERVE_DEPENDENCIES

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    for extra in ("serve", "ray", "dev"):
        declared = {re.split(r"[<>=\[;! ]", req, maxsplit=1)[0].lower() for req in extras[extra]}
        assert {package for _, package in SERVE_DEPENDENCIES} <= declared, (extra, declared)


# -- admission before work ----------------------------------------------------------------------------

def big_png(side: int = 2048) -> bytes:
    """A real side x side PNG (smooth, so that it is small to send: what matters is its pixels)."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    array = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (side, 1)),
                      np.tile(ramp[:, None], (1, side))], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def test_uploads_to_a_full_queue_get_429_before_anything_is_decoded(served_pipeline):
    """The queue full (one batch running, one request waiting, max_queue 1): 20 concurrent uploads of a
    2048x2048 PNG all get 429 and none is decoded (unclip_uploads_decoded_total stays 0), while the
    process's RSS rises by under 100 MB. The time to each 429 is printed, not asserted."""
    gate = Gate(served_pipeline)
    image = big_png()
    with running_server(gate, max_queue=1, max_upload_bytes=32 * 2**20) as (url, state):
        running = threading.Thread(target=lambda: httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS},
                                                             timeout=WAIT))
        running.start()
        wait_for(gate.entered.is_set, "the first batch to start")
        waiting = threading.Thread(target=lambda: httpx.post(url + GEN, json={"prompt": "b", **FAST_STEPS},
                                                             timeout=WAIT))
        waiting.start()
        wait_for(lambda: state.engine.queue_depth == 1, "the second request to queue")
        before = rss_mb()
        answers: list = []

        def upload() -> None:
            t0 = time.perf_counter()
            response = httpx.post(url + VAR, files={"image": ("big.png", image, "image/png")},
                                  data={"decoder_steps": "2", "super_res_steps": "2"}, timeout=WAIT)
            answers.append((response.status_code, response.json()["error"]["code"],
                            time.perf_counter() - t0, response.headers.get("retry-after")))

        threads = [threading.Thread(target=upload) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        risen = rss_mb() - before
        decoded = state.engine.metrics.uploads_decoded.labels(replica="test-replica")._value.get()
        gate.open.set()
        running.join(WAIT)
        waiting.join(WAIT)
    seconds = sorted(a[2] for a in answers)
    print(f"\n20 uploads of a {len(image):,}-byte 2048x2048 PNG to a full queue: 429 after "
          f"{seconds[0] * 1e3:.1f} ms (fastest), {seconds[len(seconds) // 2] * 1e3:.1f} ms (median), "
          f"{seconds[-1] * 1e3:.1f} ms (slowest); RSS {risen:+.1f} MB")
    assert [(a[0], a[1]) for a in answers] == [(429, "queue_full")] * 20
    assert all(a[3] is not None and int(a[3]) >= 1 for a in answers)
    assert decoded == 0
    assert risen < 100


def test_an_admitted_upload_is_decoded_once_and_pixels_over_the_cap_are_refused(served_pipeline):
    with running_server(served_pipeline, max_upload_bytes=32 * 2**20) as (url, state):
        ok = httpx.post(url + VAR, files={"image": ("s.png", big_png(64), "image/png")},
                        data={"decoder_steps": "2", "super_res_steps": "2"}, timeout=WAIT)
        too_many = httpx.post(url + VAR, files={"image": ("b.png", big_png(2049), "image/png")},
                              data={"decoder_steps": "2", "super_res_steps": "2"}, timeout=WAIT)
        decoded = state.engine.metrics.uploads_decoded.labels(replica="test-replica")._value.get()
    assert ok.status_code == 200, ok.text
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "image"
    assert "4,198,401" in too_many.json()["error"]["message"]  # 2049 x 2049, named from the header
    assert decoded == 2  # both admitted; the second refused from its header


# -- per-request caps and the default deadline ------------------------------------------------------

@pytest.mark.parametrize("field,value,param", [
    ("n", 11, "n"),
    ("decoder_steps", 101, "decoder_steps"),
    ("prior_steps", 5000, "prior_steps"),
    ("decoder_guidance", 20.5, "decoder_guidance"),
])
def test_requests_over_the_servers_caps_are_400_naming_the_field(served_pipeline, field, value, param):
    with running_server(served_pipeline) as (url, _):
        response = httpx.post(url + GEN, json={"prompt": "a red circle", **FAST_STEPS, field: value},
                              timeout=WAIT)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_default_options_bound_every_request():
    from unclip.options import ServeOptions

    o = ServeOptions()
    assert (o.timeout_s, o.max_images_per_request, o.max_steps, o.max_guidance) == (300.0, 10, 100, 20.0)
    assert (o.max_image_pixels, o.receive_timeout_s, o.limit_concurrency) == (2048 * 2048, 30.0, 64)


# -- connections --------------------------------------------------------------------------------------

def raw(port: int, data: bytes = b"", timeout: float = WAIT) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if data:
        s.sendall(data)
    return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def trickle(s: socket.socket, data: bytes, stop: threading.Event) -> None:
    """Send one byte a second (bounded by len(data)) until the server closes or `stop` is set."""
    for byte in data:
        if stop.wait(1.0):
            return
        try:
            s.sendall(bytes([byte]))
        except OSError:
            return


@pytest.mark.parametrize("part", ["headers", "body"])
def test_a_slow_client_is_cut_off_at_the_receive_deadline_while_health_answers(tiny_pipeline, part):
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = json.dumps({"prompt": "a red circle", **FAST_STEPS}).encode()
    with running_server(tiny_pipeline, receive_timeout_s=1.5) as (url, _):
        if part == "headers":  # the request line and headers at one byte a second
            s, rest = raw(port_of(url)), head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        else:  # the headers at once, then the body at one byte a second
            s, rest = raw(port_of(url), head + f"Content-Length: {len(body)}\r\n\r\n".encode()), body
        stop = threading.Event()
        sender = threading.Thread(target=trickle, args=(s, rest, stop), daemon=True)
        sender.start()
        live = []
        for _ in range(3):  # the server keeps answering others meanwhile
            live.append(httpx.get(url + "/health/live", timeout=WAIT).status_code)
            time.sleep(0.2)
        answer = read_all(s)  # returns when the server closes the connection
        stop.set()
        sender.join(WAIT)
        s.close()
    assert live == [200, 200, 200]
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"receive_timeout"' in answer.replace(b" ", b"")


def test_idle_keep_alive_connections_are_closed(tiny_pipeline):
    with running_server(tiny_pipeline, keep_alive_s=0.5) as (url, _):
        s = raw(port_of(url), b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = read_all(s)  # the response, then the close once the connection idles 0.5 s
        s.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"live"' in answer


def test_oversized_headers_are_refused_with_an_envelope(tiny_pipeline):
    """Complete but too large: 431 from the app; still arriving past the limit: 400 from the protocol."""
    big = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000
    with running_server(tiny_pipeline, max_header_bytes=4096) as (url, _):
        whole = raw(port_of(url), big + b"\r\n\r\n")
        complete = read_all(whole)
        unfinished = raw(port_of(url), big)  # no blank line: h11 keeps reading past its limit
        incomplete = read_all(unfinished)
        whole.close()
        unfinished.close()
        assert httpx.get(url + "/health/live").status_code == 200
    assert complete.startswith(b"HTTP/1.1 431") and b"headers_too_large" in complete, complete[:300]
    assert incomplete.startswith(b"HTTP/1.1 400") and b"invalid_http" in incomplete, incomplete[:300]


def test_requests_beyond_the_concurrency_limit_get_503_and_health_still_answers(served_pipeline):
    gate = Gate(served_pipeline)
    with running_server(gate, limit_concurrency=2) as (url, state):
        held = [threading.Thread(target=lambda: httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS},
                                                           timeout=WAIT)) for _ in range(2)]
        for t in held:
            t.start()
        wait_for(lambda: state.engine.in_flight + state.engine.queue_depth == 2, "two requests in progress")
        third = httpx.post(url + GEN, json={"prompt": "c", **FAST_STEPS}, timeout=WAIT)
        live = httpx.get(url + "/health/live")
        gate.open.set()
        for t in held:
            t.join(WAIT)
        after = httpx.post(url + GEN, json={"prompt": "d", **FAST_STEPS}, timeout=WAIT)
    assert third.status_code == 503 and third.json()["error"]["code"] == "concurrency_limit"
    assert third.headers["retry-after"] == "1"
    assert live.status_code == 200 and after.status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_json_routes_take_only_application_json(tiny_pipeline, content_type):
    """A web page can post text/plain or a form to a local server without a CORS preflight: refused."""
    headers = {} if content_type is None else {"content-type": content_type}
    with running_server(tiny_pipeline) as (url, _):
        response = httpx.post(url + GEN, content=json.dumps({"prompt": "a", **FAST_STEPS}), headers=headers,
                              timeout=WAIT)
        ok = httpx.post(url + GEN, content=json.dumps({"prompt": "a", **FAST_STEPS}), timeout=WAIT,
                        headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 415 and response.json()["error"]["code"] == "invalid_content_type"
    assert ok.status_code == 200


# -- client mistakes that used to be 500 ------------------------------------------------------------

def test_deep_nesting_and_huge_numbers_are_400(tiny_pipeline):
    with running_server(tiny_pipeline) as (url, _):
        nested = httpx.post(url + GEN, content=b"[" * 3000 + b"]" * 3000, timeout=WAIT,
                            headers={"content-type": "application/json"})
        digits = b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}"
        seed = httpx.post(url + GEN, content=digits, timeout=WAIT,
                          headers={"content-type": "application/json"})
    for response in (nested, seed):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json"


# -- health -------------------------------------------------------------------------------------------

def test_readiness_turns_503_after_failed_batches_and_recovers(served_pipeline):
    gate = Gate(served_pipeline)
    gate.open.set()
    gate.fail = 2
    with running_server(gate, unhealthy_after_failures=2) as (url, _):
        failed = [httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS}, timeout=WAIT) for _ in range(2)]
        first = httpx.get(url + "/health/ready")  # also starts a probe, which succeeds
        wait_for(lambda: httpx.get(url + "/health/ready").status_code == 200, "recovery")
    assert [r.status_code for r in failed] == [500, 500]
    assert all("illegal memory" not in r.text and "/opt/secret" not in r.text for r in failed)
    assert first.status_code == 503 and first.json()["error"]["code"] == "failing"


def test_readiness_turns_503_when_the_scheduler_makes_no_progress(served_pipeline):
    gate = Gate(served_pipeline)
    with running_server(gate, stall_s=0.5) as (url, _):
        thread = threading.Thread(target=lambda: httpx.post(url + GEN, json={"prompt": "a", **FAST_STEPS},
                                                            timeout=WAIT))
        thread.start()
        wait_for(gate.entered.is_set, "the batch to start")
        wait_for(lambda: httpx.get(url + "/health/ready").status_code == 503, "readiness to see the stall")
        stalled = httpx.get(url + "/health/ready")
        gate.open.set()
        thread.join(WAIT)
        wait_for(lambda: httpx.get(url + "/health/ready").status_code == 200, "readiness after progress")
        live = httpx.get(url + "/health/live")
    assert stalled.json()["error"]["code"] == "stalled" and live.status_code == 200


# -- no internals to clients --------------------------------------------------------------------------

def test_the_served_name_is_the_folders_name_never_its_path(tiny_folder):
    from unclip.options import ServeOptions

    assert ServeOptions(model=str(tiny_folder)).name() == "tiny"
    assert ServeOptions(model=str(tiny_folder) + "/").name() == "tiny"
    assert ServeOptions(model="demo").name() == "demo"
    assert ServeOptions(model=str(tiny_folder), served_model_name="shapes-v1").name() == "shapes-v1"
