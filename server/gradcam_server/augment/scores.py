"""What is explained: the score whose gradient seeds the backward pass, one `ScoreTarget` class
per kind, registered by name in `SCORE_TARGETS` (`SCORES`: the names, in the order shown).

A score target owns the graph inputs it adds beside ``target_class`` (`add_inputs`), the outputs
it can be computed on (its seed refuses another with an AugmentError naming the output) and its
seed, d score / d output, in the output's compute type (float32 for a half-precision output,
`GraphBuilder.computed`). Which methods and options a score combines with is the method's to
say (`methods.CamMethod.check`).

``target_class`` (INT64 [N]) chooses each row's class: c >= 0 explains class c, a negative -r
the r-th highest-scoring class of that row (-1: its top-1 class), decided inside the same run.
A seed is built on the rows the network computes: the image's own, or its copies under
aug_smooth or a path method, to which `rows` maps each per-image input.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from onnx import TensorProto, helper

from .detection import DetectionHeads, DetectionSeeds, detection_seeds
from .errors import AugmentError
from .graph import GraphBuilder
from .names import NAMES

Rows = Callable[[str], str]  # a per-image tensor [N, ...] as the network's rows [T*N, ...]


def same_rows(tensor: str) -> str:
    """The network computes on the image's own rows."""
    return tensor


class ScoreTarget(ABC):
    """A kind of score: its name (the request's ``score``) and the inputs it adds."""

    name: ClassVar[str]

    def add_inputs(self, b: GraphBuilder, batch: int | str | None, output: str) -> None:
        """Declare the score's own graph inputs ([`batch`, ...]; typed and sized after the
        explained `output` where they follow it). None by default."""


class OutputScore(ScoreTarget):
    """A score computed on the one explained output."""

    @abstractmethod
    def seed(
        self, b: GraphBuilder, output: str, target_class: str, rows: Rows = same_rows
    ) -> tuple[str, str | None]:
        """d score / d `output` for each row, and the class each row explains (None for a
        score without a class)."""

    def class_along_path(self, b: GraphBuilder, output: str, target_class: str) -> str:
        """The class a path method explains on every scaled copy of an image: `target_class`
        as given, unless the score resolves ranks on the image's own output."""
        return target_class


class ClassScore(OutputScore):
    """A class's score on class scores [N, classes]; ranks are resolved on the logits."""

    def seed(
        self, b: GraphBuilder, output: str, target_class: str, rows: Rows = same_rows
    ) -> tuple[str, str | None]:
        target_class = rows(target_class)
        if b.rank(output) != 2:
            hint = (" (a segmentation map [N, classes, h, w]: explain it with the region score)"
                    if b.rank(output) == 4 else "")
            raise AugmentError(f"the {self.name} score needs an output [N, classes]; {output!r} "
                               f"has rank {b.rank(output)}{hint}")
        logits = b.computed(output)
        onehot, resolved = _class_onehot(b, logits, target_class, b.elem_type(logits))
        return self.class_seed(b, logits, onehot), resolved

    @abstractmethod
    def class_seed(self, b: GraphBuilder, logits: str, onehot: str) -> str:
        """d score / d logits from the logits and the one-hot [N, classes] of each row's
        class."""

    def class_along_path(self, b: GraphBuilder, output: str, target_class: str) -> str:
        """The classes ranked on the image's own logits, so every copy explains the same."""
        return self.seed(b, output, target_class)[1]


class Logit(ClassScore):
    """score = logits[n, c]."""

    name = "logit"

    def class_seed(self, b: GraphBuilder, logits: str, onehot: str) -> str:
        return onehot


class Probability(ClassScore):
    """score = softmax(logits)[n, c], so d score / d logits = p_c (onehot_c - p)."""

    name = "probability"

    def class_seed(self, b: GraphBuilder, logits: str, onehot: str) -> str:
        probabilities = b.op("Softmax", [logits], axis=1)
        chosen = b.reduce("ReduceSum", b.op("Mul", [probabilities, onehot]), [1], keepdims=True)
        return b.op("Mul", [chosen, b.op("Sub", [onehot, probabilities])])


class FinerDifference(ClassScore):
    """Finer-CAM's score (Zhang et al., CVPR 2025; pytorch-grad-cam's FinerWeightedTarget):
    the class logit against its most similar classes,

        score = sum_j p_j (z_c - alpha z_j) / (sum_j p_j + 1e-9),

    j over the `COMPARISONS` classes other than c whose logits are nearest z_c (|z_j - z_c|
    smallest; fewer where the output has fewer classes), p = softmax(z). As the reference
    differentiates it, the weights p_j are not held constant: with P = sum_j p_j, the mask m of
    the compared classes, d_j = z_c - alpha z_j and N = sum_j p_j d_j,

        dN/dz = p m d - p N + e_c P - alpha p m,   dP/dz = p m - p P,
        d score / dz = dN/dz / (P + 1e-9) - N dP/dz / (P + 1e-9)^2.

    Not a score a request names: the method `finercam` explains it (`methods.FinerCam`)."""

    name = "finer"
    COMPARISONS = 3  # pytorch-grad-cam's default comparison ranks 1, 2, 3
    ALPHA = 1.0
    EPSILON = 1e-9

    def class_seed(self, b: GraphBuilder, logits: str, onehot: str) -> str:
        target = b.reduce("ReduceSum", b.op("Mul", [logits, onehot]), [1], keepdims=True)
        distance = b.op("Abs", [b.op("Sub", [logits, target])])
        distance = b.op("Where", [b.op("Greater", [onehot, b.const(0.0)]),
                                  b.const(float("inf")), distance])  # never c itself
        classes = b.shape_slice(logits, 1, 2)
        count = b.op("Min", [b.ints([self.COMPARISONS]), b.op("Sub", [classes, b.ints([1])])])
        _, nearest = b.op_multi("TopK", [distance, count], 2, axis=1, largest=0)
        values = b.op("Cast", [b.const([0.0, 1.0])], to=b.elem_type(logits))
        compared = b.reduce("ReduceSum", b.op("OneHot", [nearest, classes, values], axis=-1),
                            [1], keepdims=False)  # the mask m [N, classes]
        p = b.op("Softmax", [logits], axis=1)
        pm = b.op("Mul", [p, compared])
        total = b.reduce("ReduceSum", pm, [1], keepdims=True)  # P
        difference = b.op("Sub", [target, b.op("Mul", [logits, b.const(self.ALPHA)])])  # d
        numerator = b.reduce("ReduceSum", b.op("Mul", [pm, difference]), [1], keepdims=True)
        d_numerator = b.op("Add", [
            b.op("Sub", [b.op("Mul", [pm, difference]), b.op("Mul", [p, numerator])]),
            b.op("Sub", [b.op("Mul", [onehot, total]), b.op("Mul", [pm, b.const(self.ALPHA)])]),
        ])
        d_total = b.op("Sub", [pm, b.op("Mul", [p, total])])
        denominator = b.op("Add", [total, b.const(self.EPSILON)])
        return b.op("Sub", [
            b.op("Div", [d_numerator, denominator]),
            b.op("Div", [b.op("Mul", [numerator, d_total]),
                         b.op("Mul", [denominator, denominator])]),
        ])


class Similarity(OutputScore):
    """score = cos(e, r), the cosine similarity of each row's embedding e [N, D] (the output)
    to its reference r [N, D], the added input ``reference_embedding`` (as Gradient Activation
    Maps explain embedding models): d cos / d e = r / (|e| |r|) - cos e / |e|^2. It has no
    class: ``target_class`` is unused."""

    name = "similarity"

    def add_inputs(self, b: GraphBuilder, batch: int | str | None, output: str) -> None:
        """``reference_embedding`` [N, D], D as the output's, in the output's compute type
        (FP32 for a half-precision output too)."""
        width = (b.static_shape(output) or (None, None))[-1]
        b.graph.input.append(helper.make_tensor_value_info(
            NAMES.reference_embedding, b.compute_type(output), [batch, width]
        ))

    def seed(
        self, b: GraphBuilder, output: str, target_class: str, rows: Rows = same_rows
    ) -> tuple[str, str | None]:
        reference = rows(NAMES.reference_embedding)
        if b.rank(output) != 2:
            raise AugmentError(
                f"the embedding output {output!r} must be [N, D]; it has rank {b.rank(output)}"
            )
        embedding = b.computed(output)

        def norm(x: str) -> str:
            squares = b.reduce("ReduceSum", b.op("Mul", [x, x]), [1], keepdims=True)
            return b.op("Add", [b.op("Sqrt", [squares]), b.const(1e-12)])

        embedding_norm, reference_norm = norm(embedding), norm(reference)
        scale = b.op("Mul", [embedding_norm, reference_norm])
        dot = b.reduce("ReduceSum", b.op("Mul", [embedding, reference]), [1], keepdims=True)
        cosine = b.op("Div", [dot, scale])
        toward = b.op("Div", [reference, scale])
        along = b.op("Mul", [cosine, b.op("Div", [embedding,
                                                  b.op("Mul", [embedding_norm, embedding_norm])])])
        return b.op("Sub", [toward, along]), None


class Region(OutputScore):
    """A region of a segmentation output [N, classes, h, w]: score = sum over (i, j) of
    mask[n, i, j] scores[n, c, i, j] (pytorch-grad-cam's SemanticSegmentationTarget), with
    the mask the added input ``target_mask`` [N, h', w'] of any size, resized to h x w first
    (nearest pixel, as PIL's: source (i + 0.5) h' / h, floored). A negative class -r ranks
    the classes by their score summed over the mask. A mask whose values are all negative asks
    for the class's predicted region instead (the pixels whose arg-max class is c, as that
    tutorial builds its mask), and -r then ranks the classes by their predicted area."""

    name = "region"

    def add_inputs(self, b: GraphBuilder, batch: int | str | None, output: str) -> None:
        """``target_mask`` [N, h', w'], of any size, in the scores' compute type (FP32 for a
        half-precision output too)."""
        b.graph.input.append(helper.make_tensor_value_info(
            NAMES.target_mask, b.compute_type(output), [batch, "mask_height", "mask_width"]
        ))

    def seed(
        self, b: GraphBuilder, output: str, target_class: str, rows: Rows = same_rows
    ) -> tuple[str, str | None]:
        target_class, mask = rows(target_class), rows(NAMES.target_mask)
        if b.rank(output) != 4:
            raise AugmentError(
                f"the region score needs a segmentation output [N, classes, h, w]; {output!r} "
                f"has rank {b.rank(output)}"
            )
        scores = b.computed(output)
        dtype = b.elem_type(scores)
        size = b.op("Concat", [b.shape_slice(mask, 0, 1), b.ints([1]),
                               b.shape_slice(scores, 2)], axis=0)
        mask = b.squeeze(b.op("Resize", [b.unsqueeze(mask, [1]), "", "", size], mode="nearest",
                              coordinate_transformation_mode="tf_half_pixel_for_nn",
                              nearest_mode="floor"), [1])
        predicted_class = b.op("ArgMax", [scores], axis=1, keepdims=0)  # [N, h, w]
        values = b.op("Cast", [b.const([0.0, 1.0])], to=dtype)
        classes = b.shape_slice(scores, 1, 2)
        area = b.reduce("ReduceSum", b.op("OneHot", [predicted_class, classes, values], axis=1),
                        [2, 3], keepdims=False)  # [N, classes]
        given = b.unsqueeze(mask, [1])  # [N, 1, h, w]
        pooled = b.reduce("ReduceSum", b.op("Mul", [scores, given]), [2, 3], keepdims=False)
        use_predicted = b.unsqueeze(b.op("Less", [  # [N, 1]: an all-negative mask row
            b.reduce("ReduceMax", mask, [1, 2], keepdims=False),
            b.op("Cast", [b.const(0.0)], to=dtype),
        ]), [1])
        ranking = b.op("Where", [use_predicted, area, pooled])
        onehot, resolved = _class_onehot(b, ranking, target_class, dtype)
        region = b.op("Cast", [b.op("Equal", [predicted_class, b.unsqueeze(resolved, [1, 2])])],
                      to=dtype)
        weights = b.op("Where", [b.unsqueeze(use_predicted, [2, 3]), b.unsqueeze(region, [1]),
                                 given])
        return b.op("Mul", [b.unsqueeze(onehot, [2, 3]), weights]), resolved


class Detection(ScoreTarget):
    """One detection of a detector's raw heads per row (`detection.py`): its class score plus
    the IoU of its box with a reference box, chosen by the added inputs ``detection_index``
    (INT64 [N]: the anchor, or negative to choose by box) and ``reference_box`` (FP32 [N, 4]).
    Its seeds are on both heads, scores and boxes."""

    name = "detection"

    def add_inputs(self, b: GraphBuilder, batch: int | str | None, output: str) -> None:
        b.graph.input.extend([
            helper.make_tensor_value_info(NAMES.detection_index, TensorProto.INT64, [batch]),
            helper.make_tensor_value_info(NAMES.reference_box, TensorProto.FLOAT, [batch, 4]),
        ])

    def seeds(
        self,
        b: GraphBuilder,
        heads: DetectionHeads,
        target_class: str,
        iou_threshold: float,
        background_class: int | None,
    ) -> DetectionSeeds:
        """The seeds on the heads and what each row explains (`detection.detection_seeds`)."""
        return detection_seeds(b, heads, target_class, NAMES.detection_index,
                               NAMES.reference_box, iou_threshold, background_class)


SCORE_TARGETS: dict[str, ScoreTarget] = {
    target.name: target
    for target in (Logit(), Probability(), Similarity(), Region(), Detection())
}
SCORES: tuple[str, ...] = tuple(SCORE_TARGETS)


def _class_onehot(
    b: GraphBuilder, scores: str, target_class: str, dtype: int
) -> tuple[str, str]:
    """The one-hot [N, classes] of each row's class (ranks resolved on `scores` [N, classes]),
    and the classes."""
    resolved = b.op(
        "Where",
        [b.op("Less", [target_class, b.ints([0])]), _ranked_class(b, scores, target_class),
         target_class],
    )
    values = b.op("Cast", [b.const([0.0, 1.0])], to=dtype)
    onehot = b.op("OneHot", [resolved, b.shape_slice(scores, 1, 2), values], axis=-1)
    b.one_hot_rows[onehot] = resolved
    return onehot, resolved


def _ranked_class(b: GraphBuilder, logits: str, target_class: str) -> str:
    """For each row, the class of rank max(-target_class, 1): TopK down to the deepest rank
    any row asks for, then a gather of each row's own rank."""
    rank = b.op("Max", [b.op("Neg", [target_class]), b.ints([1])])
    deepest = b.op("Reshape", [b.op("ReduceMax", [rank], keepdims=1), b.ints([1])])
    _, top_indices = b.op_multi("TopK", [logits, deepest], 2, axis=1)
    position = b.unsqueeze(b.op("Sub", [rank, b.ints([1])]), [1])
    return b.squeeze(b.op("GatherElements", [top_indices, position], axis=1), [1])
