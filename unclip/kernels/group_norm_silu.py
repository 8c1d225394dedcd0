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

from unclip.kernels import interpreted, kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is the path
    triton = None


def group_norm_silu_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                              bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


if triton is not None:
    # Two passes, each over (sample, group, chunk) programs so that a large group (Karlo's
    # super-resolution: 10 channels x 256^2 per group) is spread over many SMs: pass 1 writes
    # each chunk's float32 sum and sum of squares; pass 2 reduces its group's partial sums and
    # normalises, scales, shifts and applies SiLU to its chunk.

    @triton.jit
    def _group_partial_sums_kernel(x_ptr, sums_ptr, group_size, chunks, CHUNK: tl.constexpr,
                                   BLOCK: tl.constexpr):
        group, chunk = tl.program_id(0), tl.program_id(1)
        base = group.to(tl.int64) * group_size
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + base + offs, mask=offs < group_size, other=0.0).to(tl.float32)
            acc += v
            acc_sq += v * v
        out = sums_ptr + (group * chunks + chunk) * 2
        tl.store(out, tl.sum(acc, axis=0))
        tl.store(out + 1, tl.sum(acc_sq, axis=0))

    @triton.jit
    def _group_norm_silu_kernel(x_ptr, w_ptr, b_ptr, y_ptr, sums_ptr, group_size, hw, channels_per_group,
                                groups, chunks, eps, HAS_AFFINE: tl.constexpr, CHUNK: tl.constexpr,
                                BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr):
        group, chunk = tl.program_id(0), tl.program_id(1)
        parts = tl.arange(0, MAX_CHUNKS)
        partial = sums_ptr + (group * chunks + parts) * 2
        total = tl.sum(tl.load(partial, mask=parts < chunks, other=0.0), axis=0)
        total_sq = tl.sum(tl.load(partial + 1, mask=parts < chunks, other=0.0), axis=0)
        mean = total / group_size
        rstd = 1.0 / tl.sqrt(tl.maximum(total_sq / group_size - mean * mean, 0.0) + eps)
        base = group.to(tl.int64) * group_size
        first_channel = (group % groups) * channels_per_group
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < group_size
            v = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * rstd
            if HAS_AFFINE:
                ch = first_channel + offs // hw
                w = tl.load(w_ptr + ch, mask=mask).to(tl.float32)
                y = y * w + tl.load(b_ptr + ch, mask=mask).to(tl.float32)
            y = y / (1.0 + tl.exp(-y))  # SiLU
            tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


INTERPRETED = triton is not None and interpreted(_group_norm_silu_kernel)


def runs_on(x: torch.Tensor) -> bool:
    """Whether group_norm_silu_triton can take `x` (CUDA; CPU under Triton's interpreter)."""
    return kernel_device(x, triton is not None, INTERPRETED)


def group_norm_silu_triton(x: torch.Tensor, groups: int, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """silu(group_norm(x)) for a contiguous NC... tensor on CUDA, in two kernels."""
    n, c = x.shape[:2]
    if c % groups:  # the kernels assume whole groups: the last channels would be left unwritten
        raise ValueError(f"group_norm_silu: {c} channels are not divisible by {groups} groups "
                         f"(as for nn.GroupNorm, num_channels must be a multiple of num_groups)")
    hw = x.numel() // (n * c)
    y = torch.empty_like(x)
    group_size = (c // groups) * hw
    block = min(1024, triton.next_power_of_2(group_size))
    chunk = max(block, min(16384, triton.next_power_of_2(group_size)))  # a multiple of block
    chunks = triton.cdiv(group_size, chunk)
    sums = torch.empty((n * groups, chunks, 2), dtype=torch.float32, device=x.device)
    grid = (n * groups, chunks)
    _group_partial_sums_kernel[grid](x, sums, group_size, chunks, CHUNK=chunk, BLOCK=block)
    _group_norm_silu_kernel[grid](
        x, weight if weight is not None else x, bias if bias is not None else x, y, sums,
        group_size, hw, c // groups, groups, chunks, eps, HAS_AFFINE=weight is not None,
        CHUNK=chunk, BLOCK=block, MAX_CHUNKS=triton.next_power_of_2(chunks))
    return y


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
