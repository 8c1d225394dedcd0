"""Ray Serve, end to end: each test starts `unclip serve --ray` (its own local Ray instance, every
Ray service on 127.0.0.1), drives its one HTTP endpoint with real clients, and stops it with
SIGTERM, checking that it exits 0 and leaves no process behind.

Sized for the 2-core machine: `--ray` gives each replica cores / replicas CPUs (two replicas:
one core each), and the tests run one torch thread per replica (OMP_NUM_THREADS=1, below); the
tiny and demo models at reduced steps keep a request well under a second.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import yaml
from PIL import Image

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.ray_helpers import REFUSED, family, listening, named, ray_client
from tests.serve_helpers import free_port

GEN = "/v1/images/generations"
START = 300  # seconds for Ray and its replicas to start on a loaded 2-core machine (not reached if it works)
WAIT = 120  # seconds a client waits for one answer (not reached when it works)


def wait_for(condition, what: str, seconds: float, detail=lambda: "") -> None:
    """Poll until `condition()` holds: a bounded wait, not a statement about speed."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what} {detail()}")
        time.sleep(0.05)
STEPS = dict(prior_steps=5, decoder_steps=5, super_res_steps=3)  # as tests/test_serve_http.py's CLI check
KEY = "sk-ray-test"  # the two replicas' API key: --ray's replicas check it as unclip serve does
AUTH = {"Authorization": f"Bearer {KEY}"}
REPO = Path(__file__).resolve().parent.parent


class RayServer:
    """`unclip serve --ray ...` in its own session; its stderr (Ray's and the replicas' logs) in a file."""

    def __init__(self, log: Path, *flags: str):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        # RAY_memory_monitor_refresh_ms=0: Ray's memory monitor counts the whole machine's memory
        # and kills workers above 95 %, so another job's use on a shared machine killed replicas
        # OMP_NUM_THREADS=1: one torch thread per replica. Beside other jobs on 2 cores, a team of
        # 2 OpenMP threads ran the same demo request in 3-18 s instead of 0.2 s (measured)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0",
               "RAY_memory_monitor_refresh_ms": "0", "OMP_NUM_THREADS": "1"}
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "serve", "--ray", "--port",
                                          str(self.port), *flags], env=env, cwd=REPO,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        end = time.monotonic() + START
        while "through Ray Serve" not in self.text():  # printed once every replica is up
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise AssertionError(f"unclip serve --ray did not start:\n{self.text()[-3000:]}")
            time.sleep(0.5)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def replicas(self) -> dict[str, int]:
        """Replica id -> pid, from each replica's `ready` line, in start order."""
        return {m[1]: int(m[2]) for m in re.finditer(r"replica (\S+) ready: .*?, pid (\d+)", self.text())}

    def access_lines(self) -> list[dict]:
        return [json.loads(line[line.index("{"):]) for line in self.text().splitlines()
                if '"request_id"' in line and '"replica"' in line]

    def stop(self) -> tuple[int | None, list[str]]:
        """SIGTERM, as an orchestrator stops it: (exit status, processes it left running)."""
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            code = None
        _, alive = psutil.wait_procs(family, timeout=60)
        left = [" ".join(p.cmdline()[:2]) for p in alive if p.is_running()]
        for p in alive + ([psutil.Process(self.proc.pid)] if code is None else []):
            p.kill()  # nothing of this test outlives it, whatever it asserts
        return code, left


@contextmanager
def ray_server(log: Path, *flags: str):
    try:
        server = RayServer(log, *flags)
    except AssertionError as exc:
        # the free port can be taken before Ray's proxy binds it (Ray's own processes take random ports;
        # it happened in a CI run): once more on another port; any other failure stands
        if "Failed to bind to address" not in str(exc):
            raise
        server = RayServer(log, *flags)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


def assert_stopped_cleanly(server: RayServer) -> None:
    code, left = server.stop()
    assert code == 0, server.text()[-3000:]
    assert not left, left


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory):
    """Two replicas of the demo model behind one endpoint (shared by the tests below in order:
    the fault test, last, kills one of them)."""
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    # --drain-s: the SIGTERM test's held requests (seconds each) must finish even on a loaded machine
    with ray_server(log, "--model", "demo", "--replicas", "2", "--drain-s", "60", "--api-key", KEY,
                    "--max-steps", "300") as server:
        assert len(server.replicas()) == 2, server.text()[-3000:]
        yield server
        assert_stopped_cleanly(server)


CASES = [("a red circle on a blue background", 11), ("a green square on a white background", 12),
         ("a yellow triangle on a black background", 13)]


@pytest.mark.slow
def test_two_replicas_share_the_load_and_answer_as_unclip_generate(two_replicas, tmp_path):
    server = two_replicas
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in STEPS.items()]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # three of them beside two replicas on 2 cores
    cli = [subprocess.Popen(["unclip", "generate", prompt, "--seed", str(seed), *flags, "--out",
                             str(tmp_path / str(k))], cwd=REPO, env=one_thread, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
           for k, (prompt, seed) in enumerate(CASES)]

    def ask(k: int) -> httpx.Response:
        prompt, seed = CASES[k % len(CASES)]
        return httpx.post(server.url + GEN, json={"prompt": prompt, "seed": seed, **STEPS}, headers=AUTH,
                          timeout=WAIT)

    with ThreadPoolExecutor(4) as pool:  # 4 clients: both replicas see load at once
        responses = list(pool.map(ask, range(24)))
    assert [r.status_code for r in responses] == [200] * 24, [r.text for r in responses if r.is_error]
    served_by = Counter(r.headers["x-unclip-replica"] for r in responses)
    assert set(served_by) == set(server.replicas()), (served_by, server.replicas())  # both served some

    assert [p.wait(WAIT) for p in cli] == [0] * len(CASES)
    reference = [pixels((tmp_path / str(k) / "0000.png").read_bytes()) for k in range(len(CASES))]
    for k, response in enumerate(responses):
        [item] = response.json()["data"]
        diff = np.abs(pixels(base64.b64decode(item["b64_json"])) - reference[k % len(CASES)]).max()
        assert diff <= 1, (k, diff)  # 1/255: other batch sizes round floats differently (test_batching.py)

    # the replica's identity in readiness, metrics and logs, and one request id end to end
    ready = httpx.get(server.url + "/health/ready")
    assert ready.json()["replica"] == ready.headers["x-unclip-replica"] in served_by
    stranger = httpx.post(server.url + GEN, json={"prompt": "a red circle", **STEPS}, timeout=WAIT)
    assert stranger.status_code == 401 and stranger.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/metrics").status_code == 401
    metrics = httpx.get(server.url + "/metrics", headers=AUTH)
    assert f'replica="{metrics.headers["x-unclip-replica"]}"' in metrics.text
    assert len(responses[0].headers.get_list("x-request-id")) == 1
    logged = {line["request_id"]: line["replica"] for line in server.access_lines() if line["path"] == GEN}
    for r in responses:
        assert logged[r.headers["x-request-id"]] == r.headers["x-unclip-replica"]


@pytest.mark.slow
def test_streaming_and_the_playground_through_ray(two_replicas):
    """Through Ray's proxy: OpenAI's client streams two previews and the image (the unstreamed
    image for the seed), and the playground's page loads."""
    server = two_replicas
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    prompt, seed = CASES[0]
    events = list(client.images.generate(prompt=prompt, stream=True, partial_images=2,
                                         extra_body={"seed": seed, **STEPS}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    plain = httpx.post(server.url + GEN, json={"prompt": prompt, "seed": seed, **STEPS}, headers=AUTH,
                       timeout=WAIT).json()["data"][0]["b64_json"]
    diff = np.abs(pixels(base64.b64decode(events[-1].b64_json)) - pixels(base64.b64decode(plain))).max()
    assert diff <= 1
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "unclip playground" in page.text


@pytest.mark.slow
def test_ray_runs_with_token_authentication_and_refuses_a_driver_without_the_token(two_replicas, tmp_path):
    """`--ray` starts Ray with a token (its own, made for this instance, unless the user has one):
    a driver without it is refused by the GCS, one with it gets in."""
    gcs = named(family(two_replicas.proc.pid), "gcs_server")
    environ = gcs.environ()
    assert environ.get("RAY_AUTH_MODE") == "token"
    default_file = Path(environ["HOME"]) / ".ray" / "auth_token"  # where Ray looks without the variable
    token = environ.get("RAY_AUTH_TOKEN") or default_file.read_text().strip()
    [(_, port)] = listening(gcs)
    refused = ray_client(f"127.0.0.1:{port}", tmp_path, WAIT)
    assert not refused["connected"] and REFUSED in refused["error"], refused
    admitted = ray_client(f"127.0.0.1:{port}", tmp_path, WAIT, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert admitted["connected"], admitted


@pytest.mark.slow
def test_a_killed_replica_is_restarted_and_an_openai_client_loses_nothing(two_replicas):
    """SIGKILL one replica's process under load: the requests it held fail with a retryable
    status and the envelope; OpenAI's own client (its default retries: 2, backoff 0.5 s then
    1 s, on 408/409/429/5xx) gets every image; the other replica fails nothing; Ray starts a new
    replica."""
    server = two_replicas
    before = server.replicas()
    attempts: list[tuple[str, int, str | None, str]] = []  # request, status, replica, body of a failure

    def record(response) -> None:
        response.read()
        attempts.append((response.request.headers.get("x-test-request"), response.status_code,
                         response.headers.get("x-unclip-replica"),
                         response.text if response.status_code != 200 else ""))

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=WAIT,
                           http_client=openai.DefaultHttpxClient(event_hooks={"response": [record]}))
    # in flight long enough to be hit: at 30 decoder steps a loaded CI run once killed the replica
    # between two of its batches (nothing in flight, nothing to retry)
    slow = dict(prior_steps=5, decoder_steps=45, super_res_steps=3)
    done, errors = [], []

    def user(c: int) -> None:
        for j in range(5):
            try:
                raw = client.images.with_raw_response.generate(
                    prompt=CASES[c % len(CASES)][0], model="demo", extra_body={"seed": j, **slow},
                    extra_headers={"X-Test-Request": f"{c}-{j}"})
                done.append((f"{c}-{j}", raw.headers["x-unclip-replica"], raw.parse().data[0].b64_json))
            except openai.OpenAIError as exc:
                errors.append(f"{c}-{j}: {exc!r}")

    users = [threading.Thread(target=user, args=(c,)) for c in range(6)]
    for t in users:
        t.start()
    # both replicas have answered: load on each
    wait_for(lambda: errors or set(before) <= {a[2] for a in attempts}, "both replicas to answer", WAIT)
    assert not errors, errors
    victim, survivor = list(before)
    os.kill(before[victim], signal.SIGKILL)
    for t in users:
        t.join(4 * WAIT)
    assert not errors and len(done) == 30 and all(b64 for *_, b64 in done), errors  # none lost

    failed = [a for a in attempts if a[1] != 200]
    if not failed:  # the kill fell between two of the victim's batches (2 of 4 CI runs on 2026-12-04):
        # nothing to retry; the checks above (none lost, the replica restarted) still held
        warnings.warn("the kill hit no request in flight: the client's retry of a failed request was not "
                      "exercised in this run", stacklevel=1)
    for request, status, replica, body in failed:
        assert status >= 500 and replica != survivor, (request, status, replica)  # retryable, not survivor's
        assert json.loads(body)["error"]["type"] == "server_error", body  # the envelope, from Ray's proxy
    assert all(status == 200 for _, status, replica, _ in attempts if replica == survivor)

    # Ray replaces the dead replica; the new one serves
    wait_for(lambda: len(server.replicas()) >= 3, "Ray to start a new replica", START,
             lambda: server.text()[-3000:])
    new = next(r for r in server.replicas() if r not in before)
    assert not psutil.pid_exists(before[victim]) or psutil.Process(before[victim]).status() == "zombie"
    seen = set()
    end = time.monotonic() + START
    while new not in seen and time.monotonic() < end:  # until Ray routes to it (the proxy picks at random)
        seen.add(httpx.get(server.url + "/health/ready").headers.get("x-unclip-replica"))
        time.sleep(0.05)
    assert new in seen and victim not in seen, seen


@pytest.mark.slow
def test_sigterm_lets_held_requests_finish_and_exits_0(two_replicas):
    """As `unclip serve` drains: while the requests the replicas hold finish, new ones get 503 with
    the envelope and Retry-After (another node's proxy may take them); the process exits 0 and
    Ray's processes are gone."""
    server = two_replicas
    # about 5 s on an idle machine (100 decoder steps finished within the 2 s below there): still
    # running at SIGTERM, and done well within the drain on a loaded one
    slow = dict(prior_steps=5, decoder_steps=300, super_res_steps=3)
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(httpx.post, server.url + GEN, json={"prompt": p, "seed": 1, **slow}, headers=AUTH,
                            timeout=WAIT)
                for p, _ in CASES + CASES[:1]]
        time.sleep(2)  # the proxy hands them to the replicas within milliseconds
        server.proc.send_signal(signal.SIGTERM)
        seen = {}

        def app_going() -> bool:
            seen["done early"] = any(f.done() for f in held)
            seen["late"] = httpx.get(server.url + "/health/live")
            return seen["done early"] or seen["late"].status_code != 200

        wait_for(app_going, "the application to go", WAIT)
        assert not seen["done early"]  # still held when the application began to drain
        answers, late = [f.result() for f in held], seen["late"]
    assert [r.status_code for r in answers] == [200] * 4, [r.text for r in answers]
    assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable", late.text
    assert int(late.headers["retry-after"]) >= 1
    assert_stopped_cleanly(server)


@pytest.mark.slow
def test_backpressure_refuses_the_excess_at_once_and_accepted_requests_finish(tmp_path):
    """One replica holding one request and at most two more waiting at the proxy: of 12 clients
    sending at once, the excess gets 429 with the envelope, each before the first accepted
    request is done, and every accepted request succeeds."""
    # ~2.5 s on tiny: outlasts the burst. At 150 steps (~1.5 s) a loaded CI run once saw 5 accepted in
    # the burst: a client counted as sending before the first answer whose request reached the proxy
    # only after two slots had freed (12 client threads and Ray's processes on 2 cores)
    slow = dict(prior_steps=3, decoder_steps=250, super_res_steps=2)
    barrier = threading.Barrier(12)
    events = itertools.count()  # the order of sends and answers across the clients (next() is atomic)
    with ray_server(tmp_path / "serve.log", "--model", "tiny", "--max-batch-images", "1",
                    "--max-steps", "300", "--max-ongoing-requests", "1", "--max-queue", "2") as server:

        def ask(k: int) -> tuple[httpx.Response, int, int]:
            with httpx.Client(timeout=WAIT) as client:  # made before the barrier: all send at once
                barrier.wait(WAIT)
                sent = next(events)
                response = client.post(server.url + GEN, json={"prompt": f"p{k}", **slow})
            return response, sent, next(events)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
        assert_stopped_cleanly(server)
    assert {r.status_code for r, _, _ in answers} <= {200, 429}, [r.text for r, _, _ in answers]
    first_done = min(done for r, _, done in answers if r.status_code == 200)
    burst = [(r, done) for r, sent, done in answers if sent < first_done]  # sent while nothing had finished
    statuses = [r.status_code for r, _ in burst]
    # at most the three held, plus one: a request sent before the first answer came back may reach
    # the proxy just after the replica finished it and took the next (one slot frees, ~3 s per slot)
    assert statuses.count(200) <= 4 and statuses.count(429) >= 1, statuses  # the excess refused
    for r, done in burst:
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["code"] == "queue_full" and error["type"] == "rate_limit_error", error
            assert int(r.headers["retry-after"]) >= 1 and done < first_done  # without waiting for a slot


@pytest.fixture
def ray_env_restored(monkeypatch):
    """`serve --ray` in this process sets Ray's variables in os.environ (only where unset): set here
    to the same values, so that monkeypatch removes them after the test."""
    monkeypatch.setenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "unclip.serve.ray_proxy:middlewares")
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def test_ray_missing_is_one_line(monkeypatch, ray_env_restored):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert_one_line_error(run_cli("serve", "--ray", "--model", "tiny"), "pip install 'unclip[ray]'")


def test_ray_options_need_ray_and_ray_names_the_replica(ray_env_restored):
    assert_one_line_error(run_cli("serve", "--model", "tiny", "--replicas", "2"), "--ray")
    assert_one_line_error(run_cli("serve", "--ray", "--replica", "a"), "--replica")
    assert_one_line_error(run_cli("serve", "--ray", "--model", "/no/such/model"), "/no/such/model")


@pytest.mark.parametrize("config", sorted((REPO / "deploy" / "ray").glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_configs_are_valid_ray_serve_configs(config):
    """What `serve run` / `serve deploy` check, and the application's own args, without a cluster."""
    from ray.serve.schema import ServeDeploySchema

    from unclip.serve.ray_app import build_app

    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    for app in schema.applications:
        assert app.import_path == "unclip.serve.ray_app:build_app"
        build_app(app.args)  # a misspelt or mistyped arg fails here, as it would at deploy
        [deployment] = app.deployments
        # the engine takes every request Ray lets through: a full engine queue would 429 behind Ray's back
        assert app.args["max_queue"] >= deployment.max_ongoing_requests


def test_app_args_are_checked_at_build():
    from pydantic import ValidationError

    from unclip.serve.ray_app import build_app, model_for_this_gpu

    with pytest.raises(ValidationError, match="modle"):
        build_app({"modle": "demo"})
    assert model_for_this_gpu("/models/karlo", "cpu") == "/models/karlo"
    from unclip.errors import UnclipError

    with pytest.raises(UnclipError, match="cuda"):
        model_for_this_gpu("/models/karlo/{gpu}", "cpu")
