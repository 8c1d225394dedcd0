"""Fused Triton kernels, each with a plain-torch reference (the CPU path and the test oracle).

Triton reads TRITON_INTERPRET when it decorates a function (triton's own `tl.sum` at `import
triton`, ours when their module is imported): in a process started with TRITON_INTERPRET=1 the
kernels are Python functions run by Triton's interpreter on CPU tensors. That is how every test
run exercises them, in a child process (tests/triton_interpreter.py), so that no other test sees
interpreted kernels. `runs_on` in each kernel module says which tensors its kernels can take.
"""

from __future__ import annotations

import torch


def interpreted(kernel) -> bool:
    """True when `kernel` was defined under Triton's interpreter (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def kernel_device(x: torch.Tensor, available: bool, on_cpu: bool) -> bool:
    """Whether kernels (`available`: Triton imported; `on_cpu`: interpreted) can take `x`."""
    return available and (x.is_cuda or (on_cpu and x.device.type == "cpu"))
