"""The decoder's step cache (unclip.models.step_cache) on the torch backend: the pair's exactness,
the schedule, the option's errors, the eager loop against the stage runner's loop, cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unclip
from tests.test_batching import requests
from tests.test_cuda_graphs import make_pipeline
from unclip.errors import UnclipError
from unclip.models.step_cache import schedule
from unclip.specs import example_inputs

PROMPTS = ["a red circle", "a blue square"]
STEPS = dict(prior_steps=2, decoder_steps=6, super_res_steps=2)


def counted(pipe) -> list[str]:
    """The networks the pipeline calls, in order."""
    calls, run = [], pipe.backend.run

    def counting(network, **inputs):
        calls.append(network)
        return run(network, **inputs)

    pipe.backend.run = counting
    return calls


def test_shallow_step_with_its_own_features_is_the_full_decoder_exactly():
    """The shallow branch is the UNet's own first and last levels: fed the deep features of the same
    input, it computes the full decoder's output (the cache's only error is staleness). Bit for bit when
    called directly; through the backend torch's CPU thread count may differ between calls (it follows
    the machine's load), which reorders float32 sums: 1e-5 bounds that."""
    pipe = make_pipeline()
    backend = pipe.backend
    inputs = example_inputs(backend.specs["decoder"], pipe.dims, 2, torch.Generator().manual_seed(0))
    full = backend.run("decoder", **inputs)["model_output"]
    first = backend.run("decoder_full", **inputs)
    shallow = backend.run("decoder_shallow", **inputs, deep_features=first["deep_features"])
    assert float((first["model_output"] - full).abs().max()) <= 1e-5
    assert float((shallow["model_output"] - full).abs().max()) <= 1e-5
    assert first["deep_features"].shape == (2, *backend.specs["decoder_full"].outputs[1].shape[1:])
    stale = backend.run("decoder_shallow", **inputs, deep_features=torch.zeros_like(first["deep_features"]))
    assert float((stale["model_output"] - full).abs().max()) > 0.01  # the features are used


def test_schedule_runs_a_full_step_every_n():
    assert schedule(4, 1) == ["decoder"] * 4
    assert schedule(5, 2) == ["decoder_full", "decoder_shallow"] * 2 + ["decoder_full"]
    assert schedule(7, 3).count("decoder_full") == 3


@pytest.mark.parametrize("step_cache", [0, 9, "2", 2.0, True])
def test_step_cache_must_be_an_integer_from_1_to_8(step_cache):
    with pytest.raises(UnclipError, match="step_cache must be an integer from 1"):
        unclip.load("tiny", step_cache=step_cache)


def test_eager_loop_and_stage_runner_share_the_cached_schedule():
    """The eager loop and the stage runner's loop (the graph path's logic, uncaptured on CPU) carry the
    full steps' features to the shallow steps the same way: identical images; N=1 is the plain loop."""
    eager, runner = make_pipeline(step_cache=2), make_pipeline(runner="uncaptured", step_cache=2)
    plain = make_pipeline()
    calls = counted(eager)
    cached = eager.generate(PROMPTS, seed=3, output_type="np", **STEPS)
    assert [c for c in calls if c.startswith("decoder")] == schedule(6, 2)
    assert np.array_equal(runner.generate(PROMPTS, seed=3, output_type="np", **STEPS), cached)
    uncached = plain.generate(PROMPTS, seed=3, output_type="np", **STEPS)
    assert np.array_equal(make_pipeline(step_cache=1).generate(PROMPTS, seed=3, output_type="np", **STEPS),
                          uncached)
    assert 0 < np.abs(cached - uncached).mean()  # random weights: the cache changes the image


def test_cancelled_request_leaves_the_cached_features_too(demo_pipeline):
    """A request cancelled after the decoder's first (full) step: its rows leave the carried features
    with the latents, and the others' images are those they give alone with the same cache."""
    pipe = unclip.load(demo_pipeline.backend.components, step_cache=2)
    settings = dict(prior_steps=3, decoder_steps=5, super_res_steps=2, decoder_guidance=2.0)
    state = {"cancel": False}
    reqs = requests(pipe, settings, [0, 1], PROMPTS, [1, 2], cancelled={1: lambda: state["cancel"]})

    def on_step(stage, step, rows):
        if stage == "decoder" and step == 0:
            state["cancel"] = True

    out = pipe.generate_requests(reqs, on_step=on_step)
    assert out[1] is None
    alone = pipe.generate(PROMPTS[0], seed=0, output_type="pt", **settings)
    assert float((out[0] - alone).abs().max()) <= 1 / 255  # batched vs alone: the batching tests' bound


def test_cli_generate_with_step_cache_writes_it_into_the_png(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from unclip.cli import cli

    result = CliRunner().invoke(cli, ["generate", "a red circle", "--model", "tiny", "--step-cache", "2",
                                      "--out", str(tmp_path / "out"), "--prior-steps", "2",
                                      "--decoder-steps", "4", "--super-res-steps", "2"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "0000.png").text["step_cache"] == "2"
    bad = CliRunner().invoke(cli, ["generate", "x", "--model", "tiny", "--step-cache", "0",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--step-cache" in bad.output and "Traceback" not in bad.output


def test_step_runner_pads_moves_rows_and_streams_between_steps_like_the_eager_loop():
    """The graph path's loop (uncaptured on CPU): 3 rows run padded in the 4-row bucket; a request
    cancelled after the decoder's first (full) step moves the other rows, their carried features with
    them, to the 2-row bucket; previews and on_step come between steps as on the eager loop. Images,
    previews and progress equal the eager loop's within 1e-5 (float32 sums over 4 padded rows instead
    of 3 may reorder; measured at most 6e-8 on tiny)."""
    eager, runner = make_pipeline(step_cache=2), make_pipeline(runner="uncaptured", step_cache=2)
    settings = dict(prior_steps=2, decoder_steps=5, super_res_steps=2, decoder_guidance=3.0)

    def run(pipe):
        state, steps, previews = {"cancel": False}, [], []
        reqs = requests(pipe, settings, [0, 1, 2], ["a red circle", "a blue square", "green"], [1, 1, 1],
                        cancelled={1: lambda: state["cancel"]})
        reqs[0].partial_images, reqs[0].on_partial = 2, lambda index, images: previews.append(images)

        def on_step(stage, step, rows):
            steps.append((stage, step, rows))
            state["cancel"] = state["cancel"] or (stage == "decoder" and step == 0)

        return pipe.generate_requests(reqs, on_step=on_step), steps, previews

    (want, want_steps, want_previews), (got, got_steps, got_previews) = run(eager), run(runner)
    assert got[1] is None and want[1] is None
    assert got_steps == want_steps and ("decoder", 1, 4) in got_steps  # 2 rows, guided, after the cancel
    assert len(got_previews) == len(want_previews) == 2  # partial_images=2: the last is the output
    for a, b in [(got[0], want[0]), (got[2], want[2]), *zip(got_previews, want_previews, strict=True)]:
        assert float((a - b).abs().max()) <= 1e-5
    buckets = {key[1] for key in runner.stage_runner.buffers if key[0] == "decoder"}
    assert buckets == {4, 2}
