"""Validation of an exported network against its PyTorch module on fresh random inputs.

Errors per output: max abs |onnx - torch|, and max rel = max abs / max |torch| (relative to the
output's scale, not element-wise: element-wise ratios explode where the output crosses zero).
The check is max abs <= TOLERANCE[precision] * max(1, max |torch|).
"""

from __future__ import annotations

import numpy as np
import torch

from unclip.errors import UnclipError
from unclip.specs import ModelDims, NetworkSpec, example_inputs

# fp32: re-associated sums in fused kernels differ from torch by ~1e-6 (measured max 4.7e-6 abs on
# tiny/small); 1e-4 leaves room for deeper nets. fp16: a 10-bit mantissa (~5e-4 per op) accumulated
# over depth, measured up to 1.5e-2 of the output scale (small's super-res nets); 3e-2 is 2x that.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
VALIDATION_SEED = 1234  # differs from the tracing inputs' seed, so validation sees fresh data


def compare(module: torch.nn.Module, session, spec: NetworkSpec, dims: ModelDims,
            batch: int) -> dict[str, dict[str, float]]:
    inputs = example_inputs(spec, dims, batch, torch.Generator().manual_seed(VALIDATION_SEED + batch))
    with torch.inference_mode():
        expected = module(*(inputs[n] for n in spec.input_names))
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = session.run(spec.output_names, {k: v.numpy() for k, v in inputs.items()})
    errors = {}
    for t, want, got in zip(spec.outputs, expected, actual, strict=True):
        name, want = t.name, want.float().numpy()
        if str(got.dtype) != t.dtype:  # spec dtype names are numpy's names
            raise UnclipError(f"exported {spec.name} returns {name} as {got.dtype}, the spec says "
                              f"{t.dtype}; report this with the model and the tool versions")
        scale = float(np.abs(want).max())
        max_abs = float(np.abs(got.astype(np.float32) - want).max())
        errors[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else float("inf"),
                        "max_torch": scale}
    return errors


def validate(module: torch.nn.Module, onnx_path: str, spec: NetworkSpec, dims: ModelDims,
             batch_sizes: list[int], precision: str) -> dict[str, dict[str, dict[str, float]]]:
    """{batch size: {output: errors}}; raises UnclipError when an output exceeds the tolerance."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    tolerance = TOLERANCE[precision]
    report = {}
    for batch in batch_sizes:
        errors = compare(module, session, spec, dims, batch)
        for output, e in errors.items():
            if not e["max_abs"] <= tolerance * max(1.0, e["max_torch"]):
                raise UnclipError(
                    f"validation failed: {spec.name}.{output} at batch {batch} differs from PyTorch by "
                    f"{e['max_abs']:.3g} (max abs; tolerance {tolerance:g} x max(1, {e['max_torch']:.3g}) "
                    f"for {precision}); nothing was written. Try --precision fp32 or another --opset")
        report[str(batch)] = errors
    return report
