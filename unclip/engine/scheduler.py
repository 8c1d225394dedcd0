"""The unCLIP scheduler as per-step coefficient tables.

Semantics follow Karlo's sampler as diffusers' UnCLIPScheduler implements it (squared-cosine
betas, timesteps spaced by (T-1)/(N-1), learned-range or fixed-small-log variance, sample or
epsilon prediction, x0 clipping). Everything that depends only on the step index is computed
once per (stage, steps) into tensors, so a denoising step is a pure function of buffers.
The arithmetic (float32, same operation order) matches diffusers bit for bit on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch

VARIANCE_TYPES = ("fixed_small_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample")


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    variance_type: str = "fixed_small_log"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    @classmethod
    def from_dict(cls, data: dict) -> SchedulerConfig:
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        if config.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {config.variance_type!r} is not one of {VARIANCE_TYPES}")
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {config.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if data.get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2":
            raise ValueError("only the squaredcos_cap_v2 beta schedule is used by unCLIP")
        return config

    def to_dict(self) -> dict:
        return {"_class_name": "UnCLIPScheduler", **asdict(self), "beta_schedule": "squaredcos_cap_v2"}


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Squared-cosine schedule (Nichol & Dhariwal 2021), computed in float64 then stored as float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Karlo's spacing: N points from T-1 down to 0, rounded half to even like numpy."""
    ratio = (num_train_timesteps - 1) / (steps - 1)
    return [int(round(i * ratio)) for i in range(steps)][::-1]


@dataclass
class StepTable:
    """Per-step scalars of one stage's schedule; row i belongs to the i-th model call."""

    timesteps: torch.Tensor  # [N] float32 (exact integers), fed to the networks
    sqrt_alpha_prod: torch.Tensor  # [N] x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sqrt_beta_prod: torch.Tensor
    x0_coeff: torch.Tensor  # [N] posterior mean = x0_coeff * x0 + xt_coeff * x_t
    xt_coeff: torch.Tensor
    noise_std: torch.Tensor  # [N] fixed_small_log: std of the added noise (0 on the last step)
    min_log: torch.Tensor  # [N] learned_range: log of the posterior variance (lower end)
    max_log: torch.Tensor  # [N] learned_range: log beta (upper end)
    has_noise: list[bool]  # the last step (t = 0) adds no noise

    def to(self, device: torch.device) -> StepTable:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return StepTable(**moved)


def step_table(config: SchedulerConfig, steps: int) -> StepTable:
    betas = cosine_betas(config.num_train_timesteps)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    one = torch.tensor(1.0)
    ts = timesteps(config.num_train_timesteps, steps)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in
                                           ("sa", "sb", "c0", "ct", "std", "minl", "maxl")}
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else t - 1
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_prev = alphas_cumprod[prev] if prev >= 0 else one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_prev = 1 - alpha_prod_prev
        if prev == t - 1:
            beta, alpha = betas[t], alphas[t]
        else:
            beta = 1 - alpha_prod_t / alpha_prod_prev
            alpha = 1 - beta
        rows["sa"].append(alpha_prod_t ** 0.5)
        rows["sb"].append(beta_prod_t ** 0.5)
        rows["c0"].append((alpha_prod_prev ** 0.5 * beta) / beta_prod_t)
        rows["ct"].append(alpha ** 0.5 * beta_prod_prev / beta_prod_t)
        variance = beta_prod_prev / beta_prod_t * beta
        if t > 0:
            rows["std"].append(torch.exp(0.5 * torch.log(torch.clamp(variance, min=1e-20))))
            rows["minl"].append(variance.log())
            rows["maxl"].append(beta.log())
        else:
            zero = torch.tensor(0.0)
            rows["std"].append(zero)
            rows["minl"].append(zero)
            rows["maxl"].append(zero)
    stack = {k: torch.stack(v).float() for k, v in rows.items()}
    return StepTable(
        timesteps=torch.tensor(ts, dtype=torch.float32),
        sqrt_alpha_prod=stack["sa"], sqrt_beta_prod=stack["sb"],
        x0_coeff=stack["c0"], xt_coeff=stack["ct"],
        noise_std=stack["std"], min_log=stack["minl"], max_log=stack["maxl"],
        has_noise=[t > 0 for t in ts],
    )


def predicted_x0(config: SchedulerConfig, table: StepTable, i: int, model_output: torch.Tensor,
                 sample: torch.Tensor) -> torch.Tensor:
    """The step's prediction of the clean sample (clipped as the step clips it): what a preview shows."""
    if config.prediction_type == "epsilon":
        x0 = (sample - table.sqrt_beta_prod[i] * model_output) / table.sqrt_alpha_prod[i]
    else:
        x0 = model_output
    if config.clip_sample:
        x0 = torch.clamp(x0, -config.clip_sample_range, config.clip_sample_range)
    return x0
