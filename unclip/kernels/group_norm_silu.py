"""GroupNorm followed by SiLU, fused, wired into diffusers' UNets by module replacement.

In diffusers' `ResnetBlock2D` the pattern `norm1 -> nonlinearity` (and `norm2 -> nonlinearity`
unless the block uses scale-shift time conditioning, which sits between the two) runs twice per
resnet; the UNet ends with `conv_norm_out -> conv_act`. `fuse_group_norm_silu` swaps each such
norm for `GroupNormSiLU` (same parameters, norm and activation in one pass) and the activation for
`SkipIfActivated`, which passes through exactly the tensor the fused norm produced and applies
SiLU to anything else (the resnet's shared activation also serves the time embedding).
The network code itself is untouched.

`group_norm_silu_reference` is the unfused torch pair (the CPU path: bit-identical to the
original modules); `group_norm_silu_triton` is the CUDA version (two kernels), statistics in float32
(it also runs on CPU under Triton's interpreter: see unclip/kernels/__init__.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from unclip.kernels import kernel_device, triton_module


def group_norm_silu_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


MODULE = "unclip.kernels.triton_group_norm_silu"


def runs_on(x: torch.Tensor) -> bool:
    """Whether group_norm_silu_triton can take `x` (CUDA; CPU under Triton's interpreter)."""
    return kernel_device(x, MODULE)


def group_norm_silu_triton(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """silu(group_norm(x)) for a contiguous NC... tensor on CUDA, in two kernels (imports triton)."""
    module = triton_module(MODULE)
    if module is None:
        raise RuntimeError("group_norm_silu_triton needs Triton: pip install triton, or use the reference")
    return module.group_norm_silu_triton(x, groups, weight, bias, eps)


class GroupNormSiLU(nn.Module):
    """A GroupNorm whose output is already passed through SiLU (it keeps the norm's parameters)."""

    def __init__(self, norm: nn.GroupNorm, use_triton: bool):
        super().__init__()
        self.norm = norm
        self.use_triton = use_triton
        self.produced: torch.Tensor | None = None  # read once by the SkipIfActivated that follows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if self.use_triton and runs_on(x) and x.is_contiguous():
            y = group_norm_silu_triton(x, n.num_groups, n.weight, n.bias, n.eps)
        else:
            y = group_norm_silu_reference(x, n.num_groups, n.weight, n.bias, n.eps)
        self.produced = y
        return y


class SkipIfActivated(nn.Module):
    """The activation after fused norms: identity on their outputs, SiLU on anything else."""

    def __init__(self, act: nn.Module, fused: list[GroupNormSiLU]):
        super().__init__()
        self.act = act
        self.fused = fused  # a plain list: the norms stay registered under their own parents

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm in self.fused:
            if norm.produced is x:
                norm.produced = None  # held only until consumed, so no activation outlives its step
                return x
        return self.act(x)


def _fusable(norm: nn.Module, act: nn.Module) -> bool:
    return isinstance(norm, nn.GroupNorm) and isinstance(act, nn.SiLU)


def fuse_group_norm_silu(model: nn.Module, use_triton: bool) -> int:
    """Replace every (GroupNorm, SiLU) pair of diffusers' ResnetBlock2D and the UNet's output
    norm in `model`, in place; returns the number of norms fused."""
    from diffusers.models.resnet import ResnetBlock2D

    fused = 0
    for module in list(model.modules()):
        pairs = []
        if isinstance(module, ResnetBlock2D) and _fusable(module.norm1, module.nonlinearity):
            pairs.append(("norm1", "nonlinearity"))
            if module.time_embedding_norm != "scale_shift":  # scale-shift sits between norm2 and SiLU
                pairs.append(("norm2", "nonlinearity"))
        if _fusable(getattr(module, "conv_norm_out", None), getattr(module, "conv_act", None)):
            pairs.append(("conv_norm_out", "conv_act"))
        norms = []
        for norm_name, _ in pairs:
            norms.append(GroupNormSiLU(getattr(module, norm_name), use_triton))
            setattr(module, norm_name, norms[-1])
        if pairs:
            setattr(module, pairs[0][1], SkipIfActivated(getattr(module, pairs[0][1]), norms))
            fused += len(norms)
    return fused
