"""Per-step cost of the decoder against its rows: the curve that decides continuous batching on a GPU.

The serving engine batches whole requests (docs/serving.md): on a CPU a step's cost grows in
proportion to its rows, so requests joining a running batch between steps would only time-share the
cores. On a GPU below saturation extra rows may be nearly free; this measures whether they are.

For each model and row count it times one decoder network call (a denoising step's network; the
guidance update after it is one small elementwise kernel) on random inputs in the decoder's real
shapes, in half precision:

  eager   the call as the eager loop makes it (PyTorch launches every kernel)
  graph   the same call captured once as a CUDA graph and replayed (what the fast path runs)

Each time is the median over `--repeat` calls, timed with CUDA events after `--warmup` calls; the
FLOPs of one call are counted with torch's flop counter (rows scale them linearly) and divided by
the time, against the bf16 8192^3 matmul peak measured in the same run. "rows" are network rows: a
guided step of k images runs 2k rows.

    python benchmarks/gpu_step_curve.py --models small,karlo --rows 1,2,4,8,16 --out OUT
On CPU (`--device cpu`, eager only, float32) it runs the same arithmetic for the tests.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from unclip.bench.machine import machine, versions
from unclip.engine.backends.torch_backend import TorchBackend
from unclip.engine.precision import DTYPES, PrecisionBackend
from unclip.engine.profiling import count_flops, matmul_peak_tflops
from unclip.models.components import build_preset
from unclip.specs import example_inputs


class Timer:
    """Median milliseconds of `fn()` over `repeat` calls: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, repeat: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.repeat = warmup, repeat

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def captured(fn, inputs: dict[str, torch.Tensor]):
    """`fn(**inputs)` as a CUDA graph on the static `inputs`; returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up where the capture runs (cuBLAS workspaces, autotuning)
        for _ in range(2):
            fn(**inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn(**inputs)
    return graph.replay


def curve(model: str, rows: list[int], device: torch.device, dtype: str, timer: Timer,
          peak_tflops: float | None) -> list[dict]:
    components = build_preset(model, device=device if device.type == "cuda" else "cpu")
    backend = TorchBackend(components, device)
    run = backend.run if dtype == "fp32" else PrecisionBackend(backend, dtype).run_native
    spec = backend.specs["decoder"]
    generator = torch.Generator().manual_seed(0)
    one = {k: v.to(device) for k, v in example_inputs(spec, backend.dims, 1, generator).items()}
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() and k != "timestep" else v
            for k, v in one.items()}
    flops_per_row = count_flops(backend.networks["decoder"], [cast[n] for n in spec.input_names])
    out = []
    for r in rows:
        inputs = {k: v.to(device) for k, v in example_inputs(spec, backend.dims, r, generator).items()}
        row = {"model": model, "network": "decoder", "dtype": dtype, "rows": r,
               "sample_shape": list(inputs["sample"].shape), "gflop": flops_per_row * r / 1e9,
               "eager_ms": timer(lambda inputs=inputs: run("decoder", **inputs))}
        if device.type == "cuda":
            replay = captured(lambda **kw: run("decoder", **kw), inputs)
            row["graph_ms"] = timer(replay)
            del replay
        best = min(row.get("graph_ms", row["eager_ms"]), row["eager_ms"])
        row["tflops"] = row["gflop"] / best if best > 0 else None  # GFLOP/ms = TFLOP/s
        fraction = row["tflops"] / peak_tflops if row["tflops"] and peak_tflops else None
        row["fraction_of_matmul_peak"] = fraction
        out.append(row)
        print(json.dumps(row), flush=True)
    for row in out:  # the serving question: what does a row cost next to a step of one row
        base = out[0]
        for kind in ("eager_ms", "graph_ms"):
            if kind in row:
                row[f"{kind[:-3]}_vs_rows_{base['rows']}"] = row[kind] / base[kind]
                row[f"{kind[:-3]}_ms_per_row"] = row[kind] / row["rows"]
    del backend, components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(doc: dict) -> str:
    lines = ["# Decoder step cost against rows", "", f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine'].get('gpu_name') or doc['machine']['cpu_model']}; torch "
             f"{doc['versions']['torch']}; {doc['written']}; matmul peak (bf16 8192^3) "
             f"{doc['matmul_peak_tflops'] or float('nan'):.0f} TFLOP/s.", "",
             "One decoder network call (one denoising step's network), median of CUDA-event timings; "
             "'x rows 1' is the step's time over the 1-row step's (rows that cost nothing extra give 1.0, "
             "proportional cost gives the row count).", "",
             "| model | dtype | rows | GFLOP | eager ms | graph ms | graph x rows 1 | graph ms/row | "
             "TFLOP/s | fraction of peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    for r in doc["rows"]:
        first = r.get("graph_vs_rows_1", r.get("eager_vs_rows_1"))
        lines.append(f"| {r['model']} | {r['dtype']} | {r['rows']} | {r['gflop']:,.1f} | "
                     f"{r['eager_ms']:.2f} | "
                     f"{f(r.get('graph_ms'), '.2f')} | {f(first, '.2f')} | "
                     f"{f(r.get('graph_ms_per_row', r.get('eager_ms_per_row')), '.2f')} | "
                     f"{f(r['tflops'], '.1f')} | {f(r['fraction_of_matmul_peak'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="small,karlo")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_step_curve: --device cuda needs a CUDA GPU; use --device cpu")
    timer = Timer(device, args.warmup, args.repeat)
    peak = matmul_peak_tflops(device)["tflops"] if device.type == "cuda" else None
    rows = [int(r) for r in args.rows.split(",")]
    doc = {"command": shlex.join(["python", "benchmarks/gpu_step_curve.py", *argv]),
           "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": machine(args.device), "versions": versions(), "matmul_peak_tflops": peak,
           "warmup": args.warmup, "repeat": args.repeat, "rows": []}
    for model in args.models.split(","):
        with torch.inference_mode():
            doc["rows"] += curve(model, rows, device, args.dtype, timer, peak)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_curve.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "step_curve.md").write_text(markdown(doc))
    print(markdown(doc), flush=True)
    return doc


if __name__ == "__main__":
    main(sys.argv[1:])
