"""Fused kernels: the torch references against the runtime they replace, and the Triton kernels
against the references: in every run on CPU under Triton's interpreter at small shapes
(in a child process: tests/triton_interpreter.py), and with `gpu` compiled on CUDA at full shapes
(Karlo's included)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from tests.triton_interpreter import remote
from unclip.engine.scheduler import SchedulerConfig, StepTable, predicted_x0, step_table
from unclip.kernels.group_norm_silu import (
    GroupNormSiLU,
    SkipIfActivated,
    fuse_group_norm_silu,
    group_norm_silu_reference,
)
from unclip.kernels.guidance_step import GuidanceStep, guidance_step_reference


def scheduler_step(config: SchedulerConfig, table: StepTable, i: int, model_output: torch.Tensor,
                   sample: torch.Tensor, noise: torch.Tensor | None,
                   predicted_variance: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: diffusers' UnCLIPScheduler.step in its own per-step form (x_{t_i} -> x_{t_{i+1}}:
    predict x0, clip it, take the posterior mean, add scaled noise), which the package's one update
    (guidance_step_reference, and the Triton kernel) must equal."""
    x0 = predicted_x0(config, table, i, model_output, sample)
    prev = table.x0_coeff[i] * x0 + table.xt_coeff[i] * sample
    if not table.has_noise[i]:
        return prev
    if config.variance_type == "learned_range" and predicted_variance is not None:
        frac = (predicted_variance + 1) / 2
        log_variance = frac * table.max_log[i] + (1 - frac) * table.min_log[i]
        return prev + (0.5 * log_variance).exp() * noise
    return prev + table.noise_std[i] * noise

# (sample shape, channels split, guided): prior [B, D]; decoder [B, C, H, W] with eps + variance
# channels; super-resolution [B, C, H, W] unguided
SHAPES = [((2, 32), None, True), ((1, 32), None, False), ((2, 3, 8, 8), 3, True),
          ((3, 3, 8, 8), 3, False), ((1, 3, 16, 16), None, False)]
CONFIGS = [SchedulerConfig(variance_type=v, prediction_type=p)
           for v in ("fixed_small_log", "learned_range") for p in ("epsilon", "sample")]


def pipeline_update(config, table, i, out, x, z, guidance, channels, guided):
    """What Pipeline.prior/decoder/super_res do after a network call (copied from its loops)."""
    c = channels if channels is not None else out.shape[1]
    if guided:
        uncond, cond = out.chunk(2)
        eps = uncond[:, :c] + guidance * (cond[:, :c] - uncond[:, :c])
        variance = cond[:, c:]
    else:
        eps, variance = out[:, :c], out[:, c:]
    return scheduler_step(config, table, i, eps, x, z,
                          predicted_variance=variance if variance.shape[1] == c else None)


def random_step_inputs(shape, channels, guided, steps, seed):
    g = torch.Generator().manual_seed(seed)
    out_channels = 2 * channels if channels is not None else shape[1]
    rows = shape[0] * (2 if guided else 1)
    out = torch.randn((rows, out_channels, *shape[2:]), generator=g)
    x = torch.randn(shape, generator=g)
    noise = torch.randn((steps, *shape), generator=g)
    noise[-1] = 0  # the runtime's noise buffer holds zeros for the last step (t = 0 adds none)
    return out, x, noise


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.variance_type}-{c.prediction_type}")
@pytest.mark.parametrize("shape,channels,guided", SHAPES)
def test_guidance_step_reference_is_the_pipeline_update_bit_for_bit(config, shape, channels, guided):
    steps, guidance = 5, 7.5
    table = step_table(config, steps)
    out, x, noise = random_step_inputs(shape, channels, guided, steps, seed=len(shape) + steps)
    spec = GuidanceStep(config, guided=guided, channels=channels)
    for i in range(steps):  # every step, the noiseless last one included
        expected = pipeline_update(config, table, i, out, x, noise[i] if table.has_noise[i] else None,
                                   guidance, channels, guided)
        got = guidance_step_reference(spec, table, torch.tensor([i]), out, x, noise,
                                      torch.tensor([guidance]))
        # same float32 operations in the same order on CPU, so equal to the last bit
        assert torch.equal(got, expected), (i, (got - expected).abs().max())


def test_guidance_step_reference_reads_half_outputs_in_float32():
    config, steps = CONFIGS[1], 3
    table = step_table(config, steps)
    out, x, noise = random_step_inputs((2, 3, 8, 8), 3, True, steps, seed=0)
    spec = GuidanceStep(config, guided=True, channels=3)
    half = out.half()
    got = guidance_step_reference(spec, table, torch.tensor([0]), half, x, noise, torch.tensor([4.0]))
    expected = pipeline_update(config, table, 0, half.float(), x, noise[0], 4.0, 3, True)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def fresh_unets() -> tuple[dict, dict, object]:
    """The tiny preset's UNet adapters (fresh weights: fusion edits modules in place), specs, dims."""
    from unclip.models.components import build_preset
    from unclip.models.networks import adapters, model_dims
    from unclip.specs import network_specs

    c = build_preset("tiny", seed=0)
    dims = model_dims(c)
    nets = {k: m.eval() for k, m in adapters(c).items() if k in ("decoder", "super_res_first")}
    return nets, network_specs(dims), dims


def test_group_norm_silu_fusion_keeps_the_unet_output_identical_on_cpu():
    from unclip.specs import example_inputs

    nets, specs, dims = fresh_unets()
    for name, adapter in nets.items():
        fused = copy.deepcopy(adapter)
        count = fuse_group_norm_silu(fused, use_triton=True)  # on CPU the torch reference runs
        # each resnet fuses norm1; norm2 only without scale-shift; plus the UNet's output norm
        resnets = [m for m in adapter.modules() if type(m).__name__ == "ResnetBlock2D"]
        assert resnets
        assert count == sum(1 if r.time_embedding_norm == "scale_shift" else 2 for r in resnets) + 1
        inputs = example_inputs(specs[name], dims, 2, torch.Generator().manual_seed(0)).values()
        with torch.inference_mode():
            assert torch.equal(fused(*inputs), adapter(*inputs)), name


def test_skip_if_activated_applies_silu_to_other_tensors():
    norm = GroupNormSiLU(torch.nn.GroupNorm(2, 4), use_triton=False)
    act = SkipIfActivated(torch.nn.SiLU(), [norm])
    x = torch.randn(1, 4, 3, 3)
    y = norm(x)
    assert act(y) is y  # the fused norm's own output passes through once
    assert torch.equal(act(y), torch.nn.functional.silu(y))  # consumed: a second call activates
    other = torch.randn(2, 8)
    assert torch.equal(act(other), torch.nn.functional.silu(other))


# -- the Triton kernels against the references ---------------------------------------------------
#
# `device` "interpreter": the kernels interpreted on CPU tensors in the child process (every run);
# "cuda": the compiled kernels in this process (gpu). Same test bodies, same tolerances.

def kernel(device: str, target: str):
    """The function `target` ("module:name") to call for `device`."""
    if device == "interpreter":
        return partial(remote, target)
    module, _, name = target.partition(":")
    return getattr(__import__(module, fromlist=[name]), name)


def on(device: str) -> str:
    return "cpu" if device == "interpreter" else device


def runs(cpu: list, gpu: list) -> list:
    """Parameters: `cpu` under the interpreter and on CUDA, `gpu` (the large shapes) on CUDA only."""
    return ([pytest.param("interpreter", *c, id=f"interpreter-{c}") for c in cpu]
            + [pytest.param("cuda", *c, marks=pytest.mark.gpu, id=f"cuda-{c}") for c in cpu + gpu])


STEP = "unclip.kernels.guidance_step:guidance_step_triton"
GROUP_NORM_SILU = "unclip.kernels.group_norm_silu:group_norm_silu_triton"
# Karlo's shapes at batch 8: prior, decoder, super-resolution
KARLO_STEP_SHAPES = [((8, 768), None, True), ((8, 3, 64, 64), 3, True), ((8, 3, 256, 256), None, False)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.variance_type}-{c.prediction_type}")
@pytest.mark.parametrize("device,shape,channels,guided", runs(SHAPES, KARLO_STEP_SHAPES))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
def test_guidance_step_triton_matches_reference(device, config, shape, channels, guided, out_dtype):
    step_kernel = kernel(device, STEP)
    steps, dev = 4, on(device)
    table = step_table(config, steps).to(dev)
    out, x, noise = (t.to(dev) for t in random_step_inputs(shape, channels, guided, steps, seed=1))
    out = out.to(out_dtype)
    spec = GuidanceStep(config, guided=guided, channels=channels)
    guidance = torch.tensor([6.0], device=dev)
    for i in range(steps):
        step = torch.tensor([i], device=dev)
        expected = guidance_step_reference(spec, table, step, out, x, noise, guidance)
        got = step_kernel(spec, table, step, out, x, noise, guidance)
        # float32 both; Triton may contract a*b+c into one FMA and uses a fast exp: a few ulp
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    in_place, step = x.clone(), torch.tensor([0], device=dev)
    got = step_kernel(spec, table, step, out, in_place, noise, guidance, out=in_place)  # reads x, writes x
    expected = guidance_step_reference(spec, table, step, out, x, noise, guidance)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if device == "cuda":
        assert got is in_place


# tolerance per dtype against the float32 reference of the same input: the output's own rounding
# (fp16 ~1e-3, bf16 ~8e-3 relative) plus one-pass vs Welford statistics in float32
GN_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 2e-2)}
# on CPU: tiny's activations, an odd size (masked tail of the last block) and a group of 33800
# values (three 16384-value chunks per group, the path Karlo's super-resolution takes)
GN_SHAPES = [((2, 32, 16, 16), 8), ((3, 96, 5, 7), 32), ((1, 8, 130, 130), 4)]
# on CUDA also Karlo's decoder and super-resolution activations
KARLO_GN_SHAPES = [((2, 320, 64, 64), 32), ((1, 640, 32, 32), 32), ((16, 1280, 8, 8), 32),
                   ((2, 320, 256, 256), 32)]


@pytest.mark.parametrize("dtype", list(GN_TOLERANCE))
@pytest.mark.parametrize("device,shape,groups", runs(GN_SHAPES, KARLO_GN_SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_silu_triton_matches_reference(device, dtype, shape, groups, affine):
    fused, dev = kernel(device, GROUP_NORM_SILU), on(device)
    g = torch.Generator(dev).manual_seed(0)
    x = (torch.randn(shape, device=dev, generator=g) * 3 + 0.5).to(dtype)
    c = shape[1]
    weight = torch.randn(c, device=dev, generator=g).to(dtype) if affine else None
    bias = torch.randn(c, device=dev, generator=g).to(dtype) if affine else None
    expected = group_norm_silu_reference(x.float(), groups, None if weight is None else weight.float(),
                                         None if bias is None else bias.float(), 1e-5)
    got = fused(x, groups, weight, bias, 1e-5)
    atol, rtol = GN_TOLERANCE[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_group_norm_silu_refuses_channels_not_divisible_by_groups():
    """As nn.GroupNorm does: the kernels would leave the channels past the last whole group unwritten."""
    fused = kernel("interpreter", GROUP_NORM_SILU)
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(AssertionError, match="ValueError: group_norm_silu: 6 channels are not divisible"):
        fused(x, 4, None, None, 1e-5)
    with pytest.raises(ValueError, match="divisible"):
        torch.nn.GroupNorm(4, 6)
    assert fused(x, 3, None, None, 1e-5).shape == x.shape  # 6 = 3 groups of 2: accepted


def fused_unet_errors(network: str, dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(unfused, fused) relative error of tiny's `network` in `dtype` against float32, on `device`
    (run in the interpreter child for CPU: GroupNormSiLU takes the Triton path where it can)."""
    from unclip.specs import example_inputs

    nets, specs, dims = fresh_unets()
    reference = nets[network].to(device)
    inputs = example_inputs(specs[network], dims, 2, torch.Generator().manual_seed(0))
    half = copy.deepcopy(reference).to(dtype)
    fused = copy.deepcopy(half)
    assert fuse_group_norm_silu(fused, use_triton=True) > 0
    cast = [v.to(device, dtype) if v.is_floating_point() and k != "timestep" else v.to(device)
            for k, v in inputs.items()]

    def error(out: torch.Tensor) -> float:
        return float((out.double() - expected).norm() / expected.norm())

    with torch.inference_mode():
        expected = reference(*(v.to(device) for v in inputs.values())).double()
        return error(half(*cast)), error(fused(*cast))


@pytest.mark.parametrize("device,dtype,network", [
    pytest.param("interpreter", torch.float16, "decoder", id="interpreter-fp16-decoder"),
    *[pytest.param("cuda", d, n, marks=pytest.mark.gpu, id=f"cuda-{d}-{n}".replace("torch.", ""))
      for d in (torch.float16, torch.bfloat16) for n in ("decoder", "super_res_first")],
])
def test_fused_unets_are_as_accurate_as_the_unfused_pair(device, dtype, network):
    """The oracle for fused half UNets is the float32 network: the fused norm rounds once where the
    pair (GroupNorm, then SiLU) rounds twice, so its relative error against float32 must not exceed
    the unfused half network's. Measured on CPU under the interpreter (tiny, batch 2): fused / unfused
    0.955 (decoder) and 0.900 (super-res) in fp16, 0.985 and 0.934 in bf16; 1.25 leaves room for
    other kernels' rounding. Per network: before a guided loop amplifies any difference."""
    check = kernel(device, "tests.test_kernels:fused_unet_errors")
    unfused, fused = check(network, dtype, on(device))
    assert 0 < fused <= 1.25 * unfused, (fused, unfused)
