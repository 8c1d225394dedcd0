"""Which engine fits: engine file names, their manifest entries, and missing/stale/foreign checks.

A TensorRT engine is only valid for the ONNX file it was built from, its precision and batch
profile, the GPU model and compute capability it was tuned on, and the exact TensorRT version
that built it. All of these are in the file name and in the artifact manifest, under "tensorrt":

    DIR/engines/<network>.<precision>.b<min>-<opt>-<max>.<gpu>-sm<cc>.trt<version>.<onnx sha[:12]>.engine

so a file is never mistaken for another build, and one whose ONNX file changed is never picked
up. The manifest lists one engine per network; building for another GPU (--rebuild) replaces it.
Standard library only (a serving process imports it without torch network code).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from unclip.errors import UnclipError
from unclip.export import manifest as layout
from unclip.folders import write_file_atomic

ENGINES = "engines"
SECTION = "tensorrt"


@dataclass(frozen=True)
class Target:
    """The machine an engine is built for: what TensorRT engines are not portable across."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str

    def describe(self) -> str:
        major, minor = self.compute_capability
        return f"{self.gpu_name} (sm_{major}{minor}) with TensorRT {self.tensorrt_version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_capability": list(self.compute_capability)}


def current_target(device_index: int | None = None) -> Target:
    """The GPU (default: the current one) and TensorRT; refuses with the missing piece named."""
    import torch

    from unclip.export.tensorrt_build import import_tensorrt

    if not torch.cuda.is_available():
        raise UnclipError("TensorRT engines need a CUDA GPU, and this torch build sees none "
                          "(torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU "
                          "and a CUDA build of torch, or use --backend onnxruntime")
    trt = import_tensorrt()
    if device_index is None:
        device_index = torch.cuda.current_device()
    capability = tuple(torch.cuda.get_device_capability(device_index))
    return Target(torch.cuda.get_device_name(device_index), capability, trt.__version__)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


def engine_file(network: str, precision: str, profile_tag: str, onnx_sha256: str, target: Target) -> str:
    major, minor = target.compute_capability
    return (f"{ENGINES}/{network}.{precision}.{profile_tag}.{_slug(target.gpu_name)}-sm{major}{minor}"
            f".trt{target.tensorrt_version}.{onnx_sha256[:12]}.engine")


def engine_entry(network: str, precision: str, profile: dict, onnx_sha256: str, target: Target,
                 engine_sha256: str, build: dict) -> dict:
    """What the manifest records of one engine (file relative to the artifact folder)."""
    tag = f"b{profile['min']}-{profile['opt']}-{profile['max']}"
    return {"file": engine_file(network, precision, tag, onnx_sha256, target), "sha256": engine_sha256,
            "onnx_sha256": onnx_sha256, "precision": precision, "profile": dict(profile),
            "target": target.to_dict(), "build": dict(build)}


def engine_entries(manifest: dict) -> dict[str, dict]:
    return manifest.get(SECTION, {}).get("engines", {})


def record_engines(folder: Path, entries: dict[str, dict]) -> dict:
    """Merge `entries` (network -> entry) into DIR/manifest.json, written atomically; returns it."""
    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    manifest.setdefault(SECTION, {}).setdefault("engines", {}).update(entries)
    write_file_atomic(folder / layout.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    os.chmod(folder / layout.MANIFEST, 0o644)  # as the export wrote it (a temporary file is 0600)
    return manifest


def engine_problem(folder: Path, manifest: dict, network: str, precision: str, target: Target,
                   profile: dict | None = None, check_file: bool = True) -> str | None:
    """Why the recorded engine of `network` cannot be used here, or None when it can. `profile`,
    when given, is the one asked for now (the export command); the runtime accepts any."""
    entry = engine_entries(manifest).get(network)
    if entry is None:
        return f"{network}: no TensorRT engine has been built"
    onnx_sha = manifest["networks"][network]["sha256"]
    if entry.get("onnx_sha256") != onnx_sha:
        built_from = str(entry.get("onnx_sha256"))[:12]
        return (f"{network}: the engine is stale, built from ONNX sha256 {built_from}... "
                f"but {manifest['networks'][network]['file']} is now {onnx_sha[:12]}...")
    if entry.get("precision") != precision:
        return f"{network}: the engine is {entry.get('precision')}, {precision} was asked for"
    built = Target(entry["target"]["gpu_name"], tuple(entry["target"]["compute_capability"]),
                   entry["target"]["tensorrt_version"])
    if built.tensorrt_version != target.tensorrt_version:
        return (f"{network}: the engine was built with TensorRT {built.tensorrt_version}, this machine has "
                f"TensorRT {target.tensorrt_version} (engines only load in the version that built them)")
    if (built.gpu_name, built.compute_capability) != (target.gpu_name, target.compute_capability):
        return (f"{network}: the engine was built for another GPU, {built.describe()}; this machine has "
                f"{target.describe()}")
    if profile is not None and entry.get("profile") != profile:
        return f"{network}: the engine's batch profile is {entry.get('profile')}, {profile} was asked for"
    if check_file:
        path = Path(folder) / entry["file"]
        if not path.is_file():
            return f"{network}: the engine file {entry['file']} listed in the manifest is missing"
        if layout.sha256_file(path) != entry["sha256"]:
            return f"{network}: the engine file {entry['file']} does not match its sha256 in the manifest"
    return None


def rebuild_hint(folder: Path) -> str:
    return f"build engines for this machine with `unclip export tensorrt --artifacts {folder} --rebuild`"


def require_engines(folder: Path, manifest: dict, networks: list[str], precision: str,
                    target: Target) -> dict[str, Path]:
    """network -> engine path for the runtime, or one error naming every engine that cannot be used."""
    problems = [p for n in networks if (p := engine_problem(folder, manifest, n, precision, target))]
    if problems:
        raise UnclipError(f"{'; '.join(problems)}; {rebuild_hint(folder)}")
    return {n: Path(folder) / engine_entries(manifest)[n]["file"] for n in networks}


def timing_cache_file(folder: Path, target: Target) -> Path:
    """Default timing cache: tactic timings are only valid for one GPU model and TensorRT version."""
    major, minor = target.compute_capability
    name = f"timing.{_slug(target.gpu_name)}-sm{major}{minor}.trt{target.tensorrt_version}.cache"
    return Path(folder) / ENGINES / name


def plan_builds(folder: Path, manifest: dict, profiles: dict[str, dict], precision: str, target: Target,
                rebuild: bool) -> tuple[list[str], list[str]]:
    """(networks to build, networks whose engine is up to date). Without --rebuild a stale or foreign
    engine is refused, naming the cause, rather than silently replaced."""
    build, current, refused = [], [], []
    for network, profile in profiles.items():
        problem = engine_problem(folder, manifest, network, precision, target, profile)
        if problem is None and not rebuild:
            current.append(network)
        elif problem is None or rebuild or network not in engine_entries(manifest):
            build.append(network)
        else:
            refused.append(problem)
    if refused:
        raise UnclipError(f"{'; '.join(refused)}; add --rebuild to replace these engines")
    return build, current
