"""Reading an exported artifact folder: checked manifest, sizes, schedules, tokenizer, constants.

Everything a runtime backend needs besides its sessions, without diffusers or transformers. In
order: the manifest's schema (before any other file is opened), every file listed, inside the
folder and matching its sha256, then each network's tensors, as the ONNX file itself declares
them, against the spec table of this unclip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated

import torch
from pydantic import ConfigDict, Field, ValidationError, create_model

from unclip.engine.image_input import ImagePreprocess, read_preprocess
from unclip.engine.scheduler import SchedulerConfig
from unclip.engine.settings import read_sampler_defaults, scheduler_config
from unclip.engine.tokenizer import ClipTokenizer
from unclip.errors import UnclipError, schema_error
from unclip.export import manifest as layout
from unclip.specs import ModelDims, NetworkSpec, network_specs

SCHEDULER_NAMES = ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 9: "bool"}  # onnx.TensorProto element types
# model_dims.json's schema: every ModelDims size a positive integer, nothing else; the optional
# networks' fields (image_size, has_prior) may be absent (an export made before they existed)
_ModelDimsFile = create_model(
    "ModelDimsFile", __config__=ConfigDict(strict=True, extra="forbid"),
    **{f.name: (int, Field(ge=1)) for f in fields(ModelDims) if f.name not in ("image_size", "has_prior")},
    image_size=(Annotated[int, Field(ge=1)] | None, None), has_prior=(bool, True))


@dataclass
class Artifact:
    folder: Path
    manifest: dict
    dims: ModelDims
    schedulers: dict[str, SchedulerConfig]
    tokenizer: ClipTokenizer
    constants: dict[str, torch.Tensor]
    sampler_defaults: dict = field(default_factory=dict)
    image_preprocess: ImagePreprocess | None = None  # with an image encoder
    # the networks it holds: the spec table's, plus the step cache's pair when it was exported with it
    specs: dict[str, NetworkSpec] = field(default_factory=dict)

    def network_path(self, network: str) -> Path:
        return self.folder / self.manifest["networks"][network]["file"]


def _read_config(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{path} cannot be read ({exc}); {layout.REEXPORT_HINT}") from None


def load_artifact(folder: str | Path) -> Artifact:
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    layout.verify_files(folder, manifest)
    configs = manifest["configs"]
    dims = _model_dims(folder / configs["model_dims"])
    specs = artifact_specs(folder, manifest, dims)
    _check_networks(folder, manifest, specs)
    schedulers = _schedulers(folder / configs["schedulers"], dims)
    constants = _constants(folder / configs["constants"], dims)
    tokenizer = ClipTokenizer(folder / configs["tokenizer"])
    if tokenizer.model_max_length != dims.text_len:
        raise UnclipError(f"{folder / configs['tokenizer']} pads to {tokenizer.model_max_length} tokens, but "
                          f"the networks were exported for {dims.text_len}; {layout.REEXPORT_HINT}")
    return Artifact(folder, manifest, dims, schedulers, tokenizer, constants, read_sampler_defaults(folder),
                    _image_preprocess(folder, configs, dims), specs)


def artifact_specs(folder: Path, manifest: dict, dims: ModelDims) -> dict[str, NetworkSpec]:
    """The spec table of `dims`, plus the step cache's two decoder networks when the manifest lists them
    (`unclip export onnx --step-cache`): their specs follow from the decoder's and the channels of
    the deep features, which only the manifest records (checked against the graphs after this)."""
    from unclip.models.step_cache import CACHED, FEATURES, cached_specs

    specs = network_specs(dims)
    present = [name for name in CACHED if name in manifest["networks"]]
    if not present:
        return specs
    where = Path(folder) / layout.MANIFEST
    if len(present) < len(CACHED):
        missing = next(name for name in CACHED if name not in present)
        raise UnclipError(f"{where}: networks has {present[0]} but not {missing}; the step cache needs both "
                          f"(`unclip export onnx --step-cache`): {layout.REEXPORT_HINT}")
    shapes = [t["shape"] for t in manifest["networks"]["decoder_full"]["outputs"] if t["name"] == FEATURES]
    channels = shapes[0][1] if shapes and len(shapes[0]) > 1 else None
    if not isinstance(channels, int) or "decoder" not in specs:
        raise UnclipError(f"{where}: networks.decoder_full has no output {FEATURES} with a fixed channel "
                          f"count; {layout.REEXPORT_HINT}")
    specs.update(cached_specs(specs["decoder"], channels))
    return specs


def _image_preprocess(folder: Path, configs: dict, dims: ModelDims) -> ImagePreprocess | None:
    """An image encoder comes with its preprocessing, whose crop is the encoder's input side."""
    name = configs.get("image_preprocess")
    if dims.image_size is None:
        return None
    if not name:
        raise UnclipError(f"{folder / layout.MANIFEST}: the artifact has an image encoder but configs "
                          f"names no image_preprocess file; {layout.REEXPORT_HINT}")
    pre = read_preprocess(folder / name, layout.REEXPORT_HINT)
    if pre.crop != dims.image_size:
        raise UnclipError(f"{folder / name}: crop {pre.crop} differs from the image encoder's input side "
                          f"{dims.image_size}; {layout.REEXPORT_HINT}")
    return pre


def _model_dims(path: Path) -> ModelDims:
    data = _read_config(path)
    try:
        _ModelDimsFile.model_validate(data)
    except ValidationError as exc:  # e.g. written by another unclip version
        raise schema_error(exc, where=f"{path}: ", fix=layout.REEXPORT_HINT, data=data) from None
    return ModelDims(**data)


def _check_networks(folder: Path, manifest: dict, specs: dict[str, NetworkSpec]) -> None:
    """The spec table names the networks and their tensors; the manifest and each ONNX file must agree."""
    where = folder / layout.MANIFEST
    unknown = sorted(set(manifest["networks"]) - set(specs))
    if unknown:
        raise UnclipError(f"{where}: networks.{unknown[0]} is not a network this unclip runs "
                          f"({', '.join(specs)}); {layout.REEXPORT_HINT}")
    for name, spec in specs.items():
        entry = layout.network_entry(manifest, folder, name)
        if entry["precision"] != manifest["precision"]:
            raise UnclipError(f"{where}: networks.{name}.precision is {entry['precision']}, the artifact's "
                              f"is {manifest['precision']}; {layout.REEXPORT_HINT}")
        wanted = _tensors(spec)
        recorded = tuple([(t["name"], t["dtype"], list(t["shape"])) for t in entry[key]]
                         for key in ("inputs", "outputs"))
        if recorded != wanted:
            raise UnclipError(f"{where}: networks.{name} {_difference(recorded, wanted)} (the spec table of "
                              f"this unclip); {layout.REEXPORT_HINT}")
        _check_graph(folder / entry["file"], spec, wanted, manifest["precision"])


def _tensors(spec: NetworkSpec) -> tuple[list, list]:
    return tuple([(t.name, t.dtype, list(t.shape)) for t in group] for group in (spec.inputs, spec.outputs))


def _difference(found: tuple[list, list], wanted: tuple[list, list]) -> str:
    """The first tensor that differs, as `inputs[1] is (name, dtype, shape), must be (...)`."""
    for kind, have, want in zip(("inputs", "outputs"), found, wanted, strict=True):
        for i in range(max(len(have), len(want))):
            a = have[i] if i < len(have) else "absent"
            b = want[i] if i < len(want) else "absent"
            if a != b:
                return f"{kind}[{i}] is {a}, must be {b}"
    return "differs"


def _check_graph(path: Path, spec: NetworkSpec, wanted: tuple[list, list], precision: str) -> None:
    """Tensor names, dtypes and shapes as the ONNX file declares them, and its weights' precision
    (an fp16 export holds float16 weights, an fp32 one none): the file is read without its weights'
    external data, so this costs one parse of the graph."""
    try:
        import onnx
    except ImportError:
        raise UnclipError("reading an exported artifact needs the onnx package: "
                          "pip install 'unclip[onnx]'") from None
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - protobuf and onnx raise many types for a bad file
        raise UnclipError(f"{path} cannot be read as ONNX ({str(exc)[:160] or type(exc).__name__}); "
                          f"{layout.REEXPORT_HINT}") from None
    weights = {init.name for init in graph.initializer}
    _check_external_data(path, graph, onnx)

    def declared(values) -> list:
        out = []
        for v in values:
            if v.name not in weights:
                t = v.type.tensor_type
                shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
                out.append((v.name, ONNX_DTYPES.get(t.elem_type, f"onnx type {t.elem_type}"), shape))
        return out

    found = (declared(graph.input), declared(graph.output))
    if found != wanted:
        raise UnclipError(f"{path}: the graph's {_difference(found, wanted)} for network {spec.name!r} (the "
                          f"spec table); it is another network's file or from another export: "
                          f"{layout.REEXPORT_HINT}")
    half = any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    if half != (precision == "fp16"):
        raise UnclipError(f"{path} holds {'float16' if half else 'float32'} weights, but the manifest says "
                          f"precision {precision}; {layout.REEXPORT_HINT}")


def _check_external_data(path: Path, graph, onnx) -> None:
    """Every weight stored outside the .onnx file must be in the artifact's own folder: ONNX Runtime
    reads an initializer's `location` as given, and a crafted file could name ../../etc/shadow or an
    absolute path (read into weights, then into images or errors)."""
    folder = path.parent.resolve()
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in init.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or target.parent != folder:
            raise UnclipError(f"{path}: weight {init.name!r} is stored at {location!r}, outside the artifact "
                              f"folder {folder}; an artifact keeps its weights next to its .onnx files "
                              f"(an artifact from elsewhere may be crafted): {layout.REEXPORT_HINT}")


def _schedulers(path: Path, dims: ModelDims) -> dict[str, SchedulerConfig]:
    data = _read_config(path)
    names = [n for n in SCHEDULER_NAMES if dims.has_prior or n != "prior_scheduler"]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UnclipError(f"{path} must map {', '.join(names)} to scheduler configs, got {got}; "
                          f"{layout.REEXPORT_HINT}")
    return {name: scheduler_config(config, f"{path} ({name})", layout.REEXPORT_HINT)
            for name, config in data.items()}


def _constants(path: Path, dims: ModelDims) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        constants = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UnclipError(f"{path} cannot be read ({exc}); {layout.REEXPORT_HINT}") from None
    for name in ("clip_mean", "clip_std") if dims.has_prior else ():  # the prior's (a variation model: none)
        tensor = constants.get(name)
        if tensor is None or tensor.numel() != dims.clip_dim or not torch.isfinite(tensor).all():
            raise UnclipError(f"{path} must hold {name}, {dims.clip_dim} finite numbers (the prior's CLIP "
                              f"statistics); {layout.REEXPORT_HINT}")
    return constants


def artifact_pipeline(folder: str | Path, backend: str, make_backend, make_runner=None, step_cache: int = 1):
    """A Pipeline over an artifact folder, its networks run by `make_backend(artifact)` (and its
    stage loops by `make_runner(backend)`, if given): what every backend that serves an export
    (onnxruntime, openvino, tensorrt) shares. `step_cache` > 1 needs an artifact exported with
    `--step-cache` (Pipeline checks the backend has the pair)."""
    from unclip.engine.pipeline import Pipeline

    folder = Path(folder)
    if not folder.is_dir():
        raise UnclipError(f"with --backend {backend}, --model must be an artifact folder made by "
                          f"`unclip export onnx --out DIR`; {str(folder)!r} is not a folder")
    artifact = load_artifact(folder)
    runtime = make_backend(artifact)
    return Pipeline(runtime, artifact.tokenizer, artifact.dims, artifact.schedulers,
                    model_name=artifact.manifest["source_model"]["name"],
                    stage_runner=make_runner(runtime) if make_runner else None,
                    sampler_defaults=artifact.sampler_defaults, image_preprocess=artifact.image_preprocess,
                    step_cache=step_cache)
