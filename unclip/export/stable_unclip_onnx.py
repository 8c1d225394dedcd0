"""`unclip export onnx` for Stable unCLIP models: its networks (the prior's text encoder and prior, or the
CLIP image encoder; the UNet's text encoder, the latent UNet with its class-embedding input, the VAE
decoder) traced, cleaned and validated against torch exactly as Karlo's (export/onnx_export.py), into a
folder with the runtime's files: sizes, the samplers' configs, the image normaliser's and the prior's
statistics, tokenizers and the image preprocessing. ONNX Runtime and OpenVINO run it
(engine/stable_unclip_runtime.py); `--precision fp16` writes the fp16 graphs with fp32 islands that
`unclip export tensorrt` builds engines from, as for Karlo.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from unclip.export import manifest as layout
from unclip.export.onnx_trace import EXTERNAL_DATA_BYTES
from unclip.export.validation import TOLERANCE

log = logging.getLogger("unclip")

FAMILY = "stable-unclip"
FORMAT = layout.STABLE_FORMAT
FORMAT_VERSION = 1
RUNTIME = "stable_unclip.json"  # layout, sizes, samplers
CONSTANTS = "constants.safetensors"  # normaliser mean/std, the prior's CLIP statistics
TOKENIZERS = ("tokenizer", "prior_tokenizer")


def export_stable_onnx(
    model,
    out: str | Path,
    precision: str = "fp32",
    opset: int = 17,
    batch_sizes: tuple[int, ...] | list[int] = (1, 4),
    seed: int = 0,
) -> dict:
    """Every network of a Stable unCLIP model (folder, preset or components) into `out`; the manifest."""
    from unclip.engine.stable_unclip import StableTorchBackend
    from unclip.export.onnx_export import export_network, tool_versions, weights_sha256
    from unclip.models.stable_unclip import load_stable_components

    out = Path(out)
    layout.check_output_folder(out)
    components = load_stable_components(model, seed)
    torch_backend = StableTorchBackend(components)
    dims, specs = torch_backend.dims, torch_backend.specs
    with layout.staged_folder(out) as tmp:
        networks = {}
        for i, (name, spec) in enumerate(specs.items(), 1):
            log.info("exporting %s (%d/%d, %s, opset %d)", name, i, len(specs), precision, opset)
            networks[name] = export_network(
                torch_backend.networks[name],
                spec,
                dims,
                tmp,
                precision,
                opset,
                list(batch_sizes),
                EXTERNAL_DATA_BYTES,
            )
        write_runtime_files(tmp, components, dims, torch_backend.constants())
        files = layout.checksums(tmp)
        for entry in networks.values():
            entry["sha256"] = files[entry["file"]]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": FAMILY,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": precision,
            "opset": opset,
            "source_model": {
                "name": components.name,
                "layout": components.layout,
                "weights_sha256": weights_sha256(components),
            },
            "tools": tool_versions(),
            "validation": {
                "batch_sizes": list(batch_sizes),
                "tolerance": TOLERANCE[precision],
                "rule": "max_abs <= tolerance * max(1, max|torch|)",
            },
            "networks": networks,
            "files": files,
        }
        layout.write_manifest(tmp, manifest)
    log.info("wrote %s", out)
    return manifest


def write_runtime_files(folder: Path, components, dims, prior_constants: dict) -> None:
    from safetensors.torch import save_file

    from unclip.models.stable_unclip import _sampler_dict

    runtime = {
        "layout": components.layout,
        "name": components.name,
        "dims": asdict(dims),
        "scheduler": components.scheduler,
        "noising": _sampler_dict(components.noising),
        "prior_scheduler": None
        if components.prior_scheduler is None
        else _sampler_dict(components.prior_scheduler),
        "image_preprocess": None
        if components.image_preprocess is None
        else components.image_preprocess.to_dict(),
    }
    (folder / RUNTIME).write_text(json.dumps(runtime, indent=2) + "\n")
    tensors = {
        "normalizer_mean": components.normalizer_mean,
        "normalizer_std": components.normalizer_std,
        **prior_constants,
    }
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, folder / CONSTANTS)
    components.tokenizer.save_pretrained(folder / "tokenizer")
    if components.prior_tokenizer is not None:
        components.prior_tokenizer.save_pretrained(folder / "prior_tokenizer")


def is_stable_artifact(folder) -> bool:
    try:
        return json.loads((Path(folder) / layout.MANIFEST).read_text()).get("family") == FAMILY
    except (OSError, ValueError, AttributeError):
        return False
