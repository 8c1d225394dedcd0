"""The artifact folder's format: file names, `manifest.json` and its schema, checksums, the atomic swap.

Writers (the exporters) and readers (the runtime backends) share this module, so the folder
layout is written down once. It imports no torch network code, diffusers or transformers: a
serving process reads manifests with the standard library and pydantic.

    DIR/
      manifest.json           what is here, how it was made, how well it matched PyTorch
      <network>.onnx          one per network in the spec table (+ <network>.onnx.data when > 2 GB);
                              with `--step-cache` also decoder_full.onnx and decoder_shallow.onnx
      model_dims.json         ModelDims.to_dict(): the sizes the runtime allocates buffers from
      schedulers.json         {prior|decoder|super_res}_scheduler -> SchedulerConfig.to_dict()
      constants.safetensors   tensors the sampling loop needs itself (the prior's clip_mean / clip_std)
      tokenizer/              vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
      sampler_defaults.json   optional: the model's own sampler defaults
      image_preprocess.json   with an image encoder: how images reach it (engine.image_input.ImagePreprocess)

A manifest is checked against the schema below before any other file is opened; then every file
a runtime reads must be listed in `files` (inside the folder, no link leading out) and match its
sha256. docs/onnx.md and docs/validation.md describe each key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from unclip.errors import UnclipError, schema_error
from unclip.folders import check_output_folder, staged_folder  # noqa: F401 (the layout's writers)

FORMAT = "unclip-onnx"
FORMAT_VERSION = 1
STABLE_FORMAT = "unclip-stable-unclip-onnx"  # the second family's export (export/stable_unclip_onnx.py)
MANIFEST = "manifest.json"
MODEL_DIMS = "model_dims.json"
SCHEDULERS = "schedulers.json"
CONSTANTS = "constants.safetensors"
TOKENIZER = "tokenizer"
SAMPLER_DEFAULTS = "sampler_defaults.json"  # the same name as engine.settings.SAMPLER_DEFAULTS
IMAGE_PREPROCESS = "image_preprocess.json"
# what the runtime's tokenizer reads (vocab.json and merges.txt are required)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.json")
REEXPORT_HINT = "re-run `unclip export onnx` into this folder"


# -- the schema ------------------------------------------------------------------------------------

def _inside(path: str) -> str:
    """A file of the folder: relative, POSIX, normalised, no way out ('..', an absolute path)."""
    pure = PurePosixPath(path)
    if (not path or "\\" in path or pure.is_absolute() or ".." in pure.parts or pure.as_posix() != path
            or ":" in path):
        raise ValueError("must be a relative path inside the artifact folder (no '..', no absolute path)")
    return path


RelativePath = Annotated[str, AfterValidator(_inside)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Precision = Literal["fp32", "fp16"]


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TensorEntry(_Schema):
    name: str
    dtype: Literal["float32", "float16", "int64", "bool"]
    shape: list[Annotated[int, Field(ge=1)] | str]  # a string is a dynamic axis


class FileEntry(_Schema):
    file: RelativePath
    sha256: Sha256


class OutputError(_Schema):
    max_abs: float
    max_rel: float
    max_torch: float


class NetworkEntry(_Schema):
    file: RelativePath
    sha256: Sha256
    external_data: FileEntry | None
    inputs: list[TensorEntry] = Field(min_length=1)
    outputs: list[TensorEntry] = Field(min_length=1)
    dynamic_axes: dict[str, dict[str, str]]
    opset: Annotated[int, Field(ge=1)]
    precision: Precision
    fp32_ops: list[str] | None
    validation: dict[str, dict[str, OutputError]]  # batch size -> output -> errors
    operators: list[str]
    tensorrt_unsupported_ops: list[str]


class SourceModel(_Schema):
    name: str
    weights_sha256: Sha256


class ExportValidation(_Schema):
    batch_sizes: list[Annotated[int, Field(ge=1)]]
    tolerance: Annotated[float, Field(gt=0)]
    rule: str


class Configs(_Schema):
    model_dims: RelativePath
    schedulers: RelativePath
    constants: RelativePath
    tokenizer: RelativePath
    image_preprocess: RelativePath | None = None  # present when the model has an image encoder


class _Open(BaseModel):
    """The TensorRT section belongs to the engine builder; only what the runtime reads is checked."""

    model_config = ConfigDict(strict=True, extra="allow")


class EngineTarget(_Open):
    gpu_name: str
    compute_capability: list[int] = Field(min_length=2, max_length=2)
    tensorrt_version: str


class EngineEntry(_Open):
    file: RelativePath
    sha256: Sha256
    onnx_sha256: Sha256
    precision: Precision
    profile: dict[str, int]
    target: EngineTarget


class TensorRTSection(_Open):
    engines: dict[str, EngineEntry] = {}


class _ExportManifest(_Schema):
    """What every export's manifest has: the networks, their files and checks, the engines built."""

    model_config = ConfigDict(strict=True, extra="allow")  # a later writer's extra sections are ignored

    format_version: Literal[1]
    created: str
    precision: Precision
    opset: Annotated[int, Field(ge=1)]
    tools: dict[str, str]
    validation: ExportValidation
    networks: dict[str, NetworkEntry] = Field(min_length=1)
    files: dict[RelativePath, Sha256]
    tensorrt: TensorRTSection | None = None


class Manifest(_ExportManifest):
    format: Literal["unclip-onnx"]
    source_model: SourceModel
    tensorrt_table: str
    configs: Configs


class StableSourceModel(_Schema):
    name: str
    layout: Literal["text", "image"]
    weights_sha256: Sha256


class StableManifest(_ExportManifest):
    """A Stable unCLIP export's manifest: its own runtime files (all listed in `files`)."""

    format: Literal["unclip-stable-unclip-onnx"]
    family: Literal["stable-unclip"]
    source_model: StableSourceModel


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: Path) -> dict:
    """The manifest of an artifact folder, checked against the schema before any other file is
    opened: required keys, types, paths inside the folder, each network's own file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnclipError(f"artifact folder {folder} does not exist; create one with "
                          f"`unclip export onnx --model MODEL --out {folder}`")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UnclipError(f"{folder} has no {MANIFEST}: it is not an exported artifact folder; "
                          f"{REEXPORT_HINT}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{path} is not valid JSON ({exc}); {REEXPORT_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, STABLE_FORMAT):
        raise UnclipError(f"{path} is not an unclip ONNX manifest (format {FORMAT!r}); {REEXPORT_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UnclipError(f"{path} has format_version {manifest.get('format_version')!r}, this unclip "
                          f"reads {FORMAT_VERSION}; {REEXPORT_HINT}")
    try:
        (StableManifest if manifest["format"] == STABLE_FORMAT else Manifest).model_validate(manifest)
    except ValidationError as exc:
        raise schema_error(exc, where=f"{path}: ", fix=REEXPORT_HINT, data=manifest) from None
    for name, entry in manifest["networks"].items():
        own = {"file": f"{name}.onnx", "external_data": f"{name}.onnx.data"}
        for key, wanted in own.items():
            given = entry[key]["file"] if key == "external_data" and entry[key] else entry[key]
            if given is not None and given != wanted:
                raise UnclipError(f"{path}: networks.{name}.{key} is {given!r}, but a network is read from "
                                  f"its own file, {wanted!r}; {REEXPORT_HINT}")
    return manifest


def network_entry(manifest: dict, folder: Path, network: str) -> dict:
    entry = manifest["networks"].get(network)
    if entry is None:
        raise UnclipError(f"{Path(folder) / MANIFEST} has no entry for network {network!r}; {REEXPORT_HINT}")
    return entry


def verify_file(folder: Path, relative: str, expected_sha256: str) -> Path:
    """A missing, corrupt or swapped file is named here, never met later inside a runtime."""
    path = Path(folder) / relative
    if not path.is_file():
        raise UnclipError(f"{path} is listed in {MANIFEST} but missing; {REEXPORT_HINT}")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise UnclipError(f"{path} does not match its sha256 in {MANIFEST} (file {actual[:12]}..., "
                          f"manifest {expected_sha256[:12]}...): it is corrupt or from another export; "
                          f"{REEXPORT_HINT}")
    return path


def runtime_files(folder: Path, manifest: dict) -> list[str]:
    """Every file a runtime reads (relative paths): each network's file and external data, the
    configs, the tokenizer's files, the model's sampler defaults."""
    if manifest["format"] == STABLE_FORMAT:  # its export lists every file it wrote, each read at load
        return list(manifest["files"])
    files = []
    for entry in manifest["networks"].values():
        files.append(entry["file"])
        if entry["external_data"]:
            files.append(entry["external_data"]["file"])
    configs = manifest["configs"]
    files += [configs["model_dims"], configs["schedulers"], configs["constants"]]
    if configs.get("image_preprocess"):
        files.append(configs["image_preprocess"])
    tokenizer = PurePosixPath(configs["tokenizer"])
    files += [(tokenizer / name).as_posix() for name in TOKENIZER_FILES
              if name in ("vocab.json", "merges.txt") or (Path(folder) / tokenizer / name).exists()]
    if (Path(folder) / SAMPLER_DEFAULTS).exists():
        files.append(SAMPLER_DEFAULTS)
    return files


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file a runtime reads is listed in `files`, lies inside the folder (no link leading
    out), and matches its sha256; each network's own sha256 agrees with `files`."""
    folder = Path(folder)
    listed = manifest["files"]
    for relative in runtime_files(folder, manifest):
        if relative not in listed:
            raise UnclipError(f"{folder / MANIFEST}: {relative} is read by the runtime but not listed in "
                              f"`files`, so it cannot be checked; {REEXPORT_HINT}")
    for name, entry in manifest["networks"].items():
        for key, item in (("sha256", entry), ("external_data.sha256", entry["external_data"])):
            if item and listed.get(item["file"]) != item["sha256"]:
                raise UnclipError(f"{folder / MANIFEST}: networks.{name}.{key} disagrees with `files` for "
                                  f"{item['file']}; {REEXPORT_HINT}")
    engines = [e["file"] for e in ((manifest.get("tensorrt") or {}).get("engines") or {}).values()]
    root = folder.resolve()
    for relative in [*listed, *engines]:
        path = folder / relative
        if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(root):
            raise UnclipError(f"{path} leads outside the artifact folder (a link to {path.resolve()}); "
                              f"an artifact reads only its own files: {REEXPORT_HINT}")
    for relative, digest in listed.items():
        verify_file(folder, relative, digest)


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by POSIX relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
