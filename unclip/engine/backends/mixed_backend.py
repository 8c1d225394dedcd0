"""The mixed backend: each network of an export run by whichever runtime runs it fastest on this machine.

No CPU runtime wins every network. On the project's 2-core CPU ONNX Runtime runs the demo's decoder
and super-resolution faster and OpenVINO its prior (docs/step_cache.md); which one wins depends on
the CPU (its vector units, its cores) and on the model's shapes, so `mixed` measures rather than
guesses. At load it compiles both runtimes over the same artifact, times every network on each
(at the rows of one and of two guided images, interleaved calls, the sum of the medians), keeps the
faster (by a clear margin, SWITCH_MARGIN) and frees the other's compiled copy. Mixing costs nothing
measurable by itself: ONNX Runtime alone and ONNX Runtime with OpenVINO running the text encoder,
alternated in one process, 245.5 vs 247.6 ms a demo image (+cache4; docs/step_cache.md). Both run
the export in float32 and are validated against torch, so the choice moves speed, not images (beyond
the fp32 artifacts' 2/255). `assignment` fixes the choice instead, for a service that must not vary
between restarts (load_mixed_pipeline).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from unclip.engine.artifact import Artifact, artifact_pipeline
from unclip.errors import UnclipError
from unclip.specs import example_inputs

CANDIDATES = ("onnxruntime", "openvino")
TIMING_ROWS = (2, 4)  # one and two images with classifier-free guidance: batch-1 and batch-2 requests
WARMUP_CALLS = 1  # the first call of a compiled network allocates its buffers
TIMED_CALLS = 7  # per network, rows and runtime, interleaved, so machine noise falls on both alike
# A network leaves the primary runtime only for a clear win. Measured on the demo (+cache4 and plain,
# one bench run): the decoder timed 1-2 % faster on OpenVINO per call but ran its loop 24 % slower
# there inside the pipeline (449.5 vs 363.9 ms), while the prior, timed 10-13 % faster on OpenVINO,
# ran its loop 9-16 % faster there; benchmarks/results/cpu/demo-mixed.
SWITCH_MARGIN = 0.10
TIMING_BUDGET_S = 2.0  # per network and rows: a large model stops at 2 timed calls once past it

log = logging.getLogger("unclip")


class MixedBackend:
    """Routes each network to the backend `assignment` names, through the backend protocol."""

    name = "mixed"

    def __init__(self, backends: dict, assignment: dict[str, str], timings: dict | None = None):
        first = next(iter(backends.values()))
        missing = sorted(set(first.specs) - set(assignment))
        if missing:
            raise UnclipError(f"--backend mixed: no runtime assigned to {', '.join(missing)}")
        unknown = sorted({b for b in assignment.values() if b not in backends})
        if unknown:
            raise UnclipError(f"--backend mixed: unknown runtime {', '.join(unknown)}; choose from "
                              f"{', '.join(backends)}")
        self.backends = backends
        self.assignment = dict(assignment)
        self.timings = timings or {}  # network -> runtime -> median ms, when the choice was measured
        self.device = first.device
        self.dims = first.dims
        self.specs = dict(first.specs)
        for runtime, backend in backends.items():  # each compiled network lives in one runtime only
            for network in self.specs:
                if self.assignment[network] != runtime:
                    backend.release(network)

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backends[self.assignment[network]].run(network, **inputs)

    def constants(self) -> dict[str, torch.Tensor]:
        return next(iter(self.backends.values())).constants()


def measure(backends: dict, dims, rows: tuple[int, ...] = TIMING_ROWS,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Milliseconds of every network on every backend: per row count the median of interleaved calls on
    the same random inputs, summed over `rows`."""
    first = next(iter(backends.values()))
    generator = torch.Generator().manual_seed(seed)
    timings: dict[str, dict[str, float]] = {}
    for network, spec in first.specs.items():
        timings[network] = dict.fromkeys(backends, 0.0)
        for n in rows:
            inputs = example_inputs(spec, dims, n, generator=generator)
            for backend in backends.values():
                for _ in range(WARMUP_CALLS):
                    backend.run(network, **inputs)
            samples: dict[str, list[float]] = {name: [] for name in backends}
            spent = 0.0
            for i in range(TIMED_CALLS):
                if i >= 2 and spent > TIMING_BUDGET_S:
                    break
                for name, backend in backends.items():
                    t0 = time.perf_counter()
                    backend.run(network, **inputs)
                    elapsed = time.perf_counter() - t0
                    samples[name].append(elapsed * 1e3)
                    spent += elapsed
            for name, ms in samples.items():
                timings[network][name] += statistics.median(ms)
    return timings


def fastest(timings: dict[str, dict[str, float]], margin: float = SWITCH_MARGIN) -> dict[str, str]:
    """Per network, the primary runtime (the lower total over all networks) unless another is faster by
    more than `margin`: near ties stay with the primary, as call timings there are noise (below)."""
    runtimes = list(next(iter(timings.values())))
    primary = min(runtimes, key=lambda r: sum(ms[r] for ms in timings.values()))
    chosen = {}
    for network, ms in timings.items():
        best = min(ms, key=ms.get)
        chosen[network] = best if ms[best] < ms[primary] * (1 - margin) else primary
    return chosen


def load_mixed_pipeline(folder: str | Path, device: str = "cpu", step_cache: int = 1,
                        assignment: dict[str, str] | None = None):
    """A Pipeline over an artifact folder (made by `unclip export onnx`), each network run by ONNX
    Runtime or OpenVINO (float32): the faster of the two here, measured now, unless `assignment`
    ({network: runtime}) names them."""
    if torch.device(device).type != "cpu":
        raise UnclipError("--backend mixed chooses between the CPU runtimes: use --device cpu "
                          "(on a GPU, --backend tensorrt or torch --cuda-graphs)")

    def make(artifact: Artifact) -> MixedBackend:
        from unclip.engine.backends.onnxruntime_backend import OnnxRuntimeBackend
        from unclip.engine.backends.openvino_backend import OpenVinoBackend

        backends = {"onnxruntime": OnnxRuntimeBackend(artifact, device),
                    "openvino": OpenVinoBackend(artifact, "fp32", device)}
        timings = None
        chosen = assignment
        if chosen is None:
            timings = measure(backends, artifact.dims)
            chosen = fastest(timings)
            log.info("mixed backend: %s", ", ".join(
                f"{n}: {r} ({timings[n][r]:.2f} ms vs " + ", ".join(
                    f"{o} {ms:.2f}" for o, ms in timings[n].items() if o != r) + ")"
                for n, r in chosen.items()))
        return MixedBackend(backends, chosen, timings)

    return artifact_pipeline(folder, "mixed", make, step_cache=step_cache)
