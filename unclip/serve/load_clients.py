"""The clients of one load level: locust users in a closed loop, one JSON line per request.

Run as `python -m unclip.serve.load_clients SPEC_JSON` by `unclip loadtest` (loadtest.py), one
process per concurrency level. Locust monkey-patches the standard library with gevent when it
is imported, so it lives in this process alone: the process that reads the results, and any
test or script that imports unclip, stays unpatched.

Each of `concurrency` users sends a request (streamed when its settings say `stream`: the request
ends with the stream), waits for the answer, and sends the next at once
(a closed loop), until `duration_s` has passed since the level started (or `max_requests`
were sent); a request sent in that window may finish after it, for up to `grace_s` more. After
a refused answer (429, 503) or any other failure a user pauses `refused_pause_s`, as a client
honouring backoff would, so that a dead server is not hammered in a tight loop. Stdout: one
JSON object per finished request, then `{"end": ...}`.
"""

from __future__ import annotations

import itertools
import json
import sys
import time

import gevent
from locust import FastHttpUser, constant, constant_throughput, task  # patches the stdlib with gevent
from locust.env import Environment
from locust.exception import StopUser

GENERATIONS = "/v1/images/generations"
HEADERS = {"queue_s": "X-Unclip-Queue-Seconds", "compute_s": "X-Unclip-Compute-Seconds",
           "batch_images": "X-Unclip-Batch-Images"}


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def header(response, name: str, kind=float):
    try:
        return kind(response.headers[name])
    except (KeyError, TypeError, ValueError):
        return None


def check_body(response, n: int) -> str | None:
    """None if a 200's body holds `n` images as OpenAI's API gives them (in one JSON body, or as the
    `completed` events of a stream: `--settings '{"stream": true, "partial_images": 2}'`), else what
    is wrong."""
    if (response.headers.get("content-type") or "").startswith("text/event-stream"):
        text = response.text or ""
        if "\nevent: error\n" in "\n" + text:
            return "a stream that ended with an error event"
        done = text.count("event: image_generation.completed\n")
        return None if done == n else f"a stream with {done} completed events instead of {n}"
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        return "a 200 without a JSON body holding 'data'"
    if len(data) != n or not all(isinstance(item.get("b64_json"), str) and item["b64_json"] for item in data):
        return f"a 200 with {len(data)} items in 'data' instead of {n} b64_json images"
    return None


def run(spec: dict) -> None:
    """One level: spec holds url, concurrency, duration_s, grace_s, max_requests, prompts, n,
    settings, seed_base, refused_pause_s, request_timeout_s."""
    t0 = time.monotonic()
    deadline, hard_end = t0 + spec["duration_s"], t0 + spec["duration_s"] + spec["grace_s"]
    counter, in_flight = itertools.count(), {"now": 0}
    prompts, n, pause = spec["prompts"], spec["n"], spec["refused_pause_s"]

    rate = spec.get("rate")  # requests/s of all clients: each aims at its share (locust's pacing)
    auth = {"Authorization": f"Bearer {spec['api_key']}"} if spec.get("api_key") else {}

    class Client(FastHttpUser):
        host = spec["url"]
        wait_time = constant_throughput(rate / spec["concurrency"]) if rate else constant(0)
        network_timeout = spec["request_timeout_s"]
        connection_timeout = 10.0
        max_retries = 0

        @task
        def generate(self) -> None:
            if time.monotonic() >= deadline:
                raise StopUser()
            k = next(counter)
            if k >= spec["max_requests"]:  # the count bound, besides the time bound
                raise StopUser()
            body = {"prompt": prompts[k % len(prompts)], "n": n, "seed": spec["seed_base"] + k,
                    "response_format": "b64_json", **spec["settings"]}
            start = time.monotonic()
            in_flight["now"] += 1
            with self.client.post(GENERATIONS, json=body, headers=auth, catch_response=True) as response:
                end = time.monotonic()
                in_flight["now"] -= 1
                status = response.status_code or 0  # 0: no HTTP answer (refused, reset, timed out)
                record = {"start_s": start - t0, "end_s": end - t0, "status": status, "images": 0}
                if status == 200:
                    problem = check_body(response, n)
                    if problem is None:
                        record["images"] = n
                        record.update({k: header(response, h) for k, h in HEADERS.items()})
                        record["batch_images"] = header(response, HEADERS["batch_images"], int)
                        response.success()
                    else:
                        record["error"] = problem
                        response.failure(problem)
                else:
                    record["error"] = error_code(response)
                    response.failure(record["error"])
            emit(record)
            if record["images"] == 0:
                gevent.sleep(pause)

    env = Environment(user_classes=[Client], stop_timeout=spec["grace_s"])
    runner = env.create_local_runner()
    # all clients at once; with wait=True the spawning greenlet returns when every user has stopped
    runner.start(spec["concurrency"], spawn_rate=spec["concurrency"], wait=True)
    runner.spawning_greenlet.join(timeout=max(0.0, hard_end - time.monotonic()))
    abandoned = in_flight["now"]
    runner.quit()
    sent = min(next(counter), spec["max_requests"])
    emit({"end": {"elapsed_s": time.monotonic() - t0, "abandoned": abandoned, "sent": sent}})


def error_code(response) -> str:
    """The OpenAI envelope's code, or what went wrong on the wire."""
    if not response.status_code:
        return f"no answer: {type(response.error).__name__}: {str(response.error)[:120]}"
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} without an error envelope"


if __name__ == "__main__":
    run(json.loads(sys.argv[1]))
