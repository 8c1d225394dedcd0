"""The soak of issue 22: `unclip serve` under a steady load at about 80 % of its capacity for 20 minutes,
through HTTP, with an API key: no request may fail, the server's memory may not creep and its open
file descriptors must stay flat.

  1. `unclip serve --model demo` (the key from $UNCLIP_API_KEY, a random one) on a free 127.0.0.1 port;
  2. its capacity: `unclip loadtest` closed-loop at --clients clients for --capacity-s seconds (images/s);
  3. the soak: `unclip loadtest` at the same clients, paced at --fraction of that capacity (--rate),
     for --soak-s seconds, while the server process's RSS and open file descriptors are sampled every
     --sample-s seconds (psutil). The baseline is the first sample of the soak (after the warm-up and
     the capacity run: the allocator has settled).

Verdicts (reported, with the numbers): failed requests = 0; RSS at the end <= 1.05 x the baseline;
open descriptors at the end <= the baseline + --clients (one connection per client may be open or
not at a sample). Output (benchmarks/results/serve/soak/ by default, replaced whole): results.json,
results.md, soak.png, capacity/ and soak/ (the two load tests' own results).

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python3 benchmarks/serve_soak.py     # ~23 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from unclip.bench.machine import machine, versions
from unclip.bench.results import now
from unclip.folders import staged_folder

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, env: dict, log) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "unclip.cli", "serve", "--model", model,
                             "--port", str(port)], env=env, stdout=log, stderr=log, cwd=REPO)
    import httpx

    end = time.monotonic() + 300
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"serve_soak: the server exited ({proc.returncode}); see its log")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("serve_soak: the server was not ready within 300 s")


def loadtest(url: str, out: Path, clients: int, duration_s: float, env: dict, rate: float | None = None,
             settings: dict | None = None) -> dict:
    args = [sys.executable, "-m", "unclip.cli", "loadtest", "--url", url, "--concurrency", str(clients),
            "--duration", str(duration_s), "--out", str(out), "--no-plot", "--grace-s", "120"]
    if rate is not None:
        args += ["--rate", f"{rate:.4f}"]
    if settings:
        args += ["--settings", json.dumps(settings)]
    subprocess.run(args, env=env, check=True, cwd=REPO, timeout=duration_s + 600)
    return json.loads((out / "results.json").read_text())


def sample(proc: psutil.Process, t0: float) -> dict:
    with proc.oneshot():
        return {"t_s": round(time.monotonic() - t0, 1), "rss_mb": proc.memory_info().rss / 2**20,
                "fds": proc.num_fds(), "threads": proc.num_threads()}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    t = [s["t_s"] / 60 for s in samples]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    a.plot(t, [s["rss_mb"] for s in samples])
    a.axhline(doc["verdict"]["rss_baseline_mb"] * 1.05, color="red", linestyle="--", label="baseline + 5 %")
    a.set_ylabel("server RSS (MB)")
    a.legend()
    b.plot(t, [s["fds"] for s in samples])
    b.set_ylabel("open file descriptors")
    b.set_xlabel("minutes into the soak")
    fig.suptitle(f"unclip serve --model {doc['model']}: {doc['soak']['rate_per_s']:.2f} requests/s for "
                 f"{doc['soak']['duration_s'] / 60:.0f} min")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def markdown(doc: dict) -> str:
    v, soak, cap = doc["verdict"], doc["soak"], doc["capacity"]
    lat = soak["latency_s"] or {}
    lines = [f"# Soak: `unclip serve --model {doc['model']}`, {soak['duration_s'] / 60:.0f} minutes at "
             f"{doc['fraction']:.0%} of capacity", "",
             f"Command: `{doc['command']}` ({doc['written']}; {doc['machine']['cpu_model']}, "
             f"{doc['machine']['cpu_cores']} cores; torch {doc['versions']['torch']}).", "",
             f"Capacity (closed loop, {cap['concurrency']} clients, {cap['duration_s']:.0f} s): "
             f"{cap['images_per_s']:.3f} images/s. Soak: {cap['concurrency']} clients paced at "
             f"{soak['rate_per_s']:.3f} requests/s (n = 1), with an API key.", "",
             "| | value | bar | met |", "|---|---:|---|---|",
             f"| requests answered 200 | {soak['ok']} of {soak['sent']} sent | | |",
             f"| failed requests | {soak['failed']} (refused {soak['refused']}) | 0 | "
             f"{'yes' if v['no_failures'] else '**no**'} |",
             f"| server RSS, baseline → end (max) | {v['rss_baseline_mb']:.1f} → {v['rss_end_mb']:.1f} MB "
             f"({v['rss_max_mb']:.1f}); {v['rss_growth']:+.2%} | ≤ +5 % | "
             f"{'yes' if v['rss_ok'] else '**no**'} |",
             f"| open file descriptors, baseline → end (min–max) | {v['fds_baseline']} → {v['fds_end']} "
             f"({v['fds_min']}–{v['fds_max']}) | ≤ baseline + {cap['concurrency']} | "
             f"{'yes' if v['fds_ok'] else '**no**'} |",
             f"| achieved rate | {soak['requests_per_s']:.3f} requests/s | | |",
             f"| latency p50 / p99 | {lat.get('p50', float('nan')):.2f} / "
             f"{lat.get('p99', float('nan')):.2f} s | | |", "",
             f"Samples every {doc['sample_s']:.0f} s: soak.png; both load tests' full results: capacity/, "
             "soak/."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--capacity-s", type=float, default=60.0)
    parser.add_argument("--soak-s", type=float, default=1200.0)
    parser.add_argument("--fraction", type=float, default=0.8)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve" / "soak")
    args = parser.parse_args(argv)
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "UNCLIP_API_KEY": key, "PYTHONPATH": str(REPO)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        server = start_server(args.model, port, env, log)
        try:
            capacity = loadtest(url, Path(tmp) / "capacity", args.clients, args.capacity_s, env)["levels"][0]
            rate = args.fraction * capacity["images_per_s"]
            proc, samples, stop = psutil.Process(server.pid), [], threading.Event()
            t0 = time.monotonic()

            def sampler() -> None:
                while not stop.is_set():
                    samples.append(sample(proc, t0))
                    stop.wait(args.sample_s)

            thread = threading.Thread(target=sampler, daemon=True)
            thread.start()
            soak = loadtest(url, Path(tmp) / "soak", args.clients, args.soak_s, env, rate=rate)["levels"][0]
            stop.set()
            thread.join()
            samples.append(sample(proc, t0))
        finally:
            server.terminate()
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
        log.seek(0)
        tracebacks = log.read().count("Traceback")
        base, end = samples[0], samples[-1]
        verdict = {
            "no_failures": soak["failed"] == 0 and soak["refused"] == 0,
            "rss_baseline_mb": base["rss_mb"], "rss_end_mb": end["rss_mb"],
            "rss_max_mb": max(s["rss_mb"] for s in samples), "rss_growth": end["rss_mb"] / base["rss_mb"] - 1,
            "fds_baseline": base["fds"], "fds_end": end["fds"], "fds_min": min(s["fds"] for s in samples),
            "fds_max": max(s["fds"] for s in samples), "server_log_tracebacks": tracebacks,
        }
        verdict["rss_ok"] = verdict["rss_growth"] <= 0.05
        verdict["fds_ok"] = end["fds"] <= base["fds"] + args.clients
        doc = {"tool": "benchmarks/serve_soak.py", "written": now(),
               "command": shlex.join(["python3", "benchmarks/serve_soak.py", *argv]),
               "model": args.model, "fraction": args.fraction, "sample_s": args.sample_s,
               "machine": machine("cpu"), "versions": versions(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "capacity": {k: v for k, v in capacity.items() if k != "records"},
               "soak": {**{k: v for k, v in soak.items() if k != "records"}, "rate_per_s": rate},
               "samples": samples, "verdict": verdict}
        with staged_folder(args.out) as out:
            (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
            (out / "results.md").write_text(markdown(doc))
            plot(doc, out / "soak.png")
            for name in ("capacity", "soak"):
                (out / name).mkdir()
                for f in ("results.json", "results.md"):
                    text = (Path(tmp) / name / f).read_text()
                    (out / name / f).write_text(text.replace(key, "$UNCLIP_API_KEY"))
    print(markdown(doc), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
