"""Presets, checkpoints (diffusers' UnCLIPPipeline layout) and the network adapters."""

from __future__ import annotations

from pathlib import Path

from unclip.errors import UnclipError
from unclip.models.presets import PRESETS

DEFAULT_MODEL = "tiny"  # until the trained demo model ships


def load_model(model: str | Path, allow_pickle: bool = False, seed: int = 0):
    """A checkpoint folder, or a preset name (random weights from `seed`)."""
    from unclip.models.checkpoint import load_components
    from unclip.models.components import build_preset

    path = Path(model)
    if path.exists():
        return load_components(path, allow_pickle=allow_pickle)
    if str(model) in PRESETS:
        return build_preset(str(model), seed=seed)
    raise UnclipError(f"model {str(model)!r} is neither an existing folder nor a preset "
                      f"({', '.join(PRESETS)})")
