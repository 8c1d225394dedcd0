"""Runs a benchmark: the baseline and every backend, interleaved, each in its own process.

Order of work: export what needs exporting; start one worker process per runner, one at a
time, each timed from process start to its first image (cold start); time a large matmul;
then per batch size: reset the peak-memory marks, warm up, and measure in rounds of
(baseline, runner 1, runner 2, ...) so that slow drift of the machine (other load, heat)
hits every runner alike; last, where the model can be scored, each runner's accuracy on the
evaluation prompts, one runner at a time (announced with an estimate of its time, with its own
progress bar: 120 images per runner at the model's settings take minutes on a CPU). results.json
and results.md are rewritten after every measured run, so Ctrl-C leaves what was measured so far.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from tqdm.auto import tqdm

from unclip.bench import artifacts
from unclip.bench.config import BenchConfig
from unclip.bench.machine import machine, versions
from unclip.bench.plots import PLOTS
from unclip.bench.results import Results, now
from unclip.bench.runners import parse_runner
from unclip.bench.worker import BASELINE
from unclip.errors import UnclipError

log = logging.getLogger("unclip")


class Worker:
    """A runner process and its one-line-per-message JSON protocol."""

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")
        # its own session: a terminal's Ctrl-C reaches only the parent, which then stops the workers
        self.process = subprocess.Popen([sys.executable, "-m", "unclip.bench.worker", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, start_new_session=True)

    def call(self, cmd: str, on_progress: Callable[[int], None] | None = None, **args) -> dict:
        """The command's reply; `on_progress(n)` gets each progress line the worker sends before it."""
        try:
            self.process.stdin.write(json.dumps({"cmd": cmd, "args": args}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            while line and "progress" in (reply := json.loads(line)) and len(reply) == 1:
                if on_progress is not None:
                    on_progress(reply["progress"])
                line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = self.process.wait()
            raise UnclipError(f"the {self.name} runner stopped (exit code {code}) during {cmd}: "
                              f"{self._log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise UnclipError(f"the {self.name} runner failed during {cmd}: {reply['error']}")
        return reply

    def _log_tail(self) -> str:
        self.log.seek(0)
        lines = [s for s in self.log.read().splitlines() if s.strip()]
        return " | ".join(lines[-3:]) or "no output"

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()  # the worker's loop ends on end of input
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def _image(reply: dict) -> np.ndarray:
    data = reply.pop("image")
    return np.frombuffer(base64.b64decode(data["uint8"]), dtype=np.uint8).reshape(data["shape"])


def _load_average() -> float | None:
    """The 1-minute load average (runnable processes): above the core count, others shared the CPU."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _count_flops(results: Results, baseline: Worker) -> None:
    """FLOPs per (network, rows) not yet counted; the baseline's process holds the torch networks."""
    missing = sorted(results.call_keys() - results.flops.keys())
    if missing:
        counted = baseline.call("flops", keys=[list(k) for k in missing])["flops"]
        results.flops.update({(n, r): f for n, r, f in counted})


def seconds_per_image(results: Results, name: str) -> float | None:
    """A runner's measured median seconds per image at its largest batch size (None: not measured)."""
    batches = [b for (runner, b) in results.samples if runner == name]
    if not batches:
        return None
    batch = max(batches)
    return float(np.median([s["latency_ms"] for s in results.samples[(name, batch)]])) / 1e3 / batch


def evaluation_estimate(results: Results, names: list[str], images: int) -> str:
    """'about N min' for `images` images per runner at the timed runs' speed ('' if none was timed)."""
    rates = [seconds_per_image(results, name) for name in names]
    if None in rates or not rates:
        return ""
    seconds = images * sum(rates)
    return f"about {seconds / 60:.0f} min" if seconds >= 90 else f"about {max(seconds, 1):.0f} s"


def _evaluate(cfg: BenchConfig, results: Results, names: list[str], call: Callable[..., dict | None],
              folder: str, progress: bool) -> None:
    """Each runner's accuracy (`unclip evaluate`'s prompts), said before it starts: it takes a while."""
    from unclip.bench.report import write_outputs
    from unclip.models.evaluation import evaluation_images

    images = evaluation_images()
    estimate = evaluation_estimate(results, names, images)
    expect = (f"expect {estimate} (an estimate from the timed runs' speed)" if estimate
              else "this can take minutes")
    log.info("accuracy evaluation: %d runner%s x %d images (`unclip evaluate`'s prompts), one runner at a "
             "time; %s (--no-evaluate skips it)", len(names), "" if len(names) == 1 else "s", images, expect)
    bar = tqdm(total=len(names) * images, desc="accuracy", unit="image", disable=not progress,
               file=sys.stderr)
    try:
        for name in names:
            bar.set_postfix_str(name)
            t0 = time.perf_counter()
            reply = call(name, "evaluate", on_progress=bar.update, model_folder=folder)
            if reply is None:
                continue
            results.runners[name]["accuracy"] = {**reply, "evaluation_s": time.perf_counter() - t0}
            write_outputs(results, cfg.out, plots=False)
    finally:
        bar.close()


def run_suite(cfg: BenchConfig, argv: list[str], progress: bool = True, keep_going: bool = False) -> Results:
    """Measure and write `cfg.out`/results.json, results.md (and plots); returns the results.

    `keep_going`: a runner other than the baseline that fails is recorded (runners[name]["failed"])
    and dropped, and the others go on (a GPU lease is too short to lose every runner to one)."""
    import unclip
    from unclip.bench.config import model_folder
    from unclip.bench.report import write_outputs

    runners = [BASELINE, *cfg.backends]
    specs = {name: parse_runner(name, unclip.BACKENDS) for name in cfg.backends}
    folder = model_folder(cfg.model)
    header = {"started": now(), "command": cfg.command(), "argv": argv, "suite": cfg.suite,
              "machine": machine(cfg.device), "versions": versions(),
              "settings": {"model": cfg.model, "device": cfg.device,
                           "dtype": "per runner (its name); the baseline float32",
                           "batch_sizes": list(cfg.batch_sizes), **cfg.settings, "warmup": cfg.warmup,
                           "repeat": cfg.repeat, "seed": cfg.seed, "prompt": cfg.prompt,
                           "evaluate": cfg.evaluate},
              "runners_skipped": cfg.skipped}
    results = Results(header, BASELINE, list(cfg.backends), list(cfg.batch_sizes))
    workers: dict[str, Worker] = {}
    failed: dict[str, str] = {}

    def call(name: str, cmd: str, **args) -> dict | None:
        """The worker's reply; None where a runner failed and keep_going dropped it."""
        if name in failed:
            return None
        try:
            return workers[name].call(cmd, **args)
        except UnclipError as exc:
            if not keep_going or name == BASELINE:
                raise
            failed[name] = str(exc)
            results.runners[name]["failed"] = str(exc)
            log.warning("%s; the other runners go on", exc)
            return None
    total = len(runners) * (1 + len(cfg.batch_sizes) * (cfg.warmup + cfg.repeat))  # evaluation: its own bar
    # this run's (empty) results replace any earlier run's at once: a Ctrl-C never leaves stale ones
    for name in PLOTS:
        (cfg.out / name).unlink(missing_ok=True)
    write_outputs(results, cfg.out, plots=False)
    bar = tqdm(total=total, desc="bench", unit="run", disable=not progress, file=sys.stderr)
    try:
        models = {}
        for name in runners:
            backend = BASELINE if name == BASELINE else specs[name].backend
            if name != BASELINE:
                bar.set_postfix_str(f"exporting for {name}" if backend in artifacts.EXPORTERS else "")
            step_cache = name != BASELINE and specs[name].step_cache > 1
            model, export_s, cached = artifacts.prepare(backend, cfg.model, cfg.cache_dir, step_cache)
            models[name] = model
            results.runners[name] = {"model": model, "export_s": export_s, "export_cached": cached}
        first_images = {}
        for name in runners:  # started one at a time: a cold start must not share the CPU with another
            bar.set_postfix_str(f"cold start {name}")
            spec = {"runner": name, "model": models[name], "device": cfg.device, "settings": cfg.settings,
                    "prompt": cfg.prompt, "seed": cfg.seed}
            if name != BASELINE:
                spec.update(backend=specs[name].backend, dtype=specs[name].dtype,
                            step_cache=specs[name].step_cache)
            t0 = time.perf_counter()
            workers[name] = Worker(name, spec)
            reply = call(name, "cold_start")
            if reply is None:
                bar.update()
                continue
            cold = time.perf_counter() - t0  # process start (interpreter, imports) to first image
            first_images[name] = _image(reply)
            results.runners[name].update(reply, cold_start_s=cold,
                                         startup_s=cold - reply["load_s"] - reply["first_image_s"])
            bar.update()
        for name in first_images:
            diff = np.abs(first_images[name].astype(int) - first_images[BASELINE].astype(int))
            # uint8 levels; the mean tells a few amplified pixels (random weights, CFG) from a wrong image
            results.runners[name]["first_image_max_abs_diff_vs_baseline"] = int(diff.max())
            results.runners[name]["first_image_mean_abs_diff_vs_baseline"] = float(diff.mean())
        bar.set_postfix_str("matmul peak")
        results.matmul_peak = workers[BASELINE].call("matmul_peak")
        for batch in cfg.batch_sizes:
            for name in runners:
                call(name, "reset_peak")
            for i in range(cfg.warmup):
                for name in runners:
                    bar.set_postfix_str(f"batch {batch} warm-up {i + 1}/{cfg.warmup} {name}")
                    call(name, "run", batch=batch)
                    bar.update()
            for i in range(cfg.repeat):
                for name in runners:
                    bar.set_postfix_str(f"batch {batch} repeat {i + 1}/{cfg.repeat} {name}")
                    sample = call(name, "run", batch=batch)
                    if sample is None:
                        bar.update()
                        continue
                    sample["load_average_1min"] = _load_average()  # how busy the machine was
                    results.add(name, batch, sample)
                    bar.update()
                    write_outputs(results, cfg.out, plots=False)
                if i == 0:  # every call shape of this batch size is now known
                    _count_flops(results, workers[BASELINE])
                    write_outputs(results, cfg.out, plots=False)
            for name in runners:
                memory = call(name, "memory")
                if memory is not None:
                    results.memory[(name, batch)] = memory
        if cfg.evaluate:  # one runner at a time, after the timed rounds: same prompts and seeds for each
            bar.close()
            _evaluate(cfg, results, [n for n in cfg.backends if n not in failed], call, str(folder), progress)
        results.status = "complete"
    except KeyboardInterrupt:
        results.status = "interrupted"
        raise
    except BaseException:
        results.status = "failed"
        raise
    finally:
        bar.close()
        for worker in workers.values():
            worker.stop()
        results.header["finished"] = now()
        try:
            write_outputs(results, cfg.out, plots=cfg.plots)
        except Exception as exc:  # a plot of partial results must not hide why the run stopped
            if results.status == "complete":
                raise
            log.warning("the plots of the partial results were not written: %s", exc)
    return results
