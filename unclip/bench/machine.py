"""The machine and software a result was measured on (recorded with every result)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _git_commit() -> str | None:
    """The source tree measured (an editable install): its commit, and whether it had local edits."""
    here = Path(__file__).resolve().parent
    try:
        run = dict(cwd=here, capture_output=True, text=True, timeout=30, check=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parent)], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit} (with uncommitted changes)" if dirty else commit


def versions() -> dict[str, str | None]:
    """Read from package metadata (nothing imported); null where a package is absent."""
    return {
        "python": platform.python_version(),
        "unclip": _version("unclip"),
        "unclip_git": _git_commit(),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
        "openvino": _version("openvino"),
        "tensorrt": _version("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
        "numpy": _version("numpy"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu(device: str) -> dict[str, str | None]:
    """nvidia-smi first (no CUDA context in this process); torch's view as a fallback."""
    out: dict[str, str | None] = {"gpu_name": None, "gpu_driver": None, "cuda": None}
    if not device.startswith("cuda"):
        return out
    import torch

    out["cuda"] = torch.version.cuda
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
        out["gpu_name"], out["gpu_driver"] = (s.strip() for s in line.split(",", 1))
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        out["gpu_name"] = torch.cuda.get_device_name()
    return out


def host() -> dict:
    """The CPU side, without importing torch (for tools that only send requests)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "memory_gb": _memory_gb(), "os": f"{platform.system()} {platform.release()}",
            "executable": sys.executable}


def machine(device: str) -> dict:
    import torch

    return {**host(), "torch_threads": torch.get_num_threads(), **_gpu(device)}
