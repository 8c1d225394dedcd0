"""Timing and FLOP counting around a pipeline, without touching its hot path.

A `CallTimeline` records when each network call starts and ends. Our pipeline feeds it
through `TimedBackend`, a proxy in front of any backend; diffusers' UnCLIPPipeline feeds it
through forward hooks (see unclip.bench.baseline). Both then split one generation into stages
by the same rule (`split_stages`), so a baseline and a backend are measured alike.

On CUDA the timeline records CUDA events (no synchronisation between calls), read once the
generation has finished; on CPU it reads `time.perf_counter`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Each network belongs to the stage that calls it; text_proj prepares the decoder's conditioning.
# Stable unCLIP: its latent UNet is the decoder stage, its VAE a stage of its own (Karlo has none: 0);
# its UNet's text encoder runs after the prior, so its few milliseconds count in the prior stage.
STAGE_OF_NETWORK = {
    "text_encoder": "text_encoder", "image_encoder": "text_encoder",  # the encoders of the conditioning
    "prior": "prior", "text_proj": "decoder", "decoder": "decoder",
    "decoder_full": "decoder", "decoder_shallow": "decoder",  # the step cache's pair
    "super_res_first": "super_res", "super_res_last": "super_res",
    "prior_text_encoder": "text_encoder", "unet": "decoder", "vae_decoder": "vae",  # Stable unCLIP
}
STAGES = ("text_encoder", "prior", "decoder", "super_res", "vae", "post_processing")


@dataclass
class Call:
    network: str
    rows: int  # batch rows of the call (2B under classifier-free guidance)
    start_ms: float  # from the start of the generation
    end_ms: float

    @property
    def ms(self) -> float:
        return self.end_ms - self.start_ms


@dataclass
class Trace:
    """One generation: its total time and every network call in order."""

    total_ms: float
    calls: list[Call] = field(default_factory=list)


class CallTimeline:
    """Marks: start of a generation, each call's begin/end, end of the generation."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list = []
        self._open: list[tuple[str, int, int]] = []  # (network, rows, index of begin mark)
        self._calls: list[tuple[str, int, int, int]] = []

    def _mark(self) -> int:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())
        return len(self._marks) - 1

    def start(self) -> None:
        self._marks, self._open, self._calls = [], [], []
        self._mark()

    def begin(self, network: str, rows: int) -> None:
        self._open.append((network, rows, self._mark()))

    def end(self) -> None:
        network, rows, begin = self._open.pop()
        self._calls.append((network, rows, begin, self._mark()))

    def finish(self) -> Trace:
        last = self._mark()
        if self.cuda:
            torch.cuda.synchronize()
            t0 = self._marks[0]
            at = [0.0] + [t0.elapsed_time(e) for e in self._marks[1:]]
        else:
            at = [(t - self._marks[0]) * 1e3 for t in self._marks]
        calls = [Call(n, r, at[b], at[e]) for n, r, b, e in sorted(self._calls, key=lambda c: c[2])]
        return Trace(total_ms=at[last], calls=calls)


class TimedBackend:
    """A backend proxy that records each `run(network, ...)` on a timeline; all else passes through."""

    def __init__(self, backend, timeline: CallTimeline):
        self._backend = backend
        self.timeline = timeline

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        self.timeline.begin(network, max(t.shape[0] for t in inputs.values() if t.dim() > 0))
        out = self._backend.run(network, **inputs)
        self.timeline.end()
        return out

    def run_native(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Timed too: the step body (unclip.engine.step) calls this where the backend has it."""
        run = getattr(self._backend, "run_native", self._backend.run)
        self.timeline.begin(network, max(t.shape[0] for t in inputs.values() if t.dim() > 0))
        out = run(network, **inputs)
        self.timeline.end()
        return out

    def __getattr__(self, name: str):
        return getattr(self._backend, name)


def split_stages(trace: Trace) -> dict[str, float]:
    """Stage times (ms) that add up to the total.

    A stage runs from the start of its first network call to the start of the next stage's first
    call (so it includes its scheduler steps and the noise drawn for the next stage); the first
    stage starts with the generation (tokenising included); super-resolution ends with its last
    call; post-processing is the rest (its last scheduler step, clamp, uint8, PIL). A stage
    without calls (the prior in prior-free mode) gets 0.
    """
    firsts: dict[str, float] = {}
    for call in trace.calls:
        firsts.setdefault(STAGE_OF_NETWORK[call.network], call.start_ms)
    network_stages = [s for s in STAGES[:-1] if s in firsts]
    starts = {s: firsts[s] for s in network_stages}
    if network_stages:
        starts[network_stages[0]] = 0.0
    last_end = max((c.end_ms for c in trace.calls), default=0.0)
    out = dict.fromkeys(STAGES, 0.0)
    for i, stage in enumerate(network_stages):
        end = starts[network_stages[i + 1]] if i + 1 < len(network_stages) else last_end
        out[stage] = end - starts[stage]
    out["post_processing"] = trace.total_ms - last_end
    return out


def count_flops(module: torch.nn.Module, inputs: list[torch.Tensor]) -> int:
    """FLOPs of one forward call (matmuls, convolutions, attention: what flop_counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module(*inputs)
    return int(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device | str) -> dict:
    """A large matrix product timed on this device: the practical ceiling that stages are compared to.

    GPU: 8192^3 in bfloat16 (tensor cores); CPU: 2048^3 in float32 (the dtype the CPU path runs).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n, dtype, iters = (8192, torch.bfloat16, 20) if cuda else (2048, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up: kernel selection, thread pool start
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
    else:
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        seconds = min(times)  # the least-disturbed run: a peak, not a typical value
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "iterations": iters,
            "tflops": 2 * n**3 / seconds / 1e12}
