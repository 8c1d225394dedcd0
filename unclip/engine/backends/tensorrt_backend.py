"""The TensorRT backend: engines built by `unclip export tensorrt`, run on torch CUDA tensors.

Inputs and outputs are torch tensors on the GPU, handed to TensorRT by address (no host copies);
each call sets the input shapes of this batch, binds every tensor by its spec name and enqueues
with `execute_async_v3`. Which stream (`enqueue`): outside capture, the backend's own stream,
fenced both ways against torch's current stream (which is usually the legacy default stream, on
which TensorRT adds synchronisation of its own); inside CUDA-graph capture, the capturing stream
itself (a non-default stream that torch.cuda.graph made current), since only work on the capturing
stream, or on streams joined to it, becomes part of the graph. TensorRT does its shape-dependent
setup on the first enqueue after a shape change; StageRunner's warm-up pass before capture is that
first enqueue.

A captured graph fixes the execution context's shape state, so each (network, rows) gets its own
context: graphs captured at two batch sizes never share one. The contexts' scratch memory is one
torch buffer, sized for the largest engine and allocated up front (its address must not move
under a captured graph); sharing it is safe because enqueues never overlap: eager calls are
ordered on the backend's stream, a graph's on its capture stream, and torch's stream waits for each.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.engine.artifact import Artifact, load_artifact
from unclip.errors import UnclipError
from unclip.export import tensorrt_cache
from unclip.specs import DTYPES


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifact: Artifact, device: str | torch.device = "cuda"):
        from unclip.export.tensorrt_build import import_tensorrt
        from unclip.specs import network_specs

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise UnclipError("--backend tensorrt runs on the GPU only: use --device cuda "
                              "(or --backend onnxruntime on CPU)")
        target = tensorrt_cache.current_target(self.device.index)
        self.specs = network_specs(artifact.dims)
        self.dims = artifact.dims
        precision = artifact.manifest["precision"]
        paths = tensorrt_cache.require_engines(artifact.folder, artifact.manifest, list(self.specs),
                                               precision, target)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        trt = import_tensorrt()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines, self.contexts = {}, {}
        with torch.cuda.device(self.device):
            for name, path in paths.items():
                engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
                if engine is None:
                    raise UnclipError(f"TensorRT could not load {path} (see its log above); "
                                      f"{tensorrt_cache.rebuild_hint(artifact.folder)}")
                self.engines[name] = engine
                self._check_io(trt, name, engine, path)
        self._user_managed = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        scratch = max(engine.device_memory_size_v2 for engine in self.engines.values())
        self._scratch = torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device)
        recorded = tensorrt_cache.engine_entries(artifact.manifest)
        self.profiles = {name: recorded[name]["profile"] for name in self.specs}
        self._constants = {k: v.to(self.device) for k, v in artifact.constants.items()}
        self._stream = torch.cuda.Stream(self.device)  # TensorRT's, outside capture

    def _check_io(self, trt, name: str, engine, path: Path) -> None:
        """The engine's tensors must be the spec's, in name and dtype: binding is by name."""
        spec = self.specs[name]
        found = {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            found[tensor] = (engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT,
                             _TRT_DTYPES(trt).get(engine.get_tensor_dtype(tensor)))
        want = {t.name: (True, t.dtype) for t in spec.inputs}
        want.update({t.name: (False, t.dtype) for t in spec.outputs})
        if found != want:
            raise UnclipError(f"{path} has tensors {found}, the spec of {name} is {want}; "
                              f"re-export the ONNX files and rebuild the engines")

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
        for t in spec.inputs:
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
    """execute_async_v3 on the right stream (module docstring); True when TensorRT accepted it.

    Outside capture the backend's stream first waits for torch's (inputs are written there), and
    torch's then waits for it (outputs are read there), so memory the caller frees after the call
    is reused only after TensorRT is done with it.
    """
    if capturing:
        return context.execute_async_v3(current.cuda_stream)
    own.wait_stream(current)
    accepted = context.execute_async_v3(own.cuda_stream)
    current.wait_stream(own)
    return accepted


def _TRT_DTYPES(trt) -> dict:  # noqa: N802 - a table, built once TensorRT is imported
    return {trt.float32: "float32", trt.float16: "float16", trt.int64: "int64", trt.bool: "bool"}


def load_tensorrt_pipeline(folder: str | Path, device: str = "cuda", cuda_graphs: bool = False):
    """A Pipeline over an artifact folder with engines (made by `unclip export tensorrt`);
    `cuda_graphs` captures each stage's whole loop, engine calls included."""
    from unclip.engine.pipeline import Pipeline

    folder = Path(folder)
    if not folder.is_dir():
        raise UnclipError(f"with --backend tensorrt, --model must be an artifact folder made by "
                          f"`unclip export onnx --out DIR` and `unclip export tensorrt --artifacts DIR`; "
                          f"{str(folder)!r} is not a folder")
    artifact = load_artifact(folder)
    backend = TensorRTBackend(artifact, device)
    runner = None
    if cuda_graphs:
        from unclip.engine.cuda_graphs import StageRunner

        runner = StageRunner(backend, capture=True, kernels=False)
    return Pipeline(backend, artifact.tokenizer, artifact.dims, artifact.schedulers,
                    model_name=artifact.manifest["source_model"]["name"], stage_runner=runner,
                    sampler_defaults=artifact.sampler_defaults)
