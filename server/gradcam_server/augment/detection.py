"""The "detection" score: one detection of a detector's raw head, per batch row (single-stage
heads, and a two-stage detector's per-proposal scores and per-class boxes).

A detector is explained before its post-processing (score threshold, top-k, NMS), which is not
differentiable, on its pre-NMS heads (`find_heads`):

    scores  [N, A, C]   one score per anchor (or pre-NMS box) and class; [N, C, A] also
    boxes   [N, A, 4]   decoded boxes, x1, y1, x2, y2 in input pixels; per-class boxes
                        [N, A, C, 4] (a two-stage head's) are read at the explained class
    yolo    [N, 4 + C, A] one output: cx, cy, w, h, then the class scores (Ultralytics)

The explained score is pytorch-grad-cam's FasterRCNNBoxScoreTarget on one detection: the
detection's class score plus the IoU of its box with a reference box. The detection is chosen
per row (`detection_seeds`) by the added inputs

    detection_index  INT64 [N]  >= 0: this anchor (an index into the pre-NMS outputs);
                                negative: chosen by the reference box
    reference_box    FP32 [N, 4] x1, y1, x2, y2 in input pixels; a row of zero area (zeros)
                                is no reference (with an index: the class score alone)
    target_class     INT64 [N]  the class c, or -r: the r-th highest-scoring class of the
                                chosen anchor (by box: -1 chooses among all classes); a
                                background class (two-stage heads' 0) is never explained

Choosing by box: of the anchors whose box has an area and overlaps the reference with IoU >=
the threshold, the one with the highest score for the class (the detection NMS would keep);
rows of zero boxes (a two-stage head's padding) are never chosen, and explain nothing by
index. Where none overlaps enough, the row's seed is zero and ``explained_detection`` is -1,
so a caller can refuse instead of explaining a wrong anchor. Outputs: ``explained_detection``
(INT64 [N]), ``detection_class`` (INT64 [N]), ``detection_score`` (the class score, [N]),
``detection_box`` ([N, 4], x1, y1, x2, y2) and ``detection_iou`` ([N], 0 without reference).

d IoU / d box is written in closed form (torchvision's box_iou, whose intersection is clamped
at 0; at equal edges the reference's edge is taken as the intersection's), so the seeds are
d score / d scores and d score / d boxes, and the walker differentiates the network from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .backward import ancestors, descendants, detached_tensors, path_nodes
from .errors import AugmentError
from .graph import FLOAT_TYPES, GraphBuilder, computed_tensors, infer_shapes, subgraphs

DETECTION_FORMATS = ("nac", "nca", "yolo")  # scores [N, A, C] / [N, C, A] / one YOLO output
BOX_FORMATS = ("xyxy", "cxcywh")
DEFAULT_IOU_THRESHOLD = 0.5
_NMS = "NonMaxSuppression"
# Ops that select rows by value: a tensor computed through them is no longer one row per anchor
_SELECTING = {"TopK", "NonZero", "Compress", "Loop", "If", "Scan", _NMS}
# Ops that only rearrange a head's map into rows of anchors
_REARRANGING = {"Reshape", "Transpose", "Slice", "Split", "Flatten", "Squeeze", "Unsqueeze",
                "Gather", "Shape", "Size"}


@dataclass(frozen=True)
class DetectionHeads:
    """The pre-NMS heads seen as scores [N, A, C] and boxes [N, A, 4] (or [N, A, C, 4]),
    x1, y1, x2, y2: tensors of the graph, or views of them that `views` appended (a
    transpose, a YOLO output's split, a centre-size conversion), which the backward walker
    differentiates like any forward op. `sources` are the graph's own tensors."""

    scores: str
    boxes: str
    sources: tuple[str, ...]
    per_class_boxes: bool
    description: str


def find_heads(
    b: GraphBuilder,
    image: str,
    scores: str | None = None,
    boxes: str | None = None,
    detection_format: str | None = None,
    box_format: str | None = None,
) -> DetectionHeads:
    """The pre-NMS scores and boxes, named or detected, as `DetectionHeads`.

    Named: `scores` and `boxes` are graph outputs or inner tensors (a YOLO output is `scores`
    alone, with detection_format "yolo"). Detected: among the graph's float outputs that no
    NonMaxSuppression feeds, one [N, A, 4] or [N, A, C, 4] (boxes) and one other rank-3
    (scores); or a single rank-3 output [N, K, A] with K < A, read as YOLO's. A graph whose
    outputs come out of a NonMaxSuppression is cut before it where that node reads the heads
    directly (boxes [N, A, 4], scores [N, C, A], nothing that selects rows by value on the
    way from the image); otherwise refused, naming the node. `box_format` "xyxy" (the
    default; NMS's "center_point_box" 1 and YOLO mean "cxcywh") or "cxcywh"."""
    if detection_format is not None and detection_format not in DETECTION_FORMATS:
        raise AugmentError(f"unknown detection format {detection_format!r}; expected one of "
                           f"{', '.join(DETECTION_FORMATS)}")
    if box_format is not None and box_format not in BOX_FORMATS:
        raise AugmentError(f"unknown box format {box_format!r}; expected one of "
                           f"{', '.join(BOX_FORMATS)}")
    nodes = list(b.graph.node)
    after_nms = descendants(nodes, {n.output[0] for n in nodes if n.op_type == _NMS})
    # outputs no gradient reaches (a two-stage detector's proposals) are not heads
    not_heads = after_nms | (computed_tensors(b.graph) - _differentiable(nodes, image))
    for name in (scores, boxes):
        if name is not None and name not in computed_tensors(b.graph):
            raise AugmentError(f"{name!r} is not a tensor of the model")
    if scores is not None and boxes is None and detection_format != "yolo":
        boxes = _only_box_output(b, scores, not_heads)
        if boxes is None and detection_format is None and _yolo_shaped(
                b.static_shape(scores) or ()):
            detection_format = "yolo"
    if scores is not None and (boxes is not None or detection_format == "yolo"):
        chosen = (scores, boxes)
    elif scores is not None or boxes is not None:
        raise AugmentError("name both the scores and the boxes of the detection (or the one "
                           "output with detection format 'yolo')")
    else:
        chosen = _detect_outputs(b, not_heads, detection_format)
        if chosen is None:
            return _cut_before_nms(b, nodes, image, box_format)
    for name in chosen:
        if name is not None and name in after_nms:
            return _cut_before_nms(b, nodes, image, box_format)
    scores, boxes = chosen
    if boxes is None or detection_format == "yolo":
        return _yolo_view(b, scores, box_format)
    return _view(b, scores, boxes, detection_format, box_format or "xyxy")


def _detect_outputs(
    b: GraphBuilder, not_heads: set[str], detection_format: str | None
) -> tuple[str, str | None] | None:
    """(scores, boxes) among the graph outputs not in `not_heads` (those an NMS feeds, and
    those no gradient reaches) (boxes None: a YOLO output), or None when no output looks like
    a head; AugmentError when several do."""
    outputs = [o.name for o in b.graph.output
               if o.name not in not_heads and b.elem_type(o.name) in FLOAT_TYPES]
    shapes = {name: b.static_shape(name) or () for name in outputs}
    box_outputs = [n for n in outputs if len(shapes[n]) in (3, 4) and shapes[n][-1] == 4]
    score_outputs = [n for n in outputs if len(shapes[n]) == 3 and n not in box_outputs]
    if detection_format == "yolo" or (not box_outputs and len(score_outputs) == 1
                                      and _yolo_shaped(shapes[score_outputs[0]])):
        if len(score_outputs) != 1:
            raise AugmentError(
                "detection format 'yolo' needs one [N, 4 + C, A] output; found "
                f"{_listed(b, score_outputs) or 'none'}; name it with the output option"
            )
        return score_outputs[0], None
    if not box_outputs and not score_outputs:
        return None
    if len(box_outputs) != 1 or len(score_outputs) != 1:
        raise AugmentError(
            "cannot tell the detection's outputs apart: boxes [N, A, 4] candidates: "
            f"{_listed(b, box_outputs) or 'none'}; scores [N, A, C] candidates: "
            f"{_listed(b, score_outputs) or 'none'}; name them (the output and boxes options)"
        )
    return score_outputs[0], box_outputs[0]


def _only_box_output(b: GraphBuilder, scores: str, not_heads: set[str]) -> str | None:
    """The boxes beside named scores: the one other output [N, A, 4] or [N, A, C, 4]; None
    where there is none or several (or the scores are a YOLO output and no box output)."""
    shapes = {o.name: b.static_shape(o.name) or () for o in b.graph.output
              if o.name != scores and o.name not in not_heads}
    found = [n for n, shape in shapes.items() if len(shape) in (3, 4) and shape[-1] == 4]
    return found[0] if len(found) == 1 else None


def _differentiable(nodes: Sequence, image: str) -> set[str]:
    """The tensors a gradient flows into from the image: computed from it, not only through
    what the walker holds constant (region pooling's rois and what computes them,
    `backward.detached_tensors`)."""
    detached = detached_tensors(nodes)
    reached = {image}
    for node in nodes:
        if any(t in reached and t not in detached for t in node.input):
            reached.update(t for t in node.output if t)
    return reached


def _yolo_shaped(shape: tuple) -> bool:
    """[N, 4 + C, A] with 4 + C known, and A unknown or larger (a head alone, no boxes)."""
    return (len(shape) == 3 and isinstance(shape[1], int) and shape[1] > 4
            and (not isinstance(shape[2], int) or shape[2] > shape[1]))


def _cut_before_nms(
    b: GraphBuilder, nodes: list, image: str, box_format: str | None
) -> DetectionHeads:
    """The heads a NonMaxSuppression reads, where it reads them directly (see `find_heads`)."""
    suppressions = suppression_nodes(b.graph)
    if not suppressions:
        raise AugmentError(
            "found no detection outputs: expected class scores [N, A, C] and boxes [N, A, 4] "
            "(or one YOLO output [N, 4 + C, A]); name them with the output and boxes options"
        )
    selecting: list[str] = []
    if len(suppressions) == 1 and suppressions[0] in nodes:
        nms = suppressions[0]
        boxes, scores = nms.input[0], nms.input[1]
        selecting = sorted({
            f"{n.op_type} {n.name!r}" for n in path_nodes(nodes, image, {boxes, scores})
            if n.op_type in _SELECTING
        })
        # NMS itself needs boxes [B, A, 4] and scores [B, C, A] with the same A
        box_rank, score_rank = len(b.static_shape(boxes) or ()), len(b.static_shape(scores) or ())
        if (not selecting and box_rank == score_rank == 3
                and boxes in descendants(nodes, {image})):
            centre = any(a.name == "center_point_box" and a.i == 1 for a in nms.attribute)
            return _view(b, scores, boxes, "nca", "cxcywh" if centre else box_format or "xyxy")
    raise post_processed(suppressions, selecting)


def post_processed(suppressions: Sequence, selecting: Sequence[str] = ()) -> AugmentError:
    """The refusal of a detector whose NMS cannot be cut off: it names the nodes and says to
    export the raw head."""
    names = ", ".join(f"{n.name!r}" for n in suppressions)
    return AugmentError(
        f"the detection is post-processed by {_NMS} node(s) {names}, which are not "
        "differentiable, and the pre-NMS heads cannot be cut out (the boxes and scores it "
        "reads are selected per image after the heads"
        + (f": {', '.join(selecting[:3])}" if selecting else "") + "): export "
        "the raw head instead, class scores [N, A, C] and decoded boxes [N, A, 4] before any "
        "post-processing (docs/DETECTION.md shows a torchvision wrapper)"
    )


def refuse_unexplainable(model, error: AugmentError) -> AugmentError:
    """`error` (the image input refused), or the NMS refusal where the graph has NMS: a whole
    torchvision detector takes a list of [3, H, W] images and post-processes per image."""
    suppressions = suppression_nodes(model.graph)
    return post_processed(suppressions) if suppressions else error


def suppression_nodes(graph) -> list:
    """The NonMaxSuppression nodes of `graph` and of its subgraphs (If and Loop bodies, where
    torchvision's batched NMS sits behind an "any boxes?" test)."""
    found = []
    for node in graph.node:
        if node.op_type == _NMS:
            found.append(node)
        for subgraph in subgraphs(node):
            found.extend(suppression_nodes(subgraph))
    return found


def _view(
    b: GraphBuilder, scores: str, boxes: str, detection_format: str | None, box_format: str
) -> DetectionHeads:
    score_shape, box_shape = b.static_shape(scores), b.static_shape(boxes)
    if score_shape is None or len(score_shape) != 3:
        raise AugmentError(f"the detection scores {scores!r} must be [N, A, C] or [N, C, A]")
    if box_shape is None or len(box_shape) not in (3, 4) or box_shape[-1] not in (4, None):
        raise AugmentError(f"the detection boxes {boxes!r} must be [N, A, 4] or [N, A, C, 4]")
    anchors = box_shape[1]
    layout = detection_format
    if layout is None:
        matches = [f for f, axis in (("nac", 1), ("nca", 2))  # an axis known to differ is C
                   if score_shape[axis] == anchors or not isinstance(score_shape[axis], int)]
        if len(matches) != 1:
            raise AugmentError(
                f"cannot tell whether the scores {scores!r} {_shape(score_shape)} are [N, A, C] "
                f"or [N, C, A] for boxes {_shape(box_shape)}; give the detection format "
                "('nac' or 'nca')"
            )
        layout = matches[0]
    elif layout == "yolo":
        raise AugmentError("detection format 'yolo' reads one output; do not name boxes")
    view = scores if layout == "nac" else b.op("Transpose", [scores], perm=[0, 2, 1])
    box_view = boxes if box_format == "xyxy" else _corners(b, boxes, len(box_shape))
    _know_types(b)
    return DetectionHeads(view, box_view, (scores, boxes), len(box_shape) == 4,
                          f"scores {scores!r} ({layout}), boxes {boxes!r} ({box_format})")


def _yolo_view(b: GraphBuilder, output: str, box_format: str | None) -> DetectionHeads:
    """An Ultralytics head [N, 4 + C, A] as scores [N, A, C] and boxes [N, A, 4] (xyxy)."""
    if b.rank(output) != 3:
        raise AugmentError(f"a YOLO output must be [N, 4 + C, A]; {output!r} is not rank 3")
    rows = b.op("Transpose", [output], perm=[0, 2, 1])  # [N, A, 4 + C]
    raw = b.op("Slice", [rows, b.ints([0]), b.ints([4]), b.ints([2])])
    scores = b.op("Slice", [rows, b.ints([4]), b.ints([2**62]), b.ints([2])])
    boxes = raw if box_format == "xyxy" else _corners(b, raw, 3)
    _know_types(b)
    return DetectionHeads(scores, boxes, (output,), False,
                          f"YOLO output {output!r} ({box_format or 'cxcywh'})")


def _know_types(b: GraphBuilder) -> None:
    """Shape inference over the views just appended, so that the walker's broadcasting rules
    know their ranks as they know the forward graph's."""
    inferred = infer_shapes(b.model)
    for value in inferred.graph.value_info:
        b.types.setdefault(value.name, value.type)


def _corners(b: GraphBuilder, boxes: str, rank: int) -> str:
    """cx, cy, w, h along the last axis of boxes of `rank` to x1, y1, x2, y2."""
    axis = rank - 1
    centre = b.op("Slice", [boxes, b.ints([0]), b.ints([2]), b.ints([axis])])
    half = b.op("Mul", [b.op("Slice", [boxes, b.ints([2]), b.ints([4]), b.ints([axis])]),
                        b.op("CastLike", [b.const(0.5), boxes])])
    return b.op("Concat", [b.op("Sub", [centre, half]), b.op("Add", [centre, half])], axis=axis)


@dataclass(frozen=True)
class DetectionSeeds:
    """d score / d heads, keyed by the heads' tensors, and what each row explains."""

    seeds: dict[str, str]
    explained: str  # INT64 [N]: the anchor, -1 where no anchor qualifies
    resolved_class: str  # INT64 [N]
    score: str  # [N]: the class score of the explained detection
    box: str  # [N, 4]
    iou: str  # [N]


def detection_seeds(
    b: GraphBuilder,
    heads: DetectionHeads,
    target_class: str,
    detection_index: str,
    reference_box: str,
    iou_threshold: float,
    background_class: int | None = None,
) -> DetectionSeeds:
    """The seeds of score = scores[n, a, c] + IoU(boxes[n, a(, c)], reference[n]) for each
    row's detection (a, c), chosen as the module docstring says. `background_class` (a
    two-stage head's "no object" class) is never explained: ranks (-r) and the choice by box
    pass over it, and a row asking for it explains nothing (``explained_detection`` -1).
    Half-precision heads are read in float32, as the backward pass runs
    (`GraphBuilder.computed`)."""
    scores, boxes = b.computed(heads.scores), b.computed(heads.boxes)
    dtype = b.compute_type(heads.scores)
    cast = (lambda t: t) if dtype == TensorProto.FLOAT else (
        lambda t: b.op("Cast", [t], to=dtype))
    onehot_values = b.op("Cast", [b.const([0.0, 1.0])], to=dtype)
    anchors, classes = b.shape_slice(scores, 1, 2), b.shape_slice(scores, 2, 3)
    reference = cast(reference_box)
    ranking = scores  # what classes are ranked by: the scores, background below every class
    if background_class is not None:
        indices = b.op("Range", [b.const(0, np.int64), b.squeeze(classes, [0]),
                                 b.const(1, np.int64)])  # [C]
        is_background = b.op("Equal", [indices, b.const(background_class, np.int64)])
        lowest = b.op("Sub", [b.reduce("ReduceMin", scores, [2], keepdims=True),
                              b.op("CastLike", [b.const(1.0), scores])])
        ranking = b.op("Where", [is_background, lowest, scores])

    # the class each anchor is judged by: the given one, or the anchor's best (-r in box mode)
    given = b.op("Less", [target_class, b.ints([0])])
    best = b.op("ArgMax", [ranking], axis=2, keepdims=0)  # [N, A]
    anchor_class = b.op("Where", [b.unsqueeze(given, [1]), best,
                                  b.unsqueeze(b.op("Max", [target_class, b.ints([0])]), [1])])
    class_mask = b.op("OneHot", [anchor_class, classes, onehot_values], axis=-1)  # [N, A, C]
    anchor_scores = b.reduce("ReduceSum", b.op("Mul", [scores, class_mask]), [2], keepdims=False)
    anchor_boxes = boxes
    if heads.per_class_boxes:
        anchor_boxes = b.reduce("ReduceSum", b.op("Mul", [boxes, b.unsqueeze(class_mask, [3])]),
                                [2], keepdims=False)
    ious = _iou(b, anchor_boxes, b.unsqueeze(reference, [1]))  # [N, A]
    threshold = b.op("CastLike", [b.const(iou_threshold), ious])
    # a box without area (a two-stage head's padding rows, [0, 0, 0, 0]) never qualifies,
    # whatever the threshold
    qualifies = b.op("And", [b.op("GreaterOrEqual", [ious, threshold]),
                             _has_area(b, anchor_boxes)])
    # the scores of the anchors that qualify as they are (exact ties resolved as ArgMax does),
    # the others below every score
    below = b.op("Sub", [b.reduce("ReduceMin", anchor_scores, [1], keepdims=True),
                         b.op("CastLike", [b.const(1.0), anchor_scores])])
    ranked = b.op("Where", [qualifies, anchor_scores, below])
    by_box = b.op("ArgMax", [ranked], axis=1, keepdims=0)  # [N]
    overlapping = b.reduce("ReduceMax", b.op("Cast", [qualifies], to=dtype), [1], keepdims=False)
    any_overlap = b.op("Greater", [overlapping, b.op("CastLike", [b.const(0.0), overlapping])])
    by_index = b.op("GreaterOrEqual", [detection_index, b.ints([0])])
    anchor = b.op("Where", [by_index, detection_index, by_box])
    valid = b.op("And", [b.op("Or", [by_index, any_overlap]), b.op("Less", [anchor, anchors])])
    # by index: an anchor whose boxes have no area for any class (padding) explains nothing
    boxed = _has_area(b, boxes)  # [N, A] or [N, A, C]
    if heads.per_class_boxes:
        boxed = b.reduce("ReduceMax", b.op("Cast", [boxed], to=dtype), [2], keepdims=False)
    else:
        boxed = b.op("Cast", [boxed], to=dtype)
    anchor_boxed = b.reduce("ReduceSum", b.op("Mul", [
        b.op("OneHot", [anchor, anchors, onehot_values], axis=-1), boxed]), [1], keepdims=False)
    valid = b.op("And", [valid, b.op("Greater", [anchor_boxed, b.op("CastLike", [
        b.const(0.0), anchor_boxed])])])
    if background_class is not None:
        valid = b.op("And", [valid, b.op("Not", [b.op("Equal", [
            target_class, b.ints([background_class])])])])
    explained = b.op("Where", [valid, anchor, b.ints([-1])])
    chosen = b.op("Mul", [b.op("OneHot", [anchor, anchors, onehot_values], axis=-1),
                          b.unsqueeze(b.op("Cast", [valid], to=dtype), [1])])  # [N, A]
    row = b.reduce("ReduceSum", b.op("Mul", [scores, b.unsqueeze(chosen, [2])]), [1],
                   keepdims=False)  # [N, C]
    ranked_row = b.reduce("ReduceSum", b.op("Mul", [ranking, b.unsqueeze(chosen, [2])]), [1],
                          keepdims=False)
    resolved = _resolved_class(b, ranked_row, target_class, given, by_index)
    if background_class is not None:  # a rank -r past every object class reaches it
        keep = b.op("Not", [b.op("Equal", [resolved, b.ints([background_class])])])
        explained = b.op("Where", [keep, explained, b.ints([-1])])
        chosen = b.op("Mul", [chosen, b.unsqueeze(b.op("Cast", [keep], to=dtype), [1])])
    class_onehot = b.op("OneHot", [resolved, classes, onehot_values], axis=-1)  # [N, C]
    score = b.reduce("ReduceSum", b.op("Mul", [row, class_onehot]), [1], keepdims=False)
    box_weights = b.unsqueeze(chosen, [2])  # [N, A, 1]
    if heads.per_class_boxes:
        box_weights = b.unsqueeze(b.op("Mul", [b.unsqueeze(chosen, [2]),
                                               b.unsqueeze(class_onehot, [1])]), [3])
        box = b.reduce("ReduceSum", b.op("Mul", [boxes, box_weights]), [1, 2], keepdims=False)
    else:
        box = b.reduce("ReduceSum", b.op("Mul", [boxes, box_weights]), [1], keepdims=False)
    iou = _iou(b, box, reference)
    has_reference = _has_area(b, reference)
    iou = b.op("Where", [has_reference, iou, b.op("CastLike", [b.const(0.0), iou])])
    iou_gradient = b.op("Mul", [_iou_gradient(b, box, reference),
                                b.unsqueeze(b.op("Cast", [has_reference], to=dtype), [1])])
    box_seed = b.op("Mul", [box_weights, b.unsqueeze(iou_gradient, [1, 2] if heads.per_class_boxes
                                                     else [1])])
    score_seed = b.op("Mul", [b.unsqueeze(chosen, [2]), b.unsqueeze(class_onehot, [1])])
    return DetectionSeeds({heads.scores: score_seed, heads.boxes: box_seed}, explained,
                          resolved, score, box, iou)


def _resolved_class(
    b: GraphBuilder, row: str, target_class: str, negative: str, by_index: str
) -> str:
    """The class explained at the chosen anchor: c, or the r-th of the anchor's classes; by
    box, -r counts as -1 (the best class, as the anchor was chosen by)."""
    rank = b.op("Where", [by_index, target_class, b.op("Where", [negative, b.ints([-1]),
                                                                 target_class])])
    depth = b.op("Max", [b.op("Neg", [rank]), b.ints([1])])
    deepest = b.op("Reshape", [b.op("ReduceMax", [depth], keepdims=1), b.ints([1])])
    _, top = b.op_multi("TopK", [row, deepest], 2, axis=1)
    ranked = b.squeeze(b.op("GatherElements", [top, b.unsqueeze(
        b.op("Sub", [depth, b.ints([1])]), [1])], axis=1), [1])
    return b.op("Where", [negative, ranked, target_class])


def _coordinates(b: GraphBuilder, boxes: str, axis: int) -> list[str]:
    """The four coordinates of boxes [..., 4] along `axis` (the last), each [..., 1]."""
    return b.op_multi("Split", [boxes, b.ints([1, 1, 1, 1])], 4, axis=axis)


def _iou(b: GraphBuilder, boxes: str, reference: str) -> str:
    """IoU of boxes [..., 4] with reference [..., 4] (broadcast), the last axis dropped."""
    x1, y1, x2, y2 = _coordinates(b, boxes, -1)
    r1, s1, r2, s2 = _coordinates(b, reference, -1)
    zero = b.op("CastLike", [b.const(0.0), boxes])
    width = b.op("Max", [b.op("Sub", [b.op("Min", [x2, r2]), b.op("Max", [x1, r1])]), zero])
    height = b.op("Max", [b.op("Sub", [b.op("Min", [y2, s2]), b.op("Max", [y1, s1])]), zero])
    inter = b.op("Mul", [width, height])
    area = b.op("Mul", [b.op("Sub", [x2, x1]), b.op("Sub", [y2, y1])])
    reference_area = b.op("Mul", [b.op("Sub", [r2, r1]), b.op("Sub", [s2, s1])])
    union = b.op("Sub", [b.op("Add", [area, reference_area]), inter])
    safe = b.op("Max", [union, b.op("CastLike", [b.const(1e-12), boxes])])
    return b.squeeze(b.op("Div", [inter, safe]), [-1])


def _iou_gradient(b: GraphBuilder, box: str, reference: str) -> str:
    """d IoU / d box [N, 4] for box, reference [N, 4]: with I the clamped intersection, U the
    union and S the box's area, d IoU = dI (1/U + I/U^2) - (I/U^2) dS."""
    x1, y1, x2, y2 = _coordinates(b, box, 1)
    r1, s1, r2, s2 = _coordinates(b, reference, 1)
    zero = b.op("CastLike", [b.const(0.0), box])
    width = b.op("Sub", [b.op("Min", [x2, r2]), b.op("Max", [x1, r1])])
    height = b.op("Sub", [b.op("Min", [y2, s2]), b.op("Max", [y1, s1])])
    overlap = b.op("Cast", [b.op("And", [b.op("Greater", [width, zero]),
                                         b.op("Greater", [height, zero])])],
                   to=b.elem_type(box))
    width, height = b.op("Max", [width, zero]), b.op("Max", [height, zero])
    inter = b.op("Mul", [width, height])
    box_width, box_height = b.op("Sub", [x2, x1]), b.op("Sub", [y2, y1])
    union = b.op("Sub", [b.op("Add", [b.op("Mul", [box_width, box_height]), b.op(
        "Mul", [b.op("Sub", [r2, r1]), b.op("Sub", [s2, s1])])]), inter])
    union = b.op("Max", [union, b.op("CastLike", [b.const(1e-12), box])])

    def where(condition: str, value: str) -> str:
        return b.op("Mul", [b.op("Cast", [condition], to=b.elem_type(box)), value])

    d_inter = [  # d I / d (x1, y1, x2, y2): an edge inside the reference moves the overlap
        b.op("Neg", [where(b.op("Greater", [x1, r1]), height)]),
        b.op("Neg", [where(b.op("Greater", [y1, s1]), width)]),
        where(b.op("Less", [x2, r2]), height),
        where(b.op("Less", [y2, s2]), width),
    ]
    d_area = [b.op("Neg", [box_height]), b.op("Neg", [box_width]), box_height, box_width]
    ratio = b.op("Div", [inter, b.op("Mul", [union, union])])
    inter_weight = b.op("Add", [b.op("Reciprocal", [union]), ratio])
    parts = [
        b.op("Sub", [b.op("Mul", [b.op("Mul", [di, overlap]), inter_weight]),
                     b.op("Mul", [ratio, da])])
        for di, da in zip(d_inter, d_area)
    ]
    return b.op("Concat", parts, axis=1)


def _has_area(b: GraphBuilder, boxes: str) -> str:
    """BOOL [...]: whether each box [..., 4] has x2 > x1 and y2 > y1."""
    x1, y1, x2, y2 = _coordinates(b, boxes, -1)
    return b.squeeze(b.op("And", [b.op("Greater", [x2, x1]), b.op("Greater", [y2, y1])]), [-1])


def detection_target_layer(b: GraphBuilder, heads: DetectionHeads, image: str) -> str:
    """The default layer of a detector: the last 4-D map (graph order, spatial size above
    1 x 1 where known) that every path from the image to the heads goes through, the end of
    the shared backbone in front of the multi-scale features (SSD's last common feature map,
    a ResNet-FPN's first level). pytorch-grad-cam's detection tutorials target the backbone.
    A map only rearranged into the heads (a shared head conv's output, read by Reshape or
    Slice alone) holds scores and box codes, not features, and is passed over."""
    nodes = list(b.graph.node)
    ends = set(heads.sources)
    on_path = descendants(nodes, {image}) & ancestors(nodes, ends)
    pending: dict[str, int] = {}
    for node in nodes:
        for name in set(node.input):
            if name in on_path and any(o in on_path for o in node.output):
                pending[name] = pending.get(name, 0) + 1
    live = {image}
    found = None
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in set(node.input):
            consumers.setdefault(name, []).append(node)
    for node in nodes:
        outputs = [o for o in node.output if o in on_path]
        if not outputs:
            continue
        for name in set(node.input):
            if name in pending:
                pending[name] -= 1
                if pending[name] == 0:
                    live.discard(name)
        if any(o in ends for o in outputs):
            break  # a head is out: no later tensor lies on every path to it
        live.update(o for o in outputs if pending.get(o, 0) > 0)
        if (len(live) == 1 and outputs[0] in live and _is_feature_map(b, outputs[0])
                and not all(n.op_type in _REARRANGING for n in consumers.get(outputs[0], []))):
            found = outputs[0]
    if found is None:
        raise AugmentError("could not detect a detector's target layer (no feature map that "
                           "every head reads); name one with the layer option")
    return found


def _is_feature_map(b: GraphBuilder, tensor: str) -> bool:
    shape = b.static_shape(tensor)
    if shape is None or len(shape) != 4 or b.elem_type(tensor) not in FLOAT_TYPES:
        return False
    return not (isinstance(shape[2], int) and isinstance(shape[3], int)
                and shape[2] * shape[3] <= 1)




def _listed(b: GraphBuilder, names: Sequence[str]) -> str:
    return ", ".join(f"{n!r} {_shape(b.static_shape(n) or ())}" for n in names)


def _shape(shape: Sequence) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
