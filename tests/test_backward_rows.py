"""Row-restricted gradients (`backward.build_backward`): a head that reads a few token rows is
differentiated on those rows only, and the result equals finite differences of the whole graph.

Each graph is a small transformer tail: rows mixed by attention-like ops, then per-row ops
(LayerNorm, a linear layer, Erf, Sigmoid, a broadcast position term, a Softmax over features),
then one or two rows gathered, as ViT and DeiT heads read their class and distillation tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from gradcam_server.augment.backward import build_backward
from gradcam_server.augment.graph import GraphBuilder
from gradcheck import OpSpec, Wrt, augment_for_check, build_model, check_op, session

rng = np.random.default_rng(7)


def weights(*shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * 0.5).astype(np.float32)


CONSTS = {
    "scale": weights(4), "bias": weights(4), "w": weights(4, 6), "wb": weights(6),
    "pos": weights(1, 5, 6), "zero": np.array(0, np.int64), "two": np.array(2, np.int64),
}
HEADER = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,4] x) => (float[2,6] y) {"""
ROW_WISE_TAIL = """
    n = LayerNormalization <axis = -1> (mixed, scale, bias)
    h = MatMul(n, w)
    hb = Add(h, wb)
    e = Erf(hb)
    s = Sigmoid(e)
    p = Mul(s, pos)
    f = Softmax <axis = -1> (p)"""
ATTENTION = """
    xt = Transpose <perm = [0, 2, 1]> (x)
    scores = MatMul(x, xt)
    attention = Softmax <axis = -1> (scores)
    mixed = MatMul(attention, x)"""

SPECS = [
    OpSpec("class-token", {"x": Wrt((2, 5, 4))}, consts=CONSTS,
           text=HEADER + ATTENTION + ROW_WISE_TAIL + """
    y = Gather <axis = 1> (f, zero)
}"""),
    OpSpec("two-tokens", {"x": Wrt((2, 5, 4))}, consts=CONSTS,
           text=HEADER + ATTENTION + ROW_WISE_TAIL + """
    first = Gather <axis = 1> (f, zero)
    third = Gather <axis = 1> (f, two)
    y = Add(first, third)
}"""),
    OpSpec("token-and-mean", {"x": Wrt((2, 5, 4))}, consts=CONSTS,
           text=HEADER + ATTENTION + ROW_WISE_TAIL + """
    first = Gather <axis = 1> (f, zero)
    mean = ReduceMean <axes = [1], keepdims = 0> (f)
    y = Add(first, mean)
}"""),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.op)
def test_row_restricted_gradient_matches_finite_differences(spec: OpSpec) -> None:
    check_op(spec)


def test_per_row_ops_run_on_the_gathered_rows_only() -> None:
    """With one row read, the linear layer's backward MatMul (dy w^T) multiplies a [2, 1, 6]
    gradient, not [2, 5, 6]; attention keeps the query row too (its row-wise Softmax and the
    MatMuls' first operands), while the keys and values, which every row reads, get whole
    gradients (finite differences check the values in the test above)."""
    model, seeds, _ = augment_for_check(SPECS[0])
    producers = {out: node for node in model.graph.node for out in node.output}
    backward = model.graph.node[len(build_model(SPECS[0]).graph.node):]
    probed = {}
    for node in (n for n in backward if n.op_type == "MatMul"):
        source = producers.get(node.input[1])
        role = "linear" if source is not None and source.input[:1] == ["w"] else "attention"
        probed.setdefault(role, []).append(node.input[0])
        model.graph.output.append(helper.make_empty_tensor_value_info(node.input[0]))
    feeds = {"x": rng.standard_normal((2, 5, 4)).astype(np.float32),
             seeds[0]: rng.standard_normal((2, 6)).astype(np.float32)}
    values = dict(zip([o.name for o in model.graph.output], session(model).run(None, feeds)))
    assert [values[t].shape for t in probed["linear"]] == [(2, 1, 6)]
    shapes = sorted(values[t].shape for t in probed["attention"])
    assert shapes == [(2, 1, 4), (2, 1, 5), (2, 4, 1), (2, 5, 1)], shapes


def test_gather_of_a_negative_index_is_not_restricted() -> None:
    """Index -1 (the last row) keeps the whole gradient (Gather's own rule)."""
    spec = OpSpec("gather-last", {"x": Wrt((2, 5, 4))}, consts={"i": np.array(-1, np.int64)},
                  text="""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,4] x) => (float[2,4] y) {
    t = Tanh(x)
    y = Gather <axis = 1> (t, i)
}""")
    model = build_model(spec)
    before = len(model.graph.node)
    build_backward(GraphBuilder(model), {"y": "seed"}, ["x"])
    assert not any(n.op_type == "Slice" and n.input[0] == "t" for n in model.graph.node[before:])
    check_op(spec)


def test_stacked_q_k_v_gradients_are_concatenated() -> None:
    """q, k and v gathered from a stacked [3, N, T, C] tensor (rows 0, 1, 2 of axis 0): their
    gradients tile the stack and are concatenated, with no scatter and no padding."""
    spec = OpSpec("qkv", {"x": Wrt((3, 2, 4, 3))}, consts={
        "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
        "two": np.array(2, np.int64)}, text="""<ir_version: 8, opset_import: ["" : 17]>
g (float[3,2,4,3] x) => (float[2,4,3] y) {
    q = Gather <axis = 0> (x, zero)
    k = Gather <axis = 0> (x, one)
    v = Gather <axis = 0> (x, two)
    kt = Transpose <perm = [0, 2, 1]> (k)
    scores = MatMul(q, kt)
    attention = Softmax <axis = -1> (scores)
    y = MatMul(attention, v)
}""")
    model = build_model(spec)
    before = len(model.graph.node)
    build_backward(GraphBuilder(model), {"y": "seed"}, ["x"])
    emitted = {n.op_type for n in model.graph.node[before:]}
    assert "Concat" in emitted and not emitted & {"ScatterElements", "ScatterND", "Pad"}
    check_op(spec)
