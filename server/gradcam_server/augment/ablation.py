"""Ablation-CAM inside the graph: the part of the network after the target layer, re-run once
per channel with that channel ablated, in an ONNX Loop.

Ablation-CAM (Desai and Ramaswamy, WACV 2020): with y^c the class score and y^c_k the score
when channel k of the target layer is ablated, w_k = (y^c - y^c_k) / y^c and the map is
ReLU(sum_k w_k A^k). A channel is ablated to 0, or, where the layer's activations of that image
go below 0, to their minimum minus 1e7 (as pytorch-grad-cam 1.5.7 does).

Only the nodes between the target layer and the score output are cloned into the Loop body;
everything in front of the target layer runs once, and the body reads the forward graph's
weights and tensors from the outer scope. Each iteration runs the head for the whole batch with
one channel ablated.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .backward import path_nodes
from .graph import GraphBuilder

ABLATION_OFFSET = 1e7


def ablation_cam(
    b: GraphBuilder, activations: str, score_output: str, onehot: str
) -> str:
    """Ablation-CAM's per-channel contributions w_k A^k [N, C, h, w]; `onehot` [N, classes]
    selects each item's class."""
    head = path_nodes(list(b.graph.node), activations, score_output)
    lowest = b.reduce("ReduceMin", activations, [1, 2, 3], keepdims=True)
    ablated_value = b.op(
        "Where",
        [b.op("Equal", [lowest, b.const(0.0)]), b.const(0.0),
         b.op("Sub", [lowest, b.const(ABLATION_OFFSET)])],
    )
    channels = b.shape_slice(activations, 1, 2)
    scores = b.op(
        "Loop",
        [b.squeeze(channels, [0]), b.const(True, dtype=bool)],
        body=_body(b, head, activations, score_output, onehot, channels, ablated_value),
    )  # [C, N]
    original = b.reduce("ReduceSum", b.op("Mul", [score_output, onehot]), [1], keepdims=True)
    drop = b.op("Sub", [original, b.op("Transpose", [scores], perm=[1, 0])])
    weights = b.unsqueeze(b.op("Div", [drop, original]), [2, 3])  # [N, C, 1, 1]
    return b.op("Mul", [weights, activations])


def _body(
    b: GraphBuilder,
    head: list[onnx.NodeProto],
    activations: str,
    score_output: str,
    onehot: str,
    channels: str,
    ablated_value: str,
) -> onnx.GraphProto:
    """Loop body: (iteration k, condition) -> (condition, score of every item with channel k
    ablated)."""
    iteration, condition = b.fresh("channel"), b.fresh("condition")
    one_zero = b.const([0.0, 1.0])
    mask, keep, ablated = b.fresh("mask"), b.fresh("keep"), b.fresh("ablated")
    nodes = [
        helper.make_node("Reshape", [iteration, b.ints([1])], [b.fresh("k")]),
    ]
    nodes.append(helper.make_node("OneHot", [nodes[-1].output[0], channels, one_zero],
                                  [b.fresh("onehot")], axis=-1))
    nodes.append(helper.make_node("Unsqueeze", [nodes[-1].output[0], b.ints([2, 3])], [mask]))
    nodes.append(helper.make_node("Sub", [b.const(1.0), mask], [keep]))
    kept = b.fresh("kept")
    nodes.append(helper.make_node("Mul", [activations, keep], [kept]))
    filled = b.fresh("filled")
    nodes.append(helper.make_node("Mul", [ablated_value, mask], [filled]))
    nodes.append(helper.make_node("Add", [kept, filled], [ablated]))

    renamed = {activations: ablated}
    nodes.extend(b.clone(head, renamed))

    score, condition_out = b.fresh("ablated_score"), b.fresh("condition_out")
    product = b.fresh("selected")
    nodes.append(helper.make_node("Mul", [renamed[score_output], onehot], [product]))
    axes = b.ints([1])
    nodes.append(helper.make_node("ReduceSum", [product, axes], [score], keepdims=0))
    nodes.append(helper.make_node("Identity", [condition], [condition_out]))
    return helper.make_graph(
        nodes,
        b.fresh("ablation_body"),
        [helper.make_tensor_value_info(iteration, TensorProto.INT64, []),
         helper.make_tensor_value_info(condition, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(condition_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(score, b.elem_type(score_output), [None])],
    )
