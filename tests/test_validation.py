"""The validation layer (unclip.engine.settings): settings, limits, seeds, output types, prompts,
through the API and the CLI. Issue 11's numbered items 1, 4 and 8 are here (tests named item_N)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from unclip.engine.settings import GenerationSettings, Limits
from unclip.errors import UnclipError

FAST = [f"--{k.replace('_', '-')}={v}" for k, v in FAST_STEPS.items()]


def refused(call, *fragments: str, param: str | None = None) -> UnclipError:
    with pytest.raises(UnclipError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    if param is not None:
        assert info.value.param == param, (info.value.param, message)
    return info.value


# -- issue item 1: seeds, unknown keywords --------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 1180591620717411303424, -1, 1.5, True, "3", None])
def test_item_1_bad_seed_is_an_unclip_error(tiny_pipeline, seed):
    refused(lambda: tiny_pipeline.generate("a", seed=seed, **FAST_STEPS), "seed must be an integer",
            "2**64", param="seed")


def test_item_1_extreme_seeds_run_and_numpy_seeds_count(tiny_pipeline):
    top = tiny_pipeline.generate("a", seed=2**64 - 1, output_type="np", **FAST_STEPS)
    assert top.shape == (1, 32, 32, 3)
    a = tiny_pipeline.generate("a", seed=np.int64(7), output_type="np", **FAST_STEPS)
    b = tiny_pipeline.generate("a", seed=7, output_type="np", **FAST_STEPS)
    assert np.array_equal(a, b)


def test_item_1_unknown_keyword_is_an_unclip_error(tiny_pipeline):
    refused(lambda: tiny_pipeline.generate("a", foo=3), "unknown key 'foo'", "decoder_steps", param="foo")


def test_item_1_cli_seed_overflow_is_one_line(tmp_path):
    result = run_cli("generate", "a red circle", "--seed", "1180591620717411303424", "--model", "tiny",
                     "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--seed must be an integer", "2**64")
    assert not (tmp_path / "out").exists()


def test_generator_must_be_a_cpu_generator(tiny_pipeline):
    refused(lambda: tiny_pipeline.generate("a", generator="seed 3"), "CPU torch.Generator", param="generator")
    mine = tiny_pipeline.generate("a", generator=torch.Generator().manual_seed(4), output_type="np",
                                  **FAST_STEPS)
    assert np.array_equal(mine, tiny_pipeline.generate("a", seed=4, output_type="np", **FAST_STEPS))


# -- issue item 4: limits ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--num-images", "10000"], ["--num-images 10000", "above the limit of 16", "Limits.max_images"]),
    (["--num-images", "9", "b"], ["18 images", "limit of 16"]),
    (["--decoder-steps", "100000"], ["--decoder-steps 100000", "limit of 1000 steps"]),
    (["--decoder-guidance", "1e30"], ["--decoder-guidance 1e+30", "limit of 50"]),
    (["--prior-guidance", "0.5"], ["--prior-guidance must be", "1.0 is unguided"]),
    (["x" * 1001], ["1001 characters", "limit of 1000"]),
    ([f"p{i}" for i in range(16)], ["17 prompts", "limit of 16"]),
])
def test_item_4_limits_refuse_before_loading(tmp_path, args, needles):
    """Refused before the model loads: no 'loading' note, nothing written."""
    out = tmp_path / "out"
    result = run_cli("generate", "a", *args, "--model", "tiny", "--out", str(out))
    assert_one_line_error(result, *needles)
    assert "loading" not in result.stderr and "building" not in result.stderr
    assert not out.exists()


def test_item_4_limits_in_the_api(tiny_pipeline):
    refused(lambda: tiny_pipeline.generate("a", num_images=17), "limit of 16", param="num_images")
    refused(lambda: tiny_pipeline.generate(["a"] * 4, num_images=5), "20 images", param="num_images")
    refused(lambda: tiny_pipeline.generate("a", decoder_steps=1001), "limit of 1000", param="decoder_steps")
    refused(lambda: tiny_pipeline.generate("a", prior_guidance=50.5), "limit of 50", param="prior_guidance")
    refused(lambda: tiny_pipeline.generate("a", decoder_guidance=0.99), "at least 1.0",
            param="decoder_guidance")
    refused(lambda: tiny_pipeline.generate("a", decoder_guidance=float("nan")), "finite",
            param="decoder_guidance")
    # the bounds themselves are allowed
    edge = tiny_pipeline.settings(decoder_steps=1000, decoder_guidance=50.0, num_images=16)
    assert (edge.decoder_steps, edge.decoder_guidance, edge.num_images) == (1000, 50.0, 16)


def test_limits_are_the_callers(tiny_components):
    import unclip

    pipe = unclip.load(tiny_components, limits=Limits(max_images=2, max_steps=30, max_prompt_chars=5))
    assert pipe.limits.max_images == 2
    refused(lambda: pipe.generate("a", num_images=3), "limit of 2", param="num_images")
    refused(lambda: pipe.generate("abcdef"), "6 characters", "limit of 5", param="prompts")
    refused(lambda: pipe.generate("a", prior_steps=31), "limit of 30", param="prior_steps")
    images = pipe.generate(["a", "b"], output_type="np", **FAST_STEPS)
    assert images.shape[0] == 2
    # the model's own defaults (25 steps) must fit the limits: refused at load, not at the first call
    refused(lambda: unclip.load(tiny_components, limits=Limits(max_steps=10)), "prior_steps 25",
            "limit of 10")
    refused(lambda: Limits(max_steps=5000), "Limits: max_steps", param="max_steps")
    refused(lambda: Limits(max_images=0), "max_images", param="max_images")
    refused(lambda: unclip.load(tiny_components, limits={"max_images": 2}), "unclip.Limits", param="limits")


def test_steps_beyond_a_models_schedule(tiny_components):
    from unclip.engine.backends.torch_backend import TorchBackend
    from unclip.engine.pipeline import Pipeline
    from unclip.engine.scheduler import SchedulerConfig
    from unclip.models.networks import model_dims

    c = tiny_components
    schedulers = {**c.schedulers, "decoder_scheduler": SchedulerConfig(num_train_timesteps=50)}
    pipe = Pipeline(TorchBackend(c), c.tokenizer, model_dims(c), schedulers)
    refused(lambda: pipe.settings(decoder_steps=51), "decoder schedule has timesteps (50)",
            param="decoder_steps")
    assert pipe.settings(decoder_steps=50).decoder_steps == 50


# -- issue item 8: output types ------------------------------------------------------------------------


def test_item_8_output_type_pt_is_an_nchw_tensor(tiny_pipeline):
    pt = tiny_pipeline.generate(["a", "b"], seed=2, output_type="pt", **FAST_STEPS)
    arr = tiny_pipeline.generate(["a", "b"], seed=2, output_type="np", **FAST_STEPS)
    assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and tuple(pt.shape) == (2, 3, 32, 32)
    assert 0.0 <= float(pt.min()) and float(pt.max()) <= 1.0
    assert np.array_equal(pt.permute(0, 2, 3, 1).cpu().numpy(), arr)  # the same pixels, NCHW
    pil = tiny_pipeline.generate(["a", "b"], seed=2, output_type="pil", **FAST_STEPS)
    assert [img.size for img in pil] == [(32, 32), (32, 32)]


@pytest.mark.parametrize("output_type", ["PIL", "numpy", "latent", None, 3])
def test_item_8_unknown_output_type_is_refused(tiny_pipeline, output_type):
    refused(lambda: tiny_pipeline.generate("a", output_type=output_type, **FAST_STEPS), "output_type must be",
            "'pt'", param="output_type")


# -- the settings type -------------------------------------------------------------------------------


def test_settings_are_immutable_hashable_and_checked_on_construction():
    a, b = GenerationSettings(decoder_steps=3), GenerationSettings(decoder_steps=3)
    assert a == b and hash(a) == hash(b) and len({a, b, GenerationSettings()}) == 2
    assert dataclasses.replace(a, num_images=2).num_images == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.decoder_steps = 4
    assert GenerationSettings(prior_guidance=2).prior_guidance == 2.0  # an int scale is a number
    for bad, fragment in ((dict(num_images=True), "positive integer"), (dict(prior_steps="25"), "integer"),
                          (dict(use_prior=1), "true or false"),
                          (dict(decoder_guidance="8"), "finite number")):
        refused(lambda bad=bad: GenerationSettings(**bad), fragment, param=next(iter(bad)))
    refused(lambda: dataclasses.replace(a, super_res_steps=1), "super_res_steps must be",
            param="super_res_steps")


@pytest.mark.parametrize("prompts,fragment", [
    ([], "no prompt given"), ("", "prompt 1 is empty"), (["ok", "  "], "prompt 2 is empty"),
    (["ok", 3], "prompt 2 is a int"), (b"bytes", "prompts must be a text"), (None, "prompts must be a text"),
    ({"a": 1}, "prompts must be a text"),
    ("a red \ud800 circle", "prompt 1 has an invalid character at position 6 (a lone surrogate"),
])
def test_bad_prompts(tiny_pipeline, prompts, fragment):
    refused(lambda: tiny_pipeline.generate(prompts, **FAST_STEPS), fragment, param="prompts")


# -- the command line: --help, loading note, reused --out -------------------------------------------


def test_help_shows_the_values_the_default_model_runs_with():
    from unclip.models import DEMO_FOLDER

    demo = __import__("json").loads((DEMO_FOLDER / "sampler_defaults.json").read_text())
    text = " ".join(run_cli("generate", "--help").stdout.split())
    wanted = f"[default: {demo['decoder_guidance']} for demo (its sampler_defaults.json); 8.0 without one]"
    assert wanted in text
    assert "[default: 25;" in text and "[default: 4.0;" in text
    assert "else 8.0" not in text


def test_loading_prints_a_note(tmp_path):
    result = run_cli("generate", "a", "--model", "tiny", "--out", str(tmp_path / "o"), *FAST)
    assert result.exit_code == 0, result.output
    assert "unclip: info: building preset tiny" in result.stderr


def test_reused_out_replaces_an_earlier_runs_images(tmp_path):
    out = tmp_path / "out"
    first = run_cli("generate", "a", "--num-images", "3", "--model", "tiny", "--out", str(out), *FAST)
    assert first.exit_code == 0, first.output
    (out / "notes.txt").write_text("mine")
    result = run_cli("generate", "b", "--model", "tiny", "--out", str(out), *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "notes.txt"]
    from PIL import Image

    with Image.open(out / "0000.png") as img:
        assert img.text["prompt"] == "b"


def test_reused_out_refuses_images_unclip_did_not_write(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (4, 4)).save(out / "0001.png")  # the user's own picture, no unclip metadata
    result = run_cli("generate", "a", "--model", "tiny", "--out", str(out), *FAST)
    assert_one_line_error(result, "holds 0001.png, which unclip did not write")
    assert sorted(p.name for p in out.iterdir()) == ["0001.png"]
