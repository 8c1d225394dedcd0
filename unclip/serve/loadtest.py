"""`unclip loadtest`: closed-loop load on a running server, one concurrency level after another.

For each level, `concurrency` clients (locust users, in a child process: load_clients.py) send
requests back to back for `duration` seconds; requests sent in that window may finish after it
(for up to `--grace-s`). From the per-request records this module computes, per level:
requests/s and images/s (over the span from the level's start to its last answer), latency
p50/p90/p99 of the successful requests, queue and compute time (the server's headers), the mean
batch size, errors by status, and the latency of refused answers (429, 503). Before and after
each level it reads /proc/loadavg and the server's /metrics. Output: results.json, results.md
and loadtest.png in `--out`, all or nothing (docs/serving.md).
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import click

from unclip.errors import UnclipError
from unclip.folders import check_output_folder, staged_folder

GENERATIONS = "/v1/images/generations"
DEFAULT_PROMPTS = ("a red circle on a blue background", "a green square on a white background",
                   "a yellow triangle on a black background", "a blue circle on a yellow background")
REFUSED = (429, 503)  # the server said "not now": busy (queue full) or draining
MAX_CONCURRENCY = 512
MAX_DURATION_S = 3600
SCHEMA_VERSION = 1


# -- checking the command line ------------------------------------------------------------------


def parse_concurrency(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or not all(1 <= c <= MAX_CONCURRENCY for c in levels):
        raise UnclipError(f"--concurrency {text!r} is not a comma-separated list of client counts from 1 to "
                          f"{MAX_CONCURRENCY}; e.g. --concurrency 1,4,8")
    return levels


def parse_settings(text: str) -> dict:
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnclipError(f"--settings is not valid JSON ({exc}); "
                          "e.g. --settings '{\"decoder_steps\": 10}'") from None
    if not isinstance(settings, dict):
        raise UnclipError(f"--settings must be a JSON object, got {type(settings).__name__}; "
                          "e.g. --settings '{\"decoder_steps\": 10}'")
    taken = sorted(set(settings) & {"prompt", "n", "seed", "response_format"})
    if taken:
        raise UnclipError(f"--settings may not set {', '.join(taken)}: use --prompt and --n (seeds are "
                          "chosen per request)")
    return settings


def check_url(url: str, allow_remote: bool) -> str:
    """A base URL (scheme and host, no path); loopback only unless `allow_remote`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise UnclipError(f"--url {url!r} is not a server's base URL; e.g. --url http://127.0.0.1:8000")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not allow_remote:
        raise UnclipError(f"--url {url!r} is not a loopback address: a load test would load another machine; "
                          "pass --allow-remote if that server is yours to load")
    return f"{parts.scheme}://{parts.netloc}"


# -- talking to the server (standard library: the load itself comes from locust) ------------------


def http(method: str, url: str, body: dict | None = None, timeout: float = 30, api_key: str | None = None
         ) -> tuple[int, dict, bytes]:
    """(status, headers with lower-case names, body); status 0 if nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, lower(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, lower(exc.headers), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, {}, str(getattr(exc, "reason", exc)).encode()


def lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def wait_ready(url: str, timeout_s: float) -> dict:
    """The body of /health/ready once it answers 200."""
    end = time.monotonic() + timeout_s
    while True:
        status, _, body = http("GET", url + "/health/ready", timeout=10)
        if status == 200:
            return json.loads(body)
        if time.monotonic() > end:
            what = f"HTTP {status}" if status else body.decode(errors="replace")
            raise UnclipError(f"the server at {url} is not ready after {timeout_s:.0f} s "
                              f"(/health/ready: {what}); start it with `unclip serve` or allow longer "
                              "with --ready-timeout-s")
        time.sleep(0.5)


def probe(url: str, body: dict, timeout_s: float, api_key: str | None = None) -> dict:
    """One request before the load: the server must accept what the clients will send."""
    start = time.monotonic()
    status, headers, raw = http("POST", url + GENERATIONS, body, timeout=timeout_s, api_key=api_key)
    seconds = time.monotonic() - start
    if status != 200:
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode(errors="replace")[:200] if raw else "no answer"
        fix = ("give its key with --api-key (or $UNCLIP_API_KEY)" if status == 401
               else "fix --prompt, --n or --settings")
        raise UnclipError(f"the server refused the load test's request (HTTP {status}: {message}); {fix}")
    return {"latency_s": seconds, "batch_images": headers.get("x-unclip-batch-images")}


def server_counters(url: str, api_key: str | None = None) -> dict | None:
    """Totals from /metrics (summed over labels but `status`); None if it cannot be read."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    status, _, raw = http("GET", url + "/metrics", timeout=10, api_key=api_key)
    if status != 200:
        return None
    out: Counter = Counter()
    wanted = {"unclip_batch_images_count": "batches", "unclip_batch_images_sum": "batch_images",
              "unclip_images_total": "images"}
    for family in text_string_to_metric_families(raw.decode()):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] += sample.value
            elif sample.name == "unclip_requests_total":
                out[f"requests_{sample.labels.get('status', '')}"] += sample.value
    return dict(out)


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


# -- one level ----------------------------------------------------------------------------------


def run_level(spec: dict) -> tuple[list[dict], dict]:
    """Run the clients of one level in their own process; (records, end summary)."""
    limit = spec["duration_s"] + spec["grace_s"] + 60  # the child stops itself; this is the backstop
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child cannot block on it
    proc = subprocess.Popen([sys.executable, "-m", "unclip.serve.load_clients", json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    killer = threading.Timer(limit, proc.kill)
    killer.start()
    records, end, tally = [], None, {"ok": 0, "other": 0}
    bar = _progress(spec)
    try:
        for line in proc.stdout:
            if not line.startswith("{"):  # only our records are JSON objects
                continue
            item = json.loads(line)
            if "end" in item:
                end = item["end"]
                continue
            records.append(item)
            tally["ok" if item["images"] else "other"] += 1
            if bar is not None:
                bar.update(max(0, min(spec["duration_s"], round(item["end_s"])) - bar.n))
                bar.set_postfix(tally, refresh=False)
        proc.wait()
        errors.seek(0)
        stderr = errors.read()
    finally:
        errors.close()
        killer.cancel()
        if bar is not None:
            bar.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or end is None:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        raise UnclipError(f"the load clients failed (exit {proc.returncode}): {tail or 'no message'}; "
                          "is locust installed (pip install 'unclip[bench]')?")
    return records, end


def _progress(spec: dict):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=int(spec["duration_s"]), desc=f"concurrency {spec['concurrency']}", unit="s",
                file=sys.stderr, leave=False)


def spread(values: list[float]) -> dict | None:
    """p50/p90/p99 (numpy's linear interpolation), mean and max; None when there is nothing."""
    import numpy as np

    if not values:
        return None
    v = np.asarray(values, dtype=float)
    return {"count": len(values), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "mean": float(v.mean()), "max": float(v.max())}


def summarize(records: list[dict], end: dict, concurrency: int, duration_s: float) -> dict:
    """A level's figures from its per-request records (the definitions are docs/serving.md's)."""
    ok = [r for r in records if r["images"] > 0]
    refused = [r for r in records if r["status"] in REFUSED]
    failures = [r for r in records if r["images"] == 0]
    errors = Counter("no answer" if r["status"] == 0 else str(r["status"]) for r in failures)
    span = max([duration_s, *(r["end_s"] for r in records)])
    images = sum(r["images"] for r in ok)
    with_batch = [r for r in ok if r.get("batch_images")]
    # a batch of B images holds B / n requests of n images each: batches = sum over requests of n / B
    batches = sum(r["images"] / r["batch_images"] for r in with_batch)
    return {
        "concurrency": concurrency, "duration_s": duration_s, "span_s": span,
        "sent": end["sent"], "answered": len(records), "abandoned": end["abandoned"],
        "ok": len(ok), "refused": len(refused),
        "failed": len(failures) - len(refused) + end["abandoned"],
        "errors_by_status": dict(sorted(errors.items())),
        "error_codes": dict(Counter(r.get("error", "") for r in failures)),
        "images": images, "requests_per_s": len(ok) / span, "images_per_s": images / span,
        "latency_s": spread([r["end_s"] - r["start_s"] for r in ok]),
        "queue_s": spread([r["queue_s"] for r in ok if r.get("queue_s") is not None]),
        "compute_s": spread([r["compute_s"] for r in ok if r.get("compute_s") is not None]),
        "mean_batch_images": images / batches if batches else None,
        "mean_batch_images_per_request": (sum(r["batch_images"] for r in with_batch) / len(with_batch)
                                          if with_batch else None),
        "refused_latency_s": spread([r["end_s"] - r["start_s"] for r in refused]),
    }


def server_delta(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}
    delta["mean_batch_images"] = delta["batch_images"] / delta["batches"] if delta.get("batches") else None
    return delta


# -- the whole run ------------------------------------------------------------------------------


def run_loadtest(url: str, levels: list[int], duration_s: float, *, prompts: list[str], n: int,
                 settings: dict, grace_s: float, max_requests: int, refused_pause_s: float,
                 request_timeout_s: float, ready_timeout_s: float, command: str, api_key: str | None = None,
                 rate: float | None = None) -> dict:
    from unclip.bench.machine import host, versions
    from unclip.bench.results import now

    server = wait_ready(url, ready_timeout_s)
    first = {"prompt": prompts[0], "n": n, "seed": 0, "response_format": "b64_json", **settings}
    probed = probe(url, first, request_timeout_s, api_key)
    doc = {
        "schema_version": SCHEMA_VERSION, "tool": "unclip loadtest", "written": now(), "command": command,
        "url": url, "server": server, "machine": host(), "versions": {**versions(), **client_versions()},
        "request": {"prompts": prompts, "n": n, "settings": settings},
        "options": {"concurrency": levels, "duration_s": duration_s, "grace_s": grace_s,
                    "max_requests": max_requests, "rate_per_s": rate,
                    "refused_pause_s": refused_pause_s, "request_timeout_s": request_timeout_s},
        "probe": probed, "levels": [],
    }
    for k, concurrency in enumerate(levels):
        spec = {"url": url, "concurrency": concurrency, "duration_s": duration_s, "grace_s": grace_s,
                "max_requests": max_requests,
                "prompts": prompts, "n": n, "settings": settings, "seed_base": 1_000_000 * (k + 1),
                "refused_pause_s": refused_pause_s, "request_timeout_s": request_timeout_s,
                "api_key": api_key, "rate": rate}
        load_before, counters_before = loadavg(), server_counters(url, api_key)
        records, end = run_level(spec)
        level = summarize(records, end, concurrency, duration_s)
        level.update(loadavg_before=load_before, loadavg_after=loadavg(),
                     server=server_delta(counters_before, server_counters(url, api_key)), records=records)
        doc["levels"].append(level)
        click.echo(level_line(level), err=True)
    doc["written"] = now()
    return doc


def client_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("locust", "gevent", "fastapi", "uvicorn", "prometheus-client"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def level_line(level: dict) -> str:
    lat = level["latency_s"] or {}
    return (f"concurrency {level['concurrency']}: {level['ok']} ok, {level['refused']} refused, "
            f"{level['failed']} failed; {level['images_per_s']:.3f} images/s, "
            f"latency p50 {lat.get('p50', float('nan')):.2f} s, p99 {lat.get('p99', float('nan')):.2f} s")


def write_results(doc: dict, out: Path, plot: bool = True) -> None:
    from unclip.serve.load_report import markdown, write_plot

    with staged_folder(out) as tmp:
        (tmp / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
        (tmp / "results.md").write_text(markdown(doc))
        if plot:
            write_plot(doc, tmp / "loadtest.png")


@click.command()
@click.option("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
@click.option("--concurrency", default="1,4,8", show_default=True,
              help="comma-separated client counts, one level each, in this order")
@click.option("--duration", type=click.FloatRange(0, MAX_DURATION_S, min_open=True), default=30.0,
              show_default=True, help="seconds each level sends requests (answers may come after)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("unclip-out/loadtest"),
              show_default=True, help="folder for results.json, results.md and loadtest.png (replaced whole)")
@click.option("--prompt", "prompts", multiple=True,
              help="a prompt; repeat for several (requests cycle through them)  [default: four shapes]")
@click.option("--n", type=click.IntRange(1, 64), default=1, show_default=True, help="images per request")
@click.option("--settings", default="{}", show_default=True,
              help="JSON object of extra request fields, e.g. '{\"decoder_steps\": 10}'")
@click.option("--grace-s", type=click.FloatRange(0, MAX_DURATION_S), default=300.0, show_default=True,
              help="how long requests sent during a level may take to finish after it")
@click.option("--max-requests", type=click.IntRange(1, 10**6), default=100_000, show_default=True,
              help="a level also stops after sending this many requests")
@click.option("--refused-pause-s", type=click.FloatRange(0, 60), default=0.5, show_default=True,
              help="a client's pause after a refused or failed answer before its next request "
              "(0: retry at once)")
@click.option("--request-timeout-s", type=click.FloatRange(0, 3600, min_open=True), default=600.0,
              show_default=True, help="a client gives up on a request after this long")
@click.option("--ready-timeout-s", type=click.FloatRange(0), default=120.0, show_default=True,
              help="how long to wait for /health/ready before starting")
@click.option("--api-key", envvar="UNCLIP_API_KEY", default=None, metavar="KEY",
              help="the server's API key (or $UNCLIP_API_KEY); never written to the results")
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None,
              help="requests per second all clients together aim at (each waits between its requests); "
                   "without it each client sends its next request as soon as the last is answered")
@click.option("--allow-remote", is_flag=True, help="allow a --url that is not a loopback address")
@click.option("--no-plot", is_flag=True, help="skip loadtest.png (no matplotlib needed)")
def loadtest(url: str, concurrency: str, duration: float, out: Path, prompts: tuple[str, ...], n: int,
             settings: str, grace_s: float, max_requests: int, refused_pause_s: float,
             request_timeout_s: float, ready_timeout_s: float, api_key: str | None, rate: float | None,
             allow_remote: bool, no_plot: bool) -> None:
    """Closed-loop load test of a running `unclip serve`: throughput, latency, queueing, batching
    and refusals per concurrency level."""
    base = check_url(url, allow_remote)
    levels = parse_concurrency(concurrency)
    extra = parse_settings(settings)
    if any(not p.strip() for p in prompts):
        raise UnclipError("--prompt is empty; give a text prompt")
    check_output_folder(out)
    missing = [m for m in ("locust", *(() if no_plot else ("matplotlib",))) if not _importable(m)]
    if missing:
        raise UnclipError(f"unclip loadtest needs {', '.join(missing)}: pip install 'unclip[bench]'")
    command = repeat_command(click.get_current_context())
    doc = run_loadtest(base, levels, duration, prompts=list(prompts or DEFAULT_PROMPTS), n=n, settings=extra,
                       grace_s=grace_s, max_requests=max_requests, refused_pause_s=refused_pause_s,
                       request_timeout_s=request_timeout_s, ready_timeout_s=ready_timeout_s, command=command,
                       api_key=api_key, rate=rate)
    write_results(doc, out, plot=not no_plot)
    click.echo(f"wrote {out / 'results.json'}, {out / 'results.md'}"
               + ("" if no_plot else f", {out / 'loadtest.png'}"))


def repeat_command(ctx: click.Context) -> str:
    """The command line that repeats this run, every option spelled out."""
    args = ["unclip", "loadtest"]
    for param in ctx.command.params:
        value = ctx.params[param.name]
        flag = param.opts[0]
        if param.name == "api_key":  # a secret: the command names where it came from
            args += [flag, "$UNCLIP_API_KEY"] if value else []
        elif param.is_flag:
            args += [flag] if value else []
        elif param.multiple:
            for item in value:
                args += [flag, str(item)]
        else:
            args += [flag, str(value)]
    return shlex.join(args)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
