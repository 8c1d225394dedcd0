"""The ONNX Runtime backend: the exported networks of an artifact folder, run by ORT sessions.

CPU: torch tensors go to ORT as numpy views and come back with torch.from_numpy (no copies).
CUDA (onnxruntime-gpu): inputs and outputs stay on the GPU, bound by pointer with I/O binding,
so the sampling loop's torch CUDA tensors never cross to the host.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.engine.artifact import Artifact, artifact_pipeline
from unclip.errors import UnclipError
from unclip.specs import DTYPES

NUMPY = {name: torch.empty(0, dtype=dtype).numpy().dtype for name, dtype in DTYPES.items()}

# Measured on this project's 2-core CPU machine, small preset, ORT 1.32, one prompt,
# prior/decoder/super-res steps 3/4/2, three runs after a warm-up:
#   idle machine:  intra-op threads 1: 2.26-2.30 s;  2: 1.45-1.49 s;  ORT default (0): 1.47-1.53 s
#   shared with other jobs (load ~5), best of 2: threads 1 with ALL 5.14-5.25 s, 2 with ALL 6.15-8.02 s;
#   graph optimisation BASIC 5.55-5.67 s, EXTENDED 5.48-5.58 s, ALL 5.14-5.25 s (1 thread)
# ORT_ENABLE_ALL (NCHWc conv layouts, fused attention/GELU) is fastest. Threads: ORT's default
# (one per physical core) wins on a machine to itself, which is what a service runs on; only a
# machine crowded by other jobs favoured one thread. Inter-op parallelism: these graphs are one path.
INTRA_OP_THREADS = 0  # 0 = ORT's default
GRAPH_OPTIMIZATION = "ORT_ENABLE_ALL"
ALLOW_SPINNING = False  # see docs/cpu.md: measured below


def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = INTRA_OP_THREADS
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if ALLOW_SPINNING else "0")
    options.log_severity_level = 3  # ORT's warnings about unused initialisers are not the user's problem
    return options


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, device: str | torch.device = "cpu"):
        import onnxruntime as ort

        self.device = torch.device(device)
        self.dims = artifact.dims
        self.specs = dict(artifact.specs)  # with the step cache's pair when the artifact has it
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise UnclipError("--device cuda with --backend onnxruntime needs onnxruntime-gpu "
                                  "(pip install onnxruntime-gpu); or use --device cpu")
            self._device_id = self.device.index or 0
            providers = [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = session_options()
        self.sessions = {}
        for name in self.specs:
            path = artifact.network_path(name)
            try:
                self.sessions[name] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
                raise UnclipError(f"ONNX Runtime cannot load {path} ({str(exc).splitlines()[0]}); "
                                  "re-run `unclip export onnx` into this folder") from None
        self._constants = {k: v.to(self.device) for k, v in artifact.constants.items()}

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        if self.device.type == "cuda":
            return self._run_bound(network, inputs)
        feeds = {name: inputs[name].contiguous().numpy() for name in spec.input_names}
        outputs = self.sessions[network].run(spec.output_names, feeds)
        return {name: torch.from_numpy(out) for name, out in zip(spec.output_names, outputs, strict=True)}

    def _run_bound(self, network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """GPU tensors bound by pointer; outputs allocated by torch at the spec's shape."""
        spec, session = self.specs[network], self.sessions[network]
        binding = session.io_binding()
        sizes: dict[str, int] = {}  # dynamic axis name -> this call's size, read from the inputs
        feeds = {}
        for t in spec.inputs:
            x = inputs[t.name].to(self.device, DTYPES[t.dtype]).contiguous()
            feeds[t.name] = x  # keep alive until the run ends
            sizes.update({a: n for a, n in zip(t.shape, x.shape, strict=True) if isinstance(a, str)})
            binding.bind_input(t.name, "cuda", self._device_id, NUMPY[t.dtype], list(x.shape), x.data_ptr())
        outputs = {}
        for t in spec.outputs:
            shape = [sizes[a] if isinstance(a, str) else a for a in t.shape]
            y = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            binding.bind_output(t.name, "cuda", self._device_id, NUMPY[t.dtype], shape, y.data_ptr())
            outputs[t.name] = y
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch are ready
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # ORT's stream is done before torch reads the outputs
        return outputs

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants

    def release(self, network: str) -> None:
        """Frees a network's session: the mixed backend runs it in another runtime."""
        self.sessions.pop(network, None)


def load_onnxruntime_pipeline(folder: str | Path, device: str = "cpu", step_cache: int = 1):
    """A Pipeline over an artifact folder (made by `unclip export onnx`); `step_cache` > 1 needs one
    exported with `--step-cache`."""
    return artifact_pipeline(folder, "onnxruntime", lambda artifact: OnnxRuntimeBackend(artifact, device),
                             step_cache=step_cache)
