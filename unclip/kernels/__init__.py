"""Fused Triton kernels, each with a plain-torch reference (the CPU path and the test oracle).

Triton is imported only when a kernel may run: the `@triton.jit` kernels live in their own
modules (`triton_*.py`), imported on first use by `runs_on` (a CUDA tensor, or a CPU tensor in a
process started with TRITON_INTERPRET set) or by the `*_triton` launchers. A CPU process that
never asks for the kernels never imports Triton, whose extension prints nanobind "leaked"
warnings at some interpreter shutdowns (issue 22).

Triton reads TRITON_INTERPRET when it decorates a function (triton's own `tl.sum` at `import
triton`, ours when their module is imported): in a process started with TRITON_INTERPRET=1 the
kernels are Python functions run by Triton's interpreter on CPU tensors. That is how every test
run exercises them, in a child process (tests/triton_interpreter.py), so that no other test sees
interpreted kernels. `runs_on` in each kernel module says which tensors its kernels can take.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch


def interpreted(kernel) -> bool:
    """True when `kernel` was defined under Triton's interpreter (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """The kernel module `name` (it imports triton), imported now; None when Triton is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if (e.name or "").partition(".")[0] == "triton":  # CPU-only installs: the reference is the path
            return None
        raise


def kernel_device(x: torch.Tensor, name: str) -> bool:
    """Whether the kernels of module `name` can take `x`: CUDA with Triton installed, or CPU under
    Triton's interpreter. Imports Triton only for those two cases, never for a plain CPU tensor."""
    if x.is_cuda:
        return triton_module(name) is not None
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET"):
        module = triton_module(name)
        return module is not None and module.INTERPRETED
    return False
