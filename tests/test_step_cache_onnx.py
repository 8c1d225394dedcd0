"""The step cache's decoder pair in the ONNX export (`unclip export onnx --step-cache`), run by ONNX
Runtime and OpenVINO: exported and validated like every network, the same images as the torch
backend with the same cache, and one-line refusals where the pair is missing or cannot exist."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import unclip
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import copy_of, exported, without_pair
from unclip.errors import UnclipError
from unclip.models.step_cache import CACHED, FEATURES

PROMPTS = ["a red circle on a blue background", "A Green SQUARE!!"]
# The decoder unguided: the 2/255 bound of fp32 artifacts (tests/test_onnx_runtime.py) holds where
# PyTorch itself is stable. Measured on tiny, seeds 0-5, both runtimes: max 1.5e-5/255 (the pair's
# per-network differences are ~1e-6, as the decoder's); torch with the cache against torch without it
# differs in 1.9 % of the pixels by more than 2/255, so the bound tells a cached run from a plain one.
UNGUIDED_DECODER = dict(decoder_guidance=1.0, **FAST_STEPS)
FP32_TOLERANCE = 2 / 255
# Guided (2B rows of features carried): tiny's random decoder at guidance 8 turns ~1e-6 differences
# into a few flipped pixels at some seeds, with or without the cache (docs/onnx.md). Measured at seed 5:
# ORT and OpenVINO both 2 of 12288 values off by > 2/255 (max 5.8-6.4/255), mean 3e-6; without the
# cache, torch differs from itself with it by a mean of 0.07 over 7 % of the values.
GUIDED = dict(num_images=2, **FAST_STEPS)
GUIDED_MEAN_BOUND = 2e-3
GUIDED_SHARE_BOUND = 5e-3


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return exported(tmp_path_factory, "tiny")  # exported with --step-cache (tests/onnx_artifacts.py)


@pytest.fixture(scope="module")
def torch_cached(tiny_components):
    """The torch backend on the same weights with the same cache; its images, computed once per case."""
    pipe, images = unclip.load(tiny_components, step_cache=2), {}

    def generate(name: str, settings: dict):
        if name not in images:
            images[name] = pipe.generate(PROMPTS, seed=5, output_type="np", **settings)
        return images[name]

    return generate


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_export_lists_and_validates_the_pair(tmp_path_factory, tiny_components, precision):
    """(a) Both networks in the manifest with the pair's specs, validated against torch at every batch
    size within the precision's tolerance; the shallow graph keeps the decoder's inputs (text_mask too,
    which tiny's outer levels never read) and the runtime reads them back as the pair."""
    from unclip.engine.artifact import load_artifact
    from unclip.export.validation import TOLERANCE
    from unclip.models.networks import model_dims
    from unclip.models.step_cache import cached_specs, feature_channels
    from unclip.specs import network_specs

    folder = exported(tmp_path_factory, "tiny", precision)
    manifest = json.loads((folder / "manifest.json").read_text())
    decoder = network_specs(model_dims(tiny_components))["decoder"]
    specs = cached_specs(decoder, feature_channels(tiny_components.decoder))
    assert list(manifest["networks"])[-2:] == list(CACHED)
    for name, spec in specs.items():
        entry = manifest["networks"][name]
        assert [(t["name"], t["dtype"], t["shape"]) for t in entry["inputs"] + entry["outputs"]] == [
            (t.name, t.dtype, list(t.shape)) for t in spec.inputs + spec.outputs]
        assert entry["precision"] == precision and entry["tensorrt_unsupported_ops"] == []
        assert set(entry["validation"]) == {"1", "4"}
        for errors in entry["validation"].values():
            assert set(errors) == set(spec.output_names)
            for e in errors.values():
                assert e["max_abs"] <= TOLERANCE[precision] * max(1.0, e["max_torch"]), (name, e)
    assert manifest["networks"]["decoder_full"]["outputs"][1]["shape"] == ["batch", 64, 16, 16]
    assert load_artifact(folder).specs == {**network_specs(model_dims(tiny_components)), **specs}


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cached_images_match_torch(tiny_onnx, torch_cached, backend):
    """(b), (c) ONNX Runtime and OpenVINO fp32 with step_cache=2 against the torch backend with the same
    cache, same seed: within 2/255 with the decoder unguided, and a bounded handful of pixels guided."""
    pipe = unclip.load(tiny_onnx, backend=backend, step_cache=2)
    assert pipe.step_cache == 2 and set(CACHED) <= set(pipe.backend.specs)
    calls, run = [], pipe.backend.run

    def counting(network, **inputs):
        calls.append(network)
        return run(network, **inputs)

    pipe.backend.run = counting
    ours = pipe.generate(PROMPTS, seed=5, output_type="np", **UNGUIDED_DECODER)
    assert [c for c in calls if c.startswith("decoder")] == ["decoder_full", "decoder_shallow"] * 2
    reference = torch_cached("unguided decoder", UNGUIDED_DECODER)
    assert ours.shape == reference.shape and reference.std() > 0.05
    assert float(np.abs(ours - reference).max()) <= FP32_TOLERANCE
    diff = np.abs(pipe.generate(PROMPTS, seed=5, output_type="np", **GUIDED) - torch_cached("guided", GUIDED))
    assert float(diff.mean()) <= GUIDED_MEAN_BOUND and float((diff > 2 / 255).mean()) <= GUIDED_SHARE_BOUND


def test_artifact_without_the_pair_refuses_step_cache(tiny_onnx, tmp_path):
    """(d) An export without --step-cache serves as before, and with step_cache=2 says to re-export,
    in one line, from the API and the CLI, for both runtimes."""
    folder = without_pair(tiny_onnx, tmp_path / "artifact")
    assert "decoder_shallow" not in unclip.load(folder, backend="onnxruntime").backend.specs
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(UnclipError) as error:
            unclip.load(folder, backend=backend, step_cache=2)
        message = str(error.value)
        assert "\n" not in message and "unclip export onnx --step-cache" in message, message
        assert f"the {backend} backend" in message, message
    result = run_cli("generate", "a red circle", "--model", str(folder), "--backend", "onnxruntime",
                     "--step-cache", "2", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "step_cache=2", "unclip export onnx --step-cache")
    assert not (tmp_path / "out").exists()


def test_half_a_pair_is_refused(tiny_onnx, tmp_path):
    """A manifest that lists one network of the pair, or the features without a fixed channel count,
    is damaged: one line naming it, at load, whatever step_cache is asked for."""
    from unclip.engine.artifact import load_artifact

    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    features = manifest["networks"]["decoder_full"]["outputs"][1]
    assert features["name"] == FEATURES
    features["shape"][1] = "channels"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnclipError, match="decoder_full has no output deep_features with a fixed channel"):
        load_artifact(folder)
    del manifest["networks"]["decoder_shallow"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("generate", "a red circle", "--model", str(folder), "--backend",
                                  "onnxruntime", "--out", str(tmp_path / "out")),
                          "has decoder_full but not decoder_shallow", "--step-cache")


def test_one_level_decoder_cannot_export_the_pair(tmp_path, monkeypatch):
    """(e) No preset has a one-level decoder, so one is added for this test: `--step-cache` is a
    one-line error before anything is exported, and nothing is written."""
    from unclip.models.presets import PRESETS

    monkeypatch.setitem(PRESETS, "tiny-one-level", replace(PRESETS["tiny"], decoder_channels=(32,)))
    out = tmp_path / "artifact"
    result = run_cli("export", "onnx", "--model", "tiny-one-level", "--out", str(out), "--step-cache")
    assert_one_line_error(result, "--step-cache needs a decoder UNet with more than one level",
                          "tiny-one-level's has 1", "export without --step-cache")
    assert not out.exists() and list(tmp_path.iterdir()) == []
