"""unclip: an inference engine for unCLIP (DALL-E 2 / Karlo) text-to-image models."""

from __future__ import annotations

from pathlib import Path

from unclip.errors import UnclipError

__version__ = "0.1.0"
__all__ = ["UnclipError", "load", "__version__"]

BACKENDS = ("torch", "onnxruntime")


def load(model: str | Path = "tiny", backend: str = "torch", device: str = "cpu",
         allow_pickle: bool = False):
    """Load a model once for many `generate` calls.

    `model` is a checkpoint folder (diffusers UnCLIPPipeline layout) or a preset name; with
    backend="onnxruntime" it is an artifact folder made by `unclip export onnx`.
    """
    import torch

    from unclip.engine.pipeline import Pipeline
    from unclip.models import load_model
    from unclip.models.networks import model_dims

    if backend not in BACKENDS:
        raise UnclipError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnclipError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                          "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UnclipError(f"unknown device {device!r}: use cpu or cuda")
    if backend == "onnxruntime":  # serves from the artifact: no diffusers/transformers imports
        from unclip.engine.backends.onnxruntime_backend import load_onnxruntime_pipeline

        return load_onnxruntime_pipeline(model, device)
    components = load_model(model, allow_pickle=allow_pickle)
    from unclip.engine.backends.torch_backend import TorchBackend

    runtime = TorchBackend(components, device)
    return Pipeline(runtime, components.tokenizer, model_dims(components), components.schedulers,
                    model_name=str(model))
