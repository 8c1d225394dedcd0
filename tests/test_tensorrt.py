"""TensorRT export and backend: every part that runs without TensorRT or a GPU.

Profiles, engine names, the manifest section, the missing/stale/foreign checks, the build on
Polygraphy's loaders (TensorRT stood in for) and its one-line failures, --check's comparison
through Polygraphy's Comparator (stand-in runners; ONNX Runtime against the torch networks), the
stream the backend enqueues on, the fp32-island check of fp16 graphs and the CLI's refusals. The
parts that need TensorRT and a GPU are in test_tensorrt_gpu.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.conftest import FAST_STEPS
from tests.onnx_artifacts import copy_of, exported
from unclip.errors import UnclipError
from unclip.export import tensorrt_cache as cache
from unclip.export.tensorrt_build import (
    ROWS,
    Profile,
    build_failure_message,
    check_fp32_islands,
    fp16_fragile_nodes,
    import_tensorrt,
    profile_for,
)

HERE = cache.Target("NVIDIA H100 80GB HBM3", (9, 0), "10.13.0.35")
L4 = cache.Target("NVIDIA L4", (8, 9), "10.13.0.35")
TRT11 = cache.Target(HERE.gpu_name, (9, 0), "11.4.0.106")


@pytest.fixture(scope="module")
def tiny_fp16(tmp_path_factory):
    return exported(tmp_path_factory, "tiny", "fp16")


# -- profiles ----------------------------------------------------------------------------------

def test_profiles_double_the_guided_networks():
    sizes = [1, 4, 8]
    assert profile_for("text_encoder", sizes) == Profile(1, 5, 9)  # prompts + the "" row
    for name in ("prior", "text_proj", "decoder"):
        assert profile_for(name, sizes) == Profile(1, 8, 16)  # unguided 1 .. guided 2x8
    for name in ("super_res_first", "super_res_last"):
        assert profile_for(name, sizes) == Profile(1, 4, 8)
    assert profile_for("decoder", [8, 2]) == Profile(2, 16, 16)  # order and duplicates do not matter
    assert profile_for("decoder", [3]) == Profile(3, 6, 6)
    with pytest.raises(UnclipError, match="no batch rule for network 'vae'"):
        profile_for("vae", sizes)


class RecordingBackend:
    """Wraps a backend and records the rows each network is called with."""

    def __init__(self, backend):
        self._backend, self.seen = backend, {}
        self.name, self.device, self.specs = backend.name, backend.device, backend.specs

    def run(self, network, **inputs):
        self.seen.setdefault(network, set()).add(next(iter(inputs.values())).shape[0])
        return self._backend.run(network, **inputs)

    def constants(self):
        return self._backend.constants()


STABLE_ONLY = ("prior_text_encoder", "unet", "vae_decoder")  # Stable unCLIP's own networks


def test_profiles_cover_the_rows_the_stable_unclip_pipeline_asks_for():
    """The same for the second family: guided and not, several images per prompt, a streamed request
    (its previews decode its rows alone) batched with one that does not stream."""
    from unclip.engine.batch import Request
    from unclip.engine.stable_unclip import load_stable_pipeline

    pipe = load_stable_pipeline("sd-unclip-tiny")
    pipe.backend = recorder = RecordingBackend(pipe.backend)
    recorder.dims = recorder._backend.dims
    for prompts, n, guidance in ((["a", "b"], 2, 4.0), (["a"], 4, 1.0)):
        s = pipe.settings(num_images=n, prior_guidance=guidance, decoder_guidance=guidance, prior_steps=2,
                          decoder_steps=3)
        requests = [Request(prompts, s, torch.Generator().manual_seed(0)),
                    Request(["c"], s, torch.Generator().manual_seed(1), partial_images=1, on_partial=print)]
        recorder.seen = {}
        pipe.generate_requests(requests)
        images = (len(prompts) + 1) * n
        assert set(recorder.seen) == {"prior_text_encoder", "prior", "text_encoder", "unet", "vae_decoder"}
        for network, rows in recorder.seen.items():
            profile = profile_for(network, [1, images])
            assert all(profile.min <= r <= profile.max for r in rows), (network, rows, profile)
        assert recorder.seen["vae_decoder"] == {n, images}  # the preview's rows, then the batch


@pytest.mark.parametrize("prompts,settings,expect_guided", [
    (["a", "b", "c", "d"], {}, True),  # B = 4 prompts x 1 image
    (["a"], dict(num_images=4), True),  # B = 4 as 1 prompt x 4 images: the encoder sees 2 rows
    (["a", "b"], dict(num_images=2, prior_guidance=1.0, decoder_guidance=1.0), False),
])
def test_profiles_cover_the_rows_the_pipeline_asks_for(tiny_pipeline, prompts, settings, expect_guided):
    """The ROWS table is read off the pipeline: run it and compare with what each network saw."""
    from unclip.engine.pipeline import Pipeline

    recorder = RecordingBackend(tiny_pipeline.backend)
    pipe = Pipeline(recorder, tiny_pipeline.tokenizer, tiny_pipeline.dims, tiny_pipeline.schedulers,
                    image_preprocess=tiny_pipeline.image_preprocess)
    pipe.generate(prompts, output_type="np", **{**FAST_STEPS, **settings})
    # variations of as many images: the image encoder sees one row per input image
    blank = np.zeros((16, 16, 3), np.uint8)
    pipe.vary([blank] * len(prompts), output_type="np", **{**FAST_STEPS, **settings})
    images = len(prompts) * settings.get("num_images", 1)
    assert set(recorder.seen) == set(ROWS) - set(STABLE_ONLY)
    assert recorder.seen["image_encoder"] == {len(prompts)}
    for network, rows in recorder.seen.items():
        profile = profile_for(network, [1, images])
        assert all(profile.min <= r <= profile.max for r in rows), (network, rows, profile)
        if expect_guided and network not in ("text_encoder", "image_encoder"):
            assert rows == {ROWS[network][0](images)}, network
    if expect_guided and len(prompts) == images:
        assert recorder.seen["text_encoder"] == {ROWS["text_encoder"][0](images)}


def test_profile_shapes_fill_the_batch_axis():
    assert Profile(1, 4, 8).shapes(["batch", 3, 16, 16]) == ((1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    assert Profile(2, 2, 2).shapes(["batch"]) == ((2,), (2,), (2,))


# -- engine names and the manifest section ----------------------------------------------------

def test_engine_file_name_has_every_key():
    name = cache.engine_file("decoder", "fp16", "b1-8-16", "ab" * 32, HERE)
    assert name == "engines/decoder.fp16.b1-8-16.nvidia-h100-80gb-hbm3-sm90.trt10.13.0.35.abababababab.engine"
    others = [cache.engine_file("decoder", "fp32", "b1-8-16", "ab" * 32, HERE),
              cache.engine_file("decoder", "fp16", "b1-4-8", "ab" * 32, HERE),
              cache.engine_file("decoder", "fp16", "b1-8-16", "cd" * 32, HERE),
              cache.engine_file("decoder", "fp16", "b1-8-16", "ab" * 32, L4),
              cache.engine_file("decoder", "fp16", "b1-8-16", "ab" * 32, TRT11)]
    assert len({name, *others}) == 6


def _fake_engine(folder, network, manifest, target=HERE, profile=None, data=b"serialized engine"):
    import hashlib

    profile = profile or profile_for(network, [1, 4]).to_dict()
    onnx_sha = manifest["networks"][network]["sha256"]
    entry = cache.engine_entry(network, manifest["precision"], profile, onnx_sha, target,
                               hashlib.sha256(data).hexdigest(), {"workspace_gb": 4.0, "opt_level": 3})
    (folder / entry["file"]).parent.mkdir(exist_ok=True)
    (folder / entry["file"]).write_bytes(data)
    return entry


@pytest.fixture
def built(tiny_fp16, tmp_path):
    """A copy of the tiny fp16 artifact with a (fake) engine recorded for every network."""
    from unclip.export.manifest import read_manifest

    folder = copy_of(tiny_fp16, tmp_path / "artifact")
    manifest = read_manifest(folder)
    cache.record_engines(folder, {n: _fake_engine(folder, n, manifest) for n in manifest["networks"]})
    return folder


def test_manifest_round_trip(built):
    from unclip.engine.artifact import load_artifact
    from unclip.export.manifest import read_manifest

    manifest = read_manifest(built)
    entries = cache.engine_entries(manifest)
    assert set(entries) == set(manifest["networks"])
    for network, entry in entries.items():
        assert entry["onnx_sha256"] == manifest["networks"][network]["sha256"]
        assert entry["target"] == {"gpu_name": HERE.gpu_name, "compute_capability": [9, 0],
                                   "tensorrt_version": HERE.tensorrt_version}
        assert entry["profile"] == profile_for(network, [1, 4]).to_dict()
        assert cache.engine_problem(built, manifest, network, "fp16", HERE) is None
    paths = cache.require_engines(built, manifest, list(entries), "fp16", HERE)
    assert all(p.read_bytes() == b"serialized engine" for p in paths.values())
    load_artifact(built)  # the ONNX backends still read the folder
    again = cache.record_engines(built, {})  # merging nothing changes nothing
    assert cache.engine_entries(again) == entries


def _problem(folder, network="decoder", target=HERE, precision="fp16", profile=None):
    from unclip.export.manifest import read_manifest

    return cache.engine_problem(folder, read_manifest(folder), network, precision, target, profile)


def test_every_unusable_engine_is_named(built):
    manifest = json.loads((built / "manifest.json").read_text())
    foreign = _problem(built, target=L4)
    assert "another GPU, NVIDIA H100 80GB HBM3 (sm_90)" in foreign and "NVIDIA L4 (sm_89)" in foreign
    version = _problem(built, target=TRT11)
    assert "built with TensorRT 10.13.0.35, this machine has TensorRT 11.4.0.106" in version
    assert "is fp16, fp32 was asked for" in _problem(built, precision="fp32")
    assert "batch profile" in _problem(built, profile={"min": 1, "opt": 8, "max": 16})

    engine = built / manifest["tensorrt"]["engines"]["decoder"]["file"]
    engine.write_bytes(b"truncated")
    assert "does not match its sha256" in _problem(built)
    engine.unlink()
    assert "is missing" in _problem(built)

    manifest["networks"]["decoder"]["sha256"] = "f" * 64  # as after a re-export
    (built / "manifest.json").write_text(json.dumps(manifest))
    assert "the engine is stale, built from ONNX sha256" in _problem(built)
    del manifest["tensorrt"]["engines"]["decoder"]
    (built / "manifest.json").write_text(json.dumps(manifest))
    assert _problem(built) == "decoder: no TensorRT engine has been built"


def test_runtime_refusal_lists_every_problem_and_the_fix(built):
    from unclip.export.manifest import read_manifest

    manifest = read_manifest(built)
    with pytest.raises(UnclipError) as info:
        cache.require_engines(built, manifest, list(manifest["networks"]), "fp16", TRT11)
    message = str(info.value)
    assert message.count("built with TensorRT 10.13.0.35") == len(manifest["networks"])  # each one
    assert message.endswith(f"`unclip export tensorrt --artifacts {built} --rebuild`")


def test_plan_builds_missing_up_to_date_stale_and_rebuild(built):
    from unclip.export.manifest import read_manifest

    manifest = read_manifest(built)
    profiles = {n: profile_for(n, [1, 4]).to_dict() for n in manifest["networks"]}
    assert cache.plan_builds(built, manifest, profiles, "fp16", HERE, rebuild=False) == ([], list(profiles))
    assert cache.plan_builds(built, manifest, profiles, "fp16", HERE, rebuild=True) == (list(profiles), [])
    del manifest["tensorrt"]["engines"]["prior"]
    build, current = cache.plan_builds(built, manifest, profiles, "fp16", HERE, rebuild=False)
    assert build == ["prior"] and "prior" not in current
    wider = {n: profile_for(n, [1, 8]).to_dict() for n in manifest["networks"]}
    with pytest.raises(UnclipError, match="batch profile .* add --rebuild to replace these engines"):
        cache.plan_builds(built, manifest, wider, "fp16", HERE, rebuild=False)
    other = cache.Target("NVIDIA A10G", (8, 6), HERE.tensorrt_version)
    with pytest.raises(UnclipError, match="another GPU"):
        cache.plan_builds(built, manifest, profiles, "fp16", other, rebuild=False)
    assert cache.plan_builds(built, manifest, profiles, "fp16", other, rebuild=True)[0] == list(profiles)


def test_timing_cache_is_per_gpu_and_version(tmp_path):
    a = cache.timing_cache_file(tmp_path, HERE)
    b = cache.timing_cache_file(tmp_path, cache.Target(HERE.gpu_name, (9, 0), "11.4.0.106"))
    assert a.parent == tmp_path / "engines" and a != b


# -- machine checks -----------------------------------------------------------------------------

def test_no_gpu_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnclipError, match=r"need a CUDA GPU.*torch.cuda.is_available\(\) is False"):
        cache.current_target()


def test_tensorrt_not_installed_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(UnclipError, match="TensorRT is not installed .*pip install tensorrt"):
        import_tensorrt()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(UnclipError, match="TensorRT is not installed"):
        cache.current_target()


def test_backend_refuses_cpu_and_missing_engines(tiny_fp16, monkeypatch):
    import unclip
    from unclip.engine.artifact import load_artifact
    from unclip.engine.backends.tensorrt_backend import TensorRTBackend

    with pytest.raises(UnclipError, match="runs on the GPU only: use --device cuda"):
        TensorRTBackend(load_artifact(tiny_fp16), "cpu")
    with pytest.raises(UnclipError, match="runs on the GPU only"):
        unclip.load(tiny_fp16, backend="tensorrt", device="cpu")
    with pytest.raises(UnclipError, match="not a folder"):
        unclip.load("tiny", backend="tensorrt", device="cpu")
    monkeypatch.setattr(cache, "current_target", lambda index=None: HERE)  # as on a GPU machine
    with pytest.raises(UnclipError, match="no TensorRT engine has been built.*--rebuild"):
        TensorRTBackend(load_artifact(tiny_fp16), "cuda")


class Stream:
    """Records the stream calls the backend makes (torch.cuda.Stream's names)."""

    def __init__(self, name, calls):
        self.cuda_stream, self.name, self.calls = name, name, calls

    def wait_stream(self, other):
        self.calls.append(f"{self.name} waits for {other.name}")


class Context:
    def __init__(self, calls):
        self.calls = calls

    def execute_async_v3(self, stream_handle):
        self.calls.append(f"enqueue on {stream_handle}")
        return True


def test_enqueue_uses_its_own_stream_fenced_both_ways():
    from unclip.engine.backends.tensorrt_backend import enqueue

    calls = []
    current, own = Stream("torch's current", calls), Stream("backend's", calls)
    assert enqueue(Context(calls), current, own, capturing=False)
    # inputs are written on torch's stream before TensorRT reads them; outputs read there after it wrote
    assert calls == ["backend's waits for torch's current", "enqueue on backend's",
                     "torch's current waits for backend's"]


def test_enqueue_inside_capture_uses_the_capturing_stream():
    """Only work on the capturing stream (or streams joined to it) becomes part of the graph."""
    from unclip.engine.backends.tensorrt_backend import enqueue

    calls = []
    assert enqueue(Context(calls), Stream("capturing", calls), Stream("backend's", calls), capturing=True)
    assert calls == ["enqueue on capturing"]


# -- build failures and the fp32 islands --------------------------------------------------------

def test_build_failure_message_names_network_profile_and_fix():
    profile = Profile(1, 8, 16)
    said = ["Requested amount of GPU memory (8589934592 bytes) could not be allocated. There may not be "
            "enough free memory for allocation to succeed.", "out of memory"]
    oom = build_failure_message("decoder", profile, said, 4.0)
    assert oom.startswith("TensorRT failed to build decoder (batch rows min/opt/max 1-8-16)")
    assert "lower the largest --batch-sizes (max 16 rows) or raise --workspace (now 4 GB)" in oom
    tactic = build_failure_message("prior", profile, ["Could not find any implementation for node "
                                                      "/attn/MatMul [ElementWise]"], 2.0)
    assert "no kernel for a layer" in tactic and "/attn/MatMul" in tactic and "now 2 GB" in tactic
    assert "logged no error" in build_failure_message("prior", profile, [], 2.0)
    assert "\n" not in oom + tactic


def _layer_norm_graph(input_type: int) -> onnx.ModelProto:
    from onnx import helper

    x = helper.make_tensor_value_info("x", input_type, [2, 8])
    y = helper.make_tensor_value_info("y", input_type, [2, 8])
    scale = helper.make_tensor("scale", input_type, [8], [1.0] * 8)
    node = helper.make_node("LayerNormalization", ["x", "scale"], ["y"], name="/norm/LayerNorm", axis=-1)
    graph = helper.make_graph([node], "g", [x], [y], [scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fp16_fragile_nodes_are_found(tmp_path):
    assert fp16_fragile_nodes(_layer_norm_graph(onnx.TensorProto.FLOAT)) == []
    half = _layer_norm_graph(onnx.TensorProto.FLOAT16)
    assert fp16_fragile_nodes(half) == ["LayerNormalization /norm/LayerNorm"]
    onnx.save(half, tmp_path / "net.onnx")
    with pytest.raises(UnclipError, match="prior: 1 node.* must compute in fp32 .*LayerNormalization /norm/"):
        check_fp32_islands(tmp_path / "net.onnx", "prior")


class StandInPolygraphy:
    """Polygraphy's TensorRT loaders with TensorRT itself stood in for: records what we hand them
    and plays back a build (or the errors TensorRT logs through Polygraphy)."""

    def __init__(self, monkeypatch, fail: list[str] | None = None, critical: str = ""):
        import types

        import polygraphy.backend.trt as loaders

        self.seen, self.fail, self.critical = {}, fail, critical
        monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(
            MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE")))
        monkeypatch.setattr(loaders, "CreateConfig", self.create_config)
        monkeypatch.setattr(loaders, "NetworkFromOnnxPath", self.network_from_onnx_path)
        monkeypatch.setattr(loaders, "engine_bytes_from_network", self.engine_bytes_from_network)

    def create_config(self, **kwargs):
        cache = kwargs["load_timing_cache"]
        self.seen.update(config=kwargs, old_cache=cache.read() if cache else None)
        return "config"

    def network_from_onnx_path(self, path, strongly_typed):
        self.seen["parse"] = (path, strongly_typed)
        return "network loader"

    def engine_bytes_from_network(self, network, config, save_timing_cache):
        from polygraphy.logger import G_LOGGER

        assert (network, config) == ("network loader", "config")
        if self.fail is not None:
            for message in self.fail:
                G_LOGGER.error(message)  # what TensorRT's logger does through Polygraphy's
            G_LOGGER.critical(self.critical)  # logs, then raises PolygraphyException
        save_timing_cache.write(b"new timings")
        return b"engine bytes"


def test_build_engine_on_polygraphy(tiny_fp16, tmp_path, monkeypatch):
    from unclip.export.manifest import read_manifest
    from unclip.export.tensorrt_build import BuildOptions, build_engine

    entry = read_manifest(tiny_fp16)["networks"]["decoder"]
    polygraphy = StandInPolygraphy(monkeypatch)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old timings")
    data = build_engine(tiny_fp16 / entry["file"], "decoder", entry["inputs"], Profile(1, 2, 4),
                        BuildOptions(workspace_gb=2.0, opt_level=5, timing_cache=timing))
    assert data == b"engine bytes"
    assert polygraphy.seen["parse"] == (str(tiny_fp16 / "decoder.onnx"), True)  # strongly typed
    config = polygraphy.seen["config"]
    assert config["builder_optimization_level"] == 5
    assert config["memory_pool_limits"] == {"WORKSPACE": 2 << 30}
    (shapes,) = config["profiles"]
    for tensor in entry["inputs"]:
        got = shapes[tensor["name"]]
        assert (got.min, got.opt, got.max) == Profile(1, 2, 4).shapes(tensor["shape"])
    assert polygraphy.seen["old_cache"] == b"old timings" and timing.read_bytes() == b"new timings"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache"]  # no lock or temporary files


@pytest.mark.parametrize("logged,critical,fragments", [
    (["Requested amount of GPU memory (8589934592 bytes) could not be allocated. There may not be enough "
      "free memory for allocation to succeed.", "[virtualMemoryBuffer.cpp::resizePhysical] out of memory"],
     "Invalid Engine. Please ensure the engine was built correctly",
     ["TensorRT failed to build decoder (batch rows min/opt/max 1-2-4): Requested amount of GPU memory",
      "out of GPU memory", "raise --workspace (now 2 GB)"]),
    (["In node 12 (parseGraph): INVALID_NODE: Invalid Node - /Resize"], "Could not parse ONNX correctly",
     ["TensorRT's ONNX parser rejected decoder.onnx (In node 12 (parseGraph): INVALID_NODE",
      "tensorrt_unsupported_ops"]),
])
def test_build_failures_are_one_line_with_tensorrts_words(tiny_fp16, tmp_path, monkeypatch, logged, critical,
                                                          fragments):
    from unclip.export.manifest import read_manifest
    from unclip.export.tensorrt_build import BuildOptions, build_engine

    entry = read_manifest(tiny_fp16)["networks"]["decoder"]
    StandInPolygraphy(monkeypatch, fail=logged, critical=critical)
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"old timings")
    with pytest.raises(UnclipError) as info:
        build_engine(tiny_fp16 / entry["file"], "decoder", entry["inputs"], Profile(1, 2, 4),
                     BuildOptions(workspace_gb=2.0, timing_cache=timing))
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert timing.read_bytes() == b"old timings"  # nothing half-written


def test_fp16_export_keeps_fragile_nodes_in_fp32(tiny_fp16):
    from unclip.export.manifest import read_manifest

    manifest = read_manifest(tiny_fp16)
    for name, entry in manifest["networks"].items():
        model = onnx.load(str(tiny_fp16 / entry["file"]), load_external_data=False)
        fragile = [n for n in model.graph.node if n.op_type in entry["fp32_ops"]]
        assert fragile, name  # the check below is not vacuous: each network has such nodes
        assert fp16_fragile_nodes(model) == [], name
        assert entry["tensorrt_unsupported_ops"] == [], name


# -- --check ------------------------------------------------------------------------------------

def function_runner(spec, run, name):
    """A Polygraphy runner over a function of torch tensors: the torch networks, or a stand-in engine."""
    import time
    from collections import OrderedDict

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class FunctionRunner(BaseRunner):
        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for t in spec.inputs:
                meta.add(t.name, np.dtype(t.dtype), [-1 if isinstance(a, str) else a for a in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = run({k: torch.from_numpy(np.asarray(v)) for k, v in feed_dict.items()})
            self.inference_time = time.perf_counter() - start
            return OrderedDict((k, v.detach().numpy()) for k, v in out.items())

    return FunctionRunner(name=name)


def test_check_compares_min_opt_max_and_catches_nan():
    from unclip.export.tensorrt_check import check_network, format_report
    from unclip.specs import ModelDims, network_specs

    dims = ModelDims(clip_dim=8, text_len=5, text_vocab=50, extra_tokens=2, decoder_cross_dim=8,
                     decoder_time_dim=16, decoder_size=4, decoder_channels=3, super_res_size=8)
    spec = network_specs(dims)["super_res_first"]
    seen = []

    def reference(inputs):
        seen.append(("ref", inputs["sample"].shape[0], inputs["sample"].sum().item()))
        return {"model_output": inputs["sample"] * 2}

    def engine(inputs):  # right at opt, NaN at max, slightly off at min
        rows = inputs["sample"].shape[0]
        seen.append(("trt", rows, inputs["sample"].sum().item()))
        out = inputs["sample"] * 2
        if rows == 8:
            out[0, 0, 0, 0] = float("nan")
        if rows == 1:
            out = out + 1.0
        return {"model_output": out}

    runners = function_runner(spec, reference, "reference"), function_runner(spec, engine, "engine")
    rows = check_network(spec, dims, {"min": 1, "opt": 4, "max": 8}, "fp16", *runners)
    assert [(r.shape, r.rows, r.ok) for r in rows] == [("min", 1, False), ("opt", 4, True), ("max", 8, False)]
    assert rows[2].nonfinite == 1 and rows[1].max_abs == 0.0
    assert rows[0].max_abs == pytest.approx(1.0)
    refs, engines = [s for s in seen if s[0] == "ref"], [s for s in seen if s[0] == "trt"]
    assert [s[1:] for s in refs] == [s[1:] for s in engines]  # identical inputs to both, per shape
    assert [s[1] for s in refs] == [1, 4, 8]
    report = format_report(rows, "fp16")
    assert "FAIL: NaN/inf" in report[3] and "FAIL: error too large" in report[1] and report[2].endswith("ok")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_check_onnxruntime_side_against_the_torch_networks(tmp_path_factory, tiny_pipeline, precision):
    """--check's comparison, its ONNX Runtime side (Polygraphy's OnnxrtRunner over the exported
    files) against the torch networks that were exported, at every network's profile shapes: what
    --check runs, with the torch networks in the engine's place. Same tolerance as export validation."""
    from unclip.engine.artifact import load_artifact
    from unclip.export.tensorrt_check import check_network, onnxruntime_runner

    artifact = load_artifact(exported(tmp_path_factory, "tiny", precision))
    backend = tiny_pipeline.backend  # the preset's torch networks, float32
    rows = []
    for name, spec in backend.specs.items():
        ort = onnxruntime_runner(artifact.folder, artifact.manifest["networks"][name])
        torch_net = function_runner(spec, lambda inputs, n=name: backend.run(n, **inputs), f"torch-{name}")
        profile = profile_for(name, [1, 2]).to_dict()
        rows += check_network(spec, artifact.dims, profile, precision, torch_net, ort)
    outputs = sum(len(spec.outputs) for spec in backend.specs.values())
    assert len(rows) == 3 * outputs and {r.shape for r in rows} == {"min", "opt", "max"}
    assert all(r.ok and r.nonfinite == 0 for r in rows), [r for r in rows if not r.ok]
    assert max(r.max_abs for r in rows) > 0  # two implementations, not one compared with itself


# -- CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["--batch-sizes", "0,4"], ["--batch-sizes '0,4' must be positive integers"]),
    (["--batch-sizes", "one"], ["--batch-sizes 'one' must be comma-separated integers"]),
    (["--workspace", "0"], ["--workspace 0.0 GB must be above 0"]),
    (["--workspace", "nan"], ["--workspace nan GB must be above 0"]),
    (["--opt-level", "9"], ["--opt-level 9 must be 0..5"]),
])
def test_cli_bad_arguments(tiny_fp16, args, fragments):
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tiny_fp16), *args), *fragments)


def test_cli_folder_that_is_not_an_onnx_export(tmp_path, tiny_folder):
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tmp_path / "nope")),
                          "does not exist", "unclip export onnx")
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tiny_folder)),
                          "has no manifest.json: it is not an exported artifact folder")


def test_cli_precision_must_match_the_export(tmp_path_factory, tiny_fp16):
    fp32 = exported(tmp_path_factory, "tiny")
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(fp32)),
                          "--precision fp16 but", "holds fp32 ONNX files", "--precision fp16 --out")
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tiny_fp16), "--precision", "fp32"),
                          "holds fp16 ONNX files")


def test_cli_names_the_missing_gpu_and_tensorrt(tiny_fp16, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tiny_fp16)), "need a CUDA GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert_one_line_error(run_cli("export", "tensorrt", "--artifacts", str(tiny_fp16)),
                          "TensorRT is not installed")
    assert not (tiny_fp16 / "engines").exists()  # nothing half-written


def test_cli_refuses_foreign_engines_without_rebuild(built, monkeypatch):
    monkeypatch.setattr(cache, "current_target", lambda index=None: L4)
    before = (built / "manifest.json").read_text()
    result = run_cli("export", "tensorrt", "--artifacts", str(built), "--batch-sizes", "1,4")
    assert_one_line_error(result, "another GPU, NVIDIA H100 80GB HBM3 (sm_90)", "add --rebuild")
    assert (built / "manifest.json").read_text() == before


def test_cli_up_to_date_engines_are_not_rebuilt(built, monkeypatch):
    import unclip.export.tensorrt_build as build

    monkeypatch.setattr(cache, "current_target", lambda index=None: HERE)
    monkeypatch.setattr(build, "build_engine", lambda *a, **k: pytest.fail("nothing should be built"))
    result = run_cli("export", "tensorrt", "--artifacts", str(built), "--batch-sizes", "1,4")
    assert result.exit_code == 0, result.output
    networks = json.loads((built / "manifest.json").read_text())["networks"]
    assert result.stdout.count("up to date") == len(networks)


def test_cli_builds_only_what_is_missing(built, monkeypatch):
    """The build itself is TensorRT's; here a stand-in returns bytes, to test the bookkeeping."""
    import unclip.export.tensorrt_build as build

    manifest = json.loads((built / "manifest.json").read_text())
    del manifest["tensorrt"]["engines"]["decoder"]
    (built / "manifest.json").write_text(json.dumps(manifest))
    calls = []

    def fake_build(onnx_path, network, inputs, profile, options):
        calls.append((onnx_path.name, network, profile, options.timing_cache.name))
        return b"new engine"

    monkeypatch.setattr(cache, "current_target", lambda index=None: HERE)
    monkeypatch.setattr(build, "build_engine", fake_build)
    result = run_cli("export", "tensorrt", "--artifacts", str(built), "--batch-sizes", "1,4")
    assert result.exit_code == 0, result.output
    assert calls == [("decoder.onnx", "decoder", Profile(1, 8, 8),
                      cache.timing_cache_file(built, HERE).name)]
    entry = json.loads((built / "manifest.json").read_text())["tensorrt"]["engines"]["decoder"]
    assert (built / entry["file"]).read_bytes() == b"new engine"
    assert cache.engine_problem(built, json.loads((built / "manifest.json").read_text()), "decoder", "fp16",
                                HERE) is None

    recorded = json.loads((built / "manifest.json").read_text())["tensorrt"]["engines"]
    old = {n: e["file"] for n, e in recorded.items()}
    monkeypatch.setattr(cache, "current_target", lambda index=None: L4)
    result = run_cli("export", "tensorrt", "--artifacts", str(built), "--batch-sizes", "1,4", "--rebuild")
    assert result.exit_code == 0, result.output
    networks = len(recorded)
    assert len(calls) == 1 + networks and result.stdout.count(" built ") == networks
    new = json.loads((built / "manifest.json").read_text())["tensorrt"]["engines"]
    assert all("nvidia-l4-sm89" in e["file"] and (built / e["file"]).is_file() for e in new.values())
    assert not any((built / f).exists() for f in old.values())  # replaced engines are deleted


# -- Stable unCLIP (the second family): its fp16 export, engines per network, the runtime's refusals --

# The fp16 export's images on ONNX Runtime against torch float32, the same draws: every network computes
# in fp16 with fp32 islands (each validated within 3e-2 of torch); measured on tiny, 2 images, prior 2 /
# UNet 3 steps: mean 0.25/255, max 1.7/255. Bound: 4/255.
STABLE_FP16 = 4 / 255


@pytest.fixture(scope="module")
def stable_fp16(tmp_path_factory):
    from unclip.export.stable_unclip_onnx import export_stable_onnx

    folder = tmp_path_factory.mktemp("stable") / "fp16"
    export_stable_onnx("sd-unclip-tiny", folder, precision="fp16")
    return folder


def test_stable_unclip_fp16_export_gets_an_engine_per_network_and_runs_on_onnxruntime(stable_fp16, tmp_path,
                                                                                       monkeypatch):
    """`unclip export tensorrt` on a Stable unCLIP fp16 export: each network's graph passes the fp32-island
    check and gets the profile of its rows (the UNet's guided pairs double); the manifest records the
    engines; the runtime refuses the CPU in one line; ONNX Runtime runs the same export like torch."""
    import unclip
    import unclip.export.tensorrt_build as build
    from unclip.export.manifest import read_manifest

    folder = copy_of(stable_fp16, tmp_path / "artifact")
    calls = {}

    def fake_build(onnx_path, network, inputs, profile, options):
        check_fp32_islands(onnx_path, network)  # what the real build checks first
        calls[network] = profile
        return b"engine of " + network.encode()

    monkeypatch.setattr(cache, "current_target", lambda index=None: HERE)
    monkeypatch.setattr(build, "build_engine", fake_build)
    result = run_cli("export", "tensorrt", "--artifacts", str(folder), "--batch-sizes", "1,4")
    assert result.exit_code == 0, result.output
    assert calls == {"prior_text_encoder": Profile(1, 4, 4), "prior": Profile(1, 8, 8),
                     "text_encoder": Profile(1, 5, 5), "unet": Profile(1, 8, 8),
                     "vae_decoder": Profile(1, 4, 4)}
    manifest = read_manifest(folder)
    assert set(cache.engine_entries(manifest)) == set(calls) and manifest["family"] == "stable-unclip"
    assert all(not entry["tensorrt_unsupported_ops"] for entry in manifest["networks"].values())
    with pytest.raises(UnclipError, match="on the GPU with tensorrt") as error:
        unclip.load(folder, backend="tensorrt", device="cpu")
    assert "\n" not in str(error.value)
    settings = dict(seed=3, num_images=2, output_type="np", prior_steps=2, decoder_steps=3)
    got = unclip.load(folder, backend="onnxruntime").generate("a red circle", **settings)
    want = unclip.load("sd-unclip-tiny").generate("a red circle", **settings)
    assert float(np.abs(got - want).max()) <= STABLE_FP16
