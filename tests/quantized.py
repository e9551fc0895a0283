"""Quantized models for the tests: onnxruntime's quantizers, and the continuous relaxation of a
quantized graph, the reference for its straight-through gradients.

`quantize(source, target, fmt, images)` writes `source` quantized in one of FORMATS:
``qdq`` (quantize_static, QDQ, per tensor), ``qdq-per-channel`` (the same, weights per output
channel) or ``dynamic`` (quantize_dynamic: DynamicQuantizeLinear, ConvInteger, MatMulInteger),
calibrated on `images`.

`relax(model, at)` is the float graph whose derivative the straight-through gradients of a
quantized graph are, taken at the feeds `at`: each QuantizeLinear becomes a clip of
x / scale + zero_point (round replaced by its offset at `at`, a constant; saturation kept),
each DequantizeLinear (q - zero_point) scale, DynamicQuantizeLinear the same clip with the
scale and zero point it computes at `at`, ConvInteger and MatMulInteger their float ops on the
operands minus their zero points; integers become floats. At `at` it computes what the quantized
graph computes, and its kinks lie where the straight-through masks change.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    quantize_dynamic,
    quantize_static,
)

FORMATS = ("qdq", "qdq-per-channel", "dynamic")
_RANGES = {
    TensorProto.UINT8: (0, 255),
    TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767),
}


class _Images(CalibrationDataReader):
    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._feeds = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def quantize(source: str | os.PathLike, target: str | os.PathLike, fmt: str,
             images: np.ndarray, input_name: str = "input") -> Path:
    """`source` quantized in format `fmt` (FORMATS) to `target`, calibrated on `images`."""
    if fmt == "dynamic":
        quantize_dynamic(str(source), str(target))
    elif fmt in ("qdq", "qdq-per-channel"):
        quantize_static(str(source), str(target), _Images(input_name, images),
                        quant_format=QuantFormat.QDQ, per_channel=fmt == "qdq-per-channel")
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {FORMATS}")
    return Path(target)


def relax(model: onnx.ModelProto, at: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The continuous relaxation of a quantized graph taken at the feeds `at` (the module
    docstring): each quantizer computes clip(x / scale + zero_point + offset, qmin - 1/2,
    qmax + 1/2) + saturation, with the rounding offset and the saturation correction constants
    read at `at`, so that the relaxation equals the quantized graph there. Its kinks are then
    where the straight-through mask changes (round(x / scale) + zero_point leaving [qmin, qmax]);
    DynamicQuantizeLinear's scale and zero point are the constants it computes at `at`."""
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    graph = relaxed.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    types, ranks = _types_and_ranks(model)
    values = _intermediates(model, at)
    nodes = []
    count = iter(range(1 << 30))

    def emit(op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        output = output or f"relaxed_{next(count)}"
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def as_float(name: str) -> str:
        return emit("Cast", [name], to=TensorProto.FLOAT)

    def along(value: np.ndarray, axis: int, rank: int) -> np.ndarray:
        """A 1-D scale or zero point shaped to broadcast along `axis` of a rank-`rank` tensor."""
        if value.ndim == 0:
            return value
        dims = [1] * rank
        dims[axis % rank] = -1
        return value.reshape(dims)

    def quantizer(x: str, output: str, scale: np.ndarray, zero_point: np.ndarray,
                  low: int, high: int) -> None:
        scale = scale.astype(np.float32)
        zero_point = zero_point.astype(np.float32)
        scaled = values[x] / scale
        rounded = np.rint(scaled) + zero_point
        saturation = np.clip(rounded, low, high) - np.clip(rounded, low - 0.5, high + 0.5)
        offset = np.rint(scaled) - scaled + zero_point
        shifted = emit("Add", [emit("Div", [x, _const(graph, scale)]), _const(graph, offset)])
        clipped = emit("Clip", [shifted, _const(graph, np.float32(low - 0.5)),
                                _const(graph, np.float32(high + 0.5))])
        emit("Add", [clipped, _const(graph, saturation.astype(np.float32))], output)

    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "QuantizeLinear":
            x, scale, zero_point = node.input
            rank, axis = ranks[x], attrs.get("axis", 1)
            low, high = _RANGES[types[node.output[0]]]
            quantizer(x, node.output[0], along(constants[scale], axis, rank),
                      along(constants[zero_point], axis, rank), low, high)
        elif node.op_type == "DequantizeLinear":
            q, scale, zero_point = (list(node.input) + [""])[:3]
            rank, axis = ranks[q], attrs.get("axis", 1)
            centered = as_float(q)
            parameters = {"scale": scale, "zero_point": zero_point}
            for key, name in parameters.items():
                if name in constants:
                    parameters[key] = _const(graph, along(constants[name], axis, rank)
                                             .astype(np.float32))
            if zero_point:
                centered = emit("Sub", [centered, as_float(parameters["zero_point"])])
            emit("Mul", [centered, parameters["scale"]], node.output[0])
        elif node.op_type == "DynamicQuantizeLinear":
            q, scale, zero_point = node.output
            emit("Identity", [_const(graph, values[scale].astype(np.float32))], scale)
            emit("Identity", [_const(graph, values[zero_point].astype(np.float32))], zero_point)
            quantizer(node.input[0], q, values[scale], values[zero_point], 0, 255)
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            x, w, x_zero, w_zero = (list(node.input) + ["", ""])[:4]
            x = as_float(x)
            if x_zero:
                x = emit("Sub", [x, as_float(x_zero)])
            weight = as_float(w)
            if w_zero:
                axis = 0 if node.op_type == "ConvInteger" else -1
                offset = along(constants[w_zero], axis, ranks[w]).astype(np.float32)
                weight = emit("Sub", [weight, _const(graph, offset)])
            op = "Conv" if node.op_type == "ConvInteger" else "MatMul"
            emit(op, [x, weight], node.output[0], **attrs)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for output in graph.output:
        output.type.tensor_type.elem_type = TensorProto.FLOAT
    return relaxed


def _intermediates(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """The values at `feeds` of every quantizer's input and DynamicQuantizeLinear's outputs."""
    wanted = []
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            wanted.append(node.input[0])
        elif node.op_type == "DynamicQuantizeLinear":
            wanted += [node.input[0], *node.output[1:]]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name)
                              for name in dict.fromkeys(wanted) if name not in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    return dict(zip(outputs, session.run(None, feeds)))


def _const(graph: onnx.GraphProto, value: np.ndarray) -> str:
    name = f"relaxed_const_{len(graph.initializer)}"
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _types_and_ranks(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element types and ranks of the graph's tensors, by onnx's shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    types = {v.name: v.type.tensor_type.elem_type for v in infos}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in infos
             if v.type.tensor_type.HasField("shape")}
    for init in model.graph.initializer:
        types[init.name] = init.data_type
        ranks[init.name] = len(init.dims)
    return types, ranks
