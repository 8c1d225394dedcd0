"""Exported artifact folders shared by the test_onnx_* modules: each is exported once per session."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_EXPORTED: dict[tuple, Path] = {}
# Exported with `--step-cache`: the step cache's decoder pair rides along in the shared tiny folders
# (two small graphs, a few seconds once per session) instead of a second export of its own.
# `without_pair` makes the folder an export without the flag writes, from a copy.
STEP_CACHE_PRESETS = ("tiny",)


def exported(tmp_path_factory, preset: str, precision: str = "fp32",
             batch_sizes: tuple[int, ...] | None = None) -> Path:
    """A read-only-by-convention artifact folder of `preset` (random weights, seed 0); validated at
    `batch_sizes` (default: the exporter's)."""
    from unclip.export.onnx_export import DEFAULT_BATCH_SIZES, export_onnx

    key = (preset, precision, batch_sizes)
    if key not in _EXPORTED:
        out = tmp_path_factory.mktemp(f"onnx_{preset}_{precision}") / "artifact"
        export_onnx(preset, out, precision=precision, batch_sizes=batch_sizes or DEFAULT_BATCH_SIZES,
                    step_cache=preset in STEP_CACHE_PRESETS)
        _EXPORTED[key] = out
    return _EXPORTED[key]


def copy_of(folder: Path, dest: Path) -> Path:
    """A private copy a test may damage."""
    shutil.copytree(folder, dest)
    return dest


def siblings(folder: Path) -> list[str]:
    """Everything next to `folder` (temporary export folders would show up here)."""
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)


def without_pair(folder: Path, dest: Path) -> Path:
    """A copy of `folder` as an export without --step-cache writes it: the step cache's pair neither in
    the manifest nor in the folder."""
    from unclip.models.step_cache import CACHED

    folder = copy_of(folder, dest)
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in CACHED:
        entry = manifest["networks"].pop(name)
        del manifest["files"][entry["file"]]
        (folder / entry["file"]).unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return folder
