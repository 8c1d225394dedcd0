"""The GPU fast-path suite (issue 7): diffusers eager fp32 and fp16 against our fp16 eager, fp16 +
CUDA graphs, and fp16 + CUDA graphs + fused kernels, per stage and end to end, in one run.

It runs on `unclip bench`'s machinery (unclip.bench): one process per runner started one at a
time, interleaved rounds, CUDA-event timing, FLOPs per call, the matmul peak, and the same
results.json / results.md. What it adds are the runners below, which `unclip bench` (one dtype,
backends by name) does not name:

  diffusers                    baseline: UnCLIPPipeline, fp32 eager (unclip bench's own)
  diffusers-fp16               UnCLIPPipeline, every network in fp16, eager
  torch-fp16                   ours, fp16 eager (the plain loops)
  torch-fp16-graphs            ours, fp16, each stage's loop replayed as one CUDA graph
  torch-fp16-graphs-kernels    ours, fp16, graphs + Triton GroupNorm+SiLU and fused guidance step
  torch-fp16-graphs-gn         ours, fp16, graphs + the GroupNorm+SiLU kernel alone   } each kernel is
  torch-fp16-graphs-step       ours, fp16, graphs + the fused guidance step alone     } kept only if faster
(`--dtype bf16` runs the same set in bf16, should fp16 overflow on random weights.) Not run unless
named in --runners: torch-fp16-graphs-cl, the UNets in channels-last memory format, which
precision.py leaves off until it measures faster.

The graph runners record one timed call per replayed step (the network call with its guidance and
scheduler update, which the graph holds together); their per-stage FLOPs are taken from torch-fp16
(the same work, counted per call).

A preset (`--model small|karlo`) is built on the GPU in every runner process, from the same seed:
the same weights everywhere in seconds, where Karlo's 3.4e9 weights take minutes to initialise
on the CPU or to load from a 13.7 GB checkpoint, once per runner.

    python benchmarks/gpu_fastpath.py --model karlo --batch-sizes 1,8 --out OUT/karlo
    python benchmarks/gpu_fastpath.py --preflight     # one line: can this machine run the suite?
    python benchmarks/gpu_fastpath.py --merge OUT     # OUT/parts/*.json -> OUT/results.{json,md}
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from unclip.bench import suite
from unclip.bench.results import Results
from unclip.bench.worker import BASELINE, Runner
from unclip.engine.precision import DTYPES
from unclip.engine.profiling import matmul_peak_tflops
from unclip.errors import UnclipError
from unclip.models.components import NETWORKS

RUNNERS = ("diffusers-{dtype}", "torch-{dtype}", "torch-{dtype}-graphs", "torch-{dtype}-graphs-kernels",
           "torch-{dtype}-graphs-gn", "torch-{dtype}-graphs-step")
FLAGS = {"graphs", "kernels", "gn", "step", "cl"}


def runner_options(name: str) -> dict | None:
    """What a runner name asks for (the name is all a worker process is told); None: not ours.
    A `+cacheN` suffix adds the decoder's step cache (torch-fp16-graphs-gn+cache2)."""
    name, plus, cache = name.partition("+")
    match = re.fullmatch(r"cache([2-8])", cache) if plus else None
    if plus and match is None:
        return None
    base, _, rest = name.partition("-")
    dtype, *flags = rest.split("-")
    if base not in ("diffusers", "torch") or dtype not in DTYPES or not set(flags) <= FLAGS:
        return None
    if base == "diffusers":
        return None if flags or plus else {"diffusers_dtype": dtype}
    only = "group_norm_silu" if "gn" in flags else "guidance_step" if "step" in flags else None
    return dict(dtype=dtype, cuda_graphs="graphs" in flags, kernels="kernels" in flags, only=only,
                channels_last="cl" in flags, step_cache=int(match.group(1)) if match else 1)


def parse_runner(text: str, known_backends: tuple[str, ...]):
    """unclip bench's runner parser, taught these runners' names: each runs the torch networks (no
    export); the worker reads what it asks for from its name (runner_options)."""
    from unclip.bench.runners import RunnerSpec
    from unclip.bench.runners import parse_runner as parse_bench_runner

    options = runner_options(text)
    if options is None:
        return parse_bench_runner(text, known_backends)
    return RunnerSpec("torch", options.get("diffusers_dtype", options.get("dtype")))


class TimedStageRunner:
    """One timeline call per step (a replayed step is the network call with its guidance and update)."""

    def __init__(self, runner, timeline):
        self._runner = runner
        self.timeline = timeline

    def begin(self, stage, spec, x, noise, table, networks, conditioning, guidance):
        run = self._runner.begin(stage, spec, x, noise, table, networks, conditioning, guidance)
        return TimedRun(run, self.timeline, 2 if guidance is not None else 1)

    def __getattr__(self, name: str):
        return getattr(self._runner, name)


class TimedRun:
    def __init__(self, run, timeline, factor: int):
        self._run, self.timeline, self.factor = run, timeline, factor

    def step(self, i: int, network: str) -> None:
        self.timeline.begin(network, self._run.rows * self.factor)
        self._run.step(i, network)
        self.timeline.end()

    def __getattr__(self, name: str):
        return getattr(self._run, name)


class FastRunner(Runner):
    """unclip bench's runner, plus the runners of RUNNERS."""

    def build(self):
        """The model's components: a preset built on the GPU (module docstring), else loaded."""
        from unclip.models import load_model
        from unclip.models.components import build_preset
        from unclip.models.presets import PRESETS

        model = self.spec["model"]
        if model in PRESETS and not Path(model).exists() and self.device.type == "cuda":
            return build_preset(model, device=self.device)
        return load_model(model)

    def load(self) -> None:
        from unclip.models.stable_unclip import is_stable_unclip

        options = {"diffusers_dtype": "fp32"} if self.kind == BASELINE else runner_options(self.kind)
        if options is None:
            return super().load()
        self.stable = is_stable_unclip(self.spec["model"])
        if self.stable:
            return self.load_stable(options)
        self.components = self.build()
        if "diffusers_dtype" in options:
            from unclip.bench.baseline import attach_timeline, diffusers_pipeline

            for name in NETWORKS:
                getattr(self.components, name).to(DTYPES[options["diffusers_dtype"]])
            self.pipe = diffusers_pipeline(self.components, self.spec["device"])
            attach_timeline(self.pipe, self.timeline)
            self.release_cast_copies()
            return None
        import unclip
        from unclip.engine.fast_path import UNETS
        from unclip.engine.profiling import TimedBackend
        from unclip.kernels.group_norm_silu import fuse_group_norm_silu

        only = options.pop("only")  # one kernel alone, switched on here as fast_path would
        channels_last = options.pop("channels_last")
        self.pipe = unclip.load(self.components, device=self.spec["device"], **options)
        self.release_cast_copies()
        if channels_last:  # 4-D weights only; activations follow the convolutions' weights
            for name in UNETS:
                self.pipe.backend.networks[name].to(memory_format=torch.channels_last)
        if only == "group_norm_silu":
            for name in UNETS:
                fuse_group_norm_silu(self.pipe.backend.networks[name], use_triton=True)
        elif only == "guidance_step":
            self.pipe.stage_runner.kernels = True
        self.pipe.backend = TimedBackend(self.pipe.backend, self.timeline)
        if self.pipe.stage_runner is not None:
            self.pipe.stage_runner = TimedStageRunner(self.pipe.stage_runner, self.timeline)
        return None

    def load_stable(self, options: dict) -> None:
        """Stable unCLIP (sd-unclip-l): diffusers' StableUnCLIPPipeline in the runner's dtype, or ours with
        its fast path (half precision, CUDA graphs of the prior's and UNet's calls; no Triton kernels,
        step cache or channels-last for this family)."""
        import unclip
        from unclip.bench.baseline import attach_stable_timeline
        from unclip.engine.profiling import TimedBackend
        from unclip.models.stable_unclip import diffusers_pipeline, load_stable_components

        self.components = load_stable_components(self.spec["model"], device=self.device)
        if "diffusers_dtype" in options:
            self.pipe = diffusers_pipeline(self.components).to(self.spec["device"],
                                                               DTYPES[options["diffusers_dtype"]])
            self.pipe.set_progress_bar_config(disable=True)
            attach_stable_timeline(self.pipe, self.timeline)
            self.release_cast_copies()
            return
        unsupported = [k for k in ("kernels", "only", "channels_last") if options[k]]
        if unsupported or options["step_cache"] != 1:
            raise UnclipError(f"runner {self.kind}: Stable unCLIP's fast path is half precision and "
                              "CUDA graphs (no Triton kernels, channels-last or step cache)")
        self.pipe = unclip.load(self.components, device=self.spec["device"], dtype=options["dtype"],
                                cuda_graphs=options["cuda_graphs"])
        self.release_cast_copies()
        self.pipe.backend = TimedBackend(self.pipe.backend, self.timeline)

    def release_cast_copies(self) -> None:
        """The float32 weights a half cast replaced stay cached by torch's allocator: give them back,
        or every runner process would keep a model's float32 size of GPU memory reserved."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def generate(self, batch: int) -> list:
        if getattr(self, "stable", False) and "diffusers_dtype" in (runner_options(self.kind) or {}):
            from unclip.bench.baseline import generate_stable
            from unclip.bench.worker import STABLE_SETTINGS

            settings = {k: self.settings[k] for k in STABLE_SETTINGS if k in self.settings}
            return generate_stable(self.pipe, [self.spec["prompt"]] * batch, self.spec["seed"], settings)
        if "diffusers_dtype" in (runner_options(self.kind) or {}):
            from unclip.bench.baseline import generate

            return generate(self.pipe, [self.spec["prompt"]] * batch, self.spec["seed"], self.settings)
        return super().generate(batch)

    def cmd_matmul_peak(self) -> dict:
        """unclip bench's bf16 peak, and the fp16 one (the dtype these runners compute in)."""
        peak = matmul_peak_tflops(self.device)
        if self.device.type != "cuda":
            return peak
        n, iters = peak["n"], peak["iterations"]
        a = torch.randn(n, n, device=self.device, dtype=torch.float16)
        b = torch.randn(n, n, device=self.device, dtype=torch.float16)
        for _ in range(2):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        peak["fp16_tflops"] = 2 * n**3 / (start.elapsed_time(end) / 1e3 / iters) / 1e12
        return peak


class FastWorker(suite.Worker):
    """unclip bench's worker process, started on this file so that it runs a FastRunner."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, start_new_session=True)


class FastResults(Results):
    """unclip bench's results, with the graph runners' stage FLOPs taken from their eager twin."""

    command = ""
    dtype = "fp16"

    def __init__(self, header: dict, baseline: str, backends: list[str], *args, **kwargs):
        header["command"] = FastResults.command
        header["settings"]["dtype"] = "per runner, see runner_options"
        header["runner_options"] = {BASELINE: {"diffusers_dtype": "fp32"},
                                    **{name: runner_options(name) for name in backends}}
        super().__init__(header, baseline, backends, *args, **kwargs)

    def run(self, runner: str, batch: int) -> dict:
        out = super().run(runner, batch)
        # the acceptance compares with diffusers in half precision
        half = self.samples.get((f"diffusers-{self.dtype}", batch))
        out[f"speedup_vs_diffusers_{self.dtype}"] = (float(np.median([s["latency_ms"] for s in half]))
                                                     / out["latency_ms"]["median"] if half else None)
        if not (runner_options(runner) or {}).get("cuda_graphs"):
            return out
        # eager, the same step cache: counts the per-call FLOPs that the graph stages also do
        cache = runner_options(runner)["step_cache"]
        twin_name = f"torch-{self.dtype}" + (f"+cache{cache}" if cache > 1 else "")
        twin = super().run(twin_name, batch) if (twin_name, batch) in self.samples else None
        peak = self.matmul_peak["tflops"] if self.matmul_peak else None
        for stage, ms in out["stages_ms"].items():
            if stage not in out["stage_gflop"]:
                continue
            gflop = twin["stage_gflop"][stage] if twin else None
            tflops = None if gflop is None or ms <= 0 else gflop / ms  # GFLOP/ms = TFLOP/s
            out["stage_gflop"][stage] = gflop
            out["stage_tflops"][stage] = tflops
            fraction = None if tflops is None or not peak else tflops / peak
            out["stage_fraction_of_matmul_peak"][stage] = fraction
        out["stage_flops_from"] = twin_name
        return out


# What the GPU suite imports (its tests and its benchmark runners). The device image has all but
# diffusers and pydantic; those travel as wheels (--no-deps, so each of their own needs is named;
# importlib_metadata 8.x: 9+ needs lazy-importer).
REQUIRED = {name: None for name in ("torch", "triton", "transformers", "numpy", "PIL", "safetensors", "click",
                                    "tqdm", "onnx", "onnxruntime", "pytest")}
REQUIRED.update(diffusers="diffusers==0.42.1", importlib_metadata="importlib_metadata==8.7.0",
                pydantic="pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.8.0 "
                         "typing_inspection==0.4.5")


def preflight(import_module=importlib.import_module, gpu: str | None = None) -> tuple[bool, str]:
    """(ready, one line): every required module imports and torch sees a GPU (`gpu`: its name)."""
    modules, missing = {}, []
    for name in REQUIRED:
        try:
            modules[name] = import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means: not usable here
            missing.append(f"{name} ({type(exc).__name__})")
    if missing:
        carry = " ".join(REQUIRED[m.split()[0]] for m in missing if REQUIRED[m.split()[0]])
        hint = f"; carry as wheels in .whl: {carry} (see benchmarks/gpu_suite.sh)" if carry else ""
        return False, f"gpu_suite: cannot start: missing {', '.join(missing)}{hint}"
    if gpu is None:
        return False, "gpu_suite: cannot start: torch sees no CUDA GPU (torch.cuda.is_available() is False)"
    shown = ", ".join(f"{n} {getattr(modules[n], '__version__', '?')}"
                      for n in ("torch", "triton", "diffusers", "transformers"))
    return True, f"gpu_suite: ready on {gpu}: {shown}"


def merge(out: Path) -> dict:
    """OUT/parts/<phase>.json (each phase's results.json) -> OUT/results.json (every part, and one
    summary row per run) and OUT/results.md (the summary, then each part's own report)."""
    from unclip.bench.report import markdown
    from unclip.bench.results import now, write_atomic, write_json

    parts = {p.stem: json.loads(p.read_text()) for p in sorted((out / "parts").glob("*.json"))}
    summary = []
    for part, doc in parts.items():
        for run in doc["runs"]:
            half = {k[11:]: v for k, v in run.items() if k.startswith("speedup_vs_diffusers_")}
            summary.append({"part": part, "status": doc["status"], "model": doc["settings"]["model"],
                            "gpu": doc["machine"].get("gpu_name"), "backend": run["backend"],
                            "batch": run["batch_size"], "median_ms": run["latency_ms"]["median"],
                            "speedup_vs_diffusers_fp32": run["speedup_vs_baseline"], "speedup_vs": half,
                            "stage_fraction_of_matmul_peak": run["stage_fraction_of_matmul_peak"]})
    curve_path = out / "step_curve.json"  # the curve phase's document (benchmarks/gpu_step_curve.py)
    curve = json.loads(curve_path.read_text()) if curve_path.is_file() else None
    document = {"suite": "benchmarks/gpu_suite.sh", "written": now(), "summary": summary, "parts": parts,
                "step_curve": curve}
    write_json(out / "results.json", document)

    def ratio(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}x"

    lines = ["# GPU suite, every part", "", "Speed-ups compare runs of one part (one set of processes, "
             "interleaved rounds).", "", "| part | model | backend | batch | median ms | vs diffusers fp32 | "
             "vs diffusers half | fraction of matmul peak |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in summary:
        half = ", ".join(f"{ratio(v)} ({k})" for k, v in r["speedup_vs"].items()) or "n/a"
        fractions = r["stage_fraction_of_matmul_peak"].items()
        peak = ", ".join(f"{k} {v:.3f}" for k, v in fractions if v is not None)
        lines.append(f"| {r['part']} ({r['status']}) | {r['model']} | {r['backend']} | {r['batch']} | "
                     f"{r['median_ms']:,.1f} | {ratio(r['speedup_vs_diffusers_fp32'])} | {half} | {peak} |")
    if curve is not None:
        import importlib.util

        path = Path(__file__).with_name("gpu_step_curve.py")
        spec = importlib.util.spec_from_file_location("gpu_step_curve", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        lines += ["", *("#" + x if x.startswith("#") else x for x in module.markdown(curve).splitlines())]
    for part, doc in parts.items():  # each part's own report, its headings one level down
        lines += ["", f"# Part `{part}`", ""]
        lines += ["#" + x if x.startswith("#") else x for x in markdown(doc).splitlines()]
    write_atomic(out / "results.md", "\n".join(lines) + "\n")
    return document


def main(argv: list[str]) -> None:
    from unclip.bench.config import BENCH_SETTINGS, KARLO_PROMPT, BenchConfig

    if argv[:1] == ["--preflight"]:
        ok, line = preflight(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
        print(line, flush=True)
        sys.exit(0 if ok else 3)
    if argv[:1] == ["--merge"]:
        parts = merge(Path(argv[1]))["parts"]
        print(f"gpu_fastpath: merged {len(parts)} part(s) into {argv[1]}/results.json", flush=True)
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="karlo", help="preset or checkpoint folder")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="fp32: CPU tests")
    parser.add_argument("--runners", default=None, help="runners above, comma-separated (default: all)")
    parser.add_argument("--prior-steps", type=int, default=25)
    parser.add_argument("--decoder-steps", type=int, default=25)
    parser.add_argument("--super-res-steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cuda; cpu runs the eager runners (the tests)")
    args = parser.parse_args(argv)
    runners = tuple(r for r in (args.runners or ",".join(RUNNERS).format(dtype=args.dtype)).split(",") if r)
    unknown = [r for r in runners if runner_options(r) is None]
    if unknown or (args.device == "cuda" and not torch.cuda.is_available()):
        sys.exit(f"gpu_fastpath: unknown runners {unknown}" if unknown else "gpu_fastpath: needs a CUDA GPU")
    cfg = BenchConfig(model=args.model, backends=runners, device=args.device,
                      batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
                      prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
                      super_res_steps=args.super_res_steps, warmup=args.warmup, repeat=args.repeat,
                      out=args.out, plots=False, prompt=KARLO_PROMPT, evaluate=False)
    # unclip bench's guidance defaults (4 / 8) for what was not given (bench's check() is not run: it
    # would refuse these runner names)
    cfg = replace(cfg, **{**BENCH_SETTINGS, **{k: v for k, v in cfg.settings.items() if v is not None}})
    FastResults.command = shlex.join(["python", "benchmarks/gpu_fastpath.py", *argv])
    FastResults.dtype = args.dtype
    suite.Worker, suite.Results, suite.parse_runner = FastWorker, FastResults, parse_runner  # these runners
    t0 = time.perf_counter()
    try:
        results = suite.run_suite(cfg, argv=FastResults.command.split(" "), progress=False, keep_going=True)
    except UnclipError as exc:  # a runner failed (its message names it); what was measured is in --out
        sys.exit(f"gpu_fastpath: {exc}")
    for run in results.document()["runs"]:
        fractions = {k: None if v is None else round(v, 3)
                     for k, v in run["stage_fraction_of_matmul_peak"].items()}
        stages = {k: round(v, 1) for k, v in run["stages_ms"].items()}
        print(f"{run['backend']:<26} batch {run['batch_size']:<2}"
              f" median {run['latency_ms']['median']:>9.1f} ms"
              f" speedup vs diffusers fp32 {run['speedup_vs_baseline']:.2f}x,"
              f" vs diffusers {args.dtype} {run[f'speedup_vs_diffusers_{args.dtype}'] or float('nan'):.2f}x"
              f" stages_ms {json.dumps(stages)} fraction_of_matmul_peak {json.dumps(fractions)}", flush=True)
    print(f"wrote {args.out} in {time.perf_counter() - t0:.0f} s", flush=True)
    failed = {k: v["failed"] for k, v in results.runners.items() if v.get("failed")}
    if failed:  # measured without them (keep_going); the phase still fails, naming each
        sys.exit("gpu_fastpath: runners failed and were dropped: "
                 + "; ".join(f"{k}: {v}" for k, v in failed.items()))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":  # a runner process (see FastWorker)
        import unclip.bench.worker as worker

        worker.Runner = FastRunner
        sys.argv = [sys.argv[0], sys.argv[2]]
        worker.main()
    else:
        main(sys.argv[1:])
