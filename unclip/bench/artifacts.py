"""Backends that serve an exported artifact get one, built once into a cache folder.

A backend plugs into the bench by its `unclip.load` name. If it loads from an export (ONNX
Runtime and OpenVINO from the same ONNX folder), `EXPORTERS` names the function that makes that
folder from a model; the bench then passes the folder to `unclip.load` instead of the model.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from unclip.models.presets import PRESETS


def _export_onnx(model: str, out: Path, step_cache: bool = False) -> None:
    from unclip.export.onnx_export import export_onnx
    from unclip.models.stable_unclip import is_stable_unclip

    if is_stable_unclip(model):
        from unclip.export.stable_unclip_onnx import export_stable_onnx

        export_stable_onnx(model, out, batch_sizes=(1,), seed=0)
        return

    # validated at batch 1 only: the bench compares the images it makes with the baseline anyway
    export_onnx(model, out, precision="fp32", batch_sizes=(1,), seed=0, step_cache=step_cache)


EXPORTERS = {"onnxruntime": ("onnx-fp32", _export_onnx), "openvino": ("onnx-fp32", _export_onnx),
             "mixed": ("onnx-fp32", _export_onnx)}


def cache_key(model: str) -> str:
    """A preset is its name (weights are seeded); a folder is its path and newest file time."""
    from unclip.models import resolve_model_path
    from unclip.models.stable_unclip import STABLE_PRESETS

    if not Path(model).exists() and (model in PRESETS or model in STABLE_PRESETS):
        return f"preset-{model}-seed0"
    path = resolve_model_path(model)  # 'demo' is the folder shipped in the package
    newest = max((f.stat().st_mtime_ns for f in path.rglob("*") if f.is_file()), default=0)
    digest = hashlib.sha256(f"{path.resolve()}:{newest}".encode()).hexdigest()[:16]
    return f"{path.name}-{digest}"


def prepare(backend: str, model: str, cache_dir: Path,
            step_cache: bool = False) -> tuple[str, float | None, bool]:
    """What to pass to `unclip.load` for this backend: (model or artifact, export seconds, cached).
    `step_cache`: an export that also has the decoder's cached pair (its own folder, so the plain
    export's runners keep theirs)."""
    if backend not in EXPORTERS:
        return model, None, False
    kind, export = EXPORTERS[backend]
    folder = cache_dir / cache_key(model) / (kind + "-step-cache" if step_cache else kind)
    if (folder / "manifest.json").exists():
        return str(folder), None, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    export(model, folder, step_cache=step_cache)
    return str(folder), time.perf_counter() - t0, False
