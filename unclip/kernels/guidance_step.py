"""One denoising update after the network call: guidance combine + unCLIP scheduler step + noise.

`guidance_step_reference` is plain torch: diffusers' guidance combine and UnCLIPScheduler.step,
operation for operation in float32 (tests/test_kernels.py holds diffusers' per-step form as its
oracle; on CPU the two agree bit for bit). It is the update of every path's step body
(unclip.engine.step) and the oracle of the Triton kernel `guidance_step_triton`, which does the
same in one launch.

Both read the step index from a device tensor `step` ([1] int64) and the per-step coefficients
and noise from whole-schedule tables, so a step is a pure function of buffers (CUDA-graph safe).
The last step's noise rows are zeros, so "no noise at t=0" needs no branch on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unclip.engine.scheduler import SchedulerConfig, StepTable
from unclip.kernels import kernel_device, triton_module


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


MODULE = "unclip.kernels.triton_guidance_step"


def runs_on(x: torch.Tensor) -> bool:
    """Whether guidance_step_triton can take `x` (CUDA; CPU under Triton's interpreter)."""
    return kernel_device(x, MODULE)


def guidance_step_triton(spec: GuidanceStep, table: StepTable, step: torch.Tensor,
                         model_output: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                         guidance: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's update in one kernel; `out` may be `sample` itself (an in-place update).

    Expects contiguous float32 `sample`/`noise`/tables and a contiguous `model_output` of any
    float dtype (read as is, arithmetic in float32). Imports triton.
    """
    module = triton_module(MODULE)
    if module is None:
        raise RuntimeError("guidance_step_triton needs Triton: pip install triton, or use the reference")
    return module.guidance_step_triton(spec, table, step, model_output, sample, noise, guidance, out)
