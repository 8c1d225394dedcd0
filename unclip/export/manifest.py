"""The artifact folder's format: file names, `manifest.json`, checksums, the atomic swap.

Writers (the exporters) and readers (the runtime backends) share this module, so the folder
layout is written down once. Standard library only: a serving process imports it without torch
network code, diffusers or transformers.

    DIR/
      manifest.json           what is here, how it was made, how well it matched PyTorch
      <network>.onnx          one per network in the spec table (+ <network>.onnx.data when > 2 GB)
      model_dims.json         ModelDims.to_dict(): the sizes the runtime allocates buffers from
      schedulers.json         {prior|decoder|super_res}_scheduler -> SchedulerConfig.to_dict()
      constants.safetensors   tensors the sampling loop needs itself (the prior's clip_mean / clip_std)
      tokenizer/              vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from unclip.errors import UnclipError
from unclip.folders import check_output_folder, staged_folder  # noqa: F401 (the layout's writers)

FORMAT = "unclip-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIMS = "model_dims.json"
SCHEDULERS = "schedulers.json"
CONSTANTS = "constants.safetensors"
TOKENIZER = "tokenizer"
REEXPORT_HINT = "re-run `unclip export onnx` into this folder"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(folder: Path) -> dict:
    """The manifest of an artifact folder, with the checks every backend needs before loading."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnclipError(f"artifact folder {folder} does not exist; create one with "
                          f"`unclip export onnx --model MODEL --out {folder}`")
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnclipError(f"{folder} has no {MANIFEST}: it is not an exported artifact folder; "
                          f"{REEXPORT_HINT}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnclipError(f"{path} is not valid JSON ({exc}); {REEXPORT_HINT}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UnclipError(f"{path} is not an unclip ONNX manifest (format {FORMAT!r}); {REEXPORT_HINT}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UnclipError(f"{path} has format_version {manifest.get('format_version')!r}, this unclip "
                          f"reads {FORMAT_VERSION}; {REEXPORT_HINT}")
    return manifest


def network_entry(manifest: dict, folder: Path, network: str) -> dict:
    entry = manifest.get("networks", {}).get(network)
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
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


def verify_files(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists (networks, their external data, configs, tokenizer)."""
    for relative, digest in manifest.get("files", {}).items():
        verify_file(folder, relative, digest)


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, keyed by POSIX relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
