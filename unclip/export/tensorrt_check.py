"""`unclip export tensorrt --check`: each engine against ONNX Runtime at min, opt and max rows.

TensorRT tunes kernels for the profile's opt shape; shapes away from it take other tactics, and
NaN or black images at those shapes are the failure TensorRT diffusion users report most. So every
network is run at all three profile shapes on the same random inputs by the engine and by ONNX
Runtime (CPU: the reference that export validation already compared with PyTorch), and each output
is compared: non-finite values fail outright, otherwise max abs error against the export's rule
max_abs <= tolerance * max(1, max |onnxruntime|).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unclip.export.validation import TOLERANCE
from unclip.specs import ModelDims, NetworkSpec, example_inputs

CHECK_SEED = 4321  # fresh inputs: neither the tracing nor the validation draw

# TensorRT's fp16 kernels and ORT's fp16 kernels sum in different orders; their difference is the
# same size as ORT-vs-PyTorch in export validation, so the export's tolerance applies unchanged.
Runner = Callable[[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CheckRow:
    network: str
    shape: str  # "min" | "opt" | "max"
    rows: int
    output: str
    max_abs: float
    scale: float  # max |reference|
    nonfinite: int  # NaN/inf count in the engine's output
    ok: bool


def compare_outputs(network: str, shape: str, rows: int, reference: dict[str, torch.Tensor],
                    actual: dict[str, torch.Tensor], tolerance: float) -> list[CheckRow]:
    out = []
    for name, ref in reference.items():
        ref = ref.detach().float().cpu()
        got = actual[name].detach().float().cpu()
        nonfinite = int((~torch.isfinite(got)).sum())
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        if nonfinite or got.shape != ref.shape:
            max_abs = float("inf")
        else:
            max_abs = float((got - ref).abs().max()) if ref.numel() else 0.0
        ok = nonfinite == 0 and max_abs <= tolerance * max(1.0, scale)
        out.append(CheckRow(network, shape, rows, name, max_abs, scale, nonfinite, ok))
    return out


def check_network(spec: NetworkSpec, dims: ModelDims, profile: dict, precision: str,
                  reference: Runner, engine: Runner) -> list[CheckRow]:
    """Both runners get identical inputs at each of the profile's min/opt/max rows."""
    rows_out = []
    for shape in ("min", "opt", "max"):
        rows = profile[shape]
        inputs = example_inputs(spec, dims, rows, torch.Generator().manual_seed(CHECK_SEED + rows))
        expected = reference(spec.name, inputs)
        actual = engine(spec.name, inputs)
        rows_out += compare_outputs(spec.name, shape, rows, expected, actual, TOLERANCE[precision])
    return rows_out


def format_report(rows: list[CheckRow], precision: str) -> list[str]:
    lines = [f"TensorRT vs ONNX Runtime, same random inputs; pass: finite and max abs <= "
             f"{TOLERANCE[precision]:g} x max(1, max|onnxruntime|)"]
    for r in rows:
        verdict = "ok" if r.ok else ("FAIL: NaN/inf" if r.nonfinite else "FAIL: error too large")
        lines.append(f"  {r.network:<16} {r.shape:<3} rows {r.rows:<4} {r.output:<22} "
                     f"max abs {r.max_abs:.2e} "
                     f"(scale {r.scale:.2e}, non-finite {r.nonfinite})  {verdict}")
    return lines


def onnxruntime_runner(folder, manifest: dict) -> Runner:
    """CPU ONNX Runtime sessions over the artifact's ONNX files, created on first use."""
    import onnxruntime as ort

    sessions = {}

    def run(network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        entry = manifest["networks"][network]
        if network not in sessions:
            sessions[network] = ort.InferenceSession(str(folder / entry["file"]),
                                                     providers=["CPUExecutionProvider"])
        names = [t["name"] for t in entry["outputs"]]
        outs = sessions[network].run(names, {k: v.numpy() for k, v in inputs.items()})
        return {n: torch.from_numpy(o) for n, o in zip(names, outs, strict=True)}

    return run


def check_engines(folder, device: str = "cuda") -> tuple[list[CheckRow], str]:
    """Every engine of DIR against ONNX Runtime; (rows, precision). Needs TensorRT and a GPU."""
    from unclip.engine.artifact import load_artifact
    from unclip.engine.backends.tensorrt_backend import TensorRTBackend

    artifact = load_artifact(folder)
    backend = TensorRTBackend(artifact, device)
    precision = artifact.manifest["precision"]

    def engine(network: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = backend.run(network, **{k: v.to(backend.device) for k, v in inputs.items()})
        torch.cuda.current_stream(backend.device).synchronize()
        return out

    reference = onnxruntime_runner(artifact.folder, artifact.manifest)
    rows = []
    for name, spec in backend.specs.items():
        rows += check_network(spec, artifact.dims, backend.profiles[name], precision, reference, engine)
    return rows, precision
