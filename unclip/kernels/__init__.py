"""Fused Triton kernels, each with a plain-torch reference (the CPU path and the test oracle).

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when its module is imported: with
TRITON_INTERPRET=1 the kernels become Python functions run by Triton's interpreter on CPU tensors.
That is how CI runs them (tests/test_kernels.py imports private copies of these modules with the
variable set, so nothing else in the process sees interpreted kernels); `runs_on` says where a
module's kernels can run.
"""

from __future__ import annotations

import torch


def interpreted(kernel) -> bool:
    """True when `kernel` was defined under Triton's interpreter (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def kernel_device(x: torch.Tensor, available: bool, on_cpu: bool) -> bool:
    """Whether kernels (`available`: Triton imported; `on_cpu`: interpreted) can take `x`."""
    return available and (x.is_cuda or (on_cpu and x.device.type == "cpu"))
