"""Presets, checkpoints (diffusers' UnCLIPPipeline layout), the demo model and network adapters."""

from __future__ import annotations

import logging
from pathlib import Path

from unclip.errors import UnclipError
from unclip.models.presets import PRESETS

DEMO_FOLDER = Path(__file__).parent / "demo"  # the trained demo model (models/demo/MODEL_CARD.md)
DEFAULT_MODEL = "demo"  # a first command must draw what it is asked, offline: no download


def resolve_model_path(model: str | Path) -> Path:
    """A checkpoint folder, or the folder of the built-in demo model for the name 'demo'."""
    path = Path(model)
    if path.exists():
        return path
    if str(model) == "demo":
        if not (DEMO_FOLDER / "model_index.json").exists():
            raise UnclipError(f"this build of unclip ships no demo model ({DEMO_FOLDER} is missing); "
                              "train one with `python -m training.train_demo` or pass a checkpoint folder")
        return DEMO_FOLDER
    raise UnclipError(f"model {str(model)!r} is neither an existing folder nor a preset "
                      f"({', '.join(PRESETS)}) nor 'demo'")


def load_model(model, allow_pickle: bool = False, seed: int = 0):
    """Components from loaded components, a checkpoint folder, 'demo', or a preset name
    (random weights from `seed`). Safe from several threads: one model is built at a time
    (diffusers' and transformers' lazy imports are not thread-safe: unclip/models/libraries.py)."""
    from unclip.models.components import UnclipComponents

    if isinstance(model, UnclipComponents):
        return model
    from unclip.models.libraries import LOAD_LOCK, import_model_libraries

    with LOAD_LOCK:
        import_model_libraries()
        return _load_model(model, allow_pickle, seed)


def _load_model(model, allow_pickle: bool, seed: int):
    from unclip.models.checkpoint import load_components
    from unclip.models.components import build_preset

    log = logging.getLogger("unclip")
    if str(model) in PRESETS and not Path(model).exists():
        log.info("building preset %s (random weights, seed %d) ...", model, seed)
        return build_preset(str(model), seed=seed)
    folder = resolve_model_path(model)
    log.info("loading %s ...", model if str(model) == "demo" else folder)  # takes seconds: say so
    return load_components(folder, allow_pickle=allow_pickle)
