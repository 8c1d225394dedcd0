"""CUDA graphs of one network call (Stable unCLIP's fast path: `unclip.load(..., cuda_graphs=True)`).

Karlo's stages step a one-step sampler, so a whole step (network, guidance, update) is one graph
(cuda_graphs.StageRunner). Stable unCLIP's samplers are multistep (PNDM and DPM-Solver++ keep a
history of earlier outputs in Python lists), so here the graph is one call of the network, the
hundreds of kernel launches that set a call's latency at batch 1, and the sampler's dozen
element-wise ops run eagerly between replays. Same rules as the stage runner's graphs:

* one graph per (network, row bucket): the rows are padded to the bucket (cuda_graphs.ROW_BUCKETS)
  by repeating the last row at the end, which is correct for any row layout (guided halves
  included) because every network here computes each row on its own; the padded rows are dropped;
* static buffers for every input and output, allocated outside the capture; a warm-up call on the
  capture stream first; all graphs share one memory pool, and nothing allocated during a capture
  outlives it (`StageRunner._check_pool`'s check), so replays in any order are safe;
* `capture=False` runs the same buffer path eagerly: the CPU test of padding, buckets and copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unclip.engine.batch import pad_rows
from unclip.engine.cuda_graphs import pool_allocations, row_bucket


@dataclass
class GraphEntry:
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    graph: torch.cuda.CUDAGraph | None = None
    replays: int = 0


class GraphedBackend:
    """A torch backend whose `networks` replay a CUDA graph per row bucket; the others run as before."""

    def __init__(self, backend, networks: tuple[str, ...], capture: bool = True):
        self._backend = backend
        self.name, self.device, self.specs = backend.name, backend.device, backend.specs
        self.networks = backend.networks
        self.graphed = tuple(n for n in networks if n in self.specs)
        self.capture = capture
        self.entries: dict[tuple[str, int], GraphEntry] = {}
        self._pool = None
        self._stream = None

    def __getattr__(self, name: str):  # dims, precision, dtype: the wrapped backend's
        return getattr(self._backend, name)

    def constants(self) -> dict[str, torch.Tensor]:
        return self._backend.constants()

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if network not in self.graphed:
            return self._backend.run(network, **inputs)
        spec = self.specs[network]
        n = next(iter(inputs.values())).shape[0]
        rows = row_bucket(n)
        most = getattr(self._backend, "profiles", {}).get(network, {}).get("max")  # a TensorRT engine's
        if most is not None and n <= most < rows:
            rows = most  # padded no further than the engine accepts
        padded = {k: pad_rows(inputs[k], rows, guided=False) for k in spec.input_names}
        entry = self.entries.get((network, rows))
        if entry is None:
            entry = self.entries[(network, rows)] = GraphEntry(
                {k: torch.empty_like(v) for k, v in padded.items()}
            )
        for k, v in padded.items():
            entry.inputs[k].copy_(v)
        if not self.capture:
            self._call(network, entry)
        else:
            if entry.graph is None:
                entry.graph = self._capture(network, entry)
            entry.graph.replay()
            entry.replays += 1
        return {k: v[:n].clone() for k, v in entry.outputs.items()}

    def _call(self, network: str, entry: GraphEntry) -> None:
        out = self._backend.run(network, **entry.inputs)
        for k, v in out.items():
            if k not in entry.outputs:  # allocated at the warm-up call, never inside a capture
                entry.outputs[k] = torch.empty_like(v)
            entry.outputs[k].copy_(v)

    def _capture(self, network: str, entry: GraphEntry) -> torch.cuda.CUDAGraph:
        # torch's CUDA-graph notes: warm up on the side stream that then captures (cuBLAS workspaces,
        # cuDNN plans and the outputs' buffers are made there, outside the graphs' pool)
        if self._pool is None:
            self._pool, self._stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            self._call(network, entry)
        torch.cuda.current_stream().wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
            self._call(network, entry)
        import gc

        gc.collect()
        left = pool_allocations(torch.cuda.memory_snapshot(), self._pool)
        if left:
            raise RuntimeError(
                f"CUDA-graph capture of {network} left {len(left)} tensor(s) ({sum(left) / 2**20:.1f} MiB) "
                "allocated in the graphs' shared pool: results must live in the static buffers"
            )
        return graph
