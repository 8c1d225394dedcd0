"""The TensorRT backend: engines built by `unclip export tensorrt`, run on torch CUDA tensors.

Each call binds torch tensors by address under their spec names (no host copies), sets this
batch's input shapes and enqueues with `execute_async_v3` (see `enqueue` for the stream). A
captured graph fixes an execution context's shape state, so each (network, rows) has its own
context, all sharing one scratch buffer allocated up front (its address must not move under a
graph): safe, as enqueues never overlap (torch's stream waits for each). TensorRT's shape-dependent
setup happens at the first enqueue of a shape: StageRunner's warm-up pass, before capture.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.engine.artifact import Artifact, artifact_pipeline
from unclip.errors import UnclipError
from unclip.export import tensorrt_cache
from unclip.export.tensorrt_check import polygraphy_log
from unclip.specs import DTYPES


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact: Artifact, device: str | torch.device = "cuda"):
        from unclip.export.tensorrt_build import import_tensorrt

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UnclipError("--backend tensorrt runs on the GPU only: use --device cuda "
                              "(or --backend onnxruntime on CPU)")
        target = tensorrt_cache.current_target(self.device.index)
        self.specs = dict(artifact.specs)  # with the step cache's pair when the artifact has it
        self.dims = artifact.dims
        precision = artifact.manifest["precision"]
        paths = tensorrt_cache.require_engines(artifact.folder, artifact.manifest, list(self.specs),
                                               precision, target)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        trt = import_tensorrt()
        from polygraphy.backend.trt import engine_from_path
        from polygraphy.exception import PolygraphyException

        self.engines, self.contexts = {}, {}
        self._inputs = {}  # per network, the spec inputs its engine takes (TensorRT may prune unused ones)
        with torch.cuda.device(self.device), polygraphy_log() as errors:
            for name, path in paths.items():
                try:
                    self.engines[name] = engine_from_path(str(path))
                except PolygraphyException:
                    raise UnclipError(f"TensorRT could not load {path} ({'; '.join(errors)}); "
                                      f"{tensorrt_cache.rebuild_hint(artifact.folder)}") from None
                self._check_io(trt, name, self.engines[name], path)
        self._user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        scratch = max(engine.device_memory_size_v2 for engine in self.engines.values())
        self._scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device)
        recorded = tensorrt_cache.engine_entries(artifact.manifest)
        self.profiles = {name: recorded[name]["profile"] for name in self.specs}
        self._constants = {k: v.to(self.device) for k, v in artifact.constants.items()}
        self._stream = torch.cuda.Stream(self.device)  # TensorRT's, outside capture

    def _check_io(self, trt, name: str, engine, path: Path) -> None:
        """The engine's tensors must be the spec's, in name and dtype: binding is by name."""
        from polygraphy.datatype import DataType

        spec = self.specs[name]
        found = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            found[tensor] = (engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT,
                             DataType.from_dtype(engine.get_tensor_dtype(tensor)).name)
        want = {t.name: (True, t.dtype) for t in spec.inputs}
        want.update({t.name: (False, t.dtype) for t in spec.outputs})
        # an input no layer reads may be left out of the engine (decoder_shallow's text_mask where the
        # decoder's outer levels have no attention): nothing to bind for it, every other tensor must match
        unused = {t.name for t in spec.inputs if t.name not in found}
        if found != {k: v for k, v in want.items() if k not in unused} or len(unused) == len(spec.inputs):
            raise UnclipError(f"{path} has tensors {found}, the spec of {name} is {want}; "
                              f"re-export the ONNX files and rebuild the engines")
        self._inputs[name] = [t for t in spec.inputs if t.name not in unused]

    def _context(self, network: str, rows: int):
        context = self.contexts.get((network, rows))
        if context is None:
            context = self.engines[network].create_execution_context(self._user_managed)
            context.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
            self.contexts[(network, rows)] = context
        return context

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        rows = inputs[spec.inputs[0].name].shape[0]
        profile = self.profiles[network]
        if not profile["min"] <= rows <= profile["max"]:
            raise UnclipError(f"{network} was asked for {rows} rows but its engine accepts "
                              f"{profile['min']}..{profile['max']}; rebuild with `unclip export tensorrt "
                              f"--batch-sizes ... --rebuild` covering this batch")
        context = self._context(network, rows)
        keep = []  # casts/copies, freed on return: safe, torch's stream waits for TensorRT (enqueue)
        for t in self._inputs[network]:
            x = inputs[t.name]
            if x.dtype != DTYPES[t.dtype] or x.device != self.device or not x.is_contiguous():
                x = x.to(self.device, DTYPES[t.dtype]).contiguous()
            keep.append(x)
            context.set_input_shape(t.name, tuple(x.shape))
            context.set_tensor_address(t.name, x.data_ptr())
        outputs = {}
        for t in spec.outputs:
            shape = tuple(rows if isinstance(a, str) else a for a in t.shape)
            y = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            context.set_tensor_address(t.name, y.data_ptr())
            outputs[t.name] = y
        current = torch.cuda.current_stream(self.device)
        if not enqueue(context, current, self._stream, torch.cuda.is_current_stream_capturing()):
            raise UnclipError(f"TensorRT failed to run {network} at {rows} rows (see its log above)")
        return outputs

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants


def enqueue(context, current, own, capturing: bool) -> bool:
    """execute_async_v3; True when TensorRT accepted it. Outside capture on the backend's `own`
    stream, not torch's `current` one (usually the legacy default stream, on which TensorRT adds
    synchronisation), fenced both ways: inputs are written on `current` and outputs read there, and
    memory freed after the call is reused there only after TensorRT is done. Inside capture on the
    capturing stream itself: only its work (or a joined stream's) becomes part of the graph."""
    if capturing:
        return context.execute_async_v3(current.cuda_stream)
    own.wait_stream(current)
    accepted = context.execute_async_v3(own.cuda_stream)
    current.wait_stream(own)
    return accepted


def load_tensorrt_pipeline(folder: str | Path, device: str = "cuda", cuda_graphs: bool = False,
                           step_cache: int = 1):
    """A Pipeline over an artifact folder with engines (made by `unclip export tensorrt`);
    `cuda_graphs` captures one step per network and row bucket, engine calls included; `step_cache` > 1 needs
    an ONNX export made with `--step-cache` (its pair gets engines like every network)."""
    from unclip.engine.cuda_graphs import StageRunner

    runner = (lambda backend: StageRunner(backend, capture=True, kernels=False)) if cuda_graphs else None
    return artifact_pipeline(folder, "tensorrt", lambda artifact: TensorRTBackend(artifact, device), runner,
                             step_cache=step_cache)
