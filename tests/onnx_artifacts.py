"""Exported artifact folders shared by the test_onnx_* modules: each is exported once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

_EXPORTED: dict[tuple[str, str], Path] = {}


def exported(tmp_path_factory, preset: str, precision: str = "fp32") -> Path:
    """A read-only-by-convention artifact folder of `preset` (random weights, seed 0)."""
    from unclip.export.onnx_export import export_onnx

    key = (preset, precision)
    if key not in _EXPORTED:
        out = tmp_path_factory.mktemp(f"onnx_{preset}_{precision}") / "artifact"
        export_onnx(preset, out, precision=precision)
        _EXPORTED[key] = out
    return _EXPORTED[key]


def copy_of(folder: Path, dest: Path) -> Path:
    """A private copy a test may damage."""
    shutil.copytree(folder, dest)
    return dest


def siblings(folder: Path) -> list[str]:
    """Everything next to `folder` (temporary export folders would show up here)."""
    return sorted(p.name for p in folder.parent.iterdir() if p != folder)
