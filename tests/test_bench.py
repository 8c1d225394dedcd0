"""`unclip bench` end to end on tiny: the three outputs, their consistency with the raw samples,
partial results on Ctrl-C, and bad input rejected before any work."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import unclip
from unclip.bench.runners import default_runners
from unclip.cli import cli
from unclip.engine.precision import cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[1]
# every runner that runs on this CPU: the bench's default when --backends is left out
RUNNERS = [r.name for r in default_runners("cpu", unclip.BACKENDS)[0]]
EXACT = [name for name in RUNNERS if name.endswith("fp32")]
# bf16 on tiny against the fp32 baseline, uint8 levels: its random weights leave nearly every pixel at the
# clamp, so the few that bf16 rounding flips move by up to 255. Measured means 4.5 (torch) and 7.7
# (openvino) at 2/2/2 steps; a wrong image is ~128.
BF16_MEAN_LEVELS = 30
BATCH_SIZES = [1, 2]
REPEAT = 2
FAST = ["--prior-steps", "2", "--decoder-steps", "2", "--super-res-steps", "2"]
# Stages are differences of the same clock readings; they add up to the latency up to float rounding.
SUM_TOLERANCE_MS = 1e-6


def bench_command(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unclip.cli", "bench", "--model", "tiny", "--out", str(out),
            "--cache-dir", str(cache), *FAST, *extra]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    out = root / "results"
    proc = subprocess.run(bench_command(out, root / "cache",
                                       "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--warmup", "1",
                                       "--repeat", str(REPEAT)),
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_results_json_fields_and_consistency(bench_out):
    doc = json.loads((bench_out / "results.json").read_text())
    assert doc["status"] == "complete"
    assert doc["command"].startswith(f"unclip bench --model tiny --backends {','.join(RUNNERS)} ")
    assert "--no-evaluate" in doc["command"]  # tiny cannot be scored
    # every default runner runs, but the bf16 ones on a CPU without native bf16 (skipped, with why)
    bf16 = {"torch-bf16", "openvino-bf16"}
    assert set(doc["runners_skipped"]) == (set() if cpu_has_native_bf16() else bf16)
    assert all("native bf16" in why for why in doc["runners_skipped"].values())
    for key in ("cpu_model", "cpu_cores", "gpu_name", "gpu_driver"):
        assert key in doc["machine"]
    assert doc["machine"]["cpu_cores"] >= 1
    for key in ("python", "torch", "diffusers", "onnxruntime", "openvino", "tensorrt"):
        assert key in doc["versions"]
    assert doc["versions"]["torch"] and doc["versions"]["python"]
    assert {"torch-fp32", "onnxruntime-fp32", "openvino-fp32"} | (bf16 if cpu_has_native_bf16() else set()) \
        <= set(RUNNERS)
    runners = ["diffusers", *RUNNERS]
    assert [(r["backend"], r["batch_size"]) for r in doc["runs"]] == \
        [(n, b) for b in BATCH_SIZES for n in runners]
    assert positive_finite(doc["matmul_peak"]["tflops"])

    for run in doc["runs"]:
        samples = run["samples_ms"]
        assert len(samples) == len(run["raw"]) == REPEAT
        assert all(positive_finite(s) for s in samples)
        lat = run["latency_ms"]
        assert lat["median"] == pytest.approx(float(np.median(samples)), rel=1e-12)
        assert lat["p10"] == pytest.approx(float(np.percentile(samples, 10)), rel=1e-12)
        assert lat["p90"] == pytest.approx(float(np.percentile(samples, 90)), rel=1e-12)
        assert lat["p10"] <= lat["median"] <= lat["p90"]
        assert run["images_per_s"] == pytest.approx(run["batch_size"] / (lat["median"] / 1e3), rel=1e-12)
        base = next(r for r in doc["runs"] if r["is_baseline"] and r["batch_size"] == run["batch_size"])
        expected = float(np.median(base["samples_ms"])) / float(np.median(samples))
        assert run["speedup_vs_baseline"] == pytest.approx(expected, rel=1e-12)
        for raw in run["raw"]:
            assert sum(raw["stages_ms"].values()) == pytest.approx(raw["latency_ms"], abs=SUM_TOLERANCE_MS)
            assert all(v >= 0 for v in raw["stages_ms"].values())
            assert all(positive_finite(c[2]) for c in raw["calls"])
        for stage in ("text_encoder", "prior", "decoder", "super_res"):
            assert positive_finite(run["stages_ms"][stage])
            assert positive_finite(run["stage_gflop"][stage])
            assert positive_finite(run["stage_tflops"][stage])
            assert run["stage_tflops"][stage] == pytest.approx(
                run["stage_gflop"][stage] / run["stages_ms"][stage], rel=1e-9)
        # classifier-free guidance: the decoder runs 2B rows, once per step
        assert run["networks"]["decoder"]["calls_per_generation"] == 2
        for net in run["networks"].values():
            assert positive_finite(net["median_call_ms"]) and positive_finite(net["gflop_per_call"])
        assert positive_finite(run["peak_rss_mb"])
    for name in runners:
        info = doc["runners"][name]
        assert positive_finite(info["cold_start_s"])
        parts = info["startup_s"] + info["load_s"] + info["first_image_s"]
        assert info["cold_start_s"] == pytest.approx(parts, rel=1e-9)
        assert positive_finite(info["startup_s"])
        if name in ("diffusers", *EXACT):
            # same weights and seed: the first images match the baseline's (fp32; 1 level of rounding)
            assert info["first_image_max_abs_diff_vs_baseline"] <= 1
            assert 0 <= info["first_image_mean_abs_diff_vs_baseline"] <= 1
        else:
            assert 0 < info["first_image_mean_abs_diff_vs_baseline"] <= BF16_MEAN_LEVELS
    # onnxruntime and openvino serve the same export, made once
    assert doc["runners"]["onnxruntime-fp32"]["model"] == doc["runners"]["openvino-fp32"]["model"]
    assert Path(doc["runners"]["onnxruntime-fp32"]["model"], "manifest.json").exists()
    assert doc["runners"]["openvino-fp32"]["export_cached"] is True


@pytest.mark.slow
def test_results_md_and_plots(bench_out):
    doc = json.loads((bench_out / "results.json").read_text())
    md = (bench_out / "results.md").read_text()
    assert "| backend | batch | median ms |" in md
    for run in doc["runs"]:
        if not run["is_baseline"]:
            assert f"{run['speedup_vs_baseline']:.2f}× the baseline" in md
    assert doc["command"] in md and "## Method" in md and "warm-up" in md
    for name in ("stages.png", "throughput.png"):
        with Image.open(bench_out / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_ctrl_c_leaves_partial_results(tmp_path):
    out = tmp_path / "results"
    marker = f"interrupt-marker-{os.getpid()}"  # in the workers' command lines: find leftovers
    proc = subprocess.Popen(bench_command(out, tmp_path / "cache", "--backends", "torch", "--warmup", "0",
                                          "--repeat", "500", "--batch-sizes", "1", "--prompt", marker),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            # a test run started in the background inherits SIGINT ignored, and Python
                            # then installs no Ctrl-C handler: give the child the default, as a terminal does
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            doc = json.loads((out / "results.json").read_text())
            if len(doc["runs"]) == 2:  # the baseline and torch each measured at least once
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; partial results in" in stderr and "Traceback" not in stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc["status"] == "interrupted"
    assert all(1 <= r["repeats"] < 500 for r in doc["runs"])
    assert "Status: interrupted" in (out / "results.md").read_text()
    assert _worker_pids(marker) == []


@pytest.mark.parametrize("args,message", [
    (["--backends", "torch,nope"], "unknown backend 'nope'"),
    (["--backends", "torch,torch-fp32"], "names a runner twice"),
    (["--backends", "torch-int4"], "unknown precision 'int4'"),
    (["--backends", "openvino-fp16"], "--backends openvino-fp16 cannot run here: OpenVINO runs fp32 or bf16"),
    (["--backends", "tensorrt-fp16"], "name it tensorrt"),
    (["--backends", "tensorrt"], "TensorRT runs on --device cuda only"),
    (["--model", "small", "--evaluate"], "--model small has no image_encoder/"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--batch-sizes", "1,x"], "comma-separated integers"),
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--prior-steps", "1"], "--prior-steps must be an integer of at least 2"),
    (["--model", "no-such-model"], "neither an existing folder nor a preset"),
    (["--device", "tpu"], "--device 'tpu' is unknown"),
    (["--suite", "no-such-suite.json"], "--suite no-such-suite.json: cannot read it"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["bench", "--out", str(out), *args])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unclip: error:") and message in lines[0], result.stderr
    assert not out.exists()


def test_suite_file_options_and_override(tmp_path):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"options": {"device": "tpu", "repeat": 0}}))
    result = CliRunner().invoke(cli, ["bench", "--suite", str(suite), "--out", str(tmp_path / "o")])
    assert "--device 'tpu' is unknown" in result.stderr  # the suite's value was used
    result = CliRunner().invoke(cli, ["bench", "--suite", str(suite), "--device", "cpu",
                                      "--out", str(tmp_path / "o")])
    assert "--repeat must be at least 1" in result.stderr  # the command line won for --device
    suite.write_text(json.dumps({"options": {"batch_size": 3}}))
    result = CliRunner().invoke(cli, ["bench", "--suite", str(suite)])
    assert result.exit_code == 1 and "unknown option 'batch_size'" in result.stderr


def test_committed_suites_are_valid():
    from unclip.bench.cli import option_names
    from unclip.bench.config import read_suite

    suites = {p.stem: read_suite(p, option_names()) for p in (REPO / "benchmarks" / "suites").glob("*.json")}
    assert suites["gpu-karlo"]["model"] == "karlo" and suites["gpu-karlo"]["device"] == "cuda"
    assert suites["gpu-karlo"]["batch_sizes"] == "1,8"
    assert (suites["gpu-karlo"]["prior_steps"], suites["gpu-karlo"]["decoder_steps"],
            suites["gpu-karlo"]["super_res_steps"]) == (25, 25, 7)
    assert suites["cpu-small"]["model"] == "small"


def test_demo_is_accepted_at_its_own_defaults_and_scored():
    from unclip.bench.config import BENCH_SETTINGS, BenchConfig, check

    cfg = check(BenchConfig(model="demo", plots=False), unclip.BACKENDS)
    # the demo's sampler_defaults.json sets decoder guidance 1; the rest are Karlo's 25/25/7 and 4
    assert cfg.settings == dict(prior_steps=25, decoder_steps=25, super_res_steps=7, prior_guidance=4.0,
                                decoder_guidance=1.0)
    assert cfg.evaluate is True and list(cfg.backends) == RUNNERS
    assert "--model demo" in cfg.command() and "--decoder-guidance 1.0" in cfg.command()
    assert cfg.prompt == "a red circle on a blue background"  # in the demo's world
    given = check(BenchConfig(model="demo", decoder_steps=4, backends=("torch",), plots=False),
                  unclip.BACKENDS)
    assert given.decoder_steps == 4 and given.backends == ("torch-fp32",)
    assert check(BenchConfig(model="tiny", plots=False), unclip.BACKENDS).settings == BENCH_SETTINGS


def test_runner_evaluates_with_the_evaluate_prompts(monkeypatch):
    """The worker's evaluate command scores its own pipeline (any backend) with the demo's CLIP."""
    from unclip.bench.worker import Runner
    from unclip.models import DEMO_FOLDER, evaluation

    full = evaluation.evaluate_pipeline
    seen = {}

    def smaller(pipe, folder, on_images=None, **settings):  # 2 prompts x 1 image instead of 30 x 4
        seen.update(settings)
        return full(pipe, folder, trained=1, held_out=1, images_per_prompt=1, on_images=on_images, **settings)

    monkeypatch.setattr(evaluation, "evaluate_pipeline", smaller)
    settings = dict(prior_steps=3, decoder_steps=3, super_res_steps=2, prior_guidance=4.0,
                    decoder_guidance=1.0)
    dtype = "bf16" if cpu_has_native_bf16() else "fp32"  # any runner: the one the CPU computes best
    runner = Runner({"runner": f"torch-{dtype}", "backend": "torch", "dtype": dtype, "model": "demo",
                     "device": "cpu", "settings": settings, "prompt": "a red circle", "seed": 0})
    runner.load()
    told = []
    runner.progress = told.append  # what main() turns into {"progress": n} lines for the parent's bar
    reply = runner.cmd_evaluate(str(DEMO_FOLDER))
    assert seen == settings and reply["settings"]["decoder_steps"] == 3
    assert told == [1, 1]  # one image per prompt, told after each prompt
    assert set(reply["summary"]) == {"trained", "held_out"}
    for row in reply["summary"].values():
        assert row["images"] == 1 and 0 <= row["attribute_accuracy"] <= 1


def test_report_puts_accuracy_next_to_speed():
    from unclip.bench.report import speed_and_accuracy

    def accuracy(trained: float, held_out: float) -> dict:
        rows = {"trained": (24, 96, trained), "held_out": (6, 24, held_out)}
        return {"seed": 0, "summary": {g: {"prompts": p, "images": n, "attribute_accuracy": a,
                                           "clip_retrieval_top1": 0.5} for g, (p, n, a) in rows.items()}}

    doc = {"baseline": "diffusers",
           "runners": {"diffusers": {"cold_start_s": 9.0},
                       "torch-fp32": {"cold_start_s": 5.0, "accuracy": accuracy(0.90625, 0.625)},
                       "openvino-bf16": {"cold_start_s": 4.0, "accuracy": accuracy(0.875, 0.5833)}},
           "runs": [{"backend": "torch-fp32", "batch_size": 1, "speedup_vs_baseline": 1.5},
                    {"backend": "openvino-bf16", "batch_size": 1, "speedup_vs_baseline": 2.6}]}
    text = "\n".join(speed_and_accuracy(doc))
    assert "| torch-fp32 | 1.50× | 90.6 % | 62.5 % | 50.0 % | 50.0 % | 5.0 |" in text
    assert "| openvino-bf16 | 2.60× | 87.5 % (-3.1) | 58.3 % (-4.2) |" in text
    assert "trained 24 prompts / 96 images" in text
    assert speed_and_accuracy({**doc, "runners": {"torch-fp32": {}}}) == []  # nothing scored: no table


def test_model_defaults_to_demo_like_every_other_command():
    from unclip.bench.config import BenchConfig
    from unclip.models import DEFAULT_MODEL

    assert BenchConfig().model == DEFAULT_MODEL == "demo"
    result = CliRunner().invoke(cli, ["bench", "--help"])
    model_help = result.output.split("--model", 1)[1].split("--backends", 1)[0]
    assert "demo" in model_help and "[default: demo]" in " ".join(model_help.split())


def fake_results(accuracy: bool = True):
    """Results as run_suite returns them: the baseline and torch-fp32 timed at batch 2, torch scored."""
    from unclip.bench.results import Results
    from unclip.engine.profiling import STAGES

    results = Results({}, "diffusers", ["torch-fp32"], [2])
    for name, ms in (("diffusers", 3000.0), ("torch-fp32", 2000.0)):
        for _ in range(3):
            results.add(name, 2, {"latency_ms": ms, "stages_ms": dict.fromkeys(STAGES, ms / 5), "calls": []})
    if accuracy:
        row = {"attribute_accuracy": 0.90625, "clip_retrieval_top1": 0.8333}
        results.runners["torch-fp32"]["accuracy"] = {"summary": {
            "trained": {"prompts": 24, "images": 96, **row},
            "held_out": {"prompts": 6, "images": 24, "attribute_accuracy": 0.75, "clip_retrieval_top1": 0.5}}}
    return results


def test_bench_prints_each_runners_accuracy_on_stdout(monkeypatch, tmp_path):
    from unclip.bench import suite

    args = ["bench", "--backends", "torch", "--no-plots", "--out", str(tmp_path / "o")]
    monkeypatch.setattr(suite, "run_suite", lambda cfg, argv: fake_results())
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "accuracy" in line]
    assert lines == ["torch-fp32       accuracy, all three attributes right: trained 90.6% (CLIP top-1 "
                     "83.3%, 96 images), held-out 75.0% (CLIP top-1 50.0%, 24 images)"], result.stdout
    monkeypatch.setattr(suite, "run_suite", lambda cfg, argv: fake_results(accuracy=False))
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "accuracy" not in result.stdout  # nothing scored: no line


def test_evaluation_is_announced_with_an_estimate_and_counts_images(tmp_path, caplog, monkeypatch):
    from unclip.bench import report
    from unclip.bench.config import BenchConfig
    from unclip.bench.suite import _evaluate
    from unclip.models.evaluation import evaluation_images

    assert evaluation_images() == 120  # `unclip evaluate`'s 24 + 6 prompts x 4 images
    results, progress, saved = fake_results(accuracy=False), [], []
    monkeypatch.setattr(report, "write_outputs", lambda results, out, plots: saved.append(out))

    def call(name, cmd, on_progress=None, **args):  # a worker that reports each prompt's 4 images
        for _ in range(30):
            on_progress(4)
            progress.append(4)
        return {"summary": {}, "seed": 0}

    with caplog.at_level("INFO", logger="unclip"):
        _evaluate(BenchConfig(out=tmp_path), results, ["torch-fp32"], call, "demo-folder", progress=False)
    [message] = [r.getMessage() for r in caplog.records if "accuracy" in r.getMessage()]
    # torch-fp32 measured 2000 ms per batch of 2: 120 images x 1 s
    assert "1 runner x 120 images" in message and "expect about 2 min (an estimate" in message
    assert "--no-evaluate skips it" in message
    assert sum(progress) == 120 and "evaluation_s" in results.runners["torch-fp32"]["accuracy"]
    assert saved == [tmp_path]  # results.json rewritten once the runner is scored


def test_worker_progress_lines_reach_the_bar_before_the_reply():
    import io

    from unclip.bench.suite import Worker

    worker = Worker.__new__(Worker)  # the protocol only: no process
    worker.name = "torch-fp32"
    worker.process = type("P", (), {"stdin": io.StringIO(), "stdout": io.StringIO(
        '{"progress": 4}\n{"progress": 4}\n{"summary": {}, "progress_note": 1}\n')})()
    seen = []
    reply = worker.call("evaluate", on_progress=seen.append, model_folder="x")
    assert seen == [4, 4] and reply == {"summary": {}, "progress_note": 1}
    assert json.loads(worker.process.stdin.getvalue()) == {"cmd": "evaluate", "args": {"model_folder": "x"}}
