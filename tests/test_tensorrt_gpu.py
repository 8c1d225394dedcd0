"""TensorRT engines built and run for real: needs TensorRT (with its builder) and a CUDA GPU.

Written to run as they stand on such a machine; elsewhere conftest skips them with the reason
naming what is missing. Not yet run in this project (see docs/tensorrt.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import copy_of, exported

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

BATCH_SIZES = "1,2"
PROMPTS = ["a red circle on a blue background", "A green SQUARE!!"]
# Unguided: a guided random-weight decoder amplifies per-network differences into flipped pixels
# (measured for ONNX Runtime vs torch, docs/onnx.md), which would hide what this compares.
UNGUIDED = dict(prior_guidance=1.0, decoder_guidance=1.0, **FAST_STEPS)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A private copy of the tiny fp16 artifact with engines built by the CLI, --check included."""
    folder = copy_of(exported(tmp_path_factory, "tiny", "fp16"), tmp_path_factory.mktemp("trt") / "artifact")
    result = run_cli("export", "tensorrt", "--artifacts", str(folder), "--batch-sizes", BATCH_SIZES,
                     "--workspace", "2", "--opt-level", "2", "--check")
    assert result.exit_code == 0, result.output
    checked = [line for line in result.stdout.splitlines() if "non-finite" in line]
    networks = json.loads((folder / "manifest.json").read_text())["networks"]
    outputs = sum(len(entry["outputs"]) for entry in networks.values())
    assert len(checked) == 3 * outputs  # every output of every network at min, opt and max
    assert all(line.endswith("  ok") for line in checked), result.stdout
    return folder


def test_build_records_every_engine_and_the_timing_cache(engines):
    from unclip.export import tensorrt_cache as cache
    from unclip.export.tensorrt_build import profile_for

    manifest = json.loads((engines / "manifest.json").read_text())
    target = cache.current_target()
    for network in manifest["networks"]:
        entry = manifest["tensorrt"]["engines"][network]
        assert entry["profile"] == profile_for(network, [1, 2]).to_dict()
        assert cache.engine_problem(engines, manifest, network, "fp16", target) is None
    assert cache.timing_cache_file(engines, target).stat().st_size > 0
    again = run_cli("export", "tensorrt", "--artifacts", str(engines), "--batch-sizes", BATCH_SIZES)
    networks = len(manifest["networks"])
    assert again.exit_code == 0 and again.stdout.count("up to date") == networks, again.output


def test_engine_shapes_match_the_profile(engines):
    from unclip.engine.artifact import load_artifact
    from unclip.engine.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend(load_artifact(engines), "cuda")
    for name, engine in backend.engines.items():
        spec, profile = backend.specs[name], backend.profiles[name]
        low, opt, high = engine.get_tensor_profile_shape(spec.inputs[0].name, 0)
        assert (low[0], opt[0], high[0]) == (profile["min"], profile["opt"], profile["max"]), name


def test_images_match_onnxruntime(engines):
    import unclip

    trt_images = unclip.load(engines, backend="tensorrt", device="cuda").generate(
        PROMPTS, seed=0, output_type="np", **UNGUIDED)
    ort_images = unclip.load(engines, backend="onnxruntime").generate(PROMPTS, seed=0, output_type="np",
                                                                       **UNGUIDED)
    # same fp16 graphs, other fp16 kernels: per-network differences of ~1e-3 of scale (the
    # export's fp16 validation measured up to 1.5e-2), so pixels agree to a few levels of 255
    assert np.abs(trt_images - ort_images).mean() < 4 / 255


def test_cuda_graph_capture_replays_the_engines(engines):
    import unclip

    eager = unclip.load(engines, backend="tensorrt", device="cuda")
    graphed = unclip.load(engines, backend="tensorrt", device="cuda", cuda_graphs=True)
    # the graph path's scheduler step is a separate float32 implementation (cuda_graphs.py) that may
    # round differently from the plain loop; the engines are the same, so unguided images agree
    a = eager.generate(PROMPTS, seed=3, output_type="np", **UNGUIDED)
    b = graphed.generate(PROMPTS, seed=3, output_type="np", **UNGUIDED)
    assert np.abs(a - b).max() < 2 / 255
    c = graphed.generate(PROMPTS, seed=3, output_type="np", **FAST_STEPS)  # guided: 2B rows, new graphs
    d = graphed.generate(PROMPTS, seed=3, output_type="np", **FAST_STEPS)  # replays, not captures
    assert all(buffers.replays >= 1 for buffers in graphed.stage_runner.buffers.values())
    assert {key[3] for key in graphed.stage_runner.buffers} == {False, True}  # both captured
    assert np.array_equal(c, d)  # replaying the same graphs on the same inputs is deterministic


def test_batch_outside_the_profile_is_refused(engines):
    from unclip.engine.artifact import load_artifact
    from unclip.engine.backends.tensorrt_backend import TensorRTBackend
    from unclip.errors import UnclipError
    from unclip.specs import example_inputs

    artifact = load_artifact(engines)
    backend = TensorRTBackend(artifact, "cuda")
    inputs = example_inputs(backend.specs["decoder"], artifact.dims, 5)
    with pytest.raises(UnclipError, match="decoder was asked for 5 rows but its engine accepts 1..4"):
        backend.run("decoder", **{k: v.cuda() for k, v in inputs.items()})


def test_engine_from_other_tensorrt_is_refused(engines, tmp_path):
    import unclip
    from unclip.errors import UnclipError

    folder = copy_of(engines, tmp_path / "artifact")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tensorrt"]["engines"]["prior"]["target"]["tensorrt_version"] = "9.0.0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnclipError, match="prior: the engine was built with TensorRT 9.0.0.*--rebuild"):
        unclip.load(folder, backend="tensorrt", device="cuda")



# -- Stable unCLIP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stable_engines(tmp_path_factory):
    """The tiny Stable unCLIP text model exported in fp16, its engines built by the CLI, --check included."""
    from unclip.export.stable_unclip_onnx import export_stable_onnx

    folder = tmp_path_factory.mktemp("stable-trt") / "artifact"
    export_stable_onnx("sd-unclip-tiny", folder, precision="fp16")
    result = run_cli("export", "tensorrt", "--artifacts", str(folder), "--batch-sizes", BATCH_SIZES,
                     "--workspace", "2", "--opt-level", "2", "--check")
    assert result.exit_code == 0, result.output
    checked = [line for line in result.stdout.splitlines() if "non-finite" in line]
    assert checked and all(line.endswith("  ok") for line in checked), result.stdout
    return folder


def test_stable_unclip_engines_match_onnxruntime_eager_and_graphed(stable_engines):
    """The same fp16 graphs on TensorRT and on ONNX Runtime (CPU): images within a few levels (the bound of
    test_images_match_onnxruntime); the graphed engine calls give the eager engines' images, replayed."""
    import unclip

    settings = dict(seed=3, num_images=2, output_type="np", prior_steps=2, decoder_steps=3)
    want = unclip.load(stable_engines, backend="onnxruntime").generate("a red circle", **settings)
    trt = unclip.load(stable_engines, backend="tensorrt", device="cuda")
    eager = trt.generate("a red circle", **settings)
    assert np.abs(eager - want).mean() < 4 / 255
    graphed = unclip.load(stable_engines, backend="tensorrt", device="cuda", cuda_graphs=True)
    first = graphed.generate("a red circle", **settings)
    assert np.abs(first - eager).max() < 2 / 255  # the same engines; only the calls are captured
    assert np.array_equal(graphed.generate("a red circle", **settings), first)
    assert all(entry.replays > 0 for entry in graphed.backend.entries.values())
