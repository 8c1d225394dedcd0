"""The fp16 variant of an exported graph: half-precision weights and activations, fp32 at the edges.

Inputs and outputs stay fp32 (the sampling loop and the scheduler run in fp32), and two kinds of
nodes stay fp32 because fp16 breaks them:
  * FRAGILE_OPS: normalisations (their variance sums squares that overflow fp16's 65504), softmax
    and exp (large logits), pow/sqrt/reduce-mean/erf inside decomposed norms and GELU;
  * the timestep-embedding subgraph: sin/cos of t * frequency with t up to 999 needs fp32, since
    fp16's spacing near 1000 is 0.5, i.e. half a radian.
onnxconverter-common's converter does the rewrite and inserts the Casts at the fp32 islands.
"""

from __future__ import annotations

import warnings

import onnx

FRAGILE_OPS = ["LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax", "Exp",
               "Pow", "Sqrt", "ReduceMean", "Erf", "Sin", "Cos"]
TIMESTEP_INPUT = "timestep"


def timestep_subgraph(model: onnx.ModelProto, source: str = TIMESTEP_INPUT) -> list[str]:
    """Names of the nodes computed from `source`, constants and tensor shapes alone (the UNets
    expand t to the batch size read from the sample's shape). ONNX nodes are in topological
    order, so one forward pass finds them."""
    constant = {t.name for t in model.graph.initializer} | {""}
    derived = {source} if source in {i.name for i in model.graph.input} else set()
    names = []
    for node in model.graph.node:
        inputs = set(node.input)
        if node.op_type in ("Constant", "Shape") or inputs <= constant:
            constant.update(node.output)
        elif derived & inputs and inputs <= derived | constant:
            derived.update(node.output)
            names.append(node.name)
    return names


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    output_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}  # converted in place
    _infer_shapes_without_weights(model)  # the converter's own inference cannot pass 2 GB
    block_ops, block_nodes = float16.DEFAULT_OP_BLOCK_LIST + FRAGILE_OPS, timestep_subgraph(model)
    cast_outputs = {out for node in model.graph.node if node.op_type == "Cast" for out in node.output}
    with warnings.catch_warnings():  # one warning per weight below fp16's smallest normal: expected
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(
            model, keep_io_types=True, op_block_list=block_ops, node_block_list=block_nodes,
            disable_shape_infer=True)
    _fix_casts_to_float(half)
    _feed_half_consumers_of_outputs(half, set(block_ops), set(block_nodes), cast_outputs)
    _restore_output_types(output_types, half)
    return half


def _feed_half_consumers_of_outputs(half: onnx.ModelProto, block_ops: set[str], block_nodes: set[str],
                                    cast_outputs: set[str]) -> None:
    """keep_io_types ends an output in a Cast to fp32 but leaves the output's name as the input of the
    nodes inside the graph that also read it (the step cache's decoder_full returns its deep features
    and feeds them on to its last up block): those converted to fp16 must read the Cast's fp16 input
    instead, or ORT rejects the graph for mixed types; nodes kept in fp32 keep the fp32 output.
    `cast_outputs`: outputs a Cast made before the conversion (not the converter's: left alone)."""
    producers = {out: node for node in half.graph.node for out in node.output}
    for output in half.graph.output:
        cast = producers.get(output.name)
        if (cast is None or cast.op_type != "Cast" or output.name in cast_outputs
                or onnx.helper.get_attribute_value(cast.attribute[0]) != onnx.TensorProto.FLOAT):
            continue  # not the converter's fp16 -> fp32 cast at an output (a blocked node's is fp32 -> fp16)
        source = cast.input[0]
        for node in half.graph.node:
            blocked = (node.op_type in block_ops and node.op_type != "Cast") or node.name in block_nodes
            if node is cast or blocked:
                continue
            node.input[:] = [source if i == output.name else i for i in node.input]


def _restore_output_types(want: dict[str, int], half: onnx.ModelProto) -> None:
    """keep_io_types misses an output that other nodes also consume (the text encoder's hidden
    states feed its pooling): end every float output not already made by a Cast in a Cast to its
    own type (a no-op where it was fp32 anyway, which ORT and TensorRT remove)."""
    producers = {out: node for node in half.graph.node for out in node.output}
    for output in half.graph.output:
        elem, producer = want[output.name], producers.get(output.name)
        if elem != onnx.TensorProto.FLOAT or (
                producer is not None and producer.op_type == "Cast"
                and onnx.helper.get_attribute_value(producer.attribute[0]) == elem):
            continue
        inner = output.name + "_fp16"
        for node in half.graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        half.graph.node.append(onnx.helper.make_node("Cast", [inner], [output.name], to=elem,
                                                     name=output.name + "_to_output_type"))
        output.type.tensor_type.elem_type = elem


def _infer_shapes_without_weights(model: onnx.ModelProto, large: int = 1 << 20) -> None:
    """Shape inference needs weights' shapes, not their bytes: lift large initializers' bytes out,
    infer (the model is now small enough to serialise), then put them back."""
    lifted = [(t, t.raw_data) for t in model.graph.initializer if len(t.raw_data) >= large]
    for tensor, _ in lifted:
        tensor.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for tensor, data in lifted:
            tensor.raw_data = data
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _fix_casts_to_float(model: onnx.ModelProto) -> None:
    """The converter (1.16) retypes the output of a `Cast(to=float)` that feeds fp16 nodes (e.g. the
    attention mask cast from bool) to fp16 but leaves `to` at float, which ORT rejects; make the
    Cast produce the type the converter gave its output."""
    fp16_values = {v.name for v in model.graph.value_info
                   if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16_values:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == onnx.TensorProto.FLOAT:
                    attr.i = onnx.TensorProto.FLOAT16
