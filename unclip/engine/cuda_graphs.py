"""The fast denoising loop: a whole stage as one CUDA graph on static buffers.

On a GPU a 64x64 decoder step at batch 1 is hundreds of small kernel launches, so launch
overhead, not arithmetic, sets the latency. Here each stage's loop (network call, guidance
combine, scheduler update, noise add — for every step) is captured once into a
`torch.cuda.CUDAGraph` and replayed. That needs every step to be a pure function of buffers
that live at fixed addresses, allocated once per (stage, batch size, steps):

  x          [B, ...] float32 latents, updated in place by each step
  noise      [N, B, ...] float32 noise for every step, drawn up front by the pipeline (zeros on the
             last step, which adds none)
  step       [1] int64 step counter on the device; each step reads its timestep, coefficients
             and noise at `step`, then increments it (no host round trip)
  guidance   [1] float32 guidance scale (a new scale needs no new graph)
  conditioning  the stage's other network inputs (text embeddings, decoder tokens, low-res image)

`StageRunner(capture=False)` runs the same step function eagerly: the fused kernels without
graphs, and on CPU the oracle that the tests compare with the pipeline's plain loop.

All graphs share one memory pool and are replayed in any order. That is safe only because no
tensor allocated during a capture outlives it: a graph's results live in its stage's static
buffers, and the pool holds nothing but each replay's temporaries. `_check_pool` enforces this
after every capture (torch's allocator snapshot: no block of the pool may still be allocated).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from unclip.engine.scheduler import SchedulerConfig, StepTable
from unclip.engine.step import StepBody
from unclip.kernels.guidance_step import GuidanceStep


@dataclass
class StageBuffers:
    x: torch.Tensor
    noise: torch.Tensor
    step: torch.Tensor
    guidance: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    table: StepTable
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = field(default=0)


class StageRunner:
    """Runs a stage's denoising loop on cached static buffers, captured as a CUDA graph if asked.

    `backend` is the torch backend (a PrecisionBackend in half precision); `kernels` selects the
    Triton fused step instead of its torch reference.
    """

    def __init__(self, backend, capture: bool, kernels: bool):
        self.backend = backend
        self.capture = capture
        self.kernels = kernels
        self.dtype = getattr(backend, "dtype", torch.float32)
        self.buffers: dict[tuple, StageBuffers] = {}  # keyed by (stage, batch, step networks, guided)
        self._pool = None  # one memory pool for all graphs: they are never replayed concurrently
        self._stream = None  # where every warm-up and capture runs

    def denoise(self, stage: str, x: torch.Tensor, noise: list[torch.Tensor | None],
                config: SchedulerConfig, table: StepTable, networks: list[str],
                conditioning: dict[str, torch.Tensor], guidance: float | None = None,
                channels: int | None = None) -> torch.Tensor:
        """The stage's final latents, from initial latents `x` and per-step `noise`; `networks`
        names the network of each step; `channels` splits a decoder's eps from its variance."""
        spec = GuidanceStep(config, guided=guidance is not None, channels=channels)
        key = (stage, x.shape[0], tuple(networks), spec.guided)
        buffers = self.buffers.get(key)
        if buffers is None:
            buffers = self.buffers[key] = self._allocate(x, noise, table, conditioning)
        self._load(buffers, x, noise, conditioning, guidance)
        if not self.capture:
            self._steps(buffers, spec, networks)
        else:
            if buffers.graph is None:
                self._capture(stage, buffers, spec, networks)
                self._load(buffers, x, noise, conditioning, guidance)  # capture ran the loop once
            buffers.graph.replay()
            buffers.replays += 1
        return buffers.x.clone()

    # -- buffers --------------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor, noise: list, table: StepTable,
                  conditioning: dict[str, torch.Tensor]) -> StageBuffers:
        device = x.device
        half = {k: torch.empty_like(v, dtype=self.dtype if v.is_floating_point() else v.dtype)
                for k, v in conditioning.items()}
        return StageBuffers(
            x=torch.empty_like(x, dtype=torch.float32),
            noise=torch.zeros((len(noise), *x.shape), dtype=torch.float32, device=device),
            step=torch.zeros(1, dtype=torch.int64, device=device),
            guidance=torch.ones(1, dtype=torch.float32, device=device),
            conditioning=half,
            table=_copy_table(table.to(device)),
        )

    def _load(self, b: StageBuffers, x: torch.Tensor, noise: list, conditioning: dict[str, torch.Tensor],
              guidance: float | None) -> None:
        b.x.copy_(x)
        for i, z in enumerate(noise):
            if z is None:
                b.noise[i].zero_()
            else:
                b.noise[i].copy_(z)
        for k, v in conditioning.items():
            b.conditioning[k].copy_(v)
        b.guidance.fill_(1.0 if guidance is None else guidance)
        b.step.zero_()

    # -- the loop -------------------------------------------------------------------------------

    def _steps(self, b: StageBuffers, spec: GuidanceStep, networks: list[str]) -> None:
        body = StepBody(self.backend, self.kernels)  # the eager loop's step body (unclip.engine.step)
        carried = {}  # a full step's extra outputs (the step cache's features), for the shallow steps
        for network in networks:
            body(network, spec, b.table, b.step, b.x, b.noise, b.guidance, b.conditioning, carried, out=b.x)
            b.step.add_(1)

    def _capture(self, stage: str, b: StageBuffers, spec: GuidanceStep, networks: list[str]) -> None:
        # Warm-up on a side stream first, as torch's CUDA-graph notes ask: it compiles the Triton
        # kernels and settles the caching allocator. The same stream then captures: cuBLAS keeps one
        # workspace per stream, made at its first use there, which must be now, not in the graph pool.
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._steps(b, spec, networks)
        torch.cuda.current_stream().wait_stream(self._stream)
        b.step.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            self._steps(b, spec, networks)
        self._check_pool(stage)
        b.graph = graph

    def _check_pool(self, stage: str) -> None:
        gc.collect()  # a tensor kept only by a reference cycle is unreachable: not a leak
        left = pool_allocations(torch.cuda.memory_snapshot(), self._pool)
        if left:
            mib = sum(left) / 2**20
            raise RuntimeError(
                f"CUDA-graph capture of the {stage} stage left {len(left)} tensor(s) ({mib:.1f} MiB) "
                f"allocated in the graphs' shared memory pool: a tensor allocated during capture must not "
                f"outlive it (graphs replay in any order and would overwrite it); keep results in the "
                f"stage's static buffers")


def pool_allocations(segments: list[dict], pool: tuple[int, int]) -> list[int]:
    """Sizes of the blocks of memory pool `pool` that a live tensor still holds, read from
    torch.cuda.memory_snapshot()'s segments (each names its pool; each block its state)."""
    return [block["size"] for segment in segments if tuple(segment["segment_pool_id"]) == tuple(pool)
            for block in segment["blocks"] if block["state"] == "active_allocated"]


def _copy_table(table: StepTable) -> StepTable:
    """The runner's own copy: the graph reads these addresses, whoever owns the original."""
    return StepTable(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(table).items()})
