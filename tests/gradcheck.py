"""One gradient-check helper: our backward graph against central finite differences.

`check_op(spec)` builds a small model for the spec (one node, or a graph in ONNX text), appends
the backward graph with the library's walker, runs it in stock onnxruntime, and compares
J^T v for a random v against central differences of <v, f(x)> taken on the ORIGINAL graph, also
run by onnxruntime. Every element of every differentiable input is perturbed, so inputs are kept
small.

Straight-through rules (QuantizeLinear, DequantizeLinear and the integer ops of a quantized
chain) have no finite differences on the graph itself, which is piecewise constant: their spec
gives `relaxed`, the graph's continuous relaxation (round dropped, saturation kept as a clip,
integers as floats), whose finite differences are the reference instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gradcam_server.augment.backward import build_backward
from gradcam_server.augment.graph import GraphBuilder

IR_VERSION = 8  # what every onnxruntime of the last years loads


@dataclass
class Wrt:
    """A differentiable input: its shape and the interval its values are drawn from."""

    shape: tuple[int, ...]
    low: float = -2.0
    high: float = 2.0
    avoid: tuple[float, ...] = ()  # kinks: values are kept 0.05 away from these
    distinct: bool = False  # all values different (max pooling, ties)


@dataclass
class OpSpec:
    """One line of the table: an op (or a tiny graph) and how to check it."""

    op: str
    wrt: dict[str, Wrt]
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    inputs: list[str] | None = None  # node input order; default: wrt then consts
    outputs: int = 1
    opset: int = 17
    text: str | None = None  # a graph in ONNX text instead of a single node
    relaxed: str | None = None  # ONNX text whose finite differences stand for the graph's
    symbolic: bool = False  # declare every input dim symbolic (exercises run-time shapes)
    eps: float = 1e-3
    rtol: float = 1e-2
    atol: float = 1e-3  # scaled by max(1, largest gradient magnitude)
    label: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}-{self.label}" if self.label else self.op


def build_model(spec: OpSpec, relaxed: bool = False) -> onnx.ModelProto:
    """The spec's model, or with `relaxed` its continuous relaxation (`OpSpec.relaxed`)."""
    text = spec.relaxed if relaxed else spec.text
    if text is not None:
        model = onnx.parser.parse_model(text)
        for name, value in spec.consts.items():
            model.graph.initializer.append(numpy_helper.from_array(value, name))
        model.ir_version = IR_VERSION
        return model
    names = spec.inputs or [*spec.wrt, *spec.consts]
    outputs = [f"y{i}" for i in range(spec.outputs)]
    node = helper.make_node(spec.op, names, outputs, name="node_under_test", **spec.attrs)
    graph_inputs = [
        helper.make_tensor_value_info(
            name,
            TensorProto.FLOAT,
            [f"d{name}{i}" for i in range(len(w.shape))] if spec.symbolic else list(w.shape),
        )
        for name, w in spec.wrt.items()
    ]
    initializers = [numpy_helper.from_array(v, n) for n, v in spec.consts.items()]
    graph = helper.make_graph(
        [node],
        "spec",
        graph_inputs,
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", spec.opset)], ir_version=IR_VERSION
    )


def sample_inputs(spec: OpSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    values = {}
    for name, w in spec.wrt.items():
        if w.distinct:
            count = int(np.prod(w.shape))
            grid = np.linspace(w.low, w.high, count)
            x = rng.permutation(grid).reshape(w.shape)
        else:
            x = rng.uniform(w.low, w.high, size=w.shape)
            for kink in w.avoid:
                near = np.abs(x - kink) < 0.05
                x[near] = kink + np.where(x[near] >= kink, 0.1, -0.1)
        values[name] = x.astype(np.float32)
    return values


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def augment_for_check(spec: OpSpec) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """The spec's model plus one seed input per output and one gradient output per wrt input."""
    model = build_model(spec)
    b = GraphBuilder(model)
    outputs = [o.name for o in model.graph.output]
    seeds = {}
    for name in outputs:
        seed = f"seed_{name}"
        model.graph.input.append(helper.make_tensor_value_info(seed, b.elem_type(name), None))
        seeds[name] = seed
    grads = build_backward(b, seeds, list(spec.wrt))
    grad_outputs = []
    for name, grad in grads.items():
        out = f"grad_{name}"
        model.graph.node.append(helper.make_node("Identity", [grad], [out]))
        model.graph.output.append(helper.make_empty_tensor_value_info(out))
        grad_outputs.append(out)
    return model, list(seeds.values()), grad_outputs


def gradients(
    spec: OpSpec, inputs: dict[str, np.ndarray], cotangents: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """d <cotangents, outputs> / d input for every wrt input, by the augmented graph."""
    augmented, seed_names, _ = augment_for_check(spec)
    emitted = augmented.graph.node[len(build_model(spec).graph.node):]
    assert all(node.domain in ("", "ai.onnx") for node in emitted), "non-standard op emitted"
    backward = session(augmented)
    feeds = dict(inputs) | dict(zip(seed_names, cotangents))
    results = dict(zip([o.name for o in backward.get_outputs()], backward.run(None, feeds)))
    return {name: results[f"grad_{name}"] for name in spec.wrt}


def check_op(spec: OpSpec, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    forward = session(build_model(spec))
    inputs = sample_inputs(spec, rng)
    outputs = forward.run(None, inputs)
    if spec.relaxed is not None:
        forward = session(build_model(spec, relaxed=True))
    cotangents = [rng.standard_normal(y.shape).astype(y.dtype) for y in outputs]
    results = gradients(spec, inputs, cotangents)

    def objective(values: dict[str, np.ndarray]) -> float:
        ys = forward.run(None, values)
        return float(sum(np.sum(y.astype(np.float64) * v) for y, v in zip(ys, cotangents)))

    for name in spec.wrt:
        analytic = results[name].astype(np.float64)
        assert analytic.shape == inputs[name].shape, (analytic.shape, inputs[name].shape)
        numeric = np.zeros_like(analytic)
        for index in np.ndindex(*inputs[name].shape):
            plus, minus = dict(inputs), dict(inputs)
            plus[name] = inputs[name].copy()
            minus[name] = inputs[name].copy()
            plus[name][index] += spec.eps
            minus[name][index] -= spec.eps
            step = float(plus[name][index]) - float(minus[name][index])
            numeric[index] = (objective(plus) - objective(minus)) / step
        # float32 round-off in the differences grows with the gradient's own scale
        atol = spec.atol * max(1.0, float(np.abs(numeric).max()))
        np.testing.assert_allclose(
            analytic, numeric, rtol=spec.rtol, atol=atol, err_msg=f"d/d{name} of {spec.id}"
        )
