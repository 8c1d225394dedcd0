"""The fast denoising step: one step of one network captured as a CUDA graph on static buffers.

On a GPU a 64x64 decoder step at batch 1 is hundreds of small kernel launches, so launch
overhead, not arithmetic, sets the latency. Here one step (network call, guidance combine,
scheduler update, noise add) is captured once per (stage, row-count bucket, network) into a
`torch.cuda.CUDAGraph` and replayed, as gpt-fast and vLLM capture one decoding step: the loop
over steps stays in Python (Pipeline._denoise, the same loop as the eager path), so between any two
steps the rows of cancelled requests leave, previews go out and `on_step` reports, on every path
alike. A step is a pure function of buffers at fixed addresses, allocated once per
(stage, rows bucket, step networks, guided):

  x          [R, ...] float32 latents, updated in place by each step
  noise      [N, R, ...] float32 noise for every step, drawn up front by the pipeline (zeros on the
             last step, which adds none)
  step       [1] int64 step index on the device, written before each replay; the step reads its
             timestep, coefficients and noise there
  guidance   [1] float32 guidance scale (a new scale needs no new graph)
  conditioning  the stage's other network inputs (text embeddings, decoder tokens, low-res image)
  carried    the step cache's deep features, written by a full step, read by the shallow ones
  prediction the network's output of the last step (what a preview's clean-image estimate reads)

R is the batch's row count rounded up to a bucket (ROW_BUCKETS); the extra rows repeat the last
real row and are dropped (unclip.engine.batch.pad_rows), so few graphs serve every batch size, and
a batch that loses rows mid-stage moves to a smaller bucket's buffers between two steps.

`StageRunner(capture=False)` runs the same step eagerly on the same buffers: the fused kernels
without graphs, and on CPU the oracle that the tests compare with the pipeline's plain steps.

All graphs share one memory pool and are replayed in any order. That is safe only because no
tensor allocated during a capture outlives it: a graph's results live in its stage's static
buffers, and the pool holds nothing but each replay's temporaries. `_check_pool` enforces this
after every capture (torch's allocator snapshot: no block of the pool may still be allocated).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from unclip.engine.batch import pad_rows, take_rows, unpad_rows
from unclip.engine.scheduler import StepTable
from unclip.engine.step import StepBody, guided_prediction
from unclip.kernels.guidance_step import GuidanceStep

# Row counts a step is captured at (a stage's images; guided networks see twice as many rows). A batch
# runs at the smallest bucket that holds it; past the last, at its own count.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def row_bucket(rows: int) -> int:
    return next((b for b in ROW_BUCKETS if b >= rows), rows)


@dataclass
class StageBuffers:
    x: torch.Tensor
    noise: torch.Tensor
    step: torch.Tensor
    guidance: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    table: StepTable
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    prediction: torch.Tensor | None = None
    graphs: dict[str, torch.cuda.CUDAGraph] = field(default_factory=dict)  # one step of each network
    runs: int = 0  # stage runs placed on these buffers
    replays: int = 0  # graph replays (steps)


class StageRunner:
    """Runs denoising steps on cached static buffers, each step replayed from a CUDA graph if asked.

    `backend` is the torch backend (a PrecisionBackend in half precision); `kernels` selects the
    Triton fused step instead of its torch reference.
    """

    def __init__(self, backend, capture: bool, kernels: bool):
        self.backend = backend
        self.capture = capture
        self.kernels = kernels
        self.dtype = getattr(backend, "dtype", torch.float32)
        self.buffers: dict[tuple, StageBuffers] = {}  # keyed by (stage, rows bucket, step networks, guided)
        self._pool = None  # one memory pool for all graphs: they are never replayed concurrently
        self._stream = None  # where every warm-up and capture runs

    def begin(self, stage: str, spec: GuidanceStep, x: torch.Tensor, noise: list[torch.Tensor | None],
              table: StepTable, networks: list[str], conditioning: dict[str, torch.Tensor],
              guidance: float | None) -> StageRun:
        """A stage of one batch on this runner's buffers: the caller steps it (StageRun.step)."""
        return StageRun(self, stage, spec, x, noise, table, networks, conditioning, guidance)

    # -- buffers --------------------------------------------------------------------------------

    def buffers_for(self, stage: str, rows: int, networks: list[str], guided: bool, x: torch.Tensor,
                    noise: torch.Tensor, table: StepTable,
                    conditioning: dict[str, torch.Tensor]) -> StageBuffers:
        """The buffers of (stage, rows, networks, guided), allocated at the first use; `x`, `noise` and
        `conditioning` are already padded to `rows`."""
        key = (stage, rows, tuple(networks), guided)
        if key not in self.buffers:
            device = x.device
            half = {k: torch.empty_like(v, dtype=self.dtype if v.is_floating_point() else v.dtype)
                    for k, v in conditioning.items()}
            self.buffers[key] = StageBuffers(
                x=torch.empty_like(x, dtype=torch.float32),
                noise=torch.zeros(noise.shape, dtype=torch.float32, device=device),
                step=torch.zeros(1, dtype=torch.int64, device=device),
                guidance=torch.ones(1, dtype=torch.float32, device=device),
                conditioning=half,
                table=_copy_table(table.to(device)),
            )
        return self.buffers[key]

    # -- one step -------------------------------------------------------------------------------

    def step(self, stage: str, b: StageBuffers, spec: GuidanceStep, network: str) -> None:
        """Step `b.step` of `network` on the buffers: replayed, or eagerly without capture."""
        if not self.capture:
            self._step(b, spec, network)
            return
        graph = b.graphs.get(network)
        if graph is None:
            graph = b.graphs[network] = self._capture(stage, b, spec, network)
        graph.replay()
        b.replays += 1

    def _step(self, b: StageBuffers, spec: GuidanceStep, network: str) -> None:
        body = StepBody(self.backend, self.kernels)  # the eager loop's step body (unclip.engine.step)
        carried = dict(b.carried)  # a full step adds its features here; a shallow one reads them
        _, prediction = body(network, spec, b.table, b.step, b.x, b.noise, b.guidance, b.conditioning,
                             carried, out=b.x)
        for k, v in carried.items():  # allocated at a warm-up, never inside a capture
            if k not in b.carried:
                b.carried[k] = torch.empty_like(v)
            if v is not b.carried[k]:
                b.carried[k].copy_(v)
        if b.prediction is None:
            b.prediction = torch.empty_like(prediction)
        b.prediction.copy_(prediction)

    def _capture(self, stage: str, b: StageBuffers, spec: GuidanceStep, network: str) -> torch.cuda.CUDAGraph:
        # Warm-up on a side stream first, as torch's CUDA-graph notes ask: it compiles the Triton
        # kernels, settles the caching allocator and allocates the step's outputs' buffers. The same
        # stream then captures: cuBLAS keeps one workspace per stream, made at its first use there,
        # which must be now, not in the graph pool. The warm-up ran the step: its latents are put back.
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        before = b.x.clone()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._step(b, spec, network)
        torch.cuda.current_stream().wait_stream(self._stream)
        b.x.copy_(before)
        del before
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            self._step(b, spec, network)
        self._check_pool(stage, network)
        return graph

    def _check_pool(self, stage: str, network: str | None = None) -> None:
        gc.collect()  # a tensor kept only by a reference cycle is unreachable: not a leak
        left = pool_allocations(torch.cuda.memory_snapshot(), self._pool)
        if left:
            mib = sum(left) / 2**20
            step = f"'s {network} step" if network else ""
            raise RuntimeError(
                f"CUDA-graph capture of the {stage} stage{step} left {len(left)} tensor(s) ({mib:.1f} MiB) "
                f"allocated in the graphs' shared memory pool: a tensor allocated during capture must not "
                f"outlive it (graphs replay in any order and would overwrite it); keep results in the "
                f"stage's static buffers")


class StageRun:
    """One stage of one batch on a StageRunner's buffers: `step` each step, `drop` rows between steps.
    The same interface as the eager loop's EagerRun (unclip.engine.step)."""

    def __init__(self, runner: StageRunner, stage: str, spec: GuidanceStep, x: torch.Tensor,
                 noise: list[torch.Tensor | None], table: StepTable, networks: list[str],
                 conditioning: dict[str, torch.Tensor], guidance: float | None):
        self.runner, self.stage, self.spec, self.table, self.networks = runner, stage, spec, table, networks
        self.guidance = 1.0 if guidance is None else guidance
        self.rows = x.shape[0]
        noise = torch.stack([torch.zeros_like(x) if n is None else n for n in noise])  # [steps, rows, ...]
        self._place(x, noise, conditioning, {})
        if self.buffers is not None:
            self.buffers.runs += 1

    def _place(self, x: torch.Tensor, noise: torch.Tensor, conditioning: dict[str, torch.Tensor],
               carried: dict[str, torch.Tensor]) -> None:
        """Puts the rows into the buffers of their bucket (padded)."""
        self.buffers, self._empty = None, x[:0]
        if self.rows == 0:
            return
        rows, guided = row_bucket(self.rows), self.spec.guided
        conditioning = {k: pad_rows(v, rows, guided) for k, v in conditioning.items()}
        noise, x = pad_rows(noise, rows, False, dim=1), pad_rows(x, rows, False)
        b = self.runner.buffers_for(self.stage, rows, self.networks, guided, x, noise, self.table,
                                    conditioning)
        b.x.copy_(x)
        b.noise.copy_(noise)
        for k, v in conditioning.items():
            b.conditioning[k].copy_(v)
        for k, v in carried.items():  # features kept from a full step, for the shallow steps that follow
            v = pad_rows(v, rows, guided)
            if k not in b.carried:
                b.carried[k] = torch.empty_like(v)
            b.carried[k].copy_(v)
        b.guidance.fill_(self.guidance)
        self.buffers = b

    @property
    def x(self) -> torch.Tensor:
        """The latents of the running rows (a view of the buffer: the next step overwrites it)."""
        return self._empty if self.buffers is None else self.buffers.x[:self.rows]

    def step(self, i: int, network: str) -> None:
        b = self.buffers
        b.step.fill_(i)
        self.runner.step(self.stage, b, self.spec, network)

    def prediction(self) -> torch.Tensor:
        """The last step's guided prediction for the running rows (a preview's starting point)."""
        b, guided = self.buffers, self.spec.guided
        output = unpad_rows(b.prediction, self.rows, row_bucket(self.rows), guided)
        return guided_prediction(self.spec, output, b.guidance)

    def drop(self, keep: torch.Tensor) -> None:
        """Only rows `keep` (indices into the running rows) go on: moved to their bucket's buffers."""
        b, guided = self.buffers, self.spec.guided
        if b is None:
            return
        rows = row_bucket(self.rows)
        x = take_rows(b.x[:self.rows], keep, guided=False)
        noise = b.noise[:, :self.rows].index_select(1, keep.to(b.noise.device))
        conditioning = {k: take_rows(unpad_rows(v, self.rows, rows, guided), keep, guided)
                        for k, v in b.conditioning.items()}
        carried = {k: take_rows(unpad_rows(v, self.rows, rows, guided), keep, guided)
                   for k, v in b.carried.items()}
        self.rows = keep.numel()
        self._place(x, noise, conditioning, carried)

    def result(self) -> torch.Tensor:
        return self.x.clone()


def pool_allocations(segments: list[dict], pool: tuple[int, int]) -> list[int]:
    """Sizes of the blocks of memory pool `pool` that a live tensor still holds, read from
    torch.cuda.memory_snapshot()'s segments (each names its pool; each block its state)."""
    return [block["size"] for segment in segments if tuple(segment["segment_pool_id"]) == tuple(pool)
            for block in segment["blocks"] if block["state"] == "active_allocated"]


def _copy_table(table: StepTable) -> StepTable:
    """The runner's own copy: the graph reads these addresses, whoever owns the original."""
    return StepTable(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(table).items()})
