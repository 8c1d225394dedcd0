"""The Triton kernel of the guidance + scheduler + noise step (unclip/kernels/guidance_step.py): this
module imports triton, so it is imported only when the kernel may run (`unclip.kernels.triton_module`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from unclip.engine.scheduler import StepTable
from unclip.kernels import interpreted
from unclip.kernels.guidance_step import GuidanceStep


@triton.jit
def _guidance_step_kernel(out_ptr, sample_ptr, noise_ptr, step_ptr, guidance_ptr,
                          sqrt_alpha_ptr, sqrt_beta_ptr, x0c_ptr, xtc_ptr, std_ptr, minl_ptr, maxl_ptr,
                          model_ptr, numel, inner, batch, row_stride, clip_range,
                          GUIDED: tl.constexpr, EPSILON: tl.constexpr, CLIP: tl.constexpr,
                          LEARNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    step = tl.load(step_ptr)
    b = offs // inner
    within = offs % inner  # channel-major offset inside one row; eps channels come first
    x = tl.load(sample_ptr + offs, mask=mask)
    if GUIDED:
        g = tl.load(guidance_ptr)
        u = tl.load(model_ptr + b * row_stride + within, mask=mask).to(tl.float32)
        c = tl.load(model_ptr + (b + batch) * row_stride + within, mask=mask).to(tl.float32)
        pred = u + g * (c - u)
        var_row = b + batch
    else:
        pred = tl.load(model_ptr + b * row_stride + within, mask=mask).to(tl.float32)
        var_row = b
    if EPSILON:
        x0 = (x - tl.load(sqrt_beta_ptr + step) * pred) / tl.load(sqrt_alpha_ptr + step)
    else:
        x0 = pred
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -clip_range), clip_range)
    prev = tl.load(x0c_ptr + step) * x0 + tl.load(xtc_ptr + step) * x
    z = tl.load(noise_ptr + step * numel + offs, mask=mask)
    if LEARNED:
        v = tl.load(model_ptr + var_row * row_stride + inner + within, mask=mask).to(tl.float32)
        frac = (v + 1) / 2
        log_variance = frac * tl.load(maxl_ptr + step) + (1 - frac) * tl.load(minl_ptr + step)
        prev = prev + tl.exp(0.5 * log_variance) * z
    else:
        prev = prev + tl.load(std_ptr + step) * z
    tl.store(out_ptr + offs, prev, mask=mask)


INTERPRETED = interpreted(_guidance_step_kernel)


def guidance_step_triton(spec: GuidanceStep, table: StepTable, step: torch.Tensor,
                         model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                         guidance: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's update in one kernel; `out` may be `sample` itself (an in-place update).

    Expects contiguous float32 `sample`/`noise`/tables and a contiguous `model_output` of any
    float dtype (read as is, arithmetic in float32).
    """
    if out is None:
        out = torch.empty_like(sample)
    batch = sample.shape[0]
    numel = sample.numel()
    rows = model_output.shape[0]
    row_stride = model_output.numel() // rows
    c = spec.channels if spec.channels is not None else model_output.shape[1]
    learned = spec.config.variance_type == "learned_range" and model_output.shape[1] == 2 * c
    block = 1024
    grid = (triton.cdiv(numel, block),)
    _guidance_step_kernel[grid](
        out, sample, noise, step, guidance,
        table.sqrt_alpha_prod, table.sqrt_beta_prod, table.x0_coeff, table.xt_coeff,
        table.noise_std, table.min_log, table.max_log,
        model_output, numel, numel // batch, batch, row_stride, float(spec.config.clip_sample_range),
        GUIDED=spec.guided, EPSILON=spec.config.prediction_type == "epsilon",
        CLIP=spec.config.clip_sample, LEARNED=learned, BLOCK=block)
    return out
