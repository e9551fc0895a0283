"""Every backward rule against central finite differences, run by onnxruntime.

Adding an op: write its rule in rules.py and one line here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from gradcam_server.augment import AugmentError, MissingRuleError
from gradcam_server.augment.rules import RULES
from gradcam_server.augment.backward import build_backward
from gradcam_server.augment.graph import GraphBuilder
from gradcheck import OpSpec, Wrt, build_model, check_op, gradients

rng = np.random.default_rng(1234)


def weights(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


X4 = Wrt((2, 3, 5, 5))
POSITIVE = Wrt((2, 3, 4), low=0.5, high=2.0)
KINK0 = Wrt((2, 3, 4), avoid=(0.0,))
UNIT_OPEN = Wrt((2, 3, 4), low=-0.85, high=0.85)

UNARY = [
    OpSpec("Identity", {"x": X4}),
    OpSpec("Dropout", {"x": X4}),
    OpSpec("Neg", {"x": X4}),
    OpSpec("Abs", {"x": KINK0}),
    OpSpec("Relu", {"x": KINK0}),
    OpSpec("LeakyRelu", {"x": KINK0}, attrs={"alpha": 0.1}),
    OpSpec("Elu", {"x": KINK0}, attrs={"alpha": 0.7}),
    OpSpec("PRelu", {"x": Wrt((2, 3, 4, 4), avoid=(0.0,))}, consts={"slope": weights(3, 1, 1)}),
    OpSpec("Clip", {"x": Wrt((2, 3, 4), low=-1, high=7, avoid=(0.0, 6.0))},
           consts={"lo": np.float32(0), "hi": np.float32(6)}),
    OpSpec("Clip", {"x": Wrt((2, 3, 4), low=-1, high=7, avoid=(0.0,))},
           consts={"lo": np.float32(0)}, label="min-only"),
    OpSpec("Sigmoid", {"x": X4}),
    OpSpec("HardSigmoid", {"x": Wrt((2, 3, 4), low=-4, high=4, avoid=(-2.5, 2.5))}),
    OpSpec("HardSwish", {"x": Wrt((2, 3, 4), low=-4, high=4, avoid=(-3.0, 3.0))}),
    OpSpec("Tanh", {"x": X4}),
    OpSpec("Exp", {"x": X4}),
    OpSpec("Log", {"x": POSITIVE}),
    OpSpec("Sqrt", {"x": POSITIVE}),
    OpSpec("Reciprocal", {"x": POSITIVE}),
    OpSpec("Erf", {"x": X4}),
    OpSpec("Softplus", {"x": X4}),
    OpSpec("Gelu", {"x": X4}, opset=20),
    OpSpec("Gelu", {"x": X4}, attrs={"approximate": "tanh"}, opset=20, label="tanh"),
    OpSpec("Softmax", {"x": Wrt((2, 3, 4))}, attrs={"axis": 1}),
    OpSpec("LogSoftmax", {"x": Wrt((2, 3, 4))}, attrs={"axis": -1}),
    OpSpec("Cast", {"x": X4}, attrs={"to": TensorProto.DOUBLE}),
    OpSpec("ThresholdedRelu", {"x": Wrt((2, 3, 4), avoid=(0.5,))}, attrs={"alpha": 0.5}),
    OpSpec("Shrink", {"x": Wrt((2, 3, 4), avoid=(-0.7, 0.7))}, attrs={"lambd": 0.7, "bias": 0.2}),
    OpSpec("Selu", {"x": KINK0}),
    OpSpec("Celu", {"x": KINK0}, attrs={"alpha": 0.6}),
    OpSpec("Mish", {"x": X4}, opset=18),
    OpSpec("Softsign", {"x": X4}),
    OpSpec("Sin", {"x": Wrt((2, 3, 4), low=-4, high=4)}),
    OpSpec("Cos", {"x": Wrt((2, 3, 4), low=-4, high=4)}),
    OpSpec("Tan", {"x": Wrt((2, 3, 4), low=-1.2, high=1.2)}),
    OpSpec("Asin", {"x": UNIT_OPEN}),
    OpSpec("Acos", {"x": UNIT_OPEN}),
    OpSpec("Atan", {"x": Wrt((2, 3, 4), low=-3, high=3)}),
    OpSpec("Sinh", {"x": X4}),
    OpSpec("Cosh", {"x": X4}),
    OpSpec("Asinh", {"x": Wrt((2, 3, 4), low=-3, high=3)}),
    OpSpec("Acosh", {"x": Wrt((2, 3, 4), low=1.3, high=3)}),
    OpSpec("Atanh", {"x": UNIT_OPEN}),
]

SHAPES = [
    OpSpec("Reshape", {"x": X4}, consts={"shape": ints(2, -1)}),
    OpSpec("Flatten", {"x": X4}, attrs={"axis": 1}),
    OpSpec("Squeeze", {"x": Wrt((2, 1, 3))}, consts={"axes": ints(1)}),
    OpSpec("Unsqueeze", {"x": Wrt((2, 3))}, consts={"axes": ints(0, 3)}),
    OpSpec("Transpose", {"x": Wrt((2, 3, 4))}, attrs={"perm": [2, 0, 1]}),
    OpSpec("Expand", {"x": Wrt((3, 1))}, consts={"shape": ints(2, 3, 4)}),
    OpSpec("Concat", {"a": Wrt((2, 3, 4)), "b": Wrt((2, 1, 4))}, attrs={"axis": 1}),
    OpSpec("Concat", {"a": Wrt((2, 3, 4)), "b": Wrt((2, 1, 4))}, attrs={"axis": 1},
           symbolic=True, label="symbolic"),
    OpSpec("Split", {"x": Wrt((2, 5, 3))}, consts={"split": ints(2, 3)}, attrs={"axis": 1},
           outputs=2),
    OpSpec("Split", {"x": Wrt((2, 6, 3))}, attrs={"axis": 1, "num_outputs": 3}, outputs=3,
           opset=18, label="num-outputs"),
    OpSpec("Slice", {"x": Wrt((4, 6, 5))},
           consts={"starts": ints(1, -4), "ends": ints(3, 1_000_000), "axes": ints(0, 2)}),
    OpSpec("Slice", {"x": Wrt((4, 6))}, consts={"starts": ints(0, 2), "ends": ints(-1, 5)},
           symbolic=True, label="all-axes-symbolic"),
    OpSpec("Slice", {"x": Wrt((3, 12))}, consts={"starts": ints(1), "ends": ints(1_000_000),
           "axes": ints(1), "steps": ints(4)}, label="step-4"),
    OpSpec("Slice", {"x": Wrt((4, 6, 5))}, consts={"starts": ints(-1, 4), "ends": ints(0, -100),
           "axes": ints(0, 1), "steps": ints(-2, -3)}, symbolic=True,
           label="negative-steps-symbolic"),
    OpSpec("Pad", {"x": Wrt((2, 3, 4, 4))}, consts={"pads": ints(0, 0, 1, 0, 0, 0, 2, 1)}),
    OpSpec("Pad", {"x": Wrt((2, 3, 4, 4))},
           consts={"pads": ints(1, 2, 0, 1), "value": np.float32(0), "axes": ints(2, 3)},
           opset=18, label="axes"),
    OpSpec("CastLike", {"x": X4}, consts={"like": np.zeros(1, np.float64)}, opset=15),
    OpSpec("Tile", {"x": Wrt((2, 3, 2))}, consts={"repeats": ints(2, 1, 3)}),
    OpSpec("Tile", {"x": Wrt((2, 3))}, consts={"repeats": ints(3, 2)}, symbolic=True,
           label="symbolic"),
    OpSpec("DepthToSpace", {"x": Wrt((2, 8, 2, 3))}, attrs={"blocksize": 2}, label="DCR"),
    OpSpec("DepthToSpace", {"x": Wrt((2, 8, 2, 3))}, attrs={"blocksize": 2, "mode": "CRD"},
           symbolic=True, label="CRD-symbolic"),
    OpSpec("SpaceToDepth", {"x": Wrt((2, 2, 4, 6))}, attrs={"blocksize": 2}),
    OpSpec("CumSum", {"x": Wrt((2, 3, 4))}, consts={"axis": np.array(1, np.int64)}),
    OpSpec("CumSum", {"x": Wrt((2, 3, 4))}, consts={"axis": np.array(-1, np.int32)},
           attrs={"exclusive": 1, "reverse": 1}, label="exclusive-reverse"),
    OpSpec("CumSum", {"x": Wrt((2, 5))}, consts={"axis": np.array(1, np.int64)},
           attrs={"exclusive": 1}, label="exclusive"),
    OpSpec("Trilu", {"x": Wrt((2, 4, 5))}, consts={"k": np.array(1, np.int64)}),
    OpSpec("Trilu", {"x": Wrt((4, 3))}, attrs={"upper": 0}, symbolic=True,
           label="lower-symbolic"),
]

INDEXING = [
    OpSpec("Gather", {"x": Wrt((3, 4, 5))}, consts={"i": ints(0, -1, 2, 0).reshape(2, 2)},
           attrs={"axis": 1}, label="repeated-negative"),
    OpSpec("Gather", {"x": Wrt((3, 4, 5))}, consts={"i": np.array(-2, np.int64)},
           attrs={"axis": -1}, label="scalar-last-axis"),
    OpSpec("Gather", {"x": Wrt((3, 4, 5))}, consts={"i": np.array(0, np.int64)},
           attrs={"axis": 1}, label="scalar"),
    OpSpec("Gather", {"x": Wrt((3, 1, 4, 5))},
           consts={"i": np.array(1, np.int64), "one": ints(1)}, label="scalar-unknown-rank",
           text="""<ir_version: 8, opset_import: ["" : 17]>
        g (float[3,1,4,5] x) => (float[4,5] y) {
            axes = Max(one, one)
            s = Squeeze(x, axes)
            y = Gather <axis = 0> (s, i)
        }"""),
    OpSpec("Gather", {"x": Wrt((4, 3))}, consts={"i": ints(3, -4, 1).reshape(3, 1, 1)},
           opset=18, label="rank3-indices"),
    OpSpec("Gather", {"x": Wrt((2, 3, 4))}, consts={"i": ints(1, 1, -1)}, attrs={"axis": 2},
           symbolic=True, label="symbolic"),
    OpSpec("GatherElements", {"x": Wrt((3, 4))},
           consts={"i": ints(0, -1, 3, 3, 1, 0).reshape(3, 2)}, attrs={"axis": 1}),
    OpSpec("GatherElements", {"x": Wrt((3, 4, 2))},
           consts={"i": ints(2, 0, -1, 2, 0, 1, 1, 1).reshape(2, 2, 2)}, symbolic=True,
           label="axis0-symbolic"),
    OpSpec("GatherND", {"x": Wrt((3, 4, 5))}, consts={"i": ints(0, 1, -1, 2, 0, 1).reshape(3, 2)}),
    OpSpec("GatherND", {"x": Wrt((3, 4))}, consts={"i": ints(2, -1, 0, 0).reshape(2, 1, 2)},
           symbolic=True, label="elements-symbolic"),
    OpSpec("ScatterND", {"data": Wrt((4, 3)), "updates": Wrt((2, 3))},
           consts={"i": ints(1, -1).reshape(2, 1)}, inputs=["data", "i", "updates"]),
    OpSpec("ScatterND", {"data": Wrt((4, 3)), "updates": Wrt((2,))},
           consts={"i": ints(1, 2, 3, 0).reshape(2, 2)}, attrs={"reduction": "add"},
           inputs=["data", "i", "updates"], opset=18, symbolic=True, label="add-symbolic"),
    OpSpec("ScatterElements", {"data": Wrt((3, 4)), "updates": Wrt((2, 2))},
           consts={"i": ints(0, -1, 2, 1).reshape(2, 2)}, attrs={"axis": 1},
           inputs=["data", "i", "updates"]),
    OpSpec("ScatterElements", {"data": Wrt((3, 4)), "updates": Wrt((2, 4))},
           consts={"i": ints(0, 1, 2, 0, 0, 1, 2, 0).reshape(2, 4)},
           attrs={"reduction": "add"}, inputs=["data", "i", "updates"], symbolic=True,
           label="add-symbolic"),
    OpSpec("TopK", {"x": Wrt((2, 5, 3), distinct=True)}, consts={"k": ints(3)},
           attrs={"axis": 1}, outputs=2),
    OpSpec("TopK", {"x": Wrt((2, 3, 5), distinct=True)}, consts={"k": ints(2)},
           attrs={"largest": 0}, outputs=2, symbolic=True, label="smallest-symbolic"),
    OpSpec("Compress", {"x": Wrt((3, 4))}, consts={"c": np.array([True, False, True])},
           attrs={"axis": 0}),
    OpSpec("Compress", {"x": Wrt((3, 4))}, consts={"c": np.array([1, 0, 0, 1, 1], bool)},
           symbolic=True, label="flattened-symbolic"),
]

BINARY_SHAPES = [
    ((2, 3, 4), (2, 3, 4)),
    ((2, 3, 4), (3, 1)),
    ((1, 3, 1), (2, 1, 4)),
    ((4,), (2, 3, 4)),
    ((2, 3, 4), ()),
]


def binary_specs(op: str, a_domain: dict, b_domain: dict) -> list[OpSpec]:
    specs = []
    for shape_a, shape_b in BINARY_SHAPES:
        for symbolic in (False, True):
            label = f"{shape_a}x{shape_b}" + ("-symbolic" if symbolic else "")
            specs.append(
                OpSpec(op, {"a": Wrt(shape_a, **a_domain), "b": Wrt(shape_b, **b_domain)},
                       symbolic=symbolic, label=label)
            )
    return specs


BINARY = [
    *binary_specs("Add", {}, {}),
    *binary_specs("Sub", {}, {}),
    *binary_specs("Mul", {}, {}),
    *binary_specs("Div", {}, {"low": 0.5, "high": 2.0}),
    *binary_specs("Pow", {"low": 0.5, "high": 2.0}, {"low": -1.5, "high": 1.5}),
    *binary_specs("Max", {"distinct": True}, {"low": -2.1, "high": 2.2, "distinct": True}),
    *binary_specs("Min", {"distinct": True}, {"low": -2.1, "high": 2.2, "distinct": True}),
    OpSpec("Sum", {"a": Wrt((2, 3, 4)), "b": Wrt((3, 1)), "c": Wrt((4,))}),
    OpSpec("Mean", {"a": Wrt((2, 3, 4)), "b": Wrt((3, 1))}),
    OpSpec("Where", {"a": Wrt((2, 3, 4)), "b": Wrt((3, 1))},
           consts={"cond": rng.random((1, 3, 4)) > 0.5}, inputs=["cond", "a", "b"]),
]

NORMS = [
    OpSpec("BatchNormalization", {"x": Wrt((2, 3, 4, 4))},
           consts={"scale": weights(3), "bias": weights(3), "mean": weights(3),
                   "var": np.abs(weights(3)) + 0.5}),
    OpSpec("InstanceNormalization", {"x": Wrt((2, 3, 4, 4))},
           consts={"scale": weights(3), "bias": weights(3)}),
    OpSpec("LayerNormalization", {"x": Wrt((2, 3, 4))},
           consts={"scale": weights(4), "bias": weights(4)}, attrs={"axis": -1}),
    OpSpec("LayerNormalization", {"x": Wrt((2, 3, 4))},
           consts={"scale": weights(3, 4), "bias": weights(3, 4)}, attrs={"axis": 1},
           label="two-axes"),
    OpSpec("GroupNormalization", {"x": Wrt((2, 6, 3, 2))},
           consts={"scale": weights(3), "bias": weights(3)}, attrs={"num_groups": 3},
           opset=18, label="opset18-per-group"),
    OpSpec("GroupNormalization", {"x": Wrt((2, 4, 3, 3))},
           consts={"scale": weights(4), "bias": weights(4)},
           attrs={"num_groups": 2, "epsilon": 0.1}, opset=21, symbolic=True,
           label="opset21-per-channel-symbolic"),
    OpSpec("MeanVarianceNormalization", {"x": Wrt((2, 3, 3, 2))}),
    OpSpec("MeanVarianceNormalization", {"x": Wrt((2, 3, 4))}, attrs={"axes": [1, 2]},
           symbolic=True, label="axes-symbolic"),
    OpSpec("LpNormalization", {"x": Wrt((2, 3, 4))}, attrs={"axis": 1}),
    OpSpec("LpNormalization", {"x": Wrt((2, 3, 4), avoid=(0.0,))}, attrs={"p": 1},
           symbolic=True, label="p1-symbolic"),
]

DISTINCT = Wrt((2, 2, 7, 7), distinct=True)
POOLS = [
    OpSpec("GlobalAveragePool", {"x": X4}),
    OpSpec("GlobalAveragePool", {"x": X4}, symbolic=True, label="symbolic"),
    OpSpec("GlobalMaxPool", {"x": DISTINCT}),
    OpSpec("GlobalMaxPool", {"x": Wrt((2, 3, 4), distinct=True)}, symbolic=True,
           label="1d-symbolic"),
    OpSpec("ReduceMean", {"x": X4}, attrs={"axes": [2, 3], "keepdims": 0}, label="opset17"),
    OpSpec("ReduceMean", {"x": X4}, consts={"axes": ints(-1, -2)}, opset=18, symbolic=True,
           label="opset18-symbolic"),
    OpSpec("ReduceSum", {"x": X4}, consts={"axes": ints(1)}, attrs={"keepdims": 1}),
    OpSpec("ReduceSum", {"x": X4}, label="all-axes"),
    OpSpec("ReduceSum", {"x": X4}, consts={"like": np.zeros((2, 1, 5, 1), np.float32)},
           label="run-time-axes", text="""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,1,5,1] y) {
            one = Constant <value = int64[1] {1}> ()
            flat = Constant <value = int64[1] {-1}> ()
            kept = Shape(like)
            ones = Equal(kept, one)
            sizes = Shape(x)
            same = Equal(sizes, one)
            differ = Not(same)
            both = And(ones, differ)
            found = NonZero(both)
            axes = Reshape(found, flat)
            y = ReduceSum <keepdims = 1, noop_with_empty_axes = 1> (x, axes)
        }"""),
    OpSpec("ReduceMean", {"x": X4}, consts={"axes": ints(1, 3)}, label="run-time-axes",
           text="""<ir_version: 8, opset_import: ["" : 18]>
        g (float[2,3,5,5] x) => (float[2,1,5,1] y) {
            a = Identity(axes)
            y = ReduceMean <keepdims = 1> (x, a)
        }"""),
    OpSpec("ReduceMax", {"x": DISTINCT}, attrs={"axes": [1], "keepdims": 0}),
    OpSpec("ReduceMin", {"x": DISTINCT}, consts={"axes": ints(3)}, opset=18),
    OpSpec("ReduceSumSquare", {"x": X4}, attrs={"axes": [1, -1], "keepdims": 0}),
    OpSpec("ReduceSumSquare", {"x": X4}, opset=18, attrs={"noop_with_empty_axes": 1},
           label="noop"),
    OpSpec("ReduceL1", {"x": Wrt((2, 3, 4), avoid=(0.0,))}, consts={"axes": ints(2)}, opset=18),
    OpSpec("ReduceL2", {"x": X4}, attrs={"axes": [2, 3]}),
    OpSpec("ReduceL2", {"x": X4}, consts={"axes": ints(0, 2)}, attrs={"keepdims": 0},
           opset=18, symbolic=True, label="opset18-symbolic"),
    OpSpec("ReduceLogSum", {"x": POSITIVE}, attrs={"axes": [1]}),
    OpSpec("ReduceLogSumExp", {"x": X4}, attrs={"axes": [1], "keepdims": 0}),
    OpSpec("ReduceLogSumExp", {"x": X4}, opset=18, symbolic=True, label="all-axes-symbolic"),
    OpSpec("ReduceProd", {"x": Wrt((2, 3, 4), low=0.5, high=1.5)}, attrs={"axes": [2]}),
    OpSpec("ReduceProd", {"x": Wrt((2, 3, 4), low=-1.5, high=1.5, avoid=(0.0,))},
           consts={"axes": ints(0, 1)}, attrs={"keepdims": 0}, opset=18, label="opset18"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                              "pads": [1, 1, 1, 1]}),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [2, 2], "strides": [2, 2],
                                              "ceil_mode": 1}, label="ceil"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                              "pads": [1, 1, 1, 1]}, symbolic=True,
           label="symbolic"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [3, 2], "strides": [2, 1],
                                              "auto_pad": "SAME_UPPER"}, label="same-upper"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [2, 2], "strides": [3, 3],
                                              "auto_pad": "SAME_LOWER"},
           symbolic=True, label="same-lower-symbolic"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [3, 2], "strides": [2, 2],
                                              "dilations": [2, 3], "pads": [2, 1, 1, 1]},
           label="dilated"),
    OpSpec("MaxPool", {"x": DISTINCT}, attrs={"kernel_shape": [2, 3], "strides": [2, 3]},
           label="disjoint-windows"),
    OpSpec("MaxPool", {"x": Wrt((2, 3, 9), distinct=True)},
           attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 0], "ceil_mode": 1},
           label="1d-ceil"),
    OpSpec("MaxPool", {"x": Wrt((1, 2, 4, 5, 3), distinct=True)},
           attrs={"kernel_shape": [2, 3, 2], "pads": [1, 0, 1, 0, 1, 0]}, label="3d"),
    OpSpec("AveragePool", {"x": X4}, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}),
    OpSpec("AveragePool", {"x": X4}, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                            "count_include_pad": 0}, label="exclude-pad"),
    OpSpec("AveragePool", {"x": X4}, attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                            "pads": [1, 1, 1, 1], "count_include_pad": 1},
           symbolic=True, label="include-pad-symbolic"),
]

CONV_X = Wrt((2, 4, 7, 7))
LINEAR = [
    OpSpec("Conv", {"x": CONV_X}, consts={"w": weights(6, 4, 3, 3), "bias": weights(6)},
           attrs={"pads": [1, 1, 1, 1]}),
    OpSpec("Conv", {"x": CONV_X}, consts={"w": weights(6, 4, 3, 3)},
           attrs={"strides": [2, 2], "pads": [0, 1, 1, 0]}, label="stride2-asymmetric"),
    OpSpec("Conv", {"x": Wrt((2, 4, 8, 8))}, consts={"w": weights(6, 4, 3, 3)},
           attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]}, symbolic=True,
           label="stride2-symbolic"),
    OpSpec("Conv", {"x": CONV_X}, consts={"w": weights(4, 1, 3, 3)},
           attrs={"group": 4, "dilations": [2, 2], "pads": [2, 2, 2, 2]}, label="depthwise"),
    OpSpec("Conv", {"x": CONV_X}, consts={"w": weights(6, 2, 1, 1)},
           attrs={"group": 2}, label="grouped-1x1"),
    OpSpec("Conv", {"x": CONV_X}, consts={"w": weights(6, 4, 3, 3)},
           attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"}, label="same-upper"),
    OpSpec("Gemm", {"a": Wrt((3, 4))}, consts={"b": weights(5, 4), "c": weights(5)},
           attrs={"transB": 1}),
    OpSpec("Gemm", {"a": Wrt((4, 3)), "b": Wrt((4, 5)), "c": Wrt((1, 5))},
           attrs={"transA": 1, "alpha": 0.5, "beta": 2.0}, label="transA-all-inputs"),
    OpSpec("Gemm", {"a": Wrt((3, 4)), "b": Wrt((5, 4))}, attrs={"transB": 1},
           label="transB-both"),
    OpSpec("Gemm", {"a": Wrt((4, 3)), "b": Wrt((5, 4))}, attrs={"transA": 1, "transB": 1},
           label="transA-transB"),
    OpSpec("ConvTranspose", {"x": Wrt((2, 4, 3, 3))}, consts={"w": weights(4, 3, 3, 3),
           "bias": weights(3)}, attrs={"strides": [2, 2], "pads": [1, 0, 1, 1],
           "output_padding": [1, 0]}),
    OpSpec("ConvTranspose", {"x": Wrt((2, 4, 3, 3))}, consts={"w": weights(4, 1, 3, 2)},
           attrs={"group": 2, "dilations": [2, 1], "strides": [1, 2], "pads": [1, 1, 0, 1]},
           symbolic=True, label="grouped-dilated-symbolic"),
    OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 4))}, consts={"w": weights(2, 3, 3, 3)},
           attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"}, label="same-upper"),
    OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 4))}, consts={"w": weights(2, 3, 3, 3)},
           attrs={"strides": [2, 2], "auto_pad": "SAME_LOWER", "output_padding": [1, 1]},
           label="same-lower-output-padding"),
    OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 4))}, consts={"w": weights(2, 3, 3, 3)},
           attrs={"strides": [2, 2], "output_shape": [6, 8]}, label="output-shape"),
    OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 4))}, consts={"w": weights(2, 3, 3, 3)},
           attrs={"strides": [2, 2], "auto_pad": "VALID"}, label="valid"),
    OpSpec("ConvTranspose", {"x": Wrt((2, 4, 5))}, consts={"w": weights(4, 2, 3)},
           attrs={"strides": [3], "pads": [2, 1]}, label="1d"),
    OpSpec("MatMul", {"a": Wrt((3, 4)), "b": Wrt((4, 5))}),
    OpSpec("MatMul", {"a": Wrt((2, 3, 4)), "b": Wrt((4, 5))}, label="batched-broadcast"),
    OpSpec("Einsum", {"a": Wrt((2, 3)), "b": Wrt((3, 4))}, attrs={"equation": "ij,jk->ik"}),
    OpSpec("Einsum", {"a": Wrt((2, 3, 4)), "b": Wrt((4, 5))}, attrs={"equation": "bij,jk"},
           symbolic=True, label="implicit-symbolic"),
    OpSpec("Einsum", {"a": Wrt((2, 3)), "b": Wrt((3, 4))}, attrs={"equation": "ij,jk->i"},
           label="summed-letters"),
    OpSpec("Einsum", {"a": Wrt((2, 3, 4))}, attrs={"equation": "abc->"}, label="total"),
    OpSpec("Einsum", {"a": Wrt((2, 3, 4))}, attrs={"equation": "abc->cb"}, label="one-operand"),
    OpSpec("Einsum", {"a": Wrt((2, 1, 3, 4)), "b": Wrt((1, 5, 4, 2))},
           attrs={"equation": "...ij,...jk->...ik"}, label="ellipsis-broadcast"),
    OpSpec("Einsum", {"a": Wrt((2, 3, 4)), "b": Wrt((4,))},
           attrs={"equation": "...j,j"}, symbolic=True, label="implicit-ellipsis-symbolic"),
    OpSpec("Einsum", {"a": Wrt((2, 3)), "b": Wrt((2, 3)), "c": Wrt((3, 4))},
           attrs={"equation": "nc,nc,cK->nK"}, label="three-operands-uppercase"),
]

INTEGERS = Wrt((2, 3, 5, 5), avoid=(-2.0, -1.0, 0.0, 1.0, 2.0))
HALVES = Wrt((2, 3, 5, 5), avoid=(-1.5, -0.5, 0.5, 1.5))
COMPOSED = [
    OpSpec("Floor", {"x": INTEGERS}, label="beside-identity", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,3,5,5] y) { f = Floor(x)  y = Add(f, x) }"""),
    OpSpec("Ceil", {"x": INTEGERS}, label="beside-identity", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,3,5,5] y) { f = Ceil(x)  y = Mul(f, x) }"""),
    OpSpec("Round", {"x": HALVES}, label="beside-identity", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,3,5,5] y) { f = Round(x)  y = Sub(x, f) }"""),
    OpSpec("Sign", {"x": INTEGERS}, label="beside-identity", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,3,5,5] y) { f = Sign(x)  y = Mul(f, x) }"""),
    OpSpec("Hardmax", {"x": Wrt((2, 3, 4), distinct=True)}, label="beside-identity", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) { f = Hardmax <axis = 1> (x)  y = Mul(f, x) }"""),
    OpSpec("Reshape", {"x": X4}, label="shape-from-runtime", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,5,5] x) => (float[N,75] y) {
            s = Shape <end = 1> (x)
            m = Constant <value = int64[1] {-1}> ()
            t = Concat <axis = 0> (s, m)
            y = Reshape(x, t)
        }"""),
    OpSpec("Add", {"x": Wrt((2, 3, 5, 5), avoid=(0.0,))}, label="fan-out", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,5,5] x) => (float[2,3,5,5] y) { a = Relu(x)  b = Mul(a, x)  y = Add(b, a) }"""),
]

EMPTY = np.zeros(0, dtype=np.float32)
RESIZES = [
    OpSpec("Resize", {"x": Wrt((2, 3, 4, 5))}, consts={"roi": EMPTY,
           "scales": np.array([1, 1, 2, 2], np.float32)}, attrs={"mode": "linear"},
           inputs=["x", "roi", "scales"], label="linear-x2-half-pixel"),
    OpSpec("Resize", {"x": Wrt((2, 3, 4, 5))}, consts={"roi": EMPTY, "scales": EMPTY,
           "sizes": ints(2, 3, 7, 3)}, attrs={"mode": "linear",
           "coordinate_transformation_mode": "align_corners"},
           inputs=["x", "roi", "scales", "sizes"], label="linear-sizes-align-corners"),
    OpSpec("Resize", {"x": Wrt((1, 2, 6, 6))}, consts={"roi": EMPTY, "scales": EMPTY,
           "sizes": ints(1, 2, 4, 9)}, attrs={"mode": "linear",
           "coordinate_transformation_mode": "pytorch_half_pixel"},
           inputs=["x", "roi", "scales", "sizes"], symbolic=True, label="linear-down-up"),
    OpSpec("Resize", {"x": Wrt((2, 3, 4, 5))}, consts={"roi": EMPTY,
           "scales": np.array([1, 1, 2, 3], np.float32)}, attrs={"mode": "nearest",
           "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
           inputs=["x", "roi", "scales"], label="nearest-asymmetric"),
    OpSpec("Resize", {"x": Wrt((2, 3, 4, 5))}, consts={"roi": EMPTY, "scales": EMPTY,
           "sizes": ints(2, 3, 6, 7)}, attrs={"mode": "nearest"},
           inputs=["x", "roi", "scales", "sizes"], label="nearest-half-pixel"),
]

# Rois [x1, y1, x2, y2] of two images: inside, partly outside (left and below), thin, tiny,
# entirely outside; RoiAlign is linear in X, so its finite differences are exact.
ROIS = np.array([[0.5, 1.0, 4.5, 5.5], [-2.0, 3.0, 3.0, 9.0], [2.2, 0.3, 6.9, 1.1],
                 [3.0, 3.0, 3.2, 3.1], [8.0, 7.5, 11.0, 12.0]], np.float32)
ROI_IMAGES = ints(0, 1, 1, 0, 1)


def roi_align(label: str, rois: np.ndarray = ROIS, images: np.ndarray = ROI_IMAGES,
              **attrs) -> OpSpec:
    distinct = attrs.get("mode") == "max"  # max mode: no ties between taps
    return OpSpec("RoiAlign", {"x": Wrt((2, 3, 6, 7), distinct=distinct)},
                  consts={"rois": rois, "batch_indices": images}, attrs=attrs,
                  inputs=["x", "rois", "batch_indices"], eps=1e-4 if distinct else 1e-3,
                  label=label)


# MaxRoiPool's rois carry their image first; corners at .5 check rounding half away from zero.
POOLED_ROIS = np.concatenate([ROI_IMAGES[:, None].astype(np.float32), ROIS], axis=1)
POOLED_ROIS = np.concatenate([POOLED_ROIS, [[0.0, 2.5, 1.5, 0.5, 4.5]]]).astype(np.float32)


def max_roi_pool(label: str, x: Wrt, rois: np.ndarray = POOLED_ROIS, **attrs) -> OpSpec:
    return OpSpec("MaxRoiPool", {"x": x}, consts={"rois": rois}, attrs=attrs,
                  inputs=["x", "rois"], eps=1e-4, label=label)


def roi_align_in_double(mode: str) -> OpSpec:
    """RoiAlign on float64 features and rois (the rule builds its weights in float32)."""
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6,7] x) => (float[5,3,2,3] y) {{
            features = Cast <to = 11> (x)
            boxes = Cast <to = 11> (rois)
            pooled = RoiAlign <output_height = 2, output_width = 3, mode = "{mode}"> (
                features, boxes, batch_indices)
            y = Cast <to = 1> (pooled)
        }}"""
    return OpSpec("RoiAlign", {"x": Wrt((2, 3, 6, 7), distinct=True)},
                  consts={"rois": ROIS, "batch_indices": ROI_IMAGES}, text=text, eps=1e-4,
                  label=f"{mode}-double")


ROI_POOLS = [
    roi_align("avg-ratio2", output_height=2, output_width=3, sampling_ratio=2),
    roi_align("avg-adaptive-scaled", output_height=2, output_width=3, spatial_scale=0.9),
    roi_align("avg-output-half-pixel", output_height=3, output_width=2, sampling_ratio=1,
              coordinate_transformation_mode="output_half_pixel"),
    roi_align("avg-adaptive-output-half-pixel", output_height=2, output_width=2,
              spatial_scale=1.3, coordinate_transformation_mode="output_half_pixel"),
    roi_align("max-ratio2", output_height=2, output_width=3, sampling_ratio=2, mode="max"),
    roi_align("max-adaptive-scaled", output_height=2, output_width=2, spatial_scale=0.8,
              mode="max"),
    max_roi_pool("2x3", Wrt((2, 3, 6, 7), distinct=True), pooled_shape=[2, 3]),
    max_roi_pool("3x2-scaled", Wrt((2, 3, 6, 7), distinct=True), pooled_shape=[3, 2],
                 spatial_scale=0.7),
    roi_align_in_double("avg"),
    roi_align_in_double("max"),
    # no rois at all (a level of a multi-scale pooler that no proposal maps to)
    roi_align("avg-no-rois", ROIS[:0], ROI_IMAGES[:0], output_height=2, output_width=3,
              sampling_ratio=2),
    roi_align("adaptive-no-rois", ROIS[:0], ROI_IMAGES[:0], output_height=2, output_width=3,
              mode="max"),
    max_roi_pool("2x3-no-rois", Wrt((2, 3, 6, 7)), POOLED_ROIS[:0], pooled_shape=[2, 3]),
]


def quantized_weights(*shape: int, dtype=np.int8) -> np.ndarray:
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


# Straight-through quantization: checked against finite differences of each graph's continuous
# relaxation (`OpSpec.relaxed`). Kinks (saturation) are kept farther from x than half a step.
PER_CHANNEL_SCALES = np.array([0.02, 0.05, 0.1], np.float32)
CONV_WEIGHTS = quantized_weights(4, 3, 3, 3)
MATMUL_WEIGHTS = quantized_weights(6, 5, dtype=np.uint8)
MATMUL_ZERO_POINTS = np.array([128, 120, 131, 127, 100], np.uint8)
QUANTIZED = [
    OpSpec("QuantizeLinear", {"x": Wrt((2, 3, 4), low=-3, high=3, avoid=(-2.0,))},
           label="dequantized-uint8", consts={"s": np.float32(0.05), "zp": np.uint8(40)},
           text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) { q = QuantizeLinear(x, s, zp)
                                                  y = DequantizeLinear(q, s, zp) }""",
           relaxed="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) {
            lo = Constant <value = float {0.0}> ()
            hi = Constant <value = float {255.0}> ()
            f = Cast <to = 1> (zp)
            r = Div(x, s)
            a = Add(r, f)
            q = Clip(a, lo, hi)
            c = Sub(q, f)
            y = Mul(c, s)
        }"""),
    OpSpec("DequantizeLinear", {"x": Wrt((2, 3, 4), low=-2, high=2, avoid=(0.0,))},
           label="per-channel-int8-other-scales",
           consts={"s": PER_CHANNEL_SCALES, "zp": np.array([-128, 0, 10], np.int8),
                   "s2": PER_CHANNEL_SCALES[::-1] * 3, "zp2": np.array([1, -2, 3], np.int8),
                   "s_": PER_CHANNEL_SCALES.reshape(3, 1),
                   "s2_": PER_CHANNEL_SCALES[::-1].reshape(3, 1) * 3},
           text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) { q = QuantizeLinear <axis = 1> (x, s, zp)
                                                  y = DequantizeLinear <axis = 1> (q, s2, zp2) }""",
           relaxed="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) {
            lo = Constant <value = float {-128.0}> ()
            hi = Constant <value = float {127.0}> ()
            axes = Constant <value = int64[1] {1}> ()
            z = Cast <to = 1> (zp)
            f = Unsqueeze(z, axes)
            z2 = Cast <to = 1> (zp2)
            f2 = Unsqueeze(z2, axes)
            r = Div(x, s_)
            a = Add(r, f)
            q = Clip(a, lo, hi)
            c = Sub(q, f2)
            y = Mul(c, s2_)
        }"""),
    OpSpec("DynamicQuantizeLinear", {"x": Wrt((2, 3, 4))}, label="dequantized", text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) { q, s, zp = DynamicQuantizeLinear(x)
                                                  y = DequantizeLinear(q, s, zp) }""",
           relaxed="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,4] x) => (float[2,3,4] y) { y = Identity(x) }"""),
    OpSpec("ConvInteger", {"x": Wrt((2, 3, 6, 6))}, label="dynamic-strided",
           consts={"w": CONV_WEIGHTS, "wzp": np.int8(3), "ws": np.float32(0.01),
                   "w_": (CONV_WEIGHTS.astype(np.float32) - 3) * np.float32(0.01)},
           text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6,6] x) => (float[2,4,3,3] y) {
            q, s, zp = DynamicQuantizeLinear(x)
            c = ConvInteger <pads = [1, 1, 1, 1], strides = [2, 2]> (q, w, zp, wzp)
            f = Cast <to = 1> (c)
            t = Mul(s, ws)
            y = Mul(f, t)
        }""",
           relaxed="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6,6] x) => (float[2,4,3,3] y) {
            y = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (x, w_)
        }"""),
    OpSpec("MatMulInteger", {"x": Wrt((2, 3, 6))}, label="dynamic-per-column",
           consts={"w": MATMUL_WEIGHTS, "wzp": MATMUL_ZERO_POINTS, "ws": np.float32(0.01),
                   "shape": ints(6, 6), "back": ints(2, 3, 5),
                   "w_": (MATMUL_WEIGHTS.astype(np.float32) - MATMUL_ZERO_POINTS)
                   * np.float32(0.01)},
           text="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6] x) => (float[2,3,5] y) {
            q, s, zp = DynamicQuantizeLinear(x)
            flat = Reshape(q, shape)
            c = MatMulInteger(flat, w, zp, wzp)
            r = Reshape(c, back)
            f = Cast <to = 1> (r)
            t = Mul(s, ws)
            y = Mul(f, t)
        }""",
           relaxed="""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,6] x) => (float[2,3,5] y) { y = MatMul(x, w_) }"""),
]

SPECS = (UNARY + SHAPES + INDEXING + BINARY + NORMS + POOLS + LINEAR + RESIZES + ROI_POOLS
         + COMPOSED + QUANTIZED)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_rule_matches_finite_differences(spec: OpSpec) -> None:
    check_op(spec)


# Ties: finite differences cannot check them; torch autograd is the reference.
# `reference(torch, *inputs)` computes the same output as the spec's node.
TIED = (2, 3, 5, 5)
TIES = [
    (OpSpec("ReduceMax", {"x": Wrt(TIED)}, attrs={"axes": [2, 3], "keepdims": 0}),
     lambda torch, x: torch.amax(x, dim=(2, 3))),
    (OpSpec("ReduceMax", {"x": Wrt(TIED)}, attrs={"keepdims": 0}, label="all-axes"),
     lambda torch, x: torch.amax(x)),
    (OpSpec("ReduceMin", {"x": Wrt(TIED)}, consts={"axes": ints(1)}, opset=18),
     lambda torch, x: torch.amin(x, dim=1, keepdim=True)),
    (OpSpec("Max", {"a": Wrt(TIED), "b": Wrt((5,))}),
     lambda torch, a, b: torch.maximum(a, b)),
    (OpSpec("Min", {"a": Wrt(TIED), "b": Wrt(TIED)}),
     lambda torch, a, b: torch.minimum(a, b)),
    (OpSpec("Max", {"a": Wrt(TIED), "b": Wrt((5, 1)), "c": Wrt(TIED)}, label="three-inputs"),
     lambda torch, a, b, c: torch.stack(torch.broadcast_tensors(a, b, c)).amax(0)),
    (OpSpec("GlobalMaxPool", {"x": Wrt(TIED)}),
     lambda torch, x: torch.nn.functional.adaptive_max_pool2d(x, 1)),
    (OpSpec("MaxPool", {"x": Wrt(TIED)}, attrs={"kernel_shape": [3, 3], "strides": [2, 2],
                                                "pads": [1, 1, 1, 1]}),
     lambda torch, x: torch.nn.functional.max_pool2d(x, 3, 2, 1)),
    (OpSpec("MaxPool", {"x": Wrt(TIED)}, attrs={"kernel_shape": [2, 2]}, label="overlapping"),
     lambda torch, x: torch.nn.functional.max_pool2d(x, 2, 1)),
    (OpSpec("MaxPool", {"x": Wrt(TIED)}, attrs={"kernel_shape": [2, 2], "strides": [2, 2],
                                                "dilations": [2, 2], "ceil_mode": 1},
            label="dilated-ceil"),
     lambda torch, x: torch.nn.functional.max_pool2d(x, 2, 2, dilation=2, ceil_mode=True)),
]


def tied_values(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "all-equal":
        return np.full(shape, 0.5, np.float32)
    return rng.integers(0, 3, shape).astype(np.float32)  # three values: ties everywhere


@pytest.mark.parametrize("kind", ["all-equal", "repeated"])
@pytest.mark.parametrize("spec, reference", TIES, ids=[spec.id for spec, _ in TIES])
def test_ties_are_broken_as_torch_autograd(spec: OpSpec, reference, kind: str) -> None:
    """ReduceMax/Min and Max/Min split a tied gradient evenly (torch.amax, torch.maximum);
    MaxPool and GlobalMaxPool route it to one element, the one torch picks. A ReduceMax rule
    that gave every tied element the full gradient was once seen 3,234x torch's gradient."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    inputs = {name: tied_values(w.shape, kind, rng) for name, w in spec.wrt.items()}
    tensors = [torch.tensor(v, requires_grad=True) for v in inputs.values()]
    output = reference(torch, *tensors)
    cotangent = rng.standard_normal(tuple(output.shape)).astype(np.float32)
    output.backward(torch.tensor(cotangent))
    ours = gradients(spec, inputs, [cotangent])
    for name, tensor in zip(inputs, tensors):
        np.testing.assert_allclose(ours[name], tensor.grad.numpy(), rtol=1e-6, atol=1e-6,
                                   err_msg=f"d/d{name} of {spec.id} with {kind} values")


@pytest.mark.parametrize("aligned", [False, True], ids=["output-half-pixel", "half-pixel"])
@pytest.mark.parametrize("sampling_ratio, spatial_scale", [(0, 1.0), (1, 0.7), (3, 0.5)])
def test_roi_align_matches_torchvision_autograd(
    aligned: bool, sampling_ratio: int, spatial_scale: float
) -> None:
    """torchvision.ops.roi_align (what Faster R-CNN's MultiScaleRoIAlign exports as RoiAlign,
    aligned=False as output_half_pixel) on the same rois: the gradient w.r.t. the features."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    features = torch.tensor(x, requires_grad=True)
    boxes = torch.tensor(np.concatenate([ROI_IMAGES[:, None].astype(np.float32), ROIS], 1))
    pooled = torchvision.ops.roi_align(features, boxes, (3, 2), spatial_scale, sampling_ratio,
                                       aligned)
    cotangent = rng.standard_normal(tuple(pooled.shape)).astype(np.float32)
    pooled.backward(torch.tensor(cotangent))
    transform = "half_pixel" if aligned else "output_half_pixel"
    spec = roi_align("torch", output_height=3, output_width=2, sampling_ratio=sampling_ratio,
                     spatial_scale=spatial_scale, coordinate_transformation_mode=transform)
    ours = gradients(spec, {"x": x}, [cotangent])["x"]
    assert np.abs(features.grad.numpy()).max() > 0.1
    np.testing.assert_allclose(ours, features.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["distinct", "repeated"])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_max_roi_pool_matches_torchvision_autograd(kind: str, spatial_scale: float) -> None:
    """torchvision.ops.roi_pool on the same rois: bins, rounding and the element each bin's
    gradient goes to (the first maximum; three values only: ties everywhere)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    rng = np.random.default_rng(12)
    if kind == "distinct":
        x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    else:
        x = tied_values((2, 3, 6, 7), kind, rng)
    features = torch.tensor(x, requires_grad=True)
    pooled = torchvision.ops.roi_pool(features, torch.tensor(POOLED_ROIS), (3, 2), spatial_scale)
    cotangent = rng.standard_normal(tuple(pooled.shape)).astype(np.float32)
    pooled.backward(torch.tensor(cotangent))
    spec = max_roi_pool("torch", Wrt(x.shape), pooled_shape=[3, 2], spatial_scale=spatial_scale)
    ours = gradients(spec, {"x": x}, [cotangent])["x"]
    np.testing.assert_allclose(ours, features.grad.numpy(), rtol=1e-6, atol=1e-6)


PROPOSALS_FROM_FEATURES = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2,2,6,7] x, float[5,4] base, int64[5] images) => (float[5,2,2,3] y, float[5,4] z) {
        f = Relu(x)
        m = ReduceMean <keepdims = 0> (x)
        rois = Add(base, m)
        y = RoiAlign <output_height = 2, output_width = 3, sampling_ratio = 2> (f, rois, images)
        two = Constant <value = float {2.0}> ()
        z = Mul(rois, two)
    }"""


def test_region_proposals_are_constants_as_torch_detaches_them() -> None:
    """Rois computed from the features (a detector's proposals) and read again by an output
    (its decoded boxes) get no gradient, as torch's detached proposals: d <v, y> + <w, z> / dx
    flows through the pooled features only. Explaining z alone is refused, naming the cause."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    spec = OpSpec("RoiAlign", {"x": Wrt((2, 2, 6, 7), avoid=(0.0,))},
                  consts={"base": ROIS, "images": ROI_IMAGES}, outputs=2,
                  text=PROPOSALS_FROM_FEATURES, label="proposals")
    rng = np.random.default_rng(13)
    x = rng.uniform(-2, 2, (2, 2, 6, 7)).astype(np.float32)
    v = rng.standard_normal((5, 2, 2, 3)).astype(np.float32)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    ours = gradients(spec, {"x": x}, [v, w])["x"]
    features = torch.tensor(x, requires_grad=True)
    rois = (torch.tensor(ROIS) + features.mean()).detach()
    boxes = torch.cat([torch.tensor(ROI_IMAGES, dtype=torch.float32)[:, None], rois], 1)
    pooled = torchvision.ops.roi_align(features.relu(), boxes, (2, 3), 1.0, 2, aligned=True)
    ((pooled * torch.tensor(v)).sum() + (rois * 2 * torch.tensor(w)).sum()).backward()
    np.testing.assert_allclose(ours, features.grad.numpy(), rtol=1e-5, atol=1e-6)
    model = build_model(spec)
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, None))
    with pytest.raises(AugmentError, match="does not depend"):
        build_backward(GraphBuilder(model), {"z": "seed"}, ["x"])
    model = build_model(spec)
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, None))
    with pytest.raises(AugmentError, match="produce the rois of region pooling"):
        build_backward(GraphBuilder(model), {"y": "seed"}, ["m"])


def test_reduce_prod_at_zeros_matches_torch() -> None:
    """Finite differences cannot sit on a zero; torch.prod's gradient there is the product of
    the others (one zero in the row) or 0 (two zeros)."""
    torch = pytest.importorskip("torch")
    spec = OpSpec("ReduceProd", {"x": Wrt((3, 4))}, attrs={"axes": [1], "keepdims": 0})
    x = np.array([[0.0, 2.0, 3.0, -1.5], [0.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.5, 4.0]], np.float32)
    cotangent = np.array([0.7, -1.1, 0.3], np.float32)
    tensor = torch.tensor(x, requires_grad=True)
    tensor.prod(dim=1).backward(torch.tensor(cotangent))
    ours = gradients(spec, {"x": x}, [cotangent])["x"]
    np.testing.assert_allclose(ours, tensor.grad.numpy(), rtol=1e-6)


def test_every_rule_has_a_spec_line() -> None:
    assert set(RULES) <= {spec.op for spec in SPECS}, set(RULES) - {s.op for s in SPECS}


def test_spec_ids_are_unique() -> None:
    """docs/OPERATORS.md names each check by its id, which must then name one test."""
    ids = [spec.id for spec in SPECS]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


def test_operators_doc_is_current() -> None:
    """docs/OPERATORS.md is what scripts/operators.py writes from RULES and SPECS now."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "operators.py"
    module_spec = importlib.util.spec_from_file_location("operators_script", path)
    operators = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(operators)
    current = operators.TARGET.read_text(encoding="utf-8") if operators.TARGET.exists() else ""
    assert current == operators.render(SPECS), (
        f"docs/OPERATORS.md is stale: regenerate it with `{operators.COMMAND}`"
    )


def test_binary_specs_cover_every_broadcasting_rule() -> None:
    broadcasting = {op for op, r in RULES.items() if r.broadcasting}
    checked = {s.op for s in BINARY if any(w.shape != next(iter(s.wrt.values())).shape
                                           for w in s.wrt.values())}
    assert broadcasting - {"Expand", "PRelu"} <= checked


def _model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


def test_missing_rule_names_op_node_and_opset() -> None:
    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3,3] x) => (float[2] y) { d = Det(x)  y = Relu(d) }""")
    model.graph.node[0].name = "the_det"
    b = GraphBuilder(model)
    with pytest.raises(MissingRuleError) as error:
        build_backward(b, {"y": "seed"}, ["x"])
    message = str(error.value)
    assert "'Det'" in message and "'the_det'" in message and "opset 17" in message


def test_op_without_rule_off_the_gradient_path_is_fine() -> None:
    # Det and Shape have no rule; only their integer or side outputs meet the path.
    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[3,3] x) => (float[3,3] y, float z) {
            s = Shape(x)
            r = Reshape(x, s)
            y = Relu(r)
            z = Det(x)
        }""")
    b = GraphBuilder(model)
    grads = build_backward(b, {"y": "seed"}, ["x"])
    assert set(grads) == {"x"}


def test_score_independent_of_target_is_an_error() -> None:
    model = _model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x, float[2,3] w) => (float[2,3] y) { f = Floor(x)  y = Add(f, w) }""")
    with pytest.raises(AugmentError, match="does not depend"):
        build_backward(GraphBuilder(model), {"y": "seed"}, ["x"])


REFUSED = [
    (OpSpec("Pad", {"x": Wrt((2, 3))}, consts={"pads": ints(1, 1, 1, 1)},
            attrs={"mode": "reflect"}), "mode 'reflect'"),
    (OpSpec("GatherElements", {"x": Wrt((3, 4))}, consts={"i": ints(0, 1).reshape(1, 2)},
            opset=15, label="opset15"), "before opset 16"),
    (OpSpec("MaxPool", {"x": Wrt((1, 1, 7, 7))}, attrs={"kernel_shape": [2, 2],
            "strides": [3, 3], "dilations": [2, 2], "auto_pad": "SAME_LOWER"},
            label="same-dilated"), "with dilations"),
    (OpSpec("GatherND", {"x": Wrt((2, 3, 4))}, consts={"i": ints(0, 1).reshape(2, 1)},
            attrs={"batch_dims": 1}), "only batch_dims=0"),
    (OpSpec("ScatterND", {"data": Wrt((4, 3)), "updates": Wrt((1, 3))},
            consts={"i": ints(1).reshape(1, 1)}, attrs={"reduction": "mul"},
            inputs=["data", "i", "updates"], opset=18), "reduction 'mul'"),
    (OpSpec("ScatterElements", {"data": Wrt((4, 3)), "updates": Wrt((1, 3))},
            consts={"i": ints(1, 2, 3).reshape(1, 3)}, attrs={"reduction": "max"},
            inputs=["data", "i", "updates"], opset=18), "reduction 'max'"),
    (OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 3))}, consts={"w": weights(2, 2, 3, 3)},
            attrs={"dilations": [2, 2], "output_padding": [1, 1]}, label="output-padding"),
     "output_padding"),
    (OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 3))}, consts={"w": weights(2, 2, 3, 3)},
            attrs={"strides": [2, 2], "output_shape": [6, 6]}, symbolic=True,
            label="output-shape-symbolic"),
     "static spatial sizes"),
    (OpSpec("ConvTranspose", {"x": Wrt((1, 2, 3, 3))}, consts={"w": weights(2, 2, 3, 3)},
            attrs={"output_shape": [6, 6]}, label="output-shape-too-large"),
     "larger than the full"),
    (OpSpec("Einsum", {"x": Wrt((3, 3))}, attrs={"equation": "ii->i"}, label="diagonal"),
     "diagonal"),
    (OpSpec("Einsum", {"a": Wrt((2, 3)), "b": Wrt((4, 5))}, attrs={"equation": "aB,cd"},
            label="implicit-mixed-case"),
     "upper- and lower-case"),
]


@pytest.mark.parametrize("spec, message", REFUSED, ids=[spec.id for spec, _ in REFUSED])
def test_unsupported_form_is_a_clear_error(spec: OpSpec, message: str) -> None:
    model = build_model(spec)
    seed = helper.make_tensor_value_info("seed", TensorProto.FLOAT, None)
    model.graph.input.append(seed)
    with pytest.raises(AugmentError, match=f"{spec.op} node .*{message}"):
        build_backward(GraphBuilder(model), {"y0": "seed"}, list(spec.wrt))


def test_gradients_never_flow_into_weights() -> None:
    spec = LINEAR[0]
    model = build_model(spec)
    before = len(model.graph.node)
    build_backward(GraphBuilder(model), {"y0": "seed"}, ["x"])
    emitted = model.graph.node[before:]
    assert [n.op_type for n in emitted] == ["ConvTranspose"]
