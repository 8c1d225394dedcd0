"""torch -> ONNX for one network, driven by its spec (names, dynamic axes, example inputs)."""

from __future__ import annotations

import inspect
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from unclip.specs import ModelDims, NetworkSpec, example_inputs

# One protobuf cannot exceed 2 GiB; larger models keep their weights in one side file.
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # a margin for the graph itself


def dynamic_axes(spec: NetworkSpec) -> dict[str, dict[int, str]]:
    """{tensor name: {axis index: axis name}} for every string-named axis of the spec."""
    axes = {}
    for t in (*spec.inputs, *spec.outputs):
        named = {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
        if named:
            axes[t.name] = named
    return axes


def trace_network(module: torch.nn.Module, spec: NetworkSpec, dims: ModelDims, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript-based exporter: it needs no onnxscript and handles these
    networks on every torch >= 2.4. Batch 2 traces the guided (2B) shape; the axis stays dynamic."""
    inputs = example_inputs(spec, dims, batch=2, generator=torch.Generator().manual_seed(0))
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes about python-side branches on shapes
        path = Path(tmp) / f"{spec.name}.onnx"
        torch.onnx.export(module.eval(), tuple(inputs[n] for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=dynamic_axes(spec), opset_version=opset,
                          do_constant_folding=True, **kwargs)
        return restore_unused_inputs(onnx.load(str(path)), spec)  # pulls in any external data torch wrote


ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
              "int64": onnx.TensorProto.INT64, "bool": onnx.TensorProto.BOOL}


def restore_unused_inputs(model: onnx.ModelProto, spec: NetworkSpec) -> onnx.ModelProto:
    """The tracer drops inputs that no node reads (decoder_shallow's text_mask, where the decoder's
    outermost levels have no attention); the spec table is the contract every runtime binds by, so
    they come back, in the spec's order, as graph inputs that no node reads (valid ONNX)."""
    traced = {value.name: value for value in model.graph.input}
    if all(name in traced for name in spec.input_names):
        return model
    inputs = [traced[t.name] if t.name in traced
              else onnx.helper.make_tensor_value_info(t.name, ONNX_TYPES[t.dtype], list(t.shape))
              for t in spec.inputs]
    others = [value for name, value in traced.items() if name not in spec.input_names]
    del model.graph.input[:]
    model.graph.input.extend(inputs + others)
    return model


def stamp_io_shapes(model: onnx.ModelProto, spec: NetworkSpec) -> onnx.ModelProto:
    """Graph inputs/outputs get exactly the spec's shapes: the tracer and the clean-up rename or
    loosen some axes (e.g. input_ids' batch axis became `unk__0`, the hidden states' fixed 77 a
    symbol), and runtimes such as TensorRT read these names to build their optimisation profiles."""
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis in tensors[value.name].shape:
            dim = dims.add()
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis
    return model


def save_network(model: onnx.ModelProto, path: Path,
                 external_data_bytes: int = EXTERNAL_DATA_BYTES) -> list[str]:
    """Write `path`, plus `path.data` holding the weights when the model is `external_data_bytes`
    or larger; returns the names of the files written."""
    path = Path(path)
    if model_size(model) < external_data_bytes:
        onnx.save_model(model, str(path))
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return [path.name, data]


def model_size(model: onnx.ModelProto) -> float:
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize()
    except (ValueError, EncodeError):  # protobuf refuses to size messages past 2 GiB
        return float("inf")
