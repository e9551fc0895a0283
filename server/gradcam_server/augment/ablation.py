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

Half precision: the ablated layer is computed in float32 from the layer's float32 cast, the
ablated value clamped to the layer type's largest finite magnitude (float16: the minimum - 1e7
would round to -inf, it becomes -65504), and cast to the layer's type where it enters the
cloned head; the scores are compared in float32.
"""

from __future__ import annotations

import ml_dtypes
import onnx
from onnx import helper

from .backward import path_nodes
from .graph import GraphBuilder, LoopBody

ABLATION_OFFSET = 1e7


def ablation_weights(
    b: GraphBuilder, layer: str, channel_axis: int, score_output: str, onehot: str
) -> str:
    """Ablation-CAM's channel weights w_k [N, C] for target `layer` (any layout: channel k is
    ablated along `channel_axis` at every position, prefix tokens included, as
    pytorch-grad-cam's ViT ablation layer does); `onehot` [N, classes] selects each item's
    class."""
    head = path_nodes(list(b.graph.node), layer, score_output)
    rank = b.rank(layer)
    axis = channel_axis % rank
    values = b.computed(layer)
    lowest = b.reduce("ReduceMin", values, list(range(1, rank)), keepdims=True)
    below = b.op("Sub", [lowest, b.const(ABLATION_OFFSET)])
    if b.elem_type(layer) != b.compute_type(layer):  # half precision: stay finite when cast
        largest = ml_dtypes.finfo(helper.tensor_dtype_to_np_dtype(b.elem_type(layer))).max
        below = b.op("Max", [below, b.const(-float(largest))])
    ablated_value = b.op(
        "Where", [b.op("Equal", [lowest, b.const(0.0)]), b.const(0.0), below]
    )
    channels = b.shape_slice(layer, axis, axis + 1)
    scores = _loop(b, head, layer, score_output, onehot, channels, ablated_value,
                   [a for a in range(rank) if a != axis])  # [C, N]
    original = b.reduce("ReduceSum", b.op("Mul", [b.computed(score_output), onehot]), [1],
                        keepdims=True)
    drop = b.op("Sub", [original, b.op("Transpose", [scores], perm=[1, 0])])
    return b.op("Div", [drop, original])


def _loop(
    b: GraphBuilder,
    head: list[onnx.NodeProto],
    activations: str,
    score_output: str,
    onehot: str,
    channels: str,
    ablated_value: str,
    other_axes: list[int],
) -> str:
    """One iteration per channel k: the score of every item with channel k ablated; [C, N]."""
    body = LoopBody(b, "ablation")
    k = body.op("Reshape", [body.step, b.ints([1])])
    mask = body.op("Unsqueeze", [body.op("OneHot", [k, channels, b.const([0.0, 1.0])], axis=-1),
                                 b.ints(other_axes[1:])])  # C along the channel axis
    kept = body.op("Mul", [b.computed(activations), body.op("Sub", [b.const(1.0), mask])])
    ablated = body.op("Add", [kept, body.op("Mul", [ablated_value, mask])])
    renamed = {activations: body.cast_like(ablated, activations)}
    body.clone(head, renamed)
    selected = body.op("Mul", [body.computed(renamed[score_output], score_output), onehot])
    score = body.op("ReduceSum", [selected, b.ints([1])], keepdims=0)
    return body.loop(b.squeeze(channels, [0]), score, b.compute_type(score_output), [None])
