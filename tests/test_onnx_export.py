"""`unclip export onnx`: folder layout, manifest, validation, TensorRT op check, atomic writes."""

from __future__ import annotations

import json

import onnx
import pytest

from tests.onnx_artifacts import copy_of, exported, siblings


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    return exported(tmp_path_factory, "tiny")


def test_folder_is_self_contained(tiny_onnx):
    from unclip.export.manifest import checksums

    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    for name in ("model_dims.json", "schedulers.json", "constants.safetensors",
                 "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (tiny_onnx / name).is_file(), name
    assert manifest["files"] == checksums(tiny_onnx)  # every file, with its digest
    assert not [p for p in tiny_onnx.rglob("*") if p.is_symlink()]


def test_manifest_follows_the_spec_table(tiny_onnx, tiny_components):
    from unclip.export.onnx_export import weights_sha256
    from unclip.export.validation import TOLERANCE
    from unclip.models.networks import model_dims
    from unclip.models.step_cache import cached_specs, feature_channels
    from unclip.specs import network_specs

    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    dims = model_dims(tiny_components)
    assert json.loads((tiny_onnx / "model_dims.json").read_text()) == dims.to_dict()
    assert manifest["source_model"]["weights_sha256"] == weights_sha256(tiny_components)
    assert {"torch", "onnx", "onnxruntime", "onnxsim"} <= set(manifest["tools"])
    specs = network_specs(dims)  # and the step cache's pair: the shared tiny export has it
    specs.update(cached_specs(specs["decoder"], feature_channels(tiny_components.decoder)))
    assert list(manifest["networks"]) == list(specs)
    for name, spec in specs.items():
        entry = manifest["networks"][name]
        assert entry["sha256"] == manifest["files"][entry["file"]]
        assert [t["name"] for t in entry["inputs"]] == spec.input_names
        assert [t["dtype"] for t in entry["outputs"]] == [t.dtype for t in spec.outputs]
        assert entry["dynamic_axes"]  # every network has the batch axis
        assert all(axes == {"0": "batch"} for axes in entry["dynamic_axes"].values())
        assert entry["opset"] == 17 and entry["precision"] == "fp32"
        assert set(entry["validation"]) == {"1", "4"}
        for errors in entry["validation"].values():
            assert set(errors) == set(spec.output_names)
            for e in errors.values():
                assert e["max_abs"] <= TOLERANCE["fp32"] * max(1.0, e["max_torch"])
        model = onnx.load(str(tiny_onnx / entry["file"]))
        assert [i.name for i in model.graph.input] == spec.input_names
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_every_operator_parses_in_tensorrt(tiny_onnx):
    """The readiness check itself: no tiny network uses an op TensorRT's ONNX parser lacks."""
    from unclip.export.tensorrt_ops import operator_types, tensorrt_unsupported_ops

    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    for name, entry in manifest["networks"].items():
        model = onnx.load(str(tiny_onnx / entry["file"]))
        assert entry["operators"] == operator_types(model)
        assert tensorrt_unsupported_ops(model) == entry["tensorrt_unsupported_ops"] == [], name


def test_operator_check_can_fail():
    from onnx import TensorProto, helper

    from unclip.export.tensorrt_ops import tensorrt_unsupported_ops

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    nodes = [helper.make_node("Unique", ["x"], ["u"]),
             helper.make_node("Resize", ["u", "", "s"], ["r"], mode="cubic"),
             helper.make_node("Gelu", ["r"], ["g"], domain="com.microsoft"),
             helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y])
    assert tensorrt_unsupported_ops(helper.make_model(graph)) == [
        "Resize(mode=cubic)", "Unique", "com.microsoft::Gelu"]


def test_external_data_for_large_models(tiny_components, tmp_path):
    """Past the 2 GB protobuf limit weights go to <network>.onnx.data; forced here with a 0 threshold."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from unclip.export.onnx_trace import save_network, trace_network
    from unclip.models.networks import adapters, model_dims
    from unclip.specs import example_inputs, network_specs

    dims = model_dims(tiny_components)
    spec = network_specs(dims)["text_proj"]
    module = adapters(tiny_components)["text_proj"]
    files = save_network(trace_network(module, spec, dims, 17), tmp_path / "text_proj.onnx", 0)
    assert files == ["text_proj.onnx", "text_proj.onnx.data"]
    assert (tmp_path / files[1]).stat().st_size > (tmp_path / files[0]).stat().st_size
    inputs = example_inputs(spec, dims, 3, torch.Generator().manual_seed(0))
    got = ort.InferenceSession(str(tmp_path / files[0])).run(None, {k: v.numpy() for k, v in inputs.items()})
    want = module(*(inputs[n] for n in spec.input_names))
    assert float(np.abs(got[0] - want[0].numpy()).max()) < 1e-5  # fp32 rounding only


def test_fp16_export_replaces_the_folder(tiny_onnx, tmp_path):
    """A second export into DIR replaces it whole: no old file, no temporary sibling left."""
    from unclip.export.onnx_export import export_onnx
    from unclip.export.validation import TOLERANCE

    out = copy_of(tiny_onnx, tmp_path / "artifact")
    (out / "stale.txt").write_text("from an older export")
    manifest = export_onnx("tiny", out, precision="fp16", batch_sizes=[2])
    assert not (out / "stale.txt").exists()
    assert siblings(out) == []
    # without --step-cache no step-cache pair, and the copied folder's pair is gone with the rest
    assert not {"decoder_full", "decoder_shallow"} & set(manifest["networks"])
    assert not (out / "decoder_full.onnx").exists()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for name, entry in manifest["networks"].items():
        assert entry["precision"] == "fp16" and entry["tensorrt_unsupported_ops"] == [], name
        model = onnx.load(str(out / entry["file"]))
        assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
        # the runtime feeds and reads fp32 (and int64/bool), as the spec table says
        assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT] * len(
            model.graph.output)
        for e in entry["validation"]["2"].values():
            assert e["max_abs"] <= TOLERANCE["fp16"] * max(1.0, e["max_torch"])


def test_failed_validation_leaves_the_folder_untouched(tiny_onnx, tmp_path, monkeypatch):
    from unclip.errors import UnclipError
    from unclip.export import validation
    from unclip.export.manifest import checksums
    from unclip.export.onnx_export import export_onnx

    out = copy_of(tiny_onnx, tmp_path / "artifact")
    before = checksums(out) | {"manifest.json": (out / "manifest.json").read_text()}
    monkeypatch.setitem(validation.TOLERANCE, "fp32", 0.0)  # no export can be exact to 0
    with pytest.raises(UnclipError, match="validation failed: text_encoder"):
        export_onnx("tiny", out, batch_sizes=[1])
    assert checksums(out) | {"manifest.json": (out / "manifest.json").read_text()} == before
    assert siblings(out) == []
