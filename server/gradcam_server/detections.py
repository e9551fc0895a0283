"""Detectors served: one heatmap per explained detection (score "detection", augment's
`detection.py`).

A request names the detections to explain, each as a pre-NMS box index (an anchor of the raw
head), a reference box (x1, y1, x2, y2 in the pixels of the image as sent) with a class, or
both (the index's class score plus the IoU of its box with the reference). A box is refused
unless it has 4 finite coordinates with x1 < x2 and y1 < y2 inside the image; an index
unless it is one of the model's pre-NMS boxes; a detection chosen by box whose class no
anchor overlaps with IoU >= the threshold is refused after the run (`refuse_missing`) rather
than explained on a wrong anchor. The graph sees boxes in its input's pixels: images are
resized whole to the model's size (no crop), so boxes scale by axis (`to_model_pixels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .augment.names import NAMES
from .errors import InvalidInput

if TYPE_CHECKING:  # annotations only
    from .model import Explaining, ServedModel

MAX_DETECTIONS_PER_IMAGE = 20
DETECTION_OUTPUTS = (NAMES.explained_detection, NAMES.detection_class, NAMES.detection_score,
                     NAMES.detection_box, NAMES.detection_iou)


@dataclass(frozen=True)
class DetectionRequest:
    """One detection to explain: `index` (a pre-NMS box), `box` (x1, y1, x2, y2 in the
    image's pixels), or both; `class_index` c, or None / -1: the best class (by index, -r:
    the r-th best class of that box)."""

    index: int | None = None
    box: tuple[float, ...] | None = None
    class_index: int | None = None


@dataclass(frozen=True)
class DetectedBox:
    """The detection a map explains: its pre-NMS index, its box in the image's pixels, its
    class score, and the IoU of its box with the reference box (0 without one)."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    iou: float


def check_box(box: Sequence[float], size: tuple[int, int], what: str) -> None:
    """InvalidInput unless `box` is x1, y1, x2, y2, finite, x1 < x2, y1 < y2, inside an image
    of pixel size `size` ((width, height))."""
    if len(box) != 4:
        raise InvalidInput(f"{what}: a box is 4 numbers x1, y1, x2, y2, got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InvalidInput(f"{what}: the box holds NaN or Inf")
    if not (x1 < x2 and y1 < y2):
        raise InvalidInput(
            f"{what}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] must have x1 < x2 and y1 < y2"
        )
    width, height = size
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise InvalidInput(
            f"{what}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is not inside the image "
            f"({width}x{height} pixels)"
        )


def to_model_pixels(box: Sequence[float], image: tuple[int, int],
                    model: tuple[int, int]) -> np.ndarray:
    """A box in an image of size `image` ((width, height)) in the graph's input pixels
    (`model`, (width, height)): the whole image is resized, so each axis scales."""
    sx, sy = model[0] / image[0], model[1] / image[1]
    return np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], dtype=np.float32)


def check_detection(
    model: ServedModel,
    explain: Explaining | None,
    detection: tuple[np.ndarray, np.ndarray] | None,
    target_class: np.ndarray | None,
    x: np.ndarray,
) -> tuple[np.ndarray, np.ndarray] | None:
    """The "detection" score's (detection_index INT64 [N], reference_box FP32 [N, 4], in the
    graph's input pixels), checked: given exactly when the score is "detection"; an index
    below the model's pre-NMS boxes; a row chosen by box (negative index) has a box and a
    class >= 0 or -1. `target_class` is the checked one (`check_target_class`: [N])."""
    if explain is None or explain.score != "detection":
        if detection is not None:
            raise InvalidInput(f"{NAMES.detection_index} and {NAMES.reference_box} are only "
                               "used with score 'detection'")
        return None
    rows = len(x)
    index, boxes = detection if detection is not None else (None, None)
    index = np.full(rows, -1, np.int64) if index is None else np.asarray(index)
    if index.shape == (rows, 1):  # [N, 1]: a batched scalar as Triton's clients send it
        index = index.reshape(rows)
    boxes = np.zeros((rows, 4), np.float32) if boxes is None else np.asarray(boxes)
    if index.dtype != np.int64 or index.shape != (rows,):
        raise InvalidInput(f"{NAMES.detection_index} must be INT64 [{rows}] or [{rows}, 1] (one "
                           "per image), "
                           f"got {index.dtype} {list(index.shape)}")
    if boxes.dtype != np.float32 or boxes.shape != (rows, 4):
        raise InvalidInput(f"{NAMES.reference_box} must be FP32 [{rows}, 4] (x1, y1, x2, y2 "
                           f"per image), got {boxes.dtype} {list(boxes.shape)}")
    if not np.isfinite(boxes).all():
        raise InvalidInput(f"{NAMES.reference_box} contains NaN or Inf values")
    anchors = model.num_anchors
    if anchors > 0 and (index >= anchors).any():
        raise InvalidInput(
            f"detection index {int(index[index >= anchors][0])} is out of range: the model has "
            f"{anchors} pre-NMS boxes (0..{anchors - 1})"
        )
    given = np.any(boxes != 0, axis=1)
    degenerate = given & ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if degenerate.any():
        box = boxes[degenerate][0]
        raise InvalidInput(f"reference box {_listed(box)} must have x1 < x2 and y1 < y2")
    by_box = index < 0
    if (by_box & ~given).any():
        raise InvalidInput("each detection needs a box index or a reference box (all zero "
                           f"{NAMES.reference_box} rows need a {NAMES.detection_index} >= 0)")
    if target_class is not None and (by_box & (np.asarray(target_class) < -1)).any():
        raise InvalidInput("a detection chosen by box takes a class >= 0, or -1 for any class")
    return index, np.ascontiguousarray(boxes)


def refuse_missing(
    explained: np.ndarray, classes: Sequence[int], boxes: Sequence, threshold: float,
    label: str = "image {row}",
) -> None:
    """InvalidInput for the first row whose detection no anchor matched (explained -1):
    "no detection of class c overlaps box [...] with IoU >= t". `boxes` are the requests'
    (in the pixels the client sent them in), `label` names a row."""
    for row, anchor in enumerate(np.asarray(explained)):
        if anchor >= 0:
            continue
        which = "any class" if classes[row] < 0 else f"class {classes[row]}"
        raise InvalidInput(
            f"{label.format(row=row)}: no detection of {which} overlaps box "
            f"{_listed(boxes[row])} with IoU >= {threshold:g}; nothing is explained rather "
            "than a wrong box (lower iou_threshold, or give a box index)"
        )


def _listed(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"
