"""Runners: one backend at one precision, named `backend-dtype` (torch-fp32, openvino-bf16, ...).

A runner is what `unclip.load(model, backend=..., dtype=...)` makes. `unclip bench` compares
runners with the diffusers baseline; by default every runner that can run on this machine and
device, so that a missing optional package shows as a skipped runner with its reason, not as a
silently shorter table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from importlib.util import find_spec

from unclip.errors import UnclipError

# The default comparison, in report order: the exact path first, then cheaper arithmetic and runtimes.
CPU_RUNNERS = ("torch-fp32", "torch-bf16", "onnxruntime-fp32", "openvino-fp32", "openvino-bf16")
CUDA_RUNNERS = ("torch-fp32",)  # the GPU suites name theirs (benchmarks/suites/gpu-karlo.json)
DTYPES = ("fp32", "fp16", "bf16")
EXPORTED = ("onnxruntime", "openvino", "mixed", "tensorrt")  # backends that serve an ONNX export


@dataclass(frozen=True)
class RunnerSpec:
    backend: str
    dtype: str | None  # None: set by the artifact (a TensorRT engine's precision is fixed when built)
    step_cache: int = 1  # a full decoder step every N (unclip.load's step_cache); 1: off

    @property
    def name(self) -> str:
        base = self.backend if self.dtype is None else f"{self.backend}-{self.dtype}"
        return base if self.step_cache == 1 else f"{base}+cache{self.step_cache}"


def parse_runner(text: str, known_backends: tuple[str, ...]) -> RunnerSpec:
    """`torch-bf16` -> (torch, bf16); a bare backend name is its fp32 runner (tensorrt: its engine's);
    `+cacheN` runs it with the decoder's step cache (`onnxruntime-fp32+cache2`)."""
    text, plus, cache = text.partition("+")
    if plus:
        match = re.fullmatch(r"cache([2-8])", cache)
        if match is None:
            raise UnclipError(f"--backends {text}+{cache}: a runner's suffix is +cacheN with N from 2 to 8 "
                              "(a full decoder step every N steps), e.g. torch-fp32+cache2")
        return replace(parse_runner(text, known_backends), step_cache=int(match.group(1)))
    backend, _, dtype = text.partition("-")
    if backend not in known_backends:
        raise UnclipError(f"--backends: unknown backend {backend!r} in {text!r}; choose from "
                          f"{', '.join(known_backends)}, optionally with a precision (e.g. torch-bf16)")
    if backend == "tensorrt":
        if dtype:
            raise UnclipError(f"--backends {text!r}: a TensorRT engine's precision is set when it is built; "
                              "name it tensorrt")
        return RunnerSpec(backend, None)
    if backend == "mixed" and dtype not in ("", "fp32"):
        raise UnclipError(f"--backends {text!r}: the mixed runner is float32 (each network on the faster of "
                          "ONNX Runtime and OpenVINO); name it mixed or mixed-fp32")
    if dtype and dtype not in DTYPES:
        raise UnclipError(f"--backends {text!r}: unknown precision {dtype!r}; choose {', '.join(DTYPES)}")
    return RunnerSpec(backend, dtype or "fp32")


def unavailable(spec: RunnerSpec, device: str) -> str | None:
    """Why this runner cannot run here; None if it can."""
    cpu = device == "cpu"
    if spec.backend in EXPORTED and (find_spec("onnx") is None or find_spec("onnxsim") is None):
        return "the ONNX exporter is not installed (pip install 'unclip[onnx]')"
    if spec.backend == "onnxruntime" and find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install 'unclip[onnx]')"
    if spec.backend == "mixed":
        missing = [name for name in ("onnxruntime", "openvino") if find_spec(name) is None]
        if missing:
            return f"{' and '.join(missing)} not installed (pip install 'unclip[onnx,openvino]')"
        if not cpu:
            return "the mixed runner chooses between CPU runtimes: --device cpu only"
    if spec.backend == "openvino":
        if find_spec("openvino") is None:
            return "OpenVINO is not installed (pip install 'unclip[openvino]')"
        if not cpu:
            return "OpenVINO runs on --device cpu only"
        if spec.dtype not in ("fp32", "bf16"):
            return f"OpenVINO runs fp32 or bf16, not {spec.dtype}"
        if spec.dtype == "bf16":
            from openvino import Core

            from unclip.engine.backends.openvino_backend import cpu_has_native_bf16

            if not cpu_has_native_bf16(Core()):
                return "this CPU has no native bf16 (OpenVINO lists no BF16 capability)"
    if spec.backend == "torch" and cpu and spec.dtype != "fp32":
        from unclip.engine.precision import cpu_has_native_bf16

        if spec.dtype == "fp16":
            return "torch fp16 is the GPU fast path (--device cuda)"
        if not cpu_has_native_bf16():
            return "this CPU has no native bf16 (no AVX512-BF16 or AMX)"
    if spec.backend == "tensorrt" and cpu:
        return "TensorRT runs on --device cuda only"
    return None


def default_runners(device: str, known_backends: tuple[str, ...]) -> tuple[list[RunnerSpec], dict[str, str]]:
    """Every default runner that can run here, and those that cannot with the reason."""
    names = CPU_RUNNERS if device == "cpu" else CUDA_RUNNERS
    runners, skipped = [], {}
    for name in names:
        spec = parse_runner(name, known_backends)
        reason = unavailable(spec, device)
        if reason is None:
            runners.append(spec)
        else:
            skipped[spec.name] = reason
    return runners, skipped


def check_runners(texts: tuple[str, ...], device: str, known_backends: tuple[str, ...]) -> list[RunnerSpec]:
    """Runners named on the command line: each must parse, be named once and be able to run here."""
    specs = [parse_runner(text, known_backends) for text in texts]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UnclipError(f"--backends {','.join(texts)} names a runner twice ({', '.join(names)}); "
                          "give each once")
    for spec in specs:
        reason = unavailable(spec, device)
        if reason is not None:
            raise UnclipError(f"--backends {spec.name} cannot run here: {reason}")
    return specs
