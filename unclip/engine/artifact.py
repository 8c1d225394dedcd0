"""Reading an exported artifact folder: checked manifest, sizes, schedules, tokenizer, constants.

Everything a runtime backend needs besides its sessions, without diffusers or transformers.
All files are checked against their sha256 in the manifest before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unclip.engine.pipeline import read_sampler_defaults
from unclip.engine.scheduler import SchedulerConfig
from unclip.engine.tokenizer import ClipTokenizer
from unclip.errors import UnclipError
from unclip.export import manifest as layout
from unclip.specs import ModelDims, network_specs


@dataclass
class Artifact:
    folder: Path
    manifest: dict
    dims: ModelDims
    schedulers: dict[str, SchedulerConfig]
    tokenizer: ClipTokenizer
    constants: dict[str, torch.Tensor]
    sampler_defaults: dict = field(default_factory=dict)

    def network_path(self, network: str) -> Path:
        return self.folder / self.manifest["networks"][network]["file"]


def _read_config(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{folder / name} cannot be read ({exc}); {layout.REEXPORT_HINT}") from None


def load_artifact(folder: str | Path) -> Artifact:
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    layout.verify_files(folder, manifest)
    try:
        dims = ModelDims(**_read_config(folder, layout.MODEL_DIMS))
    except TypeError as exc:  # written by another unclip version
        raise UnclipError(f"{folder / layout.MODEL_DIMS} does not match this unclip ({exc}); "
                          f"{layout.REEXPORT_HINT}") from None
    for name, spec in network_specs(dims).items():
        entry = layout.network_entry(manifest, folder, name)
        layout.verify_file(folder, entry["file"], entry["sha256"])
        if entry.get("external_data"):
            layout.verify_file(folder, entry["external_data"]["file"], entry["external_data"]["sha256"])
        names = ([t["name"] for t in entry.get("inputs", [])], [t["name"] for t in entry.get("outputs", [])])
        if names != (spec.input_names, spec.output_names):
            raise UnclipError(f"{entry['file']} was exported with tensors {names}, this unclip binds "
                              f"{(spec.input_names, spec.output_names)}; {layout.REEXPORT_HINT}")
    schedulers = {name: SchedulerConfig.from_dict(config)
                  for name, config in _read_config(folder, layout.SCHEDULERS).items()}
    constants = load_file(folder / layout.CONSTANTS)
    return Artifact(folder, manifest, dims, schedulers, ClipTokenizer(folder / layout.TOKENIZER), constants,
                    read_sampler_defaults(folder))


def artifact_pipeline(folder: str | Path, backend: str, make_backend, stage_runner=None):
    """A Pipeline over an artifact folder, its networks run by `make_backend(artifact)`: what every
    backend that serves an export (onnxruntime, openvino) shares."""
    from unclip.engine.pipeline import Pipeline

    folder = Path(folder)
    if not folder.is_dir():
        raise UnclipError(f"with --backend {backend}, --model must be an artifact folder made by "
                          f"`unclip export onnx --out DIR`; {str(folder)!r} is not a folder")
    artifact = load_artifact(folder)
    runtime = make_backend(artifact)
    return Pipeline(runtime, artifact.tokenizer, artifact.dims, artifact.schedulers,
                    model_name=artifact.manifest["source_model"]["name"], stage_runner=stage_runner,
                    sampler_defaults=artifact.sampler_defaults)
