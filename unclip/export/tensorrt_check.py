"""`unclip export tensorrt --check`: each engine against ONNX Runtime at min, opt and max rows.

TensorRT tunes kernels for the profile's opt shape; shapes away from it take other tactics, and
NaN or black images at those shapes are the failure TensorRT diffusion users report most. So every
network runs at all three profile shapes on the same random inputs, through Polygraphy: its
`Comparator.run` feeds identical inputs to a `TrtRunner` (the engine) and an `OnnxrtRunner` (CPU
ONNX Runtime over the artifact's ONNX file, the reference that export validation already compared
with PyTorch), and `Comparator.compare_accuracy` applies our rule to each output: non-finite values
fail outright, otherwise max abs error <= tolerance * max(1, max |reference|) (the export's rule).
CI runs the same comparison with the torch networks in the engine's place (tests/test_tensorrt.py).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unclip.export.validation import TOLERANCE
from unclip.specs import ModelDims, NetworkSpec, example_inputs

CHECK_SEED = 4321  # fresh inputs: neither the tracing nor the validation draw
SHAPES = ("min", "opt", "max")
# TensorRT's fp16 kernels and ORT's fp16 kernels sum in different orders; their difference is the
# same size as ORT-vs-PyTorch in export validation, so the export's tolerance applies unchanged.


@dataclass(frozen=True)
class CheckRow:
    network: str
    shape: str  # "min" | "opt" | "max"
    rows: int
    output: str
    max_abs: float
    scale: float  # max |reference|
    nonfinite: int  # NaN/inf count in the checked runner's output
    ok: bool


@contextmanager
def polygraphy_log():
    """Polygraphy's log (TensorRT's included) through Python logging while inside, so that its
    progress stays quiet and its errors are kept (the yielded list) for our one-line errors."""
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []
    keep = logging.Handler(logging.ERROR)
    keep.emit = lambda record: errors.append(record.getMessage()[4:])  # less the "[E] " severity tag
    was = G_LOGGER.use_python_logging_system, G_LOGGER.colors
    G_LOGGER.use_python_logging_system, G_LOGGER.colors = True, False
    logging.getLogger("Polygraphy").addHandler(keep)
    try:
        yield errors
    finally:
        logging.getLogger("Polygraphy").removeHandler(keep)
        G_LOGGER.use_python_logging_system, G_LOGGER.colors = was


class OutputRule:
    """A Polygraphy compare_func (called once per iteration: min, opt, max rows) applying our rule
    to every output and keeping a CheckRow for each."""

    def __init__(self, network: str, profile: dict, tolerance: float):
        self.network, self.profile, self.tolerance, self.rows = network, profile, tolerance, []

    def __call__(self, reference, actual) -> dict[str, bool]:
        shape = SHAPES[len({r.shape for r in self.rows})]
        for name, ref in reference.items():
            ref, got = np.asarray(ref, dtype=np.float64), np.asarray(actual[name], dtype=np.float64)
            nonfinite, scale = int((~np.isfinite(got)).sum()), float(np.abs(ref).max(initial=0.0))
            bad = nonfinite or got.shape != ref.shape
            max_abs = float("inf") if bad else float(np.abs(got - ref).max(initial=0.0))
            ok = not bad and max_abs <= self.tolerance * max(1.0, scale)
            self.rows.append(CheckRow(self.network, shape, self.profile[shape], name, max_abs, scale,
                                      nonfinite, ok))
        return {r.output: r.ok for r in self.rows if r.shape == shape}


def check_network(spec: NetworkSpec, dims: ModelDims, profile: dict, precision: str, reference, checked
                  ) -> list[CheckRow]:
    """Two Polygraphy runners on identical inputs at each of the profile's min/opt/max rows."""
    from polygraphy.comparator import Comparator

    feeds = []
    for rows in (profile[shape] for shape in SHAPES):
        inputs = example_inputs(spec, dims, rows, torch.Generator().manual_seed(CHECK_SEED + rows))
        feeds.append(OrderedDict((name, tensor.numpy()) for name, tensor in inputs.items()))
    rule = OutputRule(spec.name, profile, TOLERANCE[precision])
    with polygraphy_log():
        results = Comparator.run([reference, checked], data_loader=feeds)
        Comparator.compare_accuracy(results, compare_func=rule)
    return rule.rows


def format_report(rows: list[CheckRow], precision: str) -> list[str]:
    lines = [f"TensorRT vs ONNX Runtime, same random inputs; pass: finite and max abs <= "
             f"{TOLERANCE[precision]:g} x max(1, max|onnxruntime|)"]
    for r in rows:
        verdict = "ok" if r.ok else ("FAIL: NaN/inf" if r.nonfinite else "FAIL: error too large")
        lines.append(f"  {r.network:<16} {r.shape:<3} rows {r.rows:<4} {r.output:<22} "
                     f"max abs {r.max_abs:.2e} (scale {r.scale:.2e}, non-finite {r.nonfinite})  {verdict}")
    return lines


def onnxruntime_runner(folder: Path, entry: dict):
    """CPU ONNX Runtime over one network's ONNX file (its external weights next to it)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(Path(folder) / entry["file"]), providers=["cpu"]))


def check_engines(folder) -> tuple[list[CheckRow], str]:
    """Every engine of DIR against ONNX Runtime; (rows, precision). Needs TensorRT and a GPU."""
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    from unclip.engine.artifact import load_artifact
    from unclip.export import tensorrt_cache as cache
    from unclip.export.stable_unclip_onnx import is_stable_artifact

    if is_stable_artifact(folder):  # the second family: its own spec table and sizes
        from unclip.engine.stable_unclip_runtime import stable_export

        folder, manifest, dims, specs = stable_export(folder)
    else:
        artifact = load_artifact(folder)
        folder, dims = artifact.folder, artifact.dims
        manifest, specs = artifact.manifest, artifact.specs  # with the step cache's pair where exported
    precision = manifest["precision"]
    paths = cache.require_engines(folder, manifest, list(specs), precision, cache.current_target())
    rows = []
    for name, spec in specs.items():
        reference = onnxruntime_runner(folder, manifest["networks"][name])
        engine = TrtRunner(EngineFromPath(str(paths[name])))
        rows += check_network(spec, dims, cache.engine_entries(manifest)[name]["profile"], precision,
                              reference, engine)
    return rows, precision
