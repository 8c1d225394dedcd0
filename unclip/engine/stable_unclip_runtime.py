"""Stable unCLIP from an export folder (`unclip export onnx --model <Stable unCLIP>`): the same pipeline
(engine/stable_unclip.py) with its networks run by ONNX Runtime or OpenVINO instead of torch, or by the
TensorRT engines `unclip export tensorrt` built from an fp16 export (never run: no TensorRT here).

The folder is checked against its manifest first (every file's sha256), so a damaged or hand-edited
export is refused with the file's name rather than failing inside a runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from unclip.errors import UnclipError

RUNTIMES = ("onnxruntime", "openvino", "tensorrt")


class StableExportBackend:
    """The exported networks, each an ONNX Runtime session or an OpenVINO compiled model (the Backend
    protocol)."""

    def __init__(self, folder: Path, runtime: str, manifest: dict, dims, constants: dict):
        from unclip.engine.stable_unclip import stable_specs

        self.name, self.device, self.dims = runtime, torch.device("cpu"), dims
        self.specs = {name: spec for name, spec in stable_specs(dims).items() if name in manifest["networks"]}
        self._constants = constants
        self._run = {}
        for name in self.specs:
            path = folder / manifest["networks"][name]["file"]
            try:
                self._run[name] = _onnxruntime(path) if runtime == "onnxruntime" else _openvino(path)
            except Exception as exc:  # noqa: BLE001 - each runtime raises its own types
                raise UnclipError(
                    f"{runtime} cannot load {path} ({str(exc).strip().splitlines()[0]}); re-run "
                    "`unclip export onnx` into this folder"
                ) from None

    def run(self, network: str, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[network]
        feeds = {name: inputs[name].contiguous().numpy() for name in spec.input_names}
        outputs = self._run[network](spec.output_names, feeds)
        return {name: torch.from_numpy(out) for name, out in zip(spec.output_names, outputs, strict=True)}

    def constants(self) -> dict[str, torch.Tensor]:
        return self._constants


def _onnxruntime(path: Path):
    import onnxruntime as ort

    from unclip.engine.backends.onnxruntime_backend import session_options

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return lambda names, feeds: session.run(names, feeds)


def _openvino(path: Path):
    from unclip.engine.backends.openvino_backend import COMPILE_CONFIG, import_openvino

    ov = import_openvino()
    core = ov.Core()
    request = core.compile_model(
        core.read_model(str(path)), "CPU", {**COMPILE_CONFIG, "INFERENCE_PRECISION_HINT": "f32"}
    ).create_infer_request()

    def run(names, feeds):
        result = request.infer(feeds, share_inputs=True)
        return [result[name].copy() for name in names]

    return run


def stable_export(folder: str | Path) -> tuple[Path, dict, object, dict]:
    """(folder, manifest, dims, specs of the networks it holds) of an export folder, its manifest checked
    against its schema and every file against its sha256 (unclip/export/manifest.py)."""
    from unclip.engine.stable_unclip import StableDims, stable_specs
    from unclip.export import manifest as layout
    from unclip.export.stable_unclip_onnx import RUNTIME

    folder = Path(folder)
    manifest = layout.read_manifest(folder)
    layout.verify_files(folder, manifest)
    dims = StableDims(**json.loads((folder / RUNTIME).read_text())["dims"])
    return folder, manifest, dims, {n: s for n, s in stable_specs(dims).items() if n in manifest["networks"]}


def load_stable_export(
    folder: str | Path, runtime: str = "onnxruntime", device: str = "cpu", cuda_graphs: bool = False
):
    """A StableUnclipPipeline over an export folder, its networks run by `runtime`: ONNX Runtime or
    OpenVINO on the CPU, or the TensorRT engines `unclip export tensorrt` built into it (on the GPU;
    `cuda_graphs` replays each prior/UNet engine call from a CUDA graph, engine/network_graphs.py)."""
    from pydantic import TypeAdapter
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from unclip.engine.image_input import ImagePreprocess
    from unclip.engine.sd_schedulers import SamplerConfig
    from unclip.engine.stable_unclip import StableDims, StableUnclipPipeline
    from unclip.export import manifest as layout
    from unclip.export.stable_unclip_onnx import CONSTANTS, RUNTIME

    folder = Path(folder)
    if runtime not in RUNTIMES:
        raise UnclipError(
            f"--backend {runtime} does not run Stable unCLIP exports; use onnxruntime, openvino or tensorrt"
        )
    if (runtime == "tensorrt") != str(device).startswith("cuda") or (cuda_graphs and runtime != "tensorrt"):
        raise UnclipError(
            f"--backend {runtime} with --device {device}{' --cuda-graphs' if cuda_graphs else ''}: Stable "
            "unCLIP exports run on the CPU with onnxruntime/openvino, on the GPU with tensorrt (its "
            "engines, `unclip export tensorrt`; --cuda-graphs there)"
        )
    manifest = json.loads((folder / layout.MANIFEST).read_text())
    found = layout.checksums(folder)
    for file, digest in manifest["files"].items():
        if found.get(file) != digest:
            raise UnclipError(
                f"{folder / file} is {'missing' if file not in found else 'changed'} since the "
                "export (its sha256 is in manifest.json); re-run `unclip export onnx`"
            )
    config = json.loads((folder / RUNTIME).read_text())
    dims = StableDims(**config["dims"])
    tensors = load_file(folder / CONSTANTS)
    constants = {k: v for k, v in tensors.items() if k.startswith("clip_")}
    if runtime == "tensorrt":
        from unclip.engine.backends.tensorrt_backend import TensorRTBackend
        from unclip.engine.stable_unclip import STEP_NETWORKS

        _, manifest, _, specs = stable_export(folder)  # schema-checked, with the engines recorded
        artifact = SimpleNamespace(
            folder=folder, manifest=manifest, specs=specs, dims=dims, constants=constants
        )
        backend = TensorRTBackend(artifact, device)
        if cuda_graphs:
            from unclip.engine.network_graphs import GraphedBackend

            backend = GraphedBackend(backend, STEP_NETWORKS)
    else:
        backend = StableExportBackend(folder, runtime, manifest, dims, constants)
    text = config["layout"] == "text"
    components = SimpleNamespace(
        layout=config["layout"],
        name=config["name"],
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        prior_tokenizer=CLIPTokenizer.from_pretrained(folder / "prior_tokenizer") if text else None,
        scheduler=config["scheduler"],
        noising=SamplerConfig.from_dict(config["noising"]),
        prior_scheduler=SamplerConfig.from_dict(config["prior_scheduler"]) if text else None,
        normalizer_mean=tensors["normalizer_mean"],
        normalizer_std=tensors["normalizer_std"],
        image_preprocess=None
        if config["image_preprocess"] is None
        else TypeAdapter(ImagePreprocess).validate_json(json.dumps(config["image_preprocess"]), strict=True),
    )
    return StableUnclipPipeline(backend, components)
