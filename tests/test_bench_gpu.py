"""`unclip bench --device cuda` on tiny: CUDA-event timing, GPU peak memory, the bf16 matmul peak."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unclip.engine.profiling import CallTimeline, matmul_peak_tflops

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
def test_cuda_timeline_uses_events():
    timeline = CallTimeline("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    timeline.start()
    timeline.begin("decoder", 2)
    x @ x
    timeline.end()
    trace = timeline.finish()
    assert timeline.cuda and trace.calls[0].ms > 0 and trace.total_ms >= trace.calls[0].end_ms


@pytest.mark.gpu
def test_matmul_peak_is_bf16_on_gpu():
    peak = matmul_peak_tflops("cuda")
    assert peak["dtype"] == "bfloat16" and peak["n"] == 8192
    assert math.isfinite(peak["tflops"]) and peak["tflops"] > 1  # any CUDA GPU of the last decade


@pytest.mark.gpu
@pytest.mark.slow
def test_bench_on_cuda(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "unclip.cli", "bench", "--model", "tiny", "--device", "cuda",
                           "--backends", "torch", "--batch-sizes", "1,2", "--warmup", "1", "--repeat", "3",
                           "--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2",
                           "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["gpu_name"]
    assert doc["matmul_peak"]["dtype"] == "bfloat16"
    for run in doc["runs"]:
        assert run["cuda_peak_allocated_mb"] > 0
        assert all(0 < f < 1.5 for f in run["stage_fraction_of_matmul_peak"].values() if f is not None)
    assert "CUDA events" in (out / "results.md").read_text()
