"""Stable unCLIP's samplers (unclip.engine.sd_schedulers) against diffusers' schedulers: the same
timesteps, and each step the same float32 result for the same model outputs and noise; refusals of
what is not run."""

from __future__ import annotations

import diffusers
import pytest
import torch

from unclip.engine.sd_schedulers import SamplerConfig, Solver, add_noise
from unclip.errors import UnclipError

# Same operations in the same order on the same float32 tensors: measured 0. The bound leaves room for
# a torch build that fuses a multiply-add differently, far below the 1e-4 pipeline parity bound.
STEP_TOLERANCE = 1e-6
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          set_alpha_to_one=False, clip_sample=False)  # Stable Diffusion 2.1's schedule
CLASSES = {"ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
           "dpm++": diffusers.DPMSolverMultistepScheduler, "ddpm": diffusers.DDPMScheduler}
PRIOR = dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=5.0,
             prediction_type="sample", variance_type="fixed_small_log")  # the text-to-image prior's


def run_both(kind: str, config: dict, steps: int, shape=(2, 4, 8, 8)):
    cls = CLASSES[kind]
    theirs = cls.from_config(config)  # keys a class does not take are left out, as diffusers loads them
    ours = Solver(SamplerConfig.from_dict({**theirs.config, "_class_name": type(theirs).__name__}), steps)
    theirs.set_timesteps(steps)
    assert ours.timesteps == theirs.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x_theirs = x_ours = torch.randn(shape, generator=g)
    worst = 0.0
    for i, t in enumerate(theirs.timesteps):
        out = torch.randn(shape, generator=g)
        kwargs, noise = {}, None
        if kind == "ddpm":
            kwargs["generator"] = torch.Generator().manual_seed(100 + i)
            if ours.has_noise[i]:  # the same draw diffusers' step makes from its generator
                noise = torch.randn(shape, generator=torch.Generator().manual_seed(100 + i))
        x_theirs = theirs.step(out, t, x_theirs, return_dict=False, **kwargs)[0]
        x_ours = ours.step(i, out, x_ours, noise)
        worst = max(worst, float((x_theirs - x_ours).abs().max()))
    return worst


@pytest.mark.parametrize("kind", ["ddim", "pndm", "dpm++"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_latent_samplers_match_diffusers(kind, spacing, prediction):
    for steps in (2, 5, 20):  # 20: DPM-Solver++ without its lower-order final steps (>= 15)
        config = dict(SD, timestep_spacing=spacing, prediction_type=prediction, skip_prk_steps=True)
        assert run_both(kind, config, steps) <= STEP_TOLERANCE


def test_dpm_solver_variants_match_diffusers():
    for extra in (dict(solver_type="heun"), dict(solver_order=1), dict(final_sigmas_type="sigma_min"),
                  dict(lower_order_final=False)):
        assert run_both("dpm++", dict(SD, prediction_type="v_prediction", **extra), 6) <= STEP_TOLERANCE


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_ddpm_prior_sampler_matches_diffusers(spacing):
    for steps in (3, 25):
        assert run_both("ddpm", dict(PRIOR, timestep_spacing=spacing), steps, shape=(2, 32)) <= STEP_TOLERANCE


def test_add_noise_matches_diffusers():
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    config = SamplerConfig.from_dict(dict(theirs.config, _class_name="DDPMScheduler"))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    for level in (0, 100, 999):
        want = theirs.add_noise(x, noise, torch.tensor([level] * 3))
        assert float((add_noise(config, x, noise, level) - want).abs().max()) <= STEP_TOLERANCE


def test_switching_sampler_keeps_the_schedule():
    """--scheduler ddim on a PNDM checkpoint: diffusers' DDIMScheduler.from_config(pndm.config)."""
    pndm = diffusers.PNDMScheduler.from_config(dict(SD, skip_prk_steps=True, prediction_type="v_prediction"))
    ddim = diffusers.DDIMScheduler.from_config(pndm.config)
    ddim.set_timesteps(7)
    ours = SamplerConfig.from_dict(dict(pndm.config, _class_name="PNDMScheduler"), kind="ddim")
    assert ours.kind == "ddim" and ours.prediction_type == "v_prediction"
    assert ours.timesteps(7) == ddim.timesteps.tolist()


@pytest.mark.parametrize("config,message", [
    (dict(_class_name="EulerDiscreteScheduler"), "scheduler 'EulerDiscreteScheduler' is not one unclip runs"),
    (dict(_class_name="DDIMScheduler", thresholding=True), "sets thresholding=True"),
    (dict(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++"), "algorithm_type"),
    (dict(_class_name="PNDMScheduler", skip_prk_steps=False), "skip_prk_steps=false"),
    (dict(_class_name="DDIMScheduler", beta_schedule="sigmoid"), "beta_schedule 'sigmoid'"),
])
def test_refusals_name_the_setting(config, message):
    with pytest.raises(UnclipError, match=message):
        SamplerConfig.from_dict(config)
