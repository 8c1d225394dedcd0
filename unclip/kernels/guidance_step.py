"""One denoising update after the network call: guidance combine + unCLIP scheduler step + noise.

`guidance_step_reference` is plain torch and reproduces, operation for operation in float32,
what `Pipeline` does after a network call (the guidance combine) followed by
`unclip.engine.scheduler.scheduler_step`; on CPU the two agree bit for bit. It is the CPU path
and the oracle of the Triton kernel `guidance_step_triton`, which does the same in one launch.

Both read the step index from a device tensor `step` ([1] int64) and the per-step coefficients
and noise from whole-schedule tables, so a step is a pure function of buffers (CUDA-graph safe).
The last step's noise rows are zeros, so "no noise at t=0" needs no branch on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unclip.engine.scheduler import SchedulerConfig, StepTable
from unclip.kernels import interpreted, kernel_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is the path
    triton = None


@dataclass(frozen=True)
class GuidanceStep:
    """What is fixed for one stage: the scheduler and how the network output is split."""

    config: SchedulerConfig
    guided: bool  # model output rows are [unconditional; conditional]
    channels: int | None  # decoder: the first `channels` output channels are eps, the rest variance


def _at(values: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return values.index_select(0, step)  # [1]: a gather on the device, no host sync


def split_output(spec: GuidanceStep, model_output: torch.Tensor, guidance: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(guided prediction, predicted variance or None), exactly as Pipeline.prior/decoder do it."""
    out = model_output
    c = spec.channels if spec.channels is not None else out.shape[1]
    if spec.guided:
        uncond, cond = out.chunk(2)
        pred = uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c])
        variance = cond[:, c:]
    else:
        pred, variance = out[:, :c], out[:, c:]
    learned = spec.config.variance_type == "learned_range" and variance.shape[1] == c
    return pred, (variance if learned else None)


def guidance_step_reference(spec: GuidanceStep, table: StepTable, step: torch.Tensor,
                            model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                            guidance: torch.Tensor) -> torch.Tensor:
    """x_{t_i} -> x_{t_{i+1}} for i = step; `noise` is [N, *sample.shape], `guidance` a [1] tensor."""
    config = spec.config
    pred, variance = split_output(spec, model_output.float(), guidance)
    if config.prediction_type == "epsilon":
        x0 = (sample - _at(table.sqrt_beta_prod, step) * pred) / _at(table.sqrt_alpha_prod, step)
    else:
        x0 = pred
    if config.clip_sample:
        x0 = torch.clamp(x0, -config.clip_sample_range, config.clip_sample_range)
    prev = _at(table.x0_coeff, step) * x0 + _at(table.xt_coeff, step) * sample
    z = noise.index_select(0, step)[0]
    if variance is not None:
        frac = (variance + 1) / 2
        log_variance = frac * _at(table.max_log, step) + (1 - frac) * _at(table.min_log, step)
        return prev + (0.5 * log_variance).exp() * z
    return prev + _at(table.noise_std, step) * z


if triton is not None:

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


INTERPRETED = triton is not None and interpreted(_guidance_step_kernel)


def runs_on(x: torch.Tensor) -> bool:
    """Whether guidance_step_triton can take `x` (CUDA; CPU under Triton's interpreter)."""
    return kernel_device(x, triton is not None, INTERPRETED)


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
