"""The Triton kernels of GroupNorm+SiLU (unclip/kernels/group_norm_silu.py): this module imports
triton, so it is imported only when the kernels may run (`unclip.kernels.triton_module`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unclip.kernels import interpreted


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


INTERPRETED = interpreted(_group_norm_silu_kernel)


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
