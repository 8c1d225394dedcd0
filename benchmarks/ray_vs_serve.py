"""Ray Serve's cost: `unclip loadtest` against plain `unclip serve` and against `unclip serve --ray`
(one replica), in one run, on the demo model at its own sampler defaults.

The servers take turns, serve / ray / ray / serve, each started fresh on a free loopback port,
loaded for `--duration` seconds by `--concurrency` clients, and stopped with SIGTERM: a drift in
the shared machine's load between the first and the last run cancels to first order in the
means. Acceptance (issue 13): Ray's images/s >= 0.85 x plain serve's (ACCEPT_RATIO).

    PYTHONPATH=$PWD python3 benchmarks/ray_vs_serve.py                   # ~6 min on 2 cores
    PYTHONPATH=$PWD python3 benchmarks/ray_vs_serve.py --duration 120    # steadier
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python3 benchmarks/ray_vs_serve.py   # a shared CPU

Output (all or nothing; default benchmarks/results/serve/ray/): comparison.json, comparison.md,
each server's log, and each load test's own folder (serve-1/, ray-1/, ray-2/, serve-2/) as
`unclip loadtest` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from unclip.bench.machine import machine, versions
from unclip.bench.results import now
from unclip.folders import staged_folder

ACCEPT_RATIO = 0.85  # Ray's images/s at least this fraction of plain serve's (issue 13)
ORDER = ("serve", "ray", "ray", "serve")
# inherited by both servers (Ray's workers too): OMP_WAIT_POLICY=PASSIVE on a CPU shared with
# other busy processes, where spinning OpenMP teams run many times slower (docs/serving.md)
OPENMP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
START_S = 300  # a server (Ray: the instance and its replica) is ready within this
STOP_S = 120  # and has drained and exited within this after SIGTERM


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "unclip.cli", *args]


class Server:
    """`unclip serve [--ray] --model demo` on a free loopback port, in its own session (so that a
    kill reaches Ray's processes too); stopped with SIGTERM, killed if it does not exit."""

    def __init__(self, kind: str, model: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = cli("serve", *(["--ray"] if kind == "ray" else []), "--model", model,
                           "--host", "127.0.0.1", "--port", str(self.port))
        self.log, self.proc = log, None

    def __enter__(self) -> Server:
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
                                     start_new_session=True)
        end = time.monotonic() + START_S
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.__exit__()
                raise SystemExit(f"{shlex.join(self.command)} did not become ready; see {self.log}")
            time.sleep(0.5)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health/ready", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_one(kind: str, name: str, args, out: Path) -> dict:
    load_out = out / name
    with Server(kind, args.model, out / f"{name}.log") as server:
        command = cli("loadtest", "--url", server.url, "--concurrency", str(args.concurrency),
                      "--duration", str(args.duration), "--out", str(load_out))
        before = loadavg()
        subprocess.run(command, check=True)
        after = loadavg()
    [level] = json.loads((load_out / "results.json").read_text())["levels"]
    run = {"name": name, "server": kind, "server_command": shlex.join(server.command),
           "loadtest_command": shlex.join(command), "images_per_s": level["images_per_s"],
           "ok": level["ok"], "refused": level["refused"], "failed": level["failed"],
           "errors": level["error_codes"], "mean_batch_images": level["mean_batch_images"],
           "latency_p50_s": level["latency_s"].get("p50"), "exit_code": server.proc.returncode,
           "loadavg_before": before, "loadavg_after": after}
    print(f"{name}: {run['images_per_s']:.3f} images/s ({run['ok']} ok, {run['refused']} refused, "
          f"{run['failed']} failed), loadavg {before[0]:.2f} -> {after[0]:.2f}", file=sys.stderr)
    return run


def markdown(doc: dict) -> str:
    lines = [f"# Ray Serve vs plain `unclip serve`, {doc['written']}", "",
             f"`unclip loadtest` at concurrency {doc['concurrency']}, {doc['duration_s']:.0f} s per run, "
             f"model {doc['model']} at its defaults; order {', '.join(r['name'] for r in doc['runs'])}. "
             f"Machine: {doc['machine']['cpu_model']}, shared with other work (load averages below); "
             f"OpenMP environment: {doc['openmp'] or 'none'}.", "",
             "| run | images/s | ok | refused | failed | mean batch | p50 latency s | load before, after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        batch = "-" if r["mean_batch_images"] is None else f"{r['mean_batch_images']:.2f}"
        p50 = "-" if r["latency_p50_s"] is None else f"{r['latency_p50_s']:.2f}"
        lines.append(f"| {r['name']} | {r['images_per_s']:.3f} | {r['ok']} | {r['refused']} | {r['failed']} "
                     f"| {batch} | {p50} | {r['loadavg_before'][0]:.2f}, {r['loadavg_after'][0]:.2f} |")
    verdict = "met" if doc["met"] else "NOT met" + ("" if doc["no_failures"] else ": a run failed requests")
    lines += ["", f"Mean images/s: serve {doc['serve_images_per_s']:.3f}, Ray {doc['ray_images_per_s']:.3f}; "
              f"ratio **{doc['ratio']:.3f}** (acceptance: >= {ACCEPT_RATIO}, no failed request; {verdict}).",
              "", f"Command: `{doc['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve/ray"))
    args = parser.parse_args()
    with staged_folder(args.out) as out:
        seen: dict[str, int] = {}
        runs = []
        for kind in ORDER:
            seen[kind] = seen.get(kind, 0) + 1
            runs.append(run_one(kind, f"{kind}-{seen[kind]}", args, out))

        def mean(kind: str) -> float:
            rates = [r["images_per_s"] for r in runs if r["server"] == kind]
            return sum(rates) / len(rates)

        ratio = mean("ray") / mean("serve")
        # a failed request (a server restarted under load, a replica killed) makes the run no measure
        no_failures = all(r["failed"] == 0 and r["exit_code"] == 0 for r in runs)
        doc = {"written": now(), "command": shlex.join([sys.executable, *sys.argv]), "model": args.model,
               "concurrency": args.concurrency, "duration_s": args.duration, "machine": machine("cpu"),
               "openmp": {k: os.environ[k] for k in OPENMP if k in os.environ},
               "versions": versions(), "runs": runs, "serve_images_per_s": mean("serve"),
               "ray_images_per_s": mean("ray"), "ratio": ratio, "accept_ratio": ACCEPT_RATIO,
               "no_failures": no_failures, "met": ratio >= ACCEPT_RATIO and no_failures}
        (out / "comparison.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "comparison.md").write_text(markdown(doc))
    print(f"Ray / serve images/s: {ratio:.3f} (acceptance >= {ACCEPT_RATIO}); written to {args.out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
