"""Is every op of an ONNX graph one TensorRT's ONNX parser supports?

The list is onnx-tensorrt's docs/operators.md for TensorRT 10.1 GA (ops marked supported),
the oldest 10.x table, so a graph that passes here parses on every TensorRT 10 release.
Ops that parse but are data-dependent (NonZero, NonMaxSuppression) are refused too: NMS
and anything with a data-dependent output shape stays outside the engines.
"""

from __future__ import annotations

from pathlib import Path

import onnx

TRT10_SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not
OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Supported by the parser, but not wanted inside our engines.
DATA_DEPENDENT = frozenset({"NonZero", "NonMaxSuppression", "Loop", "Scan"})


def graph_ops(graph: onnx.GraphProto) -> set[str]:
    """Op types of a graph and of every subgraph (If / Loop branches)."""
    ops = set()
    for node in graph.node:
        ops.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                ops |= graph_ops(attr.g)
            for g in attr.graphs:
                ops |= graph_ops(g)
    return ops


def unsupported_ops(path: Path) -> dict[str, str]:
    """{op: why} for every op TensorRT would refuse or that we keep out of engines."""
    ops = graph_ops(onnx.load(str(path), load_external_data=False).graph)
    problems = {op: "not supported by TensorRT's ONNX parser" for op in ops if op not in TRT10_SUPPORTED}
    problems.update({op: "data-dependent; keep it outside the engine" for op in ops & DATA_DEPENDENT})
    return problems
