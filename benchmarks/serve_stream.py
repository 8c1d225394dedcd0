"""Issue 23's measurements of streaming, on `unclip serve --model demo` with an API key, in one run:

  1. latency: --rounds rounds, one request at a time, alternating an unstreamed request and the same
     request streamed with --partial-images previews (decoder 25 steps, the model's other defaults):
     the time to the first partial image against the unstreamed request's latency, and the streamed
     request's total against it;
  2. throughput: `unclip loadtest` at --clients clients for --level-s seconds, unstreamed and streamed
     alternately (A B A B ...: --pairs pairs), images/s each; the cost is 1 - streamed / unstreamed
     over the pairs' totals.

Output (benchmarks/results/serve/stream/ by default, replaced whole): results.json, results.md and
each load level's own results under load/.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python3 benchmarks/serve_stream.py    # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_soak import REPO, free_port, loadtest, start_server  # noqa: E402

from unclip.bench.machine import machine, versions  # noqa: E402
from unclip.bench.results import now  # noqa: E402
from unclip.folders import staged_folder  # noqa: E402

GEN = "/v1/images/generations"


def unstreamed(url: str, body: dict, headers: dict) -> float:
    start = time.perf_counter()
    response = httpx.post(url + GEN, json=body, headers=headers, timeout=600)
    response.raise_for_status()
    return time.perf_counter() - start


def streamed(url: str, body: dict, headers: dict, partial_images: int) -> dict:
    """Seconds to the first partial image, to each partial, and to the end of the stream."""
    start, partials, completed = time.perf_counter(), [], 0
    with httpx.stream("POST", url + GEN, json={**body, "stream": True, "partial_images": partial_images},
                      headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line == "event: image_generation.partial_image":
                partials.append(time.perf_counter() - start)
            elif line == "event: image_generation.completed":
                completed += 1
            elif line == "event: error":
                raise SystemExit("serve_stream: the stream ended with an error event")
    if len(partials) != partial_images or completed != 1:
        raise SystemExit(f"serve_stream: {len(partials)} partial and {completed} completed events")
    return {"first_partial_s": partials[0], "partials_s": partials, "total_s": time.perf_counter() - start}


def markdown(doc: dict) -> str:
    lat, tp = doc["latency"], doc["throughput"]
    lines = [f"# Streaming on `unclip serve --model {doc['model']}`", "",
             f"Command: `{doc['command']}` ({doc['written']}; {doc['machine']['cpu_model']}, "
             f"{doc['machine']['cpu_cores']} cores; torch {doc['versions']['torch']}). Requests: "
             f"`{json.dumps(doc['request'])}`, n = 1.", "",
             f"## Latency ({lat['rounds']} rounds, one request at a time, alternating)", "",
             "| | median (s) | of the unstreamed latency |", "|---|---:|---:|",
             f"| unstreamed request | {lat['unstreamed_s']:.3f} | 100 % |",
             f"| streamed ({doc['partial_images']} partial images): first partial image | "
             f"{lat['first_partial_s']:.3f} | **{lat['first_partial_fraction']:.1%}** (bar ≤ 45 %) |",
             f"| streamed: whole stream | {lat['streamed_total_s']:.3f} | "
             f"{lat['streamed_total_fraction']:.1%} |",
             "", f"## Throughput ({tp['clients']} clients, {tp['level_s']:.0f} s per level, "
             f"{len(tp['pairs'])} pairs, alternating)", "",
             "| pair | unstreamed images/s | streamed images/s |", "|---|---:|---:|"]
    for k, (a, b) in enumerate(tp["pairs"], 1):
        lines.append(f"| {k} | {a['images_per_s']:.3f} | {b['images_per_s']:.3f} |")
    lines += [f"| all | {tp['unstreamed_images_per_s']:.3f} | {tp['streamed_images_per_s']:.3f} |", "",
              f"Streaming costs **{tp['cost']:.1%}** of the throughput (bar ≤ 5 %); failed requests: "
              f"{tp['failed']}.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--partial-images", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--level-s", type=float, default=90.0)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve" / "stream")
    args = parser.parse_args(argv)
    key = secrets.token_urlsafe(24)
    env = {**os.environ, "UNCLIP_API_KEY": key, "PYTHONPATH": str(REPO)}
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    request = {"decoder_steps": 25}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
        server = start_server(args.model, port, env, log)
        try:
            rounds = []
            for k in range(args.rounds):
                body = {"prompt": "a red circle on a blue background", "seed": k, **request}
                plain = unstreamed(url, body, headers)
                rounds.append({"unstreamed_s": plain, **streamed(url, body, headers, args.partial_images)})
            pairs, failed = [], 0
            for k in range(args.pairs):
                pair = []
                for mode, extra in (("unstreamed", {}),
                                    ("streamed", {"stream": True, "partial_images": args.partial_images})):
                    out = Path(tmp) / "load" / f"{k + 1}-{mode}"
                    level = loadtest(url, out, args.clients, args.level_s, env,
                                     settings={**request, **extra})["levels"][0]
                    failed += level["failed"] + level["refused"]
                    pair.append({k2: v for k2, v in level.items() if k2 != "records"})
                pairs.append(pair)
        finally:
            server.terminate()
            try:
                server.wait(120)
            except Exception:  # noqa: BLE001 - a server that does not stop is killed
                server.kill()
        median = statistics.median
        plain_s = median(r["unstreamed_s"] for r in rounds)
        first_s = median(r["first_partial_s"] for r in rounds)
        total_s = median(r["total_s"] for r in rounds)
        images = {mode: sum(p[i]["images"] for p in pairs) / sum(p[i]["span_s"] for p in pairs)
                  for i, mode in enumerate(("unstreamed", "streamed"))}
        doc = {"tool": "benchmarks/serve_stream.py", "written": now(),
               "command": shlex.join(["python3", "benchmarks/serve_stream.py", *argv]),
               "model": args.model, "request": request, "partial_images": args.partial_images,
               "machine": machine("cpu"), "versions": versions(),
               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "latency": {"rounds": args.rounds, "unstreamed_s": plain_s, "first_partial_s": first_s,
                           "streamed_total_s": total_s, "first_partial_fraction": first_s / plain_s,
                           "streamed_total_fraction": total_s / plain_s, "each": rounds},
               "throughput": {"clients": args.clients, "level_s": args.level_s, "pairs": pairs,
                              "unstreamed_images_per_s": images["unstreamed"],
                              "streamed_images_per_s": images["streamed"],
                              "cost": 1 - images["streamed"] / images["unstreamed"], "failed": failed}}
        with staged_folder(args.out) as out:
            (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
            (out / "results.md").write_text(markdown(doc))
            for level in sorted((Path(tmp) / "load").iterdir()):
                (out / "load" / level.name).mkdir(parents=True)
                for f in ("results.json", "results.md"):
                    text = (level / f).read_text()
                    (out / "load" / level.name / f).write_text(text.replace(key, "$UNCLIP_API_KEY"))
    print(markdown(doc), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
