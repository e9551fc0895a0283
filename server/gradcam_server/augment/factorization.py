"""Deep Feature Factorization inside the graph: the target layer's activations factorised into
non-negative concepts, each concept scored by the classifier head.

Deep Feature Factorization (Collins, Achanta and Süsstrunk, ECCV 2018), as pytorch-grad-cam
1.5.7's `dff` prepares it, per image (pytorch-grad-cam factorises a batch jointly, its positions
side by side; here each row of a batch is its own request, so each image is factorised alone,
as pytorch-grad-cam does for a batch of one): the activations as V [C, h*w] (NaN as 0), each channel
shifted by its minimum over the positions (the offset), V ~ W H with W [C, k] >= 0 the concept
embeddings and H [k, h*w] >= 0 the concept maps; the concepts are W plus the offsets.

The factorisation: scikit-learn's multiplicative updates for the Frobenius norm (Lee and Seung),
W <- W (V H^T) / (W H H^T), then H <- H (W^T V) / (W^T W H), a zero denominator replaced by
float32's epsilon, `NMF_ITERATIONS` times in an ONNX Loop. pytorch-grad-cam runs scikit-learn's
coordinate-descent solver from a random start (``init="random", random_state=0``), which has no
fixed cost and no graph form; its start is replaced by a deterministic one of the same scale,
avg * U with avg = sqrt(mean(V) / k) (scikit-learn's) and U in (0, 1) from a multiplicative hash
of each entry's index (`initial_factors`), so a map is a pure function of the image.

The concept scores: each concept embedding [C] run through the classifier head. The head is the
part of the network after the target layer, which must begin with the global average pooling of
that layer (a CNN's last feature map: GlobalAveragePool, or ReduceMean over its positions); the
pooling of a map holding the concept at every position is the concept itself, so the head's
output for that map is the head's output for the concept embedding. The scores are the softmax
of those outputs over the classes (as pytorch-grad-cam's `run_dff_on_image` labels concepts).

The heatmap of the explained class is the map of the concept whose score for that class is the
highest; `concept_scores` [N, k] holds each concept's score for it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .backward import path_nodes
from .errors import AugmentError
from .graph import GraphBuilder, LoopBody, axes_are_input

CONCEPTS = 5  # k, pytorch-grad-cam's `run_dff_on_image` default
NMF_ITERATIONS = 200  # scikit-learn's NMF default max_iter
NMF_EPSILON = float(np.finfo(np.float32).eps)  # scikit-learn's guard of a zero denominator
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash, modulo 2^32
_HASH_MODULUS = 2**32


def initial_factors(channels: int, positions: int, concepts: int = CONCEPTS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """U_W [C, k] and U_H [k, P] in (0, 1), the start of the factorisation before its scaling
    by avg: entry number i (W's row-major, then H's) is
    ((i * 2654435761) mod 2^32 + 0.5) / 2^32. The graph computes the same (`_hashed`)."""
    index = np.arange(channels * concepts + concepts * positions, dtype=np.int64)
    values = (((index * _HASH_MULTIPLIER) % _HASH_MODULUS) + 0.5) / _HASH_MODULUS
    values = values.astype(np.float32)
    split = channels * concepts
    return (values[:split].reshape(channels, concepts),
            values[split:].reshape(concepts, positions))


def deep_feature_factorization(
    b: GraphBuilder, activations: str, layer: str, score_output: str, onehot: str
) -> tuple[str, str]:
    """The raw map [N, 1, h, w] of the explained class (the concept map whose score for it is
    the highest) and the concepts' scores for that class [N, k], from the target layer
    `layer` (NCHW; `activations` its values in float32) and the one-hot [N, classes] of each
    row's class."""
    head = _classifier_head(b, layer, score_output)
    flat = b.op("Reshape", [activations, b.ints([0, 0, -1])])  # [N, C, P]
    flat = b.op("Where", [b.op("IsNaN", [flat]), b.const(0.0), flat])
    offset = b.reduce("ReduceMin", flat, [2], keepdims=True)  # [N, C, 1]
    v = b.op("Sub", [flat, offset])
    weights, maps = _nmf(b, v)  # [N, C, k], [N, k, P]
    concepts = b.op("Add", [weights, offset])
    outputs = _head_on_concepts(b, head, layer, score_output, concepts)  # [k, N, classes]
    probabilities = b.op("Softmax", [outputs], axis=2)
    scores = b.op("Transpose", [b.reduce("ReduceSum", b.op("Mul", [probabilities, onehot]), [2],
                                         keepdims=False)], perm=[1, 0])  # [N, k]
    best = b.op("ArgMax", [scores], axis=1, keepdims=0)
    chosen = b.op("OneHot", [best, b.ints([CONCEPTS]), b.const([0.0, 1.0])], axis=-1)
    selected = b.reduce("ReduceSum", b.op("Mul", [maps, b.unsqueeze(chosen, [2])]), [1],
                        keepdims=True)  # [N, 1, P]
    shape = b.op("Concat", [b.shape_slice(activations, 0, 1), b.ints([1]),
                            b.shape_slice(activations, 2)], axis=0)
    return b.op("Reshape", [selected, shape]), scores


def _classifier_head(b: GraphBuilder, layer: str, score_output: str) -> list[onnx.NodeProto]:
    """The nodes from `layer` to the score; refused unless every one reading the layer is a
    global average pooling of its positions."""
    head = path_nodes(list(b.graph.node), layer, score_output)
    readers = [node for node in head if layer in node.input]
    if not readers or not all(_pools_positions(b, node) for node in readers):
        found = ", ".join(sorted({node.op_type for node in readers})) or "nothing"
        raise AugmentError(
            f"dff scores its concepts with the classifier head, which must begin with the "
            f"global average pooling of the target layer; {layer!r} is read by {found} on "
            f"the way to the score (choose the feature map the classifier pools)"
        )
    return head


def _pools_positions(b: GraphBuilder, node: onnx.NodeProto) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    if axes_are_input("ReduceMean", b.opset):
        axes = b.initializer_value(node.input[1]) if len(node.input) > 1 else None
    else:
        axes = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"),
                    None)
    return axes is not None and sorted(int(a) % 4 for a in np.ravel(axes)) == [2, 3]


def _hashed(b: GraphBuilder, start: str, count: str) -> str:
    """`initial_factors`' values for the indices start .. start + count - 1 (INT64 [1] each),
    as FLOAT [count]."""
    index = b.op("Range", [b.squeeze(start, [0]), b.squeeze(b.op("Add", [start, count]), [0]),
                           b.const(1, np.int64)])
    hashed = b.op("Mod", [b.op("Mul", [index, b.const(_HASH_MULTIPLIER, np.int64)]),
                          b.const(_HASH_MODULUS, np.int64)])
    return b.op("Div", [b.op("Add", [b.op("Cast", [hashed], to=TensorProto.FLOAT),
                                     b.const(0.5)]), b.const(float(_HASH_MODULUS))])


def _nmf(b: GraphBuilder, v: str) -> tuple[str, str]:
    """W [N, C, k] and H [N, k, P] with V [N, C, P] ~ W H, as the module says."""
    channels, positions = b.shape_slice(v, 1, 2), b.shape_slice(v, 2, 3)
    k = b.ints([CONCEPTS])
    w_count = b.op("Mul", [channels, k])
    start_w = _hashed(b, b.ints([0]), w_count)
    start_h = _hashed(b, w_count, b.op("Mul", [k, positions]))
    average = b.op("Sqrt", [b.op("Div", [b.reduce("ReduceMean", v, [1, 2], keepdims=True),
                                         b.const(float(CONCEPTS))])])  # [N, 1, 1]
    w0 = b.op("Mul", [average, b.op("Reshape", [start_w, b.op("Concat", [channels, k], axis=0)])])
    h0 = b.op("Mul", [average, b.op("Reshape", [start_h, b.op("Concat", [k, positions],
                                                                  axis=0)])])
    step, condition = b.fresh("nmf_step"), b.fresh("nmf_condition")
    w_in, h_in = b.fresh("nmf_w"), b.fresh("nmf_h")
    nodes: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], **attrs) -> str:
        output = b.fresh(op_type.lower())
        nodes.append(helper.make_node(op_type, inputs, [output], name=b.fresh(op_type), **attrs))
        return output

    def transposed(x: str) -> str:
        return op("Transpose", [x], perm=[0, 2, 1])

    def guarded(denominator: str) -> str:
        zero = op("Equal", [denominator, b.const(0.0)])
        return op("Where", [zero, b.const(NMF_EPSILON), denominator])

    h_t = transposed(h_in)
    w_delta = op("Div", [op("MatMul", [v, h_t]),
                         guarded(op("MatMul", [w_in, op("MatMul", [h_in, h_t])]))])
    w_out = op("Mul", [w_in, w_delta])
    w_t = transposed(w_out)
    h_delta = op("Div", [op("MatMul", [w_t, v]),
                         guarded(op("MatMul", [op("MatMul", [w_t, w_out]), h_in]))])
    h_out = op("Mul", [h_in, h_delta])
    condition_out = op("Identity", [condition])
    floats = [None, None, None]
    body = helper.make_graph(
        nodes, b.fresh("nmf_body"),
        [helper.make_tensor_value_info(step, TensorProto.INT64, []),
         helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
         helper.make_tensor_value_info(w_in, TensorProto.FLOAT, floats),
         helper.make_tensor_value_info(h_in, TensorProto.FLOAT, floats)],
        [helper.make_tensor_value_info(condition_out, TensorProto.BOOL, []),
         helper.make_tensor_value_info(w_out, TensorProto.FLOAT, floats),
         helper.make_tensor_value_info(h_out, TensorProto.FLOAT, floats)],
    )
    w, h = b.op_multi("Loop", [b.const(NMF_ITERATIONS, np.int64), b.const(True, dtype=bool),
                               w0, h0], 2, body=body)
    return w, h


def _head_on_concepts(
    b: GraphBuilder, head: list[onnx.NodeProto], layer: str, score_output: str, concepts: str
) -> str:
    """The head's output for each concept [k, N, classes]: one Loop iteration per concept,
    the head run on the layer-shaped map holding that concept at every position."""
    body = LoopBody(b, "dff_concepts")
    concept = body.op("Gather", [concepts, body.step], axis=2)  # [N, C]
    spread = body.op("Expand", [body.op("Unsqueeze", [concept, b.ints([2, 3])]),
                                b.shape(layer)])
    renamed = {layer: body.cast_like(spread, layer)}
    body.clone(head, renamed)
    output = body.computed(renamed[score_output], score_output)
    return body.loop(b.const(CONCEPTS, np.int64), output, b.compute_type(score_output),
                     [None, None])
