"""The OpenVINO backend: the networks of an ONNX artifact folder, read and compiled by OpenVINO for the CPU.

The same folders as the ONNX Runtime backend (`unclip export onnx`): OpenVINO reads the ONNX files
itself, so there is no second export. Torch tensors go in as numpy views and the outputs come back
as copies (an infer request reuses its output memory on the next call).

Precision is one option: "fp32", or "bf16" = OpenVINO's inference-precision hint on the UNets
(decoder, super-resolution), under which its CPU plugin runs their convolutions and matrix products
in bfloat16 while inputs and outputs stay float32. The text encoder, prior and text_proj stay fp32:
they are a small share of the time, and on the demo model the prior in bf16 cost accuracy for no
measurable speed (docs/cpu.md). bf16 is offered only where the CPU computes it natively
(OpenVINO lists BF16 among the CPU's OPTIMIZATION_CAPABILITIES: AVX512-BF16 or AMX); elsewhere
OpenVINO would emulate it, slower than fp32, so it is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.engine.artifact import Artifact, artifact_pipeline
from unclip.errors import UnclipError

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}  # our name -> OpenVINO's INFERENCE_PRECISION_HINT
# what "bf16" runs in bf16: the UNets, and the step cache's pair (the decoder's own layers) where exported
HALF_NETWORKS = ("decoder", "super_res_first", "super_res_last", "decoder_full", "decoder_shallow")
# LATENCY: one stream, all cores on one request, which is how the sampling loop calls a network.
# Threads: OpenVINO's default (one per core). Its TBB workers sleep when idle instead of spinning,
# so it does not fight other processes for the CPU the way a spinning OpenMP pool does (docs/cpu.md).
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY"}


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise UnclipError("--backend openvino needs OpenVINO: pip install 'unclip[openvino]' "
                          "(or pip install openvino)") from None
    return openvino


def cpu_has_native_bf16(core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_precision(core, precision: str) -> None:
    if precision not in PRECISIONS:
        raise UnclipError(f"--dtype {precision} is not supported by --backend openvino: choose fp32 or bf16")
    if precision == "bf16" and not cpu_has_native_bf16(core):
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise UnclipError(f"--dtype bf16 with --backend openvino needs a CPU with native bf16 (AVX512-BF16 "
                          f"or AMX); this one ({name}) has none, so it would be emulated and slower: "
                          "use --dtype fp32")


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, artifact: Artifact, precision: str = "fp32", device: str | torch.device = "cpu"):
        ov = import_openvino()
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise UnclipError("--backend openvino runs on the CPU here: use --device cpu "
                              "(or --backend onnxruntime / tensorrt on a GPU)")
        core = ov.Core()
        check_precision(core, precision)
        self.precision = precision
        self.dims = artifact.dims
        self.specs = dict(artifact.specs)  # with the step cache's pair when the artifact has it
        self.requests = {}
        for name in self.specs:
            hint = PRECISIONS[precision] if name in HALF_NETWORKS else "f32"
            config = {**COMPILE_CONFIG, "INFERENCE_PRECISION_HINT": hint}
            path = artifact.network_path(name)
            try:
                compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError with its own text
                raise UnclipError(f"OpenVINO cannot load {path} ({str(exc).strip().splitlines()[0]}); "
                                  "re-run `unclip export onnx` into this folder") from None
            self.requests[name] = compiled.create_infer_request()
        self._constants = dict(artifact.constants)

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        feeds = {name: inputs[name].contiguous().numpy() for name in spec.input_names}
        result = self.requests[network].infer(feeds, share_inputs=True)  # outputs copied (not shared)
        return {name: torch.from_numpy(result[name]) for name in spec.output_names}

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants

    def release(self, network: str) -> None:
        """Frees a network's compiled model: the mixed backend runs it in another runtime."""
        self.requests.pop(network, None)


def load_openvino_pipeline(folder: str | Path, precision: str = "fp32", device: str = "cpu",
                           step_cache: int = 1):
    """A Pipeline over an artifact folder (made by `unclip export onnx`), run by OpenVINO; `step_cache`
    > 1 needs one exported with `--step-cache`."""
    return artifact_pipeline(folder, "openvino",
                             lambda artifact: OpenVinoBackend(artifact, precision, device),
                             step_cache=step_cache)
