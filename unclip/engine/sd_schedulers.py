"""The samplers of Stable unCLIP checkpoints: DDIM, PNDM (PLMS, `skip_prk_steps`), DPM-Solver++ (multistep)
and DDPM (the text-to-image prior; the image-embedding noising), as diffusers computes them.

Karlo's cascade has one sampler (engine/scheduler.py, coefficient tables). Stable unCLIP's latent UNet
ships with PNDM and users switch to DDIM or DPM-Solver++; the multistep ones keep earlier model
outputs, so a stage run holds a `Solver` (its state) and steps it once per network call. Each reads
the diffusers scheduler config a checkpoint ships (`scheduler/scheduler_config.json`) and computes in
the same float32 operations in the same order, so a step equals diffusers' (tests/test_sd_schedulers.py).
Settings a published checkpoint does not use (thresholding, Karras sigmas, zero-SNR rescaling, SDE
variants, eta > 0) are refused by name rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unclip.engine.scheduler import cosine_betas
from unclip.errors import UnclipError

KINDS = {"DDIMScheduler": "ddim", "PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpm++",
         "DDPMScheduler": "ddpm"}
NAMES = {v: k for k, v in KINDS.items()}  # --scheduler ddim|pndm|dpm++ -> diffusers' class
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "v_prediction", "sample")
# Each class's own defaults where they differ from SamplerConfig's: a config that leaves a key out (or
# one switched to another class, which keeps only the keys it has) means the class's default, as in
# diffusers: a PNDM config has no clip_sample, so DDIMScheduler.from_config(it) clips x0 to [-1, 1].
KIND_DEFAULTS = {
    "ddim": dict(clip_sample=True, set_alpha_to_one=True),
    "pndm": dict(set_alpha_to_one=False),
    "dpm++": dict(timestep_spacing="linspace"),
    "ddpm": dict(clip_sample=True),
}
# config keys that change the arithmetic and the value under which we compute exactly what diffusers does
UNSUPPORTED = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
               "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
               "use_flow_sigmas": False, "euler_at_final": False, "trained_betas": None}


@dataclass(frozen=True)
class SamplerConfig:
    """A diffusers scheduler config, the fields that matter to the arithmetic."""

    kind: str  # ddim | pndm | dpm++ | ddpm
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    skip_prk_steps: bool = True  # PNDM: only the PLMS steps (what Stable Diffusion checkpoints ship)
    solver_order: int = 2  # DPM-Solver++
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"
    variance_type: str = "fixed_small"  # DDPM
    extra: dict = field(default_factory=dict, compare=False)  # the rest of the file, for to_dict

    @classmethod
    def from_dict(cls, data: dict, kind: str | None = None) -> SamplerConfig:
        """From a scheduler_config.json; `kind` switches the sampler, keeping the schedule (as diffusers'
        `OtherScheduler.from_config(pipe.scheduler.config)` does)."""
        name = data.get("_class_name")
        kind = kind or KINDS.get(name)
        if kind not in NAMES:
            raise UnclipError(f"scheduler {name!r} is not one unclip runs for Stable unCLIP; use one of "
                              f"{', '.join(NAMES.values())}")
        for key, allowed in UNSUPPORTED.items():
            if data.get(key, allowed) not in (allowed, None):
                raise UnclipError(f"scheduler config sets {key}={data[key]!r}, which unclip does not run; "
                                  f"set it to {allowed!r} (what the published checkpoints use)")
        if kind == "dpm++" and data.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            raise UnclipError(f"DPM-Solver algorithm_type {data['algorithm_type']!r} is not run by unclip; "
                              "use dpmsolver++")
        if kind == "pndm" and not data.get("skip_prk_steps", False) and kind == KINDS.get(name):
            raise UnclipError("PNDM with skip_prk_steps=false (Runge-Kutta warm-up steps) is not run by "
                              "unclip; set skip_prk_steps to true, as Stable Diffusion checkpoints ship it")
        known = {f for f in cls.__dataclass_fields__ if f not in ("kind", "extra")}
        values = {**KIND_DEFAULTS[kind], **{k: v for k, v in data.items() if k in known}}
        if kind == "pndm":
            values["skip_prk_steps"] = True
        config = cls(kind=kind, extra={k: v for k, v in data.items() if k not in known}, **values)
        for value, allowed, what in ((config.beta_schedule, BETA_SCHEDULES, "beta_schedule"),
                                     (config.timestep_spacing, SPACINGS, "timestep_spacing"),
                                     (config.prediction_type, PREDICTIONS, "prediction_type")):
            if value not in allowed:
                raise UnclipError(f"scheduler {what} {value!r} is not supported; choose {', '.join(allowed)}")
        if kind == "pndm" and config.prediction_type == "sample":
            raise UnclipError("PNDM takes epsilon or v_prediction models, not prediction_type 'sample'")
        if kind == "dpm++" and (config.solver_order not in (1, 2) or config.solver_type not in ("midpoint",
                                                                                                "heun")):
            raise UnclipError("DPM-Solver++ runs solver_order 1 or 2 with solver_type midpoint or heun here")
        if kind == "dpm++" and config.final_sigmas_type not in ("zero", "sigma_min"):
            raise UnclipError(f"final_sigmas_type {config.final_sigmas_type!r}: choose zero or sigma_min")
        if kind == "ddpm" and config.variance_type not in ("fixed_small", "fixed_small_log"):
            raise UnclipError(f"DDPM variance_type {config.variance_type!r}: choose fixed_small or "
                              "fixed_small_log")
        return config

    def alphas_cumprod(self) -> torch.Tensor:
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=torch.float32) ** 2
        else:
            betas = cosine_betas(n)
        return torch.cumprod(1.0 - betas, dim=0)

    def timesteps(self, steps: int) -> list[int]:
        """The timestep of each model call (PNDM: steps + 1 calls, its first timestep twice)."""
        n = self.num_train_timesteps
        if not 1 <= steps <= n:
            raise UnclipError(f"steps must be from 1 to {n}, got {steps}")
        if self.kind == "dpm++":
            return [int(t) for t in _dpm_timesteps(self, steps)]
        if self.timestep_spacing == "linspace":
            asc = np.linspace(0, n - 1, steps).round().astype(np.int64)
        elif self.timestep_spacing == "leading":
            asc = (np.arange(0, steps) * (n // steps)).round().astype(np.int64) + self.steps_offset
        else:
            asc = np.round(np.arange(n, 0, -n / steps))[::-1].astype(np.int64) - 1
        if self.kind == "pndm":  # plms_timesteps: the second-highest twice (that call redoes the first step)
            asc = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])
        return [int(t) for t in asc[::-1]]


def _dpm_timesteps(config: SamplerConfig, steps: int) -> np.ndarray:
    n = config.num_train_timesteps  # lambda_min_clipped is -inf in every published config: no clipping
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = n // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + config.steps_offset
    return np.arange(n, 0, -n / steps).round().copy().astype(np.int64) - 1


class Solver:
    """One stage run's sampler state: `step(i, model_output, sample, noise)` for the i-th model call."""

    def __init__(self, config: SamplerConfig, steps: int):
        self.config, self.steps = config, steps
        self.timesteps = config.timesteps(steps)
        self.alphas_cumprod = config.alphas_cumprod()
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.ets: list[torch.Tensor] = []  # PNDM: earlier model outputs
        self.cur_sample: torch.Tensor | None = None
        self.outputs: list[torch.Tensor | None] = [None] * config.solver_order  # DPM-Solver++
        self.lower_order_nums = 0
        if config.kind == "dpm++":
            sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
            sigmas = np.interp(np.array(self.timesteps), np.arange(0, len(sigmas)), sigmas)
            last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5 \
                if config.final_sigmas_type == "sigma_min" else 0
            self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))

    @property
    def has_noise(self) -> list[bool]:
        """Which calls' steps add fresh noise (drawn from the request's generator, in this order)."""
        return [self.config.kind == "ddpm" and t > 0 for t in self.timesteps]

    def step(self, i: int, model_output: torch.Tensor, sample: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        kind = self.config.kind
        if kind == "ddim":
            return self._ddim(i, model_output, sample)
        if kind == "pndm":
            return self._plms(i, model_output, sample)
        if kind == "dpm++":
            return self._dpm(i, model_output, sample)
        return self._ddpm(i, model_output, sample, noise)

    def predicted_x0(self, i: int, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Call `i`'s estimate of the clean sample (a streamed request's preview; not the step's own
        arithmetic, which PNDM and DPM-Solver++ combine across calls)."""
        alpha_prod_t = self.alphas_cumprod[self.timesteps[i]]
        return self._x0(model_output, sample, alpha_prod_t, 1 - alpha_prod_t)

    def keep(self, rows: torch.Tensor) -> None:
        """Only `rows` of the batch go on (a request left between calls): the history keeps them only."""
        def take(x):
            return None if x is None else x.index_select(0, rows.to(x.device))

        self.ets = [take(e) for e in self.ets]
        self.cur_sample = take(self.cur_sample)
        self.outputs = [take(o) for o in self.outputs]

    def _prev(self, i: int) -> int:
        return self.timesteps[i] - self.config.num_train_timesteps // self.steps

    def _x0(self, model_output, sample, alpha_prod_t, beta_prod_t):
        p = self.config.prediction_type
        if p == "epsilon":
            return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        if p == "sample":
            return model_output
        return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output

    def _ddim(self, i, model_output, sample):
        c = self.config
        t, prev = self.timesteps[i], self._prev(i)
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        if c.prediction_type == "epsilon":
            x0 = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            eps = model_output
        elif c.prediction_type == "sample":
            x0 = model_output
            eps = (sample - alpha_prod_t ** (0.5) * x0) / beta_prod_t ** (0.5)
        else:
            x0 = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            eps = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        std_dev_t = 0.0  # eta = 0, what the pipelines run
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * eps
        return alpha_prod_t_prev ** (0.5) * x0 + direction

    def _plms(self, i, model_output, sample):
        t = self.timesteps[i]
        prev = t - self.config.num_train_timesteps // self.steps
        if i != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:  # the repeated first timestep: the step from t again, with the two outputs averaged
            prev, t = t, t + self.config.num_train_timesteps // self.steps
        if len(self.ets) == 1 and i == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and i == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            e = self.ets
            model_output = (1 / 24) * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denom = (alpha_prod_t * beta_prod_t_prev ** (0.5)
                 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5))
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom

    def _dpm(self, i, model_output, sample):
        c = self.config
        n = len(self.timesteps)
        lower_order_final = i == n - 1 and ((c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")
        lower_order_second = i == n - 2 and c.lower_order_final and n < 15
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i])
        if c.prediction_type == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif c.prediction_type == "sample":
            x0 = model_output
        else:
            x0 = alpha_t * sample - sigma_t * model_output
        for k in range(c.solver_order - 1):
            self.outputs[k] = self.outputs[k + 1]
        self.outputs[-1] = x0
        dtype, sample = x0.dtype, sample.to(torch.float32)
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev = self._dpm_first(i, x0, sample)
        else:
            del lower_order_second  # order 2 is the highest run here: the second-order update either way
            prev = self._dpm_second(i, sample)
        if self.lower_order_nums < c.solver_order:
            self.lower_order_nums += 1
        return prev.to(dtype)

    def _dpm_first(self, i, x0, sample):
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s) - torch.log(sigma_s))
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0

    def _dpm_second(self, i, sample):
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
        m0, m1 = self.outputs[-1], self.outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.config.solver_type == "midpoint":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)

    def _ddpm(self, i, model_output, sample, noise):
        c = self.config
        t = self.timesteps[i]
        prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev] if prev >= 0 else torch.tensor(1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        x0 = self._x0(model_output, sample, alpha_prod_t, beta_prod_t)
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        x0_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + sample_coeff * sample
        if t > 0:
            variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
            if c.variance_type == "fixed_small_log":
                std = torch.exp(0.5 * torch.log(variance))
            else:
                std = variance ** 0.5
            prev_sample = prev_sample + std * noise
        return prev_sample


def _alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def add_noise(config: SamplerConfig, samples: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
    """The forward process at timestep `level` (the image-embedding noising of Stable unCLIP)."""
    alphas_cumprod = config.alphas_cumprod().to(dtype=samples.dtype)
    index = torch.tensor([level] * samples.shape[0])
    sqrt_alpha_prod = (alphas_cumprod[index] ** 0.5).flatten()
    sqrt_one_minus = ((1 - alphas_cumprod[index]) ** 0.5).flatten()
    while sqrt_alpha_prod.dim() < samples.dim():
        sqrt_alpha_prod, sqrt_one_minus = sqrt_alpha_prod.unsqueeze(-1), sqrt_one_minus.unsqueeze(-1)
    return sqrt_alpha_prod.to(samples.device) * samples + sqrt_one_minus.to(samples.device) * noise
