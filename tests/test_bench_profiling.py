"""The measuring pieces on their own: call timeline, stage split, FLOP count, figures from samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import FAST_STEPS
from unclip.engine.profiling import STAGES, Call, CallTimeline, TimedBackend, Trace, count_flops, split_stages


def test_split_stages_adds_up_and_follows_the_rule():
    calls = [Call("text_encoder", 3, 1.0, 2.0), Call("prior", 2, 3.0, 4.0), Call("prior", 2, 4.5, 5.0),
             Call("text_proj", 2, 6.0, 6.5), Call("decoder", 2, 7.0, 9.0),
             Call("super_res_first", 1, 10.0, 11.0), Call("super_res_last", 1, 11.5, 12.0)]
    stages = split_stages(Trace(total_ms=13.0, calls=calls))
    assert stages == {"text_encoder": 3.0, "prior": 3.0, "decoder": 4.0, "super_res": 2.0, "vae": 0.0,
                      "post_processing": 1.0}
    # prior-free: no prior calls, the stage is 0 and the rest still adds up
    no_prior = split_stages(Trace(13.0, [c for c in calls if c.network != "prior"]))
    assert no_prior["prior"] == 0.0 and no_prior["text_encoder"] == 6.0
    assert sum(no_prior.values()) == 13.0


def test_timed_backend_records_every_call(tiny_pipeline):
    timeline = CallTimeline("cpu")
    plain = tiny_pipeline.backend
    tiny_pipeline.backend = TimedBackend(plain, timeline)
    try:
        timeline.start()
        images = tiny_pipeline.generate(["a", "b"], seed=0, output_type="np", **FAST_STEPS)
        trace = timeline.finish()
    finally:
        tiny_pipeline.backend = plain
    steps = FAST_STEPS
    expected = (["text_encoder"] + ["prior"] * steps["prior_steps"] + ["text_proj"]
                + ["decoder"] * steps["decoder_steps"]
                + ["super_res_first"] * (steps["super_res_steps"] - 1) + ["super_res_last"])
    assert [c.network for c in trace.calls] == expected
    # guided: "" plus two prompts in one text-encoder call, 2B rows in the loops, B in super-res
    assert [c.rows for c in trace.calls[:2]] == [3, 4] and trace.calls[-1].rows == 2
    starts = [c.start_ms for c in trace.calls]
    assert starts == sorted(starts) and all(c.ms > 0 for c in trace.calls)
    assert 0 < trace.calls[-1].end_ms < trace.total_ms
    assert sum(split_stages(trace).values()) == pytest.approx(trace.total_ms, abs=1e-6)
    assert images.shape[0] == 2


def test_count_flops_of_a_linear_layer():
    layer = torch.nn.Linear(4, 8, bias=False)
    # a matmul of [3, 4] x [4, 8]: 3 * 8 outputs, 4 multiply-adds each, 2 FLOPs per multiply-add
    assert count_flops(layer, [torch.zeros(3, 4)]) == 2 * 3 * 4 * 8


def test_figures_follow_the_samples():
    from unclip.bench.results import Results

    def sample(ms: float) -> dict:
        stages = dict.fromkeys(STAGES, ms / len(STAGES))
        calls = [["decoder", 2, ms / 2], ["decoder", 2, ms / 4]]
        return {"latency_ms": ms, "stages_ms": stages, "calls": calls}

    results = Results({}, "diffusers", ["torch"], [2])
    for ms in (100.0, 120.0, 110.0):
        results.add("diffusers", 2, sample(ms))
    for ms in (50.0, 70.0, 90.0):
        results.add("torch", 2, sample(ms))
    results.flops[("decoder", 2)] = 10**9
    base, torch_run = results.document()["runs"]
    assert base["latency_ms"]["median"] == 110.0 and base["speedup_vs_baseline"] == 1.0
    assert torch_run["latency_ms"] == {"median": 70.0, "p10": 54.0, "p90": 86.0}
    assert torch_run["speedup_vs_baseline"] == pytest.approx(110 / 70)
    assert torch_run["images_per_s"] == pytest.approx(2 / 0.070)
    assert torch_run["stage_gflop"]["decoder"] == 2.0
    assert torch_run["stage_tflops"]["decoder"] == pytest.approx(2.0 / (70.0 / len(STAGES)))  # GFLOP/ms
    net = torch_run["networks"]["decoder"]
    assert net["calls_per_generation"] == 2 and net["median_call_ms"] == float(np.median([25, 12.5, 35, 17.5,
                                                                                          45, 22.5]))
    assert math.isclose(net["tflops"], 1.0 / net["median_call_ms"])
