"""Raw samples in, the figures of results.json out; written atomically after every measured run.

Every figure is a function of the raw samples stored next to it: latency median/p10/p90
(numpy's linear-interpolation percentiles), images/s = batch / median, speedup = baseline
median / backend median at the same batch size, per-stage and per-call medians, and TFLOP/s =
FLOPs counted for the calls of a stage / that stage's median time.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from unclip.engine.profiling import STAGE_OF_NETWORK, STAGES
from unclip.folders import write_file_atomic as write_atomic

SCHEMA_VERSION = 1


def spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)),
            "p90": float(np.percentile(v, 90))}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Results:
    """Everything measured so far; `document()` is results.json."""

    def __init__(self, header: dict, baseline: str, backends: list[str], batch_sizes: list[int]):
        self.header = header
        self.baseline = baseline
        self.order = [baseline, *backends]
        self.batch_sizes = batch_sizes
        self.samples: dict[tuple[str, int], list[dict]] = {}
        self.memory: dict[tuple[str, int], dict] = {}
        self.runners: dict[str, dict] = {name: {} for name in self.order}
        self.flops: dict[tuple[str, int], int] = {}
        self.matmul_peak: dict | None = None
        self.status = "running"

    def add(self, runner: str, batch: int, sample: dict) -> None:
        self.samples.setdefault((runner, batch), []).append(sample)

    def call_keys(self) -> set[tuple[str, int]]:
        return {(c[0], c[1]) for samples in self.samples.values() for s in samples for c in s["calls"]}

    # -- figures --------------------------------------------------------------------------------

    def _stage_flops(self, sample: dict) -> dict[str, float | None]:
        out: dict[str, float | None] = dict.fromkeys(STAGES[:-1], 0.0)
        for network, rows, _ in sample["calls"]:
            stage = STAGE_OF_NETWORK[network]
            flops = self.flops.get((network, rows))
            out[stage] = None if flops is None or out[stage] is None else out[stage] + flops
        return out

    def _networks(self, samples: list[dict]) -> dict[str, dict]:
        out = {}
        for network in STAGE_OF_NETWORK:
            calls = [c for s in samples for c in s["calls"] if c[0] == network]
            if not calls:
                continue
            flops = [self.flops.get((network, rows)) for _, rows, _ in calls]
            median_ms = float(np.median([c[2] for c in calls]))
            gflop = None if None in flops else float(np.mean(flops)) / 1e9
            out[network] = {
                "calls_per_generation": len(calls) / len(samples),
                "median_call_ms": median_ms,
                "ms_per_generation": float(np.median([sum(c[2] for c in s["calls"] if c[0] == network)
                                                      for s in samples])),
                "gflop_per_call": gflop,
                "tflops": None if gflop is None else gflop / median_ms,  # GFLOP/ms = TFLOP/s
            }
        return out

    def run(self, runner: str, batch: int) -> dict:
        samples = self.samples[(runner, batch)]
        latency = spread([s["latency_ms"] for s in samples])
        stages = {k: float(np.median([s["stages_ms"][k] for s in samples])) for k in STAGES}
        stage_flops = self._stage_flops(samples[0])
        peak = self.matmul_peak["tflops"] if self.matmul_peak else None
        tflops = {k: (None if stage_flops[k] is None or stages[k] <= 0 else stage_flops[k] / stages[k] / 1e9)
                  for k in stage_flops}
        base = self.samples.get((self.baseline, batch))
        speedup = float(np.median([s["latency_ms"] for s in base])) / latency["median"] if base else None
        return {
            "backend": runner, "is_baseline": runner == self.baseline, "batch_size": batch,
            "repeats": len(samples), "latency_ms": latency,
            "images_per_s": batch / (latency["median"] / 1e3),
            "speedup_vs_baseline": speedup,
            "stages_ms": stages,
            "stage_gflop": {k: (None if v is None else v / 1e9) for k, v in stage_flops.items()},
            "stage_tflops": tflops,
            "stage_fraction_of_matmul_peak": {k: (None if v is None or not peak else v / peak)
                                              for k, v in tflops.items()},
            "networks": self._networks(samples),
            **self.memory.get((runner, batch), {"peak_rss_mb": None, "cuda_peak_allocated_mb": None}),
            "samples_ms": [s["latency_ms"] for s in samples],
            "raw": samples,
        }

    def document(self) -> dict:
        runs = [self.run(r, b) for b in self.batch_sizes for r in self.order if (r, b) in self.samples]
        return {
            "schema_version": SCHEMA_VERSION, "status": self.status, "written": now(), **self.header,
            "baseline": self.baseline, "matmul_peak": self.matmul_peak, "runners": self.runners,
            "flops_per_call": [{"network": n, "rows": r, "gflop": f / 1e9}
                               for (n, r), f in sorted(self.flops.items())],
            "runs": runs,
        }


def write_json(path: Path, document: dict) -> None:
    write_atomic(path, json.dumps(document, indent=1) + "\n")
