"""One runner (the diffusers baseline, or one unclip backend) in its own process.

Why a process each: the peak host memory of a runner is then its own (not the sum of every
model loaded for the comparison), and a crash in one backend cannot take down the others.
The parent sends one JSON command per line on stdin and reads one JSON reply per line from
the original stdout, after any `{"progress": n}` lines a long command (evaluate) sends on the way;
anything libraries print goes to stderr. Ctrl-C is the parent's to
handle: the worker ignores SIGINT and exits when its stdin closes.
"""

from __future__ import annotations

import base64
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import torch

from unclip.engine.profiling import CallTimeline, TimedBackend, count_flops, matmul_peak_tflops, split_stages

BASELINE = "diffusers"
STABLE_SETTINGS = ("prior_steps", "decoder_steps", "prior_guidance", "decoder_guidance")


class Runner:
    """Loads a model for one backend (or the baseline) and times single generations."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.kind = spec["runner"]
        self.device = torch.device(spec["device"])
        self.settings = spec["settings"]
        self.timeline = CallTimeline(self.device)
        self.components = None
        self.progress: Callable[[int], None] | None = None  # main() sends {"progress": n} lines with it

    def load(self) -> None:
        from unclip.models.stable_unclip import is_stable_unclip

        self.stable = is_stable_unclip(self.spec["model"])
        if self.kind == BASELINE and self.stable:  # diffusers' StableUnCLIPPipeline over the same networks
            from unclip.bench.baseline import attach_stable_timeline
            from unclip.models.stable_unclip import diffusers_pipeline, load_stable_components

            self.components = load_stable_components(self.spec["model"])
            self.pipe = diffusers_pipeline(self.components).to(self.spec["device"])
            self.pipe.set_progress_bar_config(disable=True)
            attach_stable_timeline(self.pipe, self.timeline)
        elif self.kind == BASELINE:
            from unclip.bench.baseline import attach_timeline, diffusers_pipeline
            from unclip.models import load_model

            self.components = load_model(self.spec["model"])
            self.pipe = diffusers_pipeline(self.components, self.spec["device"])
            attach_timeline(self.pipe, self.timeline)
        else:
            import unclip

            dtype = self.spec["dtype"] or "fp32"  # None: the artifact's own precision (TensorRT)
            self.pipe = unclip.load(self.spec["model"], backend=self.spec["backend"],
                                    device=self.spec["device"], dtype=dtype,
                                    step_cache=self.spec.get("step_cache", 1))
            # the mixed runner's choice: {network: runtime}, and the times it was measured from
            self.mixed = {k: getattr(self.pipe.backend, k) for k in ("assignment", "timings")
                          if hasattr(self.pipe.backend, "assignment")}
            self.pipe.backend = TimedBackend(self.pipe.backend, self.timeline)

    def generate(self, batch: int) -> list:
        prompts = [self.spec["prompt"]] * batch
        if getattr(self, "stable", False):  # Stable unCLIP: its settings (no super-resolution stage)
            settings = {k: self.settings[k] for k in STABLE_SETTINGS if k in self.settings}
            if self.kind == BASELINE:
                from unclip.bench.baseline import generate_stable

                return generate_stable(self.pipe, prompts, self.spec["seed"], settings)
            return self.pipe.generate(prompts, seed=self.spec["seed"], **settings)
        if self.kind == BASELINE:
            from unclip.bench.baseline import generate

            return generate(self.pipe, prompts, self.spec["seed"], self.settings)
        return self.pipe.generate(prompts, seed=self.spec["seed"], **self.settings)

    def timed(self, batch: int) -> tuple[dict, list]:
        self.timeline.start()
        images = self.generate(batch)
        trace = self.timeline.finish()
        sample = {"latency_ms": trace.total_ms, "stages_ms": split_stages(trace),
                  "calls": [[c.network, c.rows, c.ms] for c in trace.calls]}
        return sample, images

    # -- commands ------------------------------------------------------------------------------

    def cmd_cold_start(self) -> dict:
        """Load, then the first image (batch 1); the image comes back for comparison with the baseline.
        (The parent adds the process start-up: cold start = start-up + load + first image.)"""
        t0 = time.perf_counter()
        self.load()
        t1 = time.perf_counter()
        images = self.generate(1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        first = np.stack([np.asarray(im) for im in images])
        mixed = {f"mixed_{k}": v for k, v in getattr(self, "mixed", {}).items()}
        return {"load_s": t1 - t0, "first_image_s": t2 - t1, **mixed,
                "image": {"shape": list(first.shape), "uint8": base64.b64encode(first.tobytes()).decode()}}

    def cmd_run(self, batch: int) -> dict:
        sample, _ = self.timed(batch)
        return sample

    def cmd_reset_peak(self) -> dict:
        """Peak host RSS from here on: Linux resets VmHWM on writing 5 to clear_refs (since 4.0)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            rss_reset = True
        except OSError:
            rss_reset = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return {"rss_reset": rss_reset}

    def cmd_memory(self) -> dict:
        out = {"peak_rss_mb": _peak_rss_mb(), "cuda_peak_allocated_mb": None}
        if self.device.type == "cuda":
            out["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    def cmd_flops(self, keys: list[list]) -> dict:
        """FLOPs of one call of each (network, rows), counted on our adapters of the loaded networks."""
        if getattr(self, "stable", False):
            from unclip.engine.stable_unclip import StableTorchBackend
            from unclip.specs import example_inputs

            backend = StableTorchBackend(self.components, self.device)
            out = []
            for network, rows in keys:
                generator = torch.Generator().manual_seed(0)
                inputs = example_inputs(backend.specs[network], backend.dims, rows, generator)
                inputs = [t.to(self.device) for t in inputs.values()]
                out.append([network, rows, count_flops(backend.networks[network], inputs)])
            self.timeline.start()
            return {"flops": out}
        from unclip.models.networks import adapters, model_dims
        from unclip.models.step_cache import cached_adapters, cached_specs, feature_channels
        from unclip.specs import example_inputs, network_specs

        dims = model_dims(self.components)
        specs = network_specs(dims)
        modules = adapters(self.components)
        if any(network.startswith("decoder_") for network, _ in keys):  # the step cache's pair
            specs.update(cached_specs(specs["decoder"], feature_channels(self.components.decoder)))
            modules.update(cached_adapters(modules["decoder"]))
        out = []
        for network, rows in keys:
            inputs = example_inputs(specs[network], dims, rows, torch.Generator().manual_seed(0))
            inputs = [t.to(self.device) for t in inputs.values()]
            out.append([network, rows, count_flops(modules[network], inputs)])
        self.timeline.start()  # the counting calls went through the hooks; drop them
        return {"flops": out}

    def cmd_evaluate(self, model_folder: str) -> dict:
        """`unclip evaluate`'s prompts, seeds and image counts, run by this runner at the bench's settings;
        the summary per prompt group (the per-image detail stays here)."""
        from unclip.models.evaluation import evaluate_pipeline

        result = evaluate_pipeline(self.pipe, model_folder, on_images=self.progress, **self.settings)
        return {"summary": result["summary"], "images_per_prompt": result["images_per_prompt"],
                "seed": result["seed"], "settings": result["settings"]}

    def cmd_matmul_peak(self) -> dict:
        return matmul_peak_tflops(self.device)


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library prints must not corrupt the protocol
    sys.stdout = sys.stderr
    runner = Runner(json.loads(sys.argv[1]))
    runner.progress = lambda n: replies.write(json.dumps({"progress": n}) + "\n")
    for line in sys.stdin:
        message = json.loads(line)
        try:
            reply = getattr(runner, "cmd_" + message["cmd"])(**message.get("args", {}))
        except Exception as exc:  # reported to the parent, which names the backend and stops
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
