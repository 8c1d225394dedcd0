"""`unclip loadtest` against a real uvicorn server on 127.0.0.1 (the in-thread server of
serve_helpers), and its error paths. Counts and structure only, never speeds."""

from __future__ import annotations

import json
import logging

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.serve_helpers import free_port, running_server
from unclip.serve.loadtest import summarize

# slower than FAST_STEPS, so that 4 clients keep a 1-running + 1-queued server full and get 429s
SLOW_STEPS = dict(prior_steps=3, decoder_steps=40, super_res_steps=2)


def test_loadtest_writes_every_level_and_agrees_with_the_servers_count(tiny_pipeline, tmp_path):
    out = tmp_path / "load"
    with running_server(tiny_pipeline, max_queue=1, max_batch_images=2) as (url, _):
        result = run_cli("loadtest", "--url", url, "--concurrency", "1,4", "--duration", "2",
                         "--out", str(out), "--settings", json.dumps(SLOW_STEPS), "--n", "1",
                         "--refused-pause-s", "0.05", "--prompt", "a red circle", "--prompt", "a blue square")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["loadtest.png", "results.json", "results.md"]
    assert (out / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text())
    assert doc["command"].startswith("unclip loadtest --url http://127.0.0.1:")
    assert doc["machine"]["cpu_cores"] >= 1 and doc["versions"]["locust"]
    assert doc["request"] == {"prompts": ["a red circle", "a blue square"], "n": 1, "settings": SLOW_STEPS}
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4]
    assert doc["probe"]["batch_images"] == "1" and doc["options"]["max_requests"] == 100_000
    for lv in doc["levels"]:
        records = lv["records"]
        assert lv["sent"] == lv["answered"] + lv["abandoned"] == len(records) + lv["abandoned"]
        assert lv["failed"] == 0 and lv["abandoned"] == 0
        assert lv["ok"] + lv["refused"] == lv["answered"] and lv["ok"] >= 1
        assert lv["images"] == lv["ok"]  # n = 1
        assert lv["latency_s"]["count"] == lv["queue_s"]["count"] == lv["ok"]
        assert 1 <= lv["mean_batch_images"] <= 2  # --max-batch-images 2
        assert all(r["status"] == 429 and r["error"] == "queue_full" for r in records if r["images"] == 0)
        server = lv["server"]  # the server's /metrics, before and after the level
        assert server["images"] == lv["images"] and server["requests_ok"] == lv["ok"]
        assert server.get("requests_rejected", 0) == lv["refused"]
        assert len(lv["loadavg_before"]) == 3
    one, four = doc["levels"]
    assert one["refused"] == 0 and one["mean_batch_images"] == 1  # one closed-loop client: never refused
    # four clients, room for two (one running, one queued): the others are refused while it is full
    assert four["refused"] >= 1 and four["refused_latency_s"]["count"] == four["refused"]
    assert four["errors_by_status"] == {"429": four["refused"]}
    text = (out / "results.md").read_text()
    assert doc["command"] in text and "| clients | ok | refused | failed |" in text


def test_locust_stays_in_its_own_process(tiny_pipeline, tmp_path):
    """Locust patches the standard library with gevent when imported: never in this process."""
    import socket
    import sys

    with running_server(tiny_pipeline) as (url, _):
        result = run_cli("loadtest", "--url", url, "--concurrency", "2", "--duration", "0.5", "--no-plot",
                         "--settings", json.dumps(FAST_STEPS), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert "locust" not in sys.modules
    assert socket.socket.__module__ == "socket"  # gevent's would be gevent._socket3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.json", "results.md"]


def test_summary_definitions():
    """Batches counted from the header (B images hold B/n requests), refusals apart from failures,
    throughput over the span up to the last answer."""
    records = [
        {"start_s": 0.0, "end_s": 4.0, "status": 200, "images": 2, "queue_s": 0.5, "compute_s": 3.5,
         "batch_images": 4},
        {"start_s": 0.0, "end_s": 4.0, "status": 200, "images": 2, "queue_s": 0.5, "compute_s": 3.5,
         "batch_images": 4},
        {"start_s": 4.0, "end_s": 12.0, "status": 200, "images": 2, "queue_s": 0.0, "compute_s": 8.0,
         "batch_images": 2},
        {"start_s": 1.0, "end_s": 1.01, "status": 429, "images": 0, "error": "queue_full"},
        {"start_s": 2.0, "end_s": 2.5, "status": 500, "images": 0, "error": "generation_failed"},
        {"start_s": 3.0, "end_s": 3.1, "status": 0, "images": 0, "error": "no answer: ConnectionRefused"},
    ]
    s = summarize(records, {"sent": 7, "abandoned": 1}, concurrency=3, duration_s=10.0)
    assert (s["ok"], s["refused"], s["failed"], s["images"]) == (3, 1, 3, 6)  # 500, no answer, abandoned
    assert s["errors_by_status"] == {"429": 1, "500": 1, "no answer": 1}
    assert s["span_s"] == 12.0 and s["images_per_s"] == pytest.approx(0.5) and s["requests_per_s"] == 0.25
    assert s["mean_batch_images"] == pytest.approx(3.0)  # 6 images in 2 batches (4, then 2)
    assert s["mean_batch_images_per_request"] == pytest.approx(10 / 3)
    assert s["latency_s"]["p50"] == 4.0 and s["latency_s"]["max"] == 8.0
    assert s["refused_latency_s"]["count"] == 1


@pytest.mark.parametrize("args,fragments", [
    (["--url", "http://10.1.2.3:8000"], ["not a loopback address", "--allow-remote"]),
    (["--url", "http://example.com"], ["not a loopback address"]),
    (["--url", "127.0.0.1:8000"], ["not a server's base URL"]),
    (["--url", "http://127.0.0.1:8000/v1/images/generations"], ["not a server's base URL"]),
    (["--concurrency", "1,x"], ["--concurrency", "1,4,8"]),
    (["--concurrency", "0"], ["--concurrency"]),
    (["--concurrency", "100000"], ["--concurrency"]),
    (["--settings", "{decoder_steps: 3}"], ["--settings is not valid JSON"]),
    (["--settings", "[1, 2]"], ["must be a JSON object"]),
    (["--settings", '{"prompt": "x"}'], ["may not set prompt"]),
    (["--prompt", "  "], ["--prompt is empty"]),
], ids=["remote-ip", "remote-name", "no-scheme", "a-path", "not-numbers", "zero", "too-many", "bad-json",
        "not-object", "sets-prompt", "empty-prompt"])
def test_bad_options_are_one_line_errors(tmp_path, args, fragments):
    base = {"--url": "http://127.0.0.1:9", "--out": str(tmp_path / "out")}
    given = dict(zip(args[::2], args[1::2], strict=True))
    argv = [x for k, v in {**base, **given}.items() for x in (k, v)]
    result = run_cli("loadtest", *argv)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("mine")
    result = run_cli("loadtest", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "taken"))
    assert_one_line_error(result, "is a file")
    assert (tmp_path / "taken").read_text() == "mine"


def test_no_server_is_a_one_line_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_cli("loadtest", "--url", url, "--ready-timeout-s", "0", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "not ready", "unclip serve")
    assert not (tmp_path / "out").exists()


def test_a_request_the_server_refuses_stops_before_the_load(tiny_pipeline, tmp_path, monkeypatch):
    # the in-thread server's access log would reach the CLI's stderr handler in this one process
    monkeypatch.setattr(logging.getLogger("unclip.serve.access"), "propagate", False)
    with running_server(tiny_pipeline) as (url, state):
        result = run_cli("loadtest", "--url", url, "--settings", '{"decoder_steps": 1}',
                         "--out", str(tmp_path / "out"))
        seen = state.engine.metrics.exposition().decode()
    assert_one_line_error(result, "HTTP 400", "decoder_steps", "--settings")
    assert not (tmp_path / "out").exists()
    assert "unclip_images_total" in seen and 'status="ok"' not in seen  # no load was sent


def test_loadtest_sends_the_api_key_and_paces_to_a_rate(tiny_pipeline, tmp_path, monkeypatch):
    """Against a server with keys: every request and the /metrics scrape carry the key (from
    $UNCLIP_API_KEY here), which the written command does not hold; --rate paces the clients."""
    import json as _json

    from unclip.options import digest

    monkeypatch.setenv("UNCLIP_API_KEY", "sk-load")
    with running_server(tiny_pipeline, key_digests=(digest("sk-load"),)) as (url, _):
        result = run_cli("loadtest", "--url", url, "--concurrency", "2", "--duration", "2", "--rate", "4",
                         "--no-plot", "--out", str(tmp_path / "out"), "--settings",
                         '{"prior_steps": 2, "decoder_steps": 2, "super_res_steps": 2}')
        monkeypatch.delenv("UNCLIP_API_KEY")
        refused = run_cli("loadtest", "--url", url, "--duration", "1", "--no-plot",
                          "--out", str(tmp_path / "no"))
    assert result.exit_code == 0, result.output
    doc = _json.loads((tmp_path / "out" / "results.json").read_text())
    level = doc["levels"][0]
    assert level["ok"] > 0 and level["failed"] == 0 and level["refused"] == 0
    assert level["server"] is not None  # /metrics was read, with the key
    assert "sk-load" not in (tmp_path / "out" / "results.json").read_text()
    assert "--api-key '$UNCLIP_API_KEY'" in doc["command"] and doc["options"]["rate_per_s"] == 4
    assert level["sent"] <= 2 * 4 + 2  # paced: about rate x duration, not as fast as answers come
    assert_one_line_error(refused, "HTTP 401", "--api-key")
