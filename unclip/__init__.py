"""unclip: an inference engine for unCLIP (DALL-E 2 / Karlo) text-to-image models."""

from __future__ import annotations

import logging
from pathlib import Path

from unclip.errors import GenerationError, UnclipError

__version__ = "0.1.0"
__all__ = ["GenerationError", "Limits", "UnclipError", "load", "__version__"]

BACKENDS = ("torch", "onnxruntime", "openvino", "mixed", "tensorrt")


def __getattr__(name: str):
    if name == "Limits":  # unclip.Limits without importing pydantic for `import unclip`
        from unclip.engine.settings import Limits

        return Limits
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")


def load(model: str | Path = "demo", backend: str = "torch", device: str = "cpu", allow_pickle: bool = False,
         dtype: str = "fp32", cuda_graphs: bool = False, kernels: bool = False, limits=None,
         step_cache: int = 1):
    """Load a model once for many `generate` calls.

    `model` is a checkpoint folder (diffusers UnCLIPPipeline layout), "demo" (the trained model
    that ships in the package), a preset name, or already loaded UnclipComponents; with
    backend="onnxruntime", "openvino" or "mixed" (each network on the faster of the two, measured at
    load) it is an artifact folder made by `unclip export onnx`.
    `dtype` is the precision: fp32, fp16/bf16 for torch on cuda, bf16 for torch or openvino on a CPU
    with native bf16 (docs/cpu.md). `cuda_graphs` and `kernels` switch on the GPU fast path of the
    torch backend (unclip.engine.fast_path; docs/gpu.md). `limits` (unclip.Limits) bounds what one
    generate call may ask for; the default is generous for one user (docs/validation.md).
    `step_cache` N > 1 runs a full decoder step every N steps and cheaper shallow steps between them
    that reuse its deep features (unclip.models.step_cache; docs/step_cache.md); 1 is off. An exported
    artifact needs the pair in it (`unclip export onnx --step-cache`, docs/onnx.md).
    Threads may call it at once (each builds in turn) and then generate concurrently.
    """
    from unclip.models.libraries import LOAD_LOCK

    with LOAD_LOCK:  # safe from several threads: one model built at a time (unclip/models/libraries.py)
        pipe = _load(model, backend, device, allow_pickle, dtype, cuda_graphs, kernels, limits, step_cache)
    if limits is not None and getattr(pipe, "family", "karlo") != "karlo":
        pipe.limits = limits  # Stable unCLIP checks its settings against them at each call
    elif limits is not None:  # backends that build their own Pipeline get the caller's limits here
        pipe.limits = limits
        pipe.settings()  # the model's own defaults must fit them: say so now, not at the first call
        pipe.image_settings()
    return pipe


def _load(model, backend: str, device: str, allow_pickle: bool, dtype: str, cuda_graphs: bool, kernels: bool,
          limits, step_cache: int = 1):
    import torch

    from unclip.engine.pipeline import Pipeline
    from unclip.engine.settings import Limits
    from unclip.models import load_model
    from unclip.models.networks import model_dims

    if backend not in BACKENDS:
        raise UnclipError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnclipError("--device cuda was asked for but this torch build sees no CUDA GPU; "
                          "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UnclipError(f"unknown device {device!r}: use cpu or cuda")
    if limits is not None and not isinstance(limits, Limits):
        raise UnclipError(f"limits must be an unclip.Limits, got {type(limits).__name__}", param="limits")
    from unclip.models.stable_unclip import is_stable_unclip

    if is_stable_unclip(model):  # the second family (unclip.engine.stable_unclip)
        return _load_stable(model, backend, device, dtype, cuda_graphs, kernels, step_cache)
    if backend != "torch":  # the torch backend's loader (unclip.models.load_model) says it itself
        logging.getLogger("unclip").info("loading %s (%s) ...", model, backend)
    if backend == "tensorrt":  # engines from `unclip export tensorrt`; cuda_graphs captures them too
        from unclip.engine.backends.tensorrt_backend import load_tensorrt_pipeline

        if dtype != "fp32" or kernels:
            raise UnclipError("--dtype and --kernels apply to --backend torch; a TensorRT engine's precision "
                              "is set when it is built (`unclip export tensorrt`): drop them")
        return load_tensorrt_pipeline(model, device, cuda_graphs=cuda_graphs, step_cache=step_cache)
    if backend == "mixed":  # per network, the faster of ONNX Runtime and OpenVINO here (float32)
        from unclip.engine.backends.mixed_backend import load_mixed_pipeline

        if dtype != "fp32" or cuda_graphs or kernels:
            raise UnclipError("--backend mixed runs each network in float32 on the faster of ONNX Runtime "
                              "and OpenVINO; drop --dtype/--cuda-graphs/--kernels (bf16: --backend openvino "
                              "--dtype bf16)")
        return load_mixed_pipeline(model, device, step_cache=step_cache)
    _check_fast_path(backend, device, dtype, cuda_graphs, kernels)
    if backend == "onnxruntime":  # serves from the artifact: no diffusers/transformers imports
        from unclip.engine.backends.onnxruntime_backend import load_onnxruntime_pipeline

        return load_onnxruntime_pipeline(model, device, step_cache=step_cache)
    if backend == "openvino":  # the same artifact, compiled by OpenVINO; dtype checked against the CPU there
        from unclip.engine.backends.openvino_backend import load_openvino_pipeline

        return load_openvino_pipeline(model, dtype, device, step_cache=step_cache)
    components = load_model(model, allow_pickle=allow_pickle)
    from unclip.engine.backends.torch_backend import TorchBackend

    runtime, stage_runner = TorchBackend(components, device), None
    if dtype != "fp32" or cuda_graphs or kernels:
        from unclip.engine.fast_path import fast_path

        runtime, stage_runner = fast_path(runtime, dtype, cuda_graphs, kernels)
    return Pipeline(runtime, components.tokenizer, model_dims(components), components.schedulers,
                    model_name=components.name, stage_runner=stage_runner,
                    sampler_defaults=components.sampler_defaults, limits=limits,
                    image_preprocess=components.image_preprocess, step_cache=step_cache)


def _load_stable(model, backend: str, device: str, dtype: str, cuda_graphs: bool, kernels: bool,
                 step_cache: int):
    from unclip.engine.stable_unclip import load_stable_pipeline

    given = [name for name, on in (("--kernels", kernels), (f"--step-cache {step_cache}", step_cache != 1))
             if on]
    if given:  # the Triton kernels and the step cache are built for Karlo's own UNet modules
        raise UnclipError(f"{given[0]} is not available for Stable unCLIP models yet (its fast path is "
                          "--dtype fp16|bf16 with --cuda-graphs); drop it")
    if dtype != "fp32" and backend != "torch":
        raise UnclipError(f"--dtype {dtype} applies to --backend torch for Stable unCLIP models (an export's "
                          "precision is set by `unclip export onnx --precision`); drop it")
    if cuda_graphs and backend not in ("torch", "tensorrt"):
        raise UnclipError(f"--cuda-graphs applies to --backend torch or tensorrt, not {backend}; drop it")
    if backend == "torch":
        _check_fast_path("torch", device, dtype, cuda_graphs, False)
    from unclip.export.stable_unclip_onnx import is_stable_artifact

    logging.getLogger("unclip").info("loading %s (Stable unCLIP, %s) ...", model, backend)
    exported = not isinstance(model, str | Path) or is_stable_artifact(model)
    if backend in ("onnxruntime", "openvino", "tensorrt"):
        if not (isinstance(model, str | Path) and exported):
            raise UnclipError(f"with --backend {backend}, --model must be a folder made by `unclip export "
                              f"onnx`; {model} is a Stable unCLIP checkpoint: export it first, or use "
                              "--backend torch")
        from unclip.engine.stable_unclip_runtime import load_stable_export

        return load_stable_export(model, backend, device, cuda_graphs)
    if backend != "torch":
        raise UnclipError(f"--backend {backend} does not run Stable unCLIP models; use torch, onnxruntime, "
                          "openvino or tensorrt")
    if isinstance(model, str | Path) and exported:
        raise UnclipError(f"{model} is an export folder: load it with --backend onnxruntime, openvino or "
                          "tensorrt")
    return load_stable_pipeline(model, device, dtype=dtype, cuda_graphs=cuda_graphs)


def _check_fast_path(backend: str, device: str, dtype: str, cuda_graphs: bool, kernels: bool) -> None:
    if dtype not in ("fp32", "fp16", "bf16"):
        raise UnclipError(f"unknown --dtype {dtype!r}: choose fp32, fp16 or bf16")
    fast = [name for name, on in (("--dtype " + dtype, dtype != "fp32"), ("--cuda-graphs", cuda_graphs),
                                  ("--kernels", kernels)) if on]
    if backend == "openvino":  # its one option is its precision, checked by the backend against the CPU
        fast = [name for name in fast if not name.startswith("--dtype")]
    if fast and backend != "torch":
        raise UnclipError(f"{fast[0]} applies to --backend torch only; drop it or use --backend torch")
    if backend == "torch" and dtype == "bf16" and device == "cpu":  # the CPU fast path: bf16, channels-last
        from unclip.engine.precision import cpu_has_native_bf16

        if not cpu_has_native_bf16():
            raise UnclipError("--dtype bf16 on --device cpu needs a CPU with native bf16 (AVX512-BF16 or "
                              "AMX); this one has none, so it would be emulated and slower: use --dtype fp32")
        fast.remove("--dtype bf16")
    if fast and not device.startswith("cuda"):
        raise UnclipError(f"{fast[0]} is the GPU fast path and needs --device cuda; "
                          "on CPU use --dtype fp32 or bf16 without --cuda-graphs/--kernels")
    if kernels:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UnclipError("--kernels needs Triton: pip install triton (it ships with CUDA builds "
                              "of torch), or drop --kernels") from None
