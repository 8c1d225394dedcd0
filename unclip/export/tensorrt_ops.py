"""TensorRT readiness: which operators of an exported graph TensorRT's ONNX parser cannot parse.

Source: the operator support matrix of onnx-tensorrt, docs/operators.md at commit 96e7811
("ONNX-TensorRT 10.1 GA release", June 2024), which states that TensorRT 10.0 parses opsets
9 to 20. The set below is every operator that table marks "Y"; an operator the table marks "N"
or does not list at all is unsupported. Per-operator restrictions that matter for unCLIP graphs
are checked too (Resize: no cubic mode, no antialiasing).
"""

from __future__ import annotations

import onnx

TABLE_SOURCE = ("onnx-tensorrt docs/operators.md @ 96e7811 "
                "(ONNX-TensorRT 10.1 GA; TensorRT 10.0 parses opsets 9-20)")
MAX_OPSET = 20

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())


def _nodes(graph: onnx.GraphProto):
    """Every node, including those inside If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            for sub in attr.graphs:
                yield from _nodes(sub)


def operator_types(model: onnx.ModelProto) -> list[str]:
    """Sorted op types; ops outside the default ONNX domain are written `domain::Op`."""
    return sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                   for n in _nodes(model.graph)})


def tensorrt_unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (or `Op(restriction)`) TensorRT's parser rejects; empty when the graph is parseable."""
    bad = {op for op in operator_types(model) if op not in SUPPORTED}
    for node in _nodes(model.graph):
        if node.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("mode", b"nearest") == b"cubic":
                bad.add("Resize(mode=cubic)")
            if attrs.get("antialias", 0):
                bad.add("Resize(antialias=1)")
    return sorted(bad)
