"""The OpenVINO backend: the ONNX artifact folder, compiled by OpenVINO; same images as the torch
backend in fp32, bounded differences in bf16, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import copy_of, exported
from unclip.engine.backends.openvino_backend import HALF_NETWORKS
from unclip.errors import UnclipError

# The ONNX Runtime backend's bound for fp32 artifacts; OpenVINO fp32 measures 0 on tiny.
FP32_TOLERANCE = 2 / 255
# bf16 on tiny: its random weights leave nearly every pixel at the clamp (std 0.498), so the few that a
# bf16 rounding flips across it move by up to 1. Measured: mean 0.008-0.055, flipped share 0.8-5.5 %
# (torch's own bf16 path: mean 0.004-0.032). A wrong image measures a mean near 0.5.
BF16_MEAN_BOUND = 0.1
BF16_SHARE_BOUND = 0.1

CASES = [
    (["a red circle on a blue background", "A Green SQUARE!!"], dict(num_images=2, **FAST_STEPS)),
    (["an unguided drawing"], dict(prior_guidance=1.0, decoder_guidance=1.0, **FAST_STEPS)),
    (["no prior, just text"], dict(use_prior=False, **FAST_STEPS)),
]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return exported(tmp_path_factory, "tiny")


@pytest.mark.parametrize("prompts,settings", CASES)
def test_fp32_matches_torch_backend(tiny_onnx, tiny_pipeline, prompts, settings):
    import unclip

    runtime = unclip.load(tiny_onnx, backend="openvino")
    assert runtime.backend.name == "openvino" and runtime.backend.precision == "fp32"
    ours = runtime.generate(prompts, seed=5, output_type="np", **settings)
    reference = tiny_pipeline.generate(prompts, seed=5, output_type="np", **settings)
    assert ours.shape == reference.shape and reference.std() > 0.05
    assert float(np.abs(ours - reference).max()) <= FP32_TOLERANCE


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("prompts,settings", CASES)
def test_bf16_is_bf16_and_close_to_torch(tiny_onnx, tiny_pipeline, prompts, settings):
    import openvino

    import unclip

    runtime = unclip.load(tiny_onnx, backend="openvino", dtype="bf16")
    for name, request in runtime.backend.requests.items():  # the UNets in bf16, the rest fp32
        hint = request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT")
        assert hint == (openvino.Type.bf16 if name in HALF_NETWORKS else openvino.Type.f32), name
    diff = np.abs(runtime.generate(prompts, seed=5, output_type="np", **settings)
                  - tiny_pipeline.generate(prompts, seed=5, output_type="np", **settings))
    assert 0 < float(diff.mean()) <= BF16_MEAN_BOUND  # > 0: the hint took effect
    assert float((diff > 2 / 255).mean()) <= BF16_SHARE_BOUND


@pytest.mark.cpu_bf16
def test_cli_generate_bf16_writes_images(tiny_onnx, tmp_path):
    out = tmp_path / "images"
    result = run_cli("generate", "a red circle", "--model", str(tiny_onnx), "--backend", "openvino",
                     "--dtype", "bf16", "--out", str(out), "--prior-steps", "2", "--decoder-steps", "2",
                     "--super-res-steps", "2")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["0000.png"]


def test_bf16_refused_where_the_cpu_has_no_native_bf16(tiny_onnx, tmp_path, monkeypatch):
    from unclip.engine.backends import openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_has_native_bf16", lambda core: False)
    result = run_cli("generate", "a red circle", "--model", str(tiny_onnx), "--backend", "openvino",
                     "--dtype", "bf16", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "--dtype bf16 with --backend openvino needs a CPU with native bf16",
                          "use --dtype fp32")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(dtype="fp16"), "--dtype fp16 is not supported by --backend openvino: choose fp32 or bf16"),
    (dict(cuda_graphs=True), "--cuda-graphs applies to --backend torch only"),
])
def test_options_it_cannot_honour(tiny_onnx, kwargs, message):
    import unclip

    with pytest.raises(UnclipError, match=message):
        unclip.load(tiny_onnx, backend="openvino", **kwargs)


def test_refuses_a_model_that_is_not_an_artifact_and_names_damage(tiny_onnx, tmp_path):
    def generate(model):
        return run_cli("generate", "a red circle", "--model", str(model), "--backend", "openvino",
                       "--out", str(tmp_path / "out"), "--prior-steps", "2", "--decoder-steps", "2",
                       "--super-res-steps", "2")

    assert_one_line_error(generate("tiny"), "with --backend openvino, --model must be an artifact folder")
    folder = copy_of(tiny_onnx, tmp_path / "artifact")
    data = bytearray((folder / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "decoder.onnx").write_bytes(bytes(data))
    assert_one_line_error(generate(folder), "decoder.onnx", "sha256")
    assert not (tmp_path / "out").exists()


def test_same_artifact_helper_as_onnx_runtime(tiny_onnx):
    """Both backends build their Pipeline through one helper: same settings, tokenizer and name."""
    import unclip

    ov, ort = (unclip.load(tiny_onnx, backend=b) for b in ("openvino", "onnxruntime"))
    assert ov.model_name == ort.model_name and ov.settings() == ort.settings() and ov.dims == ort.dims
