"""`unclip export onnx`: a loadable model -> a self-contained folder of validated ONNX networks.

Per network, in the order data flows: trace through its adapter (names, dtypes and dynamic axes
from the spec table) -> clean the graph (onnxsim) -> optionally convert to fp16 -> list its
operators and those TensorRT cannot parse -> save (external data past 2 GB) -> validate against
PyTorch at each batch size. Then the runtime's configs, checksums and the manifest. Everything is
written into a temporary sibling of DIR, which replaces DIR only when all of it succeeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from unclip.engine.settings import write_sampler_defaults
from unclip.errors import UnclipError
from unclip.export import manifest as layout
from unclip.export.fp16 import FRAGILE_OPS
from unclip.export.onnx_trace import EXTERNAL_DATA_BYTES, dynamic_axes
from unclip.export.tensorrt_ops import MAX_OPSET, TABLE_SOURCE
from unclip.export.validation import TOLERANCE

log = logging.getLogger("unclip")

PRECISIONS = ("fp32", "fp16")
MIN_OPSET = 14  # Trilu (the text encoder's causal mask) exists from opset 14
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17: one node, one fp32 island in fp16
DEFAULT_BATCH_SIZES = (1, 4)
TOOLS = ("unclip", "torch", "onnx", "onnxruntime", "onnxsim", "onnxconverter-common", "diffusers",
         "transformers", "tokenizers")


def check_export_args(precision: str, opset: int, batch_sizes: tuple[int, ...] | list[int]) -> None:
    """User input, checked before any model is loaded."""
    if precision not in PRECISIONS:
        raise UnclipError(f"--precision {precision!r} is not supported: choose fp32 or fp16")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnclipError(f"--opset {opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (Trilu needs "
                          f"{MIN_OPSET}; TensorRT 10's parser and torch's TorchScript exporter stop at "
                          f"{MAX_OPSET}); default {DEFAULT_OPSET}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UnclipError(f"--batch-sizes {list(batch_sizes)} must be positive integers, e.g. 1,4")


def export_onnx(model: str | Path, out: str | Path, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                batch_sizes: tuple[int, ...] | list[int] = DEFAULT_BATCH_SIZES, allow_pickle: bool = False,
                seed: int = 0, external_data_bytes: int = EXTERNAL_DATA_BYTES,
                step_cache: bool = False) -> dict:
    """Export every network of `model` (a checkpoint folder or a preset) into `out`; returns the manifest.
    `step_cache` also exports the step cache's decoder pair, decoder_full and decoder_shallow
    (unclip.models.step_cache), so the exported model can run with `step_cache=N`."""
    from unclip.models import load_model
    from unclip.models.networks import adapters, model_dims
    from unclip.specs import network_specs

    check_export_args(precision, opset, batch_sizes)
    out = Path(out)
    layout.check_output_folder(out)
    components = load_model(model, allow_pickle=allow_pickle, seed=seed)
    dims = model_dims(components)
    specs = network_specs(dims)
    modules = adapters(components)
    if step_cache:
        add_step_cache_pair(components, specs, modules)
    with layout.staged_folder(out) as tmp:
        networks = {}
        for i, (name, spec) in enumerate(specs.items(), 1):
            log.info("exporting %s (%d/%d, %s, opset %d)", name, i, len(specs), precision, opset)
            networks[name] = export_network(modules[name], spec, dims, tmp, precision, opset,
                                            list(batch_sizes), external_data_bytes)
        write_runtime_files(tmp, components, dims)
        files = layout.checksums(tmp)
        for entry in networks.values():
            entry["sha256"] = files[entry["file"]]
            if entry["external_data"]:
                entry["external_data"]["sha256"] = files[entry["external_data"]["file"]]
        manifest = {
            "format": layout.FORMAT, "format_version": layout.FORMAT_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "precision": precision, "opset": opset,
            "source_model": {"name": components.name, "weights_sha256": weights_sha256(components)},
            "tools": tool_versions(),
            "validation": {"batch_sizes": list(batch_sizes), "tolerance": TOLERANCE[precision],
                           "rule": "max_abs <= tolerance * max(1, max|torch|); "
                                   "max_rel = max_abs / max|torch|"},
            "tensorrt_table": TABLE_SOURCE,
            "configs": {"model_dims": layout.MODEL_DIMS, "schedulers": layout.SCHEDULERS,
                        "constants": layout.CONSTANTS, "tokenizer": layout.TOKENIZER,
                        **({"image_preprocess": layout.IMAGE_PREPROCESS}
                           if components.image_preprocess else {})},
            "networks": networks,
            "files": files,
        }
        layout.write_manifest(tmp, manifest)
        from unclip.engine.artifact import load_artifact

        load_artifact(tmp)  # the runtime must accept what we wrote: schema, hashes, tensors, precision
    log.info("wrote %s", out)
    return manifest


def add_step_cache_pair(components, specs: dict, modules: dict) -> None:
    """The step cache's two networks, built on the decoder's own adapter (the same weights), and their
    specs; a decoder with one level has no deep part to cache: a one-line error before any export."""
    from unclip.models.step_cache import cached_adapters, cached_specs, feature_channels

    try:
        channels = feature_channels(components.decoder)
    except ValueError:
        levels = len(components.decoder.config.block_out_channels)
        raise UnclipError(f"--step-cache needs a decoder UNet with more than one level, and "
                          f"{components.name}'s has {levels} (nothing deeper to cache): export without "
                          "--step-cache") from None
    modules.update(cached_adapters(modules["decoder"]))
    specs.update(cached_specs(specs["decoder"], channels))


def export_network(module: torch.nn.Module, spec, dims, folder: Path, precision: str, opset: int,
                   batch_sizes: list[int], external_data_bytes: int) -> dict:
    from unclip.export.fp16 import to_fp16
    from unclip.export.graph_cleanup import clean_graph
    from unclip.export.onnx_trace import save_network, stamp_io_shapes, trace_network
    from unclip.export.tensorrt_ops import operator_types, tensorrt_unsupported_ops
    from unclip.export.validation import validate

    graph = clean_graph(trace_network(module, spec, dims, opset), spec.name)
    if precision == "fp16":
        graph = to_fp16(graph)
    graph = stamp_io_shapes(graph, spec)
    operators, unsupported = operator_types(graph), tensorrt_unsupported_ops(graph)
    files = save_network(graph, folder / f"{spec.name}.onnx", external_data_bytes)
    del graph  # large models: the weights now live on disk
    errors = validate(module, str(folder / files[0]), spec, dims, batch_sizes, precision)
    return {
        "file": files[0],
        "sha256": None,  # filled in once every file is written
        "external_data": {"file": files[1], "sha256": None} if len(files) > 1 else None,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs],
        "dynamic_axes": {name: {str(i): axis for i, axis in axes.items()}  # JSON keys are strings
                         for name, axes in dynamic_axes(spec).items()},
        "opset": opset,
        "precision": precision,
        "fp32_ops": FRAGILE_OPS + ["timestep embedding"] if precision == "fp16" else None,
        "validation": errors,
        "operators": operators,
        "tensorrt_unsupported_ops": unsupported,
    }


def write_runtime_files(folder: Path, components, dims) -> None:
    """What the sampling loop needs besides the networks: sizes, schedules, CLIP statistics, tokenizer,
    and with an image encoder its preprocessing."""
    from safetensors.torch import save_file

    from unclip.engine.tokenizer import ClipTokenizer
    from unclip.models.checkpoint import _write_tokenizer_files

    (folder / layout.MODEL_DIMS).write_text(json.dumps(dims.to_dict(), indent=2) + "\n")
    schedulers = {name: config.to_dict() for name, config in components.schedulers.items()}
    (folder / layout.SCHEDULERS).write_text(json.dumps(schedulers, indent=2) + "\n")
    write_sampler_defaults(folder, components.sampler_defaults)  # the model's defaults serve from here too
    prior = components.prior  # a variation-only model has none, and no CLIP statistics
    save_file({} if prior is None else {"clip_mean": prior.clip_mean.detach().float().cpu().contiguous(),
                                        "clip_std": prior.clip_std.detach().float().cpu().contiguous()},
              folder / layout.CONSTANTS)
    if components.image_preprocess is not None:
        preprocess = components.image_preprocess.to_dict()
        (folder / layout.IMAGE_PREPROCESS).write_text(json.dumps(preprocess, indent=2) + "\n")
    tokenizer = folder / layout.TOKENIZER
    components.tokenizer.save_pretrained(tokenizer)
    _write_tokenizer_files(components.tokenizer, tokenizer)  # vocab.json + merges.txt, as Karlo ships
    ClipTokenizer(tokenizer)  # the runtime must be able to read what we wrote


def weights_sha256(components) -> str:
    """One digest over every network's tensors (name, dtype, shape, bytes) in a fixed order, so a
    preset and its saved checkpoint folder hash the same."""
    digest = hashlib.sha256()
    for net_name, net in components.networks().items():
        for key, tensor in sorted(net.state_dict().items()):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{net_name}.{key}:{t.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in TOOLS:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions
