"""`unclip bench --device cuda` on tiny (gpu): CUDA-event timing, GPU peak memory, the bf16 matmul peak.
On CPU: the GPU suite's plumbing (benchmarks/gpu_suite.sh and gpu_fastpath.py): its one-line
preflight, its phases within a call's budget and their resumption, the merge of its parts."""

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


# -- the GPU suite's plumbing, on CPU -------------------------------------------------------------

def gpu_fastpath():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_fastpath", REPO / "benchmarks" / "gpu_fastpath.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preflight_names_what_is_missing_and_what_to_carry():
    import importlib

    suite = gpu_fastpath()

    def without(*absent):
        def import_module(name):
            if name in absent:
                raise ImportError(name)
            return importlib.import_module(name)
        return import_module

    ok, line = suite.preflight(without("diffusers", "importlib_metadata"), gpu="NVIDIA H100 80GB HBM3")
    assert not ok and line == ("gpu_suite: cannot start: missing diffusers (ImportError), importlib_metadata "
                               "(ImportError); carry as wheels in .whl: diffusers==0.42.1 "
                               "importlib_metadata==8.7.0 (see benchmarks/gpu_suite.sh)")
    ok, line = suite.preflight(without("triton"), gpu="NVIDIA H100 80GB HBM3")
    assert not ok and line == "gpu_suite: cannot start: missing triton (ImportError)"  # not a carried one
    ok, line = suite.preflight(without(), gpu=None)
    assert not ok and "torch sees no CUDA GPU" in line
    ok, line = suite.preflight(without(), gpu="NVIDIA H100 80GB HBM3")
    assert ok and line.startswith("gpu_suite: ready on NVIDIA H100 80GB HBM3: torch ") and "\n" not in line


STAND_IN_PYTHON = r"""#!/usr/bin/env bash
# python3 for gpu_suite.sh's bookkeeping test: records each call, plays each phase back at once
echo "$*" >>"$CALLS"
case "$*" in
  *--preflight*) echo "gpu_suite: ready on a stand-in GPU"; exit 0 ;;
  *--merge*) exit 0 ;;
  *"-m pytest"*) exit 0 ;;
esac
out=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
echo '{"status": "complete"}' >"$out/results.json"
if [[ "$*" == *gpu_fastpath*karlo* && "$*" == *fp16* ]]; then
  echo "gpu_fastpath: the decoder stage produced non-finite values (precision fp16, batch 1)"
  exit 1
fi
"""


def test_gpu_suite_runs_phases_within_its_budget_and_resumes(tmp_path):
    """benchmarks/gpu_suite.sh's bookkeeping with python3 stood in for (each phase returns at once):
    phases run while their time caps fit the call's budget, the rest is named for the next call,
    and a call given the previous call's files skips what passed there."""
    import os
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STAND_IN_PYTHON)
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.txt")}

    def call(out, *args, budget):
        proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *args], capture_output=True,
                              text=True, timeout=120, env={**env, "OUT": str(out), "BUDGET": str(budget)})
        return proc.returncode, proc.stdout

    # caps: tests 200 s, curve 90 s, small 150 s, karlo-main 300 s: a budget of 230 s (phases that
    # return at once) fits the first three
    code, output = call(tmp_path / "call1", budget=230)
    assert code == 0, output
    assert ("=== next call: bash benchmarks/gpu_suite.sh --from <this call's files> karlo-main small-kernels "
            "karlo-kernels karlo-cache") in output
    phases = (tmp_path / "call1" / "phases.txt").read_text().splitlines()
    assert [line.split()[:2] for line in phases] == [["tests", "exit=0"], ["curve", "exit=0"],
                                                     ["small", "exit=0"]]
    assert sorted(p.name for p in (tmp_path / "call1" / "parts").iterdir()) == ["small.json"]

    previous = tmp_path / "came-back"  # what the device tool returns: read-only files
    shutil.copytree(tmp_path / "call1", previous)
    for path in previous.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    code, output = call(tmp_path / "call2", "--from", str(previous), budget=1000)
    assert code == 1, output  # karlo-main overflowed fp16 (stand-in)
    assert "=== tests: passed in an earlier call, skipped" in output and "=== small: passed" in output
    assert "next call: DTYPE=bf16 bash benchmarks/gpu_suite.sh --from <this call's files> karlo-main" \
        in output
    phases = (tmp_path / "call2" / "phases.txt").read_text().splitlines()
    assert [line.split()[:2] for line in phases] == [
        ["tests", "exit=0"], ["curve", "exit=0"], ["small", "exit=0"], ["karlo-main", "exit=1"],
        ["small-kernels", "exit=0"], ["karlo-kernels", "exit=1"], ["karlo-cache", "exit=1"]]
    log = (tmp_path / "call2" / "log.txt").read_text()
    assert log.count("=== gpu_suite ") == 2  # both calls' logs, in order
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert sum("-m pytest -m gpu" in c for c in calls) == 1  # the tests ran once, in the first call
    assert sum("--merge" in c for c in calls) == 6  # after every benchmark phase and the curve
    assert sum("gpu_step_curve.py" in c for c in calls) == 1


def part_document(suite, model: str, medians: dict[str, float]) -> dict:
    """A results.json as gpu_fastpath.py writes it (unclip bench's header), from made-up latencies."""
    from unclip.bench.machine import machine, versions

    runners = list(medians)
    header = {"started": "2026-11-25T00:00:00+00:00", "command": "", "argv": [], "suite": None,
              "machine": machine("cpu"), "versions": versions(),
              "settings": {"model": model, "device": "cuda", "dtype": "float32", "batch_sizes": [1],
                           "prior_steps": 25, "decoder_steps": 25, "super_res_steps": 7,
                           "prior_guidance": 4.0, "decoder_guidance": 8.0, "warmup": 1, "repeat": 3,
                           "seed": 0, "prompt": "a cat"}}
    results = suite.FastResults(header, runners[0], runners[1:], [1])
    for name, ms in medians.items():
        results.runners[name] = {"model": model, "cold_start_s": 10.0}
        for scale in (0.99, 1.0, 1.01):
            calls = [["prior", 2, 0.1 * ms * scale], ["decoder", 2, 0.5 * ms * scale]]
            stages = {"text_encoder": 0.0, "prior": 0.2 * ms * scale, "decoder": 0.6 * ms * scale,
                      "super_res": 0.2 * ms * scale, "vae": 0.0, "post_processing": 0.0}
            results.add(name, 1, {"latency_ms": ms * scale, "stages_ms": stages, "calls": calls})
    results.flops = {("prior", 2): 10**9, ("decoder", 2): 10**10}
    results.matmul_peak = {"tflops": 800.0, "n": 8192, "dtype": "bfloat16", "iterations": 20}
    results.status = "complete"
    return results.document()


def test_merge_puts_every_part_in_one_results_json(tmp_path):
    import json

    suite = gpu_fastpath()
    (tmp_path / "parts").mkdir()
    small = part_document(suite, "small", {"diffusers": 400.0, "diffusers-fp16": 300.0,
                                           "torch-fp16-graphs-kernels": 60.0})
    karlo = part_document(suite, "karlo", {"diffusers": 2000.0, "torch-fp16-graphs": 400.0})
    (tmp_path / "parts" / "small.json").write_text(json.dumps(small))
    (tmp_path / "parts" / "karlo-kernels.json").write_text(json.dumps(karlo))
    suite.merge(tmp_path)
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["parts"]) == {"small", "karlo-kernels"} and merged["parts"]["small"] == small
    rows = {(r["part"], r["backend"]): r for r in merged["summary"]}
    assert len(rows) == 5
    fused = rows[("small", "torch-fp16-graphs-kernels")]
    assert fused["speedup_vs_diffusers_fp32"] == pytest.approx(400 / 60)  # against its own part's baseline
    assert fused["speedup_vs"] == {"diffusers_fp16": pytest.approx(300 / 60)}
    graphs = rows[("karlo-kernels", "torch-fp16-graphs")]
    assert graphs["speedup_vs_diffusers_fp32"] == pytest.approx(5.0)
    assert graphs["speedup_vs"] == {"diffusers_fp16": None}  # diffusers fp16 did not run in that part
    report = (tmp_path / "results.md").read_text()
    assert ("| small (complete) | small | torch-fp16-graphs-kernels | 1 | 60.0 | 6.67x | "
            "5.00x (diffusers_fp16) |") in report
    assert "# Part `small`" in report and "# Part `karlo-kernels`" in report
    assert "\n## unclip bench: `karlo` on cuda" in report  # each part's own report, a level down


@pytest.mark.slow
def test_gpu_fastpath_runners_of_stable_unclip_on_cpu():
    """The suite's sd-unclip phase runs gpu_fastpath.py's runners on Stable unCLIP: here each runner of
    it in float32 on CPU, in this process: diffusers' pipeline (the baseline, and by dtype) and ours
    time the family's stages and make the same image for the seed; Karlo-only options are refused."""
    import importlib.util

    import numpy as np

    from unclip.errors import UnclipError

    path = REPO / "benchmarks" / "gpu_fastpath.py"
    spec_file = importlib.util.spec_from_file_location("gpu_fastpath", path)
    fastpath = importlib.util.module_from_spec(spec_file)
    spec_file.loader.exec_module(fastpath)
    spec = {"device": "cpu", "model": "sd-unclip-tiny", "prompt": "a red circle", "seed": 3, "dtype": "fp32",
            "backend": "torch", "settings": dict(prior_steps=2, decoder_steps=2, prior_guidance=4.0,
                                                 decoder_guidance=8.0, super_res_steps=7)}
    images = {}
    for kind in ("diffusers", "diffusers-fp32", "torch-fp32"):
        runner = fastpath.FastRunner({**spec, "runner": kind})
        runner.load()
        sample, made = runner.timed(1)
        assert sample["stages_ms"]["vae"] > 0 and sample["stages_ms"]["super_res"] == 0, (kind, sample)
        images[kind] = np.asarray(made[0])
    assert all(np.array_equal(image, images["diffusers"]) for image in images.values())
    with pytest.raises(UnclipError, match="Stable unCLIP's fast path is half precision and CUDA graphs"):
        fastpath.FastRunner({**spec, "runner": "torch-fp32-graphs-kernels"}).load()


def test_gpu_fastpath_measures_on_cpu_and_keeps_going_past_a_failed_runner(tmp_path):
    """gpu_fastpath.py end to end on CPU (eager runners, float32): its runner names pass the bench's
    machinery, and a runner that fails (here: CUDA graphs on CPU) is dropped, named and fails the
    phase while the others are measured (a GPU lease is too short to lose a whole phase to one)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_fastpath.py"), "--device", "cpu",
                           "--model", "tiny", "--dtype", "fp32", "--batch-sizes", "1",
                           "--runners", "diffusers-fp32,torch-fp32-graphs", "--prior-steps", "2",
                           "--decoder-steps", "2", "--super-res-steps", "2", "--warmup", "0", "--repeat", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "gpu_fastpath: runners failed and were dropped: torch-fp32-graphs:" in proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "complete"
    assert [r["backend"] for r in doc["runs"]] == ["diffusers", "diffusers-fp32"]
    assert all(r["speedup_vs_diffusers_fp32"] > 0 and r["repeats"] == 2 for r in doc["runs"])
    assert "needs --device cuda" in doc["runners"]["torch-fp32-graphs"]["failed"]
    assert doc["settings"]["prior_guidance"] == 4.0 and doc["settings"]["decoder_guidance"] == 8.0
    assert "Runners that failed and were dropped: torch-fp32-graphs" in (out / "results.md").read_text()
