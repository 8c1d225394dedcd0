"""The fast path's stage runner, precision policy and options.

On CPU the runner runs its step function uncaptured, in float32, and must give exactly the
images of the pipeline's plain loops: that checks buffers, noise order, the step counter and the
guidance buffer without a GPU. With both Triton kernels (interpreted, in a child process:
tests/triton_interpreter.py) the same loop checks the kernels' wiring. The `gpu` tests check
capture, half precision and the compiled kernels.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from tests.conftest import FAST_STEPS
from tests.triton_interpreter import remote
from unclip.engine.batch import partial_steps
from unclip.engine.cuda_graphs import StageRunner, pool_allocations
from unclip.engine.pipeline import Pipeline
from unclip.errors import UnclipError

PROMPTS = ["a red circle", "a blue square"]


def make_pipeline(device="cpu", dtype="fp32", cuda_graphs=False, kernels=False, runner=None,
                  preset="tiny", step_cache=1):
    """A pipeline on fresh preset weights (the fast path edits networks in place)."""
    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.fast_path import fast_path
    from unclip.models.components import build_preset
    from unclip.models.networks import model_dims

    c = build_preset(preset, seed=0)
    backend = TorchBackend(c, device)
    if runner == "uncaptured":  # the CPU oracle: the runner's step function, eagerly, float32
        return Pipeline(backend, c.tokenizer, model_dims(c), c.schedulers, step_cache=step_cache,
                        stage_runner=StageRunner(backend, capture=False, kernels=kernels))
    backend, stage_runner = fast_path(backend, dtype, cuda_graphs, kernels)  # fp32 alone: (backend, None)
    return Pipeline(backend, c.tokenizer, model_dims(c), c.schedulers, stage_runner=stage_runner,
                    step_cache=step_cache)


SETTINGS = [
    dict(num_images=1, **FAST_STEPS),  # guided (4 / 8)
    dict(num_images=2, prior_guidance=1.0, decoder_guidance=1.0, **FAST_STEPS),  # unguided
    dict(num_images=1, use_prior=False, decoder_guidance=3.0, **FAST_STEPS),  # prior-free
]


@pytest.fixture(scope="module")
def plain_and_runner():
    return make_pipeline(), make_pipeline(runner="uncaptured")


@pytest.mark.parametrize("settings", SETTINGS, ids=["guided", "unguided", "prior-free"])
def test_uncaptured_runner_equals_the_plain_loops_on_cpu(plain_and_runner, settings):
    plain, fast = plain_and_runner
    expected = plain.generate(PROMPTS, seed=3, output_type="np", **settings)
    got = fast.generate(PROMPTS, seed=3, output_type="np", **settings)
    assert np.array_equal(got, expected)  # float32, same operations: identical


def test_runner_with_fused_group_norm_reference_equals_the_plain_loops_on_cpu(plain_and_runner):
    from unclip.engine.fast_path import UNETS
    from unclip.kernels.group_norm_silu import fuse_group_norm_silu

    plain, _ = plain_and_runner
    fast = make_pipeline(runner="uncaptured", kernels=True)  # Triton step needs CUDA: reference on CPU
    assert all(fuse_group_norm_silu(fast.backend.networks[n], use_triton=True) > 0 for n in UNETS)
    expected = plain.generate(PROMPTS, seed=5, output_type="np", **FAST_STEPS)
    assert np.array_equal(fast.generate(PROMPTS, seed=5, output_type="np", **FAST_STEPS), expected)


def test_runner_buffers_are_cached_per_stage_batch_and_steps(plain_and_runner):
    _, fast = plain_and_runner
    runner = fast.stage_runner
    runner.buffers.clear()
    fast.generate(PROMPTS, seed=0, output_type="np", **FAST_STEPS)
    keys = set(runner.buffers)
    first = {k: b.x for k, b in runner.buffers.items()}
    fast.generate(PROMPTS[:1] * 2, seed=1, output_type="np", **FAST_STEPS)  # same batch and steps
    assert set(runner.buffers) == keys and all(runner.buffers[k].x is first[k] for k in keys)
    assert {(stage, rows, len(networks)) for stage, rows, networks, _ in keys} == {
        ("prior", 2, 3), ("decoder", 2, 4), ("super_res", 2, 2)}
    fast.generate(PROMPTS[:1], seed=1, output_type="np", **FAST_STEPS)  # a new batch size: new buffers
    assert len(runner.buffers) == 6


def test_half_precision_policy_and_runner_on_cpu_bf16():
    """bf16 runs on CPU too, so the half path's casts are checked here: networks in bf16, outputs
    read back as float32, timesteps kept float32, and the runner equal to the plain loops."""
    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.precision import PrecisionBackend
    from unclip.models.components import build_preset
    from unclip.models.networks import model_dims

    c = build_preset("tiny", seed=0)
    backend = PrecisionBackend(TorchBackend(c), "bf16")
    assert {p.dtype for net in backend.networks.values() for p in net.parameters()} == {torch.bfloat16}
    seen = {}
    backend.networks["decoder"].register_forward_pre_hook(
        lambda _m, args: seen.update(sample=args[0].dtype, timestep=args[1].dtype))
    plain = Pipeline(backend, c.tokenizer, model_dims(c), c.schedulers)
    fast = Pipeline(backend, c.tokenizer, model_dims(c), c.schedulers,
                    stage_runner=StageRunner(backend, capture=False, kernels=False))
    expected = plain.generate(PROMPTS, seed=3, output_type="np", **FAST_STEPS)
    assert seen == {"sample": torch.bfloat16, "timestep": torch.float32}
    assert backend.run("text_encoder", input_ids=torch.ones(1, 77, dtype=torch.long))["text_embeds"].dtype \
        == torch.float32
    assert np.array_equal(fast.generate(PROMPTS, seed=3, output_type="np", **FAST_STEPS), expected)


class NanDecoder:
    """A backend whose decoder returns NaN: what an fp16 overflow looks like to the pipeline."""

    def __init__(self, backend):
        self._backend = backend

    def run(self, network, **inputs):
        out = self._backend.run(network, **inputs)
        return {k: torch.full_like(v, float("nan")) for k, v in out.items()} if network == "decoder" else out

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_non_finite_stage_output_names_stage_precision_and_batch(plain_and_runner):
    plain, _ = plain_and_runner
    broken = Pipeline(NanDecoder(plain.backend), plain.tokenizer, plain.dims, plain.schedulers)
    with pytest.raises(UnclipError, match=r"the decoder stage .*precision fp32, batch 2\)"):
        broken.generate(PROMPTS, seed=0, **FAST_STEPS)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp8"), "unknown --dtype 'fp8'"),
    (dict(dtype="fp16"), "--dtype fp16 is the GPU fast path and needs --device cuda"),
    (dict(cuda_graphs=True), "--cuda-graphs is the GPU fast path"),
    (dict(kernels=True), "--kernels is the GPU fast path"),
    (dict(backend="onnxruntime", dtype="bf16"), "--dtype bf16 applies to --backend torch only"),
])
def test_load_rejects_fast_path_options_it_cannot_honour(kwargs, message):
    import unclip

    with pytest.raises(UnclipError, match=message.replace("(", r"\(")):
        unclip.load("tiny", **kwargs)


def test_cli_generate_fp16_on_cpu_is_one_line_and_exit_1(tmp_path):
    from click.testing import CliRunner

    from unclip.cli import cli

    result = CliRunner().invoke(cli, ["generate", "a cat", "--model", "tiny", "--dtype", "fp16",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("unclip: error: ") and "needs --device cuda" in lines[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# -- GPU -----------------------------------------------------------------------------------------

# Images are compared by their mean absolute difference and the share of values that differ by
# more than a threshold, not by the maximum: random weights drive many pixels to the clamp at
# +-1, where one rounding can flip a pixel from 0 to 1 (on CPU, tiny at fp16 vs fp32: mean 3e-4 to
# 9e-3, max 0.99). (mean bound, threshold, largest share above the threshold):
# captured vs uncaptured run the same kernels on the same buffers; only cuBLAS/cuDNN algorithm
# choices may differ inside the graph, so nearly nothing may move
CAPTURE_TOLERANCE = (1e-3, 1e-2, 1e-3)
# graphs + kernels against the plain loops, all in float32 (TF32 off), unguided: the fused math
# alone, without guidance amplifying differences into flipped pixels. The kernels differ from
# torch's ops by a few ulp (kernel tests: <= 1e-5). Emulated on CPU (kernels under the interpreter,
# uncaptured, FAST_STEPS, batch 2): tiny mean 2.0e-7, max 1.2e-3 (one value in 6144), none off by
# more than 1e-2; small: see docs/gpu.md.
FUSED_MATH_TOLERANCE = (1e-4, 1e-2, 1e-3)
# half precision, guided: fused kernels against eager, both measured by their distance to the float32
# loops (mean abs over the images). Emulated on CPU (tiny, batch 2): fp16 fused/eager 0.0105/0.0116
# = 0.91, bf16 0.0245/0.0286 = 0.86; the distance is mostly saturated pixels flipped (a count of ~70
# on tiny), so the bound has room for count noise: 1.25.
HALF_RATIO = 1.25
# fp16 vs fp32: a different precision, loose
PRECISION_TOLERANCE = (2e-2, 5e-2, 5e-2)


def assert_images_close(got: np.ndarray, expected: np.ndarray, tolerance: tuple[float, float, float]):
    mean_bound, threshold, share = tolerance
    diff = np.abs(got.astype(np.float64) - expected)
    assert np.isfinite(got).all()
    assert diff.mean() <= mean_bound, f"mean abs difference {diff.mean():.2e} > {mean_bound}"
    moved = (diff > threshold).mean()
    assert moved <= share, f"{moved:.2%} of values differ by more than {threshold}"


def gpu_images(pipe, batch=2, **settings):
    prompts = (PROMPTS * batch)[:batch]
    return pipe.generate(prompts, seed=11, output_type="np", **{**FAST_STEPS, **settings})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_captured_matches_uncaptured_half_precision(dtype, preset):
    eager = make_pipeline("cuda", dtype, preset=preset)
    captured = make_pipeline("cuda", dtype, cuda_graphs=True, preset=preset)
    expected = gpu_images(eager)
    got = gpu_images(captured)
    assert_images_close(got, expected, CAPTURE_TOLERANCE)
    # a replay of the cached graphs gives the same images again, bit for bit
    assert np.array_equal(gpu_images(captured), got)


@contextmanager
def no_tf32():
    """TF32 would round two paths' slightly different float32 activations differently."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def fused_math_images(preset: str, device: str, batch: int, unfused: tuple[str, ...] = (),
                      **settings) -> tuple[np.ndarray, np.ndarray]:
    """(plain loops, runner with both kernels) images in float32 on `device`: on CUDA the stages are
    captured; on CPU (in the interpreter child) they run uncaptured. The UNets named in `unfused`
    keep torch's GroupNorm and SiLU (the same weights: both pipelines are built from one seed)."""
    from unclip.kernels import group_norm_silu, guidance_step

    x = torch.zeros(1, device=device)
    assert group_norm_silu.runs_on(x) and guidance_step.runs_on(x), "the Triton kernels would not run here"
    with no_tf32():
        plain = make_pipeline(device, preset=preset)
        fused = make_pipeline(device, cuda_graphs=device == "cuda", kernels=True, preset=preset)
        for name in unfused:
            fused.backend.networks[name] = plain.backend.networks[name]
        return gpu_images(plain, batch, **settings), gpu_images(fused, batch, **settings)


UNGUIDED = dict(prior_guidance=1.0, decoder_guidance=1.0)


@pytest.mark.slow
def test_runner_with_both_kernels_matches_the_plain_loops_interpreted():
    """Both kernels wired in (GroupNorm+SiLU in the decoder UNet, the fused step in the runner's step
    body for every stage) and run by Triton's interpreter on CPU: the CPU twin of the GPU test below,
    at fewer steps and one image. The super-resolution UNets keep torch's GroupNorm here: the same
    module replacement, but 22 of the 29 interpreted seconds (the kernel's shapes are covered in
    tests/test_kernels.py; on the GPU both UNets run fused)."""
    steps = dict(prior_steps=2, decoder_steps=2, super_res_steps=2)
    expected, got = remote("tests.test_cuda_graphs:fused_math_images", "tiny", "cpu", 1,
                           ("super_res_first", "super_res_last"), **UNGUIDED, **steps)
    assert expected.std() > 0.05  # a real image, not a constant that would hide differences
    assert_images_close(got, expected, FUSED_MATH_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_graphs_and_kernels_match_the_plain_loops_fp32(preset):
    """The fused math against its sound oracle: the same loops, float32, unguided."""
    expected, got = fused_math_images(preset, "cuda", 2, **UNGUIDED)
    assert_images_close(got, expected, FUSED_MATH_TOLERANCE)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_graphs_and_kernels_half_are_as_close_to_fp32_as_eager(preset, dtype):
    """The fast path as it runs (half, graphs, kernels, guided) against the float32 loops, compared
    with eager half against the same: in half precision guidance 8 amplifies any rounding into
    flipped saturated pixels (the fused norm rounds once, the pair twice: different, not worse), so
    eager half is no oracle for the kernels, but float32 is one for both. Per network, before any
    amplification, test_kernels.py::test_fused_unets_are_as_accurate_as_the_unfused_pair."""
    with no_tf32():
        reference = gpu_images(make_pipeline("cuda", preset=preset), 4).astype(np.float64)
    eager = gpu_images(make_pipeline("cuda", dtype, preset=preset), 4)
    fused = gpu_images(make_pipeline("cuda", dtype, cuda_graphs=True, kernels=True, preset=preset), 4)
    assert np.isfinite(fused).all()
    eager_distance, fused_distance = np.abs(eager - reference).mean(), np.abs(fused - reference).mean()
    assert fused_distance <= HALF_RATIO * eager_distance, (fused_distance, eager_distance)


@pytest.mark.gpu
def test_fp16_eager_is_close_to_fp32():
    assert_images_close(gpu_images(make_pipeline("cuda", "fp16")), gpu_images(make_pipeline("cuda", "fp32")),
                        PRECISION_TOLERANCE)


@pytest.mark.gpu
def test_graph_cache_reuses_graphs_per_stage_batch_and_steps():
    pipe = make_pipeline("cuda", "fp16", cuda_graphs=True)
    runner = pipe.stage_runner
    gpu_images(pipe, batch=1)
    graphs = {k: dict(b.graphs) for k, b in runner.buffers.items()}  # one step of each network
    assert {k[0]: set(g) for k, g in graphs.items()} == {
        "prior": {"prior"}, "decoder": {"decoder"}, "super_res": {"super_res_first", "super_res_last"}}
    gpu_images(pipe, batch=1, prior_guidance=2.0, decoder_guidance=5.0)  # new scales: same graphs
    assert {k: b.graphs for k, b in runner.buffers.items()} == graphs
    assert all(b.runs == 2 and b.replays == 2 * len(k[2]) for k, b in runner.buffers.items())
    gpu_images(pipe, batch=2)  # new row bucket: new buffers and graphs
    assert len(runner.buffers) == 6
    gpu_images(pipe, batch=1, decoder_steps=5)  # new step count: a new decoder graph
    assert len(runner.buffers) == 7


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fp16_overflow_is_an_error_naming_stage_precision_and_batch(cuda_graphs):
    pipe = make_pipeline("cuda", "fp16", cuda_graphs=cuda_graphs)
    with torch.no_grad():  # a decoder whose output overflows fp16 (max 65504)
        pipe.backend.networks["decoder"].net.conv_out.weight.mul_(1e6)
    with pytest.raises(UnclipError, match=r"the decoder stage .*precision fp16, batch 2\)"):
        gpu_images(pipe, batch=2)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_step_cache_captured_matches_uncaptured_half_precision(preset):
    """The step cache on the graph path: the full step's graph leaves its features in static buffers
    that the shallow step's graph reads, as the eager loop carries them; one graph per network."""
    eager = make_pipeline("cuda", "fp16", preset=preset, step_cache=2)
    captured = make_pipeline("cuda", "fp16", cuda_graphs=True, preset=preset, step_cache=2)
    expected, got = gpu_images(eager), gpu_images(captured)
    assert_images_close(got, expected, CAPTURE_TOLERANCE)
    assert not np.array_equal(expected, gpu_images(make_pipeline("cuda", "fp16", preset=preset)))
    schedules = {key[2] for key in captured.stage_runner.buffers if key[0] == "decoder"}
    assert schedules == {("decoder_full", "decoder_shallow") * 2}
    assert all(set(b.graphs) == {"decoder_full", "decoder_shallow"}
               for k, b in captured.stage_runner.buffers.items() if k[0] == "decoder")


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_streamed_previews_on_the_gpu_leave_the_images_unchanged(cuda_graphs):
    """Previews at the partial steps and at the decoder's output, eager or replayed step by step (the
    same loop); either way the final images are those of the same request without streaming, bit for
    bit."""
    pipe = make_pipeline("cuda", "fp16", cuda_graphs=cuda_graphs)
    plain = gpu_images(pipe, batch=1)
    previews = []
    streamed = gpu_images(pipe, batch=1, partial_images=3,
                          on_partial=lambda index, images: previews.append((index, images)))
    assert np.array_equal(streamed, plain)
    expected = len(partial_steps(FAST_STEPS["decoder_steps"], 3)) + 1
    assert [index for index, _ in previews] == list(range(expected))
    size = pipe.dims.super_res_size
    for _, images in previews:
        assert images.shape == (1, 3, size, size) and images.device.type == "cpu"
        assert torch.isfinite(images).all() and 0 <= images.min() and images.max() <= 1


@pytest.mark.gpu
def test_load_fast_path_through_the_public_api():
    import unclip

    pipe = unclip.load("tiny", device="cuda", dtype="fp16", cuda_graphs=True, kernels=True)
    images = pipe.generate("a cat", seed=0, **FAST_STEPS)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert pipe.backend.precision == "fp16" and pipe.stage_runner.capture and pipe.stage_runner.kernels


def test_gpu_suite_times_runner_stages_and_borrows_flops_from_eager_twin():
    """benchmarks/gpu_fastpath.py's glue, on CPU: a stage-runner pipeline is timed per step (one replay
    each), its stages split like the eager one's, and its FLOPs per stage come from the eager twin."""
    import importlib.util
    from pathlib import Path

    from unclip.engine.profiling import CallTimeline, TimedBackend, split_stages

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_fastpath.py"
    spec = importlib.util.spec_from_file_location("gpu_fastpath", path)
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.runner_options("torch-bf16-graphs-step") == dict(
        dtype="bf16", cuda_graphs=True, kernels=False, only="guidance_step", channels_last=False,
        step_cache=1)
    assert suite.runner_options("torch-fp16-graphs-gn+cache3")["step_cache"] == 3
    assert suite.runner_options("torch-fp16+cache9") is None
    assert suite.runner_options("diffusers-fp16+cache2") is None
    assert suite.runner_options("diffusers") is None and suite.runner_options("onnxruntime-fp32") is None
    assert suite.runner_options("torch-fp32") == dict(  # the eager float32 runner (the CPU tests' one)
        dtype="fp32", cuda_graphs=False, kernels=False, only=None, channels_last=False, step_cache=1)

    results = suite.FastResults({"settings": {}}, "diffusers", ["torch-fp16", "torch-fp16-graphs"], [2])
    pipes = {"torch-fp16": make_pipeline(), "torch-fp16-graphs": make_pipeline(runner="uncaptured")}
    for name, pipe in pipes.items():
        timeline = CallTimeline("cpu")
        pipe.backend = TimedBackend(pipe.backend, timeline)
        if pipe.stage_runner is not None:
            pipe.stage_runner = suite.TimedStageRunner(pipe.stage_runner, timeline)
        timeline.start()
        pipe.generate(PROMPTS, seed=0, **FAST_STEPS)
        trace = timeline.finish()
        results.add(name, 2, {"latency_ms": trace.total_ms, "stages_ms": split_stages(trace),
                              "calls": [[c.network, c.rows, c.ms] for c in trace.calls]})
    calls = {name: [c[0] for c in results.samples[(name, 2)][0]["calls"]] for name in pipes}
    assert calls["torch-fp16-graphs"] == calls["torch-fp16"] == [  # one timed call per step, on both
        "text_encoder", *["prior"] * 3, "text_proj", *["decoder"] * 4, "super_res_first", "super_res_last"]
    results.flops = {key: 10**9 for key in results.call_keys()}  # 1 GFLOP per call
    eager, graphs = results.run("torch-fp16", 2), results.run("torch-fp16-graphs", 2)
    assert eager["stage_gflop"] == {"text_encoder": 1.0, "prior": 3.0, "decoder": 5.0, "super_res": 2.0,
                                    "vae": 0.0}
    assert graphs["stage_gflop"] == eager["stage_gflop"]
    assert graphs["networks"].keys() == eager["networks"].keys()
    assert all(graphs["stage_tflops"][k] == pytest.approx(v / graphs["stages_ms"][k])
               for k, v in eager["stage_gflop"].items() if v)  # the stages tiny has (no VAE)


# -- the shared graph pool: nothing allocated during capture may outlive it ---------------------

def segment(pool, *blocks):
    """A segment of torch.cuda.memory_snapshot() (its documented keys), blocks as (size, state)."""
    return {"segment_pool_id": pool, "address": 0, "total_size": sum(b[0] for b in blocks),
            "blocks": [{"size": size, "state": state, "address": 0} for size, state in blocks]}


def test_pool_allocations_reads_live_blocks_of_one_pool():
    snapshot = [segment((0, 0), (512, "active_allocated")),  # the ordinary allocator: not the graphs'
                segment((1, 7), (2048, "inactive"), (4096, "active_allocated")),
                segment((1, 7), (1024, "active_awaiting_free")),  # freed, waiting on a stream: not live
                segment((1, 8), (256, "active_allocated"))]  # another pool
    assert pool_allocations(snapshot, (1, 7)) == [4096]
    assert pool_allocations(snapshot, (2, 0)) == []


def test_capture_check_names_stage_count_and_size(monkeypatch):
    runner = StageRunner(backend=None, capture=True, kernels=False)
    runner._pool = (1, 7)
    live = segment((1, 7), (2 * 2**20, "active_allocated"), (2**20, "active_allocated"))
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [live])
    with pytest.raises(RuntimeError, match=r"capture of the decoder stage left 2 tensor\(s\) \(3.0 MiB\) "
                                           r"allocated in the graphs' shared memory pool.*not outlive"):
        runner._check_pool("decoder")
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [segment((1, 7), (2**20, "inactive"))])
    runner._check_pool("decoder")  # all of the pool free again: accepted


class KeepsLastOutput:
    """A backend that holds on to its last output: a tensor allocated during capture outliving it."""

    def __init__(self, backend):
        self._backend, self.last = backend, None

    def run(self, network, **inputs):
        self.last = self._backend.run(network, **inputs)
        return self.last

    def run_native(self, network, **inputs):  # what the stage runner calls on a half-precision backend
        self.last = self._backend.run_native(network, **inputs)
        return self.last

    def __getattr__(self, name):
        return getattr(self._backend, name)


@pytest.mark.gpu
def test_capture_refuses_a_tensor_that_outlives_it():
    pipe = make_pipeline("cuda", "fp16", cuda_graphs=True)
    pipe.backend = KeepsLastOutput(pipe.backend)
    pipe.stage_runner.backend = pipe.backend
    with pytest.raises(RuntimeError, match="capture of the prior stage's prior step left .* not outlive"):
        gpu_images(pipe, batch=1)
    pipe.backend.last = None
    gpu_images(make_pipeline("cuda", "fp16", cuda_graphs=True), batch=1)  # the real backends hold nothing
