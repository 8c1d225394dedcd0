"""The mixed backend: each network of an ONNX export on the faster of ONNX Runtime and OpenVINO,
measured at load or named; routed through the backend protocol, the same images as either runtime
alone, each compiled network held by one runtime only, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unclip
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import exported
from unclip.engine.backends.mixed_backend import CANDIDATES, MixedBackend, fastest, load_mixed_pipeline
from unclip.errors import UnclipError

# The fp32 artifacts' bound against torch (tests/test_onnx_runtime.py); OpenVINO and ONNX Runtime each
# hold it, so a pipeline that mixes them holds it against either (measured on the demo: 0.003/255).
FP32_TOLERANCE = 2 / 255
PROMPTS = ["a red circle on a blue background", "A Green SQUARE!!"]
SETTINGS = dict(num_images=2, decoder_guidance=1.0, **FAST_STEPS)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return exported(tmp_path_factory, "tiny")  # with the step cache's pair (tests/onnx_artifacts.py)


def held(backend) -> set[str]:
    """The networks a runtime still has compiled."""
    return set(getattr(backend, "sessions", None) or getattr(backend, "requests", {}))


def test_measured_choice_routes_every_network_and_keeps_one_compiled_copy(tiny_onnx):
    pipe = unclip.load(tiny_onnx, backend="mixed", step_cache=2)
    backend = pipe.backend
    assert backend.name == "mixed" and set(backend.assignment) == set(backend.specs)
    assert set(backend.assignment.values()) <= set(CANDIDATES)
    for ms in backend.timings.values():  # both timed
        assert set(ms) == set(CANDIDATES) and all(v > 0 for v in ms.values())
    assert backend.assignment == fastest(backend.timings)
    for runtime, sub in backend.backends.items():
        assert held(sub) == {n for n, r in backend.assignment.items() if r == runtime}
    ort = unclip.load(tiny_onnx, backend="onnxruntime", step_cache=2)
    got = pipe.generate(PROMPTS, seed=3, output_type="np", **SETTINGS)
    want = ort.generate(PROMPTS, seed=3, output_type="np", **SETTINGS)
    assert float(np.abs(got - want).max()) <= FP32_TOLERANCE


def test_named_assignment_is_kept_and_alternating_runtimes_give_the_same_images(tiny_onnx):
    """Every second network on each runtime (the decoder pair split across them): the images of either
    runtime alone."""
    from unclip.engine.artifact import load_artifact

    names = list(load_artifact(tiny_onnx).specs)
    split = {n: CANDIDATES[i % 2] for i, n in enumerate(names)}
    mixed = load_mixed_pipeline(tiny_onnx, step_cache=2, assignment=split)
    assert mixed.backend.assignment == split and mixed.backend.timings == {}
    assert {split["decoder_full"], split["decoder_shallow"]} == set(CANDIDATES)
    # against ONNX Runtime alone (OpenVINO alone holds the same bound: tests/test_openvino.py)
    ort = unclip.load(tiny_onnx, backend="onnxruntime", step_cache=2)
    got = mixed.generate(PROMPTS, seed=4, output_type="np", **SETTINGS)
    want = ort.generate(PROMPTS, seed=4, output_type="np", **SETTINGS)
    assert float(np.abs(got - want).max()) <= FP32_TOLERANCE


class FakeRuntime:
    """A backend that answers with its own name, to see where a call went."""

    def __init__(self, name: str):
        self.name, self.device, self.dims = name, torch.device("cpu"), None
        self.specs = {"prior": None, "decoder": None}
        self.released: list[str] = []

    def run(self, network: str, **inputs):
        return {"who": self.name}

    def constants(self):
        return {"from": self.name}

    def release(self, network: str) -> None:
        self.released.append(network)


def test_routing_release_and_refusals():
    a, b = FakeRuntime("a"), FakeRuntime("b")
    mixed = MixedBackend({"a": a, "b": b}, {"prior": "b", "decoder": "a"})
    assert mixed.run("prior")["who"] == "b" and mixed.run("decoder")["who"] == "a"
    assert a.released == ["prior"] and b.released == ["decoder"] and mixed.constants() == {"from": "a"}
    with pytest.raises(UnclipError, match="no runtime assigned to decoder"):
        MixedBackend({"a": FakeRuntime("a")}, {"prior": "a"})
    with pytest.raises(UnclipError, match="unknown runtime c"):
        MixedBackend({"a": FakeRuntime("a")}, {"prior": "a", "decoder": "c"})
    # the primary (lower total) keeps near ties; a clear win (> 10 %) moves a network
    assert fastest({"prior": {"onnxruntime": 2.5, "openvino": 2.0},
                    "text_encoder": {"onnxruntime": 1.0, "openvino": 0.95},
                    "decoder": {"onnxruntime": 15.1, "openvino": 17.0}}) == {
        "prior": "openvino", "text_encoder": "onnxruntime", "decoder": "onnxruntime"}


@pytest.mark.parametrize("args,message", [
    (["--dtype", "bf16"], "--backend mixed runs each network in float32"),
    (["--model", "tiny"], "with --backend mixed, --model must be an artifact folder"),
])
def test_bad_options_are_one_line(tiny_onnx, tmp_path, args, message):
    result = run_cli("generate", "a red circle", "--model", str(tiny_onnx), "--backend", "mixed",
                     "--out", str(tmp_path / "x.png"), *args)
    assert_one_line_error(result, message)
    assert not (tmp_path / "x.png").exists()


def test_bench_runner_names():
    """The bench's mixed runner: its names (the worker reports the choice: the bench run in
    benchmarks/results/cpu/demo-mixed shows it)."""
    from unclip.bench.runners import parse_runner

    assert parse_runner("mixed+cache2", unclip.BACKENDS).name == "mixed-fp32+cache2"
    with pytest.raises(UnclipError, match="the mixed runner is float32"):
        parse_runner("mixed-bf16", unclip.BACKENDS)
