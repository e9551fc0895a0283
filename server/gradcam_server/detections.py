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

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .augment.cam import PIXEL_METHODS
from .augment.passes import NAMES
from .errors import InvalidInput

if TYPE_CHECKING:  # the service imports this module
    from .model import Explaining, ServedModel
    from .service import Explained, GradCamService, HeatmapSize

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


async def explain_detections(
    service: GradCamService,
    model: ServedModel,
    images: Sequence[bytes | np.ndarray],
    detections: Sequence[Sequence[DetectionRequest]],
    *,
    request: Explaining,
    num_channels: int,
    heatmap_size: HeatmapSize,
    extra_bytes_per_pixel: int = 0,
    deadline: float | None = None,
) -> Explained:
    """The typed API's detector path: one map per detection of each image (`detections`: one
    list per image, or one list for every image), in request order; images of one shape
    share a batch, each image's row repeated once per detection."""
    from .service import (
        ClassMap, Explained, ImageExplanation, _check_count, image_tensor_size, resize_heatmap,
    )

    _check_count(len(images))
    request = model.resolve(request)
    if request.score != "detection":
        raise InvalidInput(f"detections are explained with score 'detection', not "
                           f"{request.score!r}")
    if len(detections) == 1 and len(images) > 1:
        detections = list(detections) * len(images)
    if len(detections) != len(images):
        raise InvalidInput(f"{len(detections)} lists of detections for {len(images)} images "
                           "(give one per image, or one for all)")
    for number, wanted in enumerate(detections):
        if not 1 <= len(wanted) <= MAX_DETECTIONS_PER_IMAGE:
            raise InvalidInput(f"image {number}: give 1..{MAX_DETECTIONS_PER_IMAGE} detections "
                               f"to explain, got {len(wanted)}")
    most = max(len(wanted) for wanted in detections)

    tensor_sizes = [image_tensor_size(model, image) for image in images
                    if not isinstance(image, bytes) and image.ndim == 3]

    def check_sizes(encoded_sizes: list[tuple[int, int]]) -> None:
        """The response's bound, before any image is decoded (as `GradCamService.explain`)."""
        service.check_heatmap_response(
            model, [*encoded_sizes, *tensor_sizes], heatmap_size, most, extra_bytes_per_pixel,
            pixel_channels=model.channels if request.method in PIXEL_METHODS else 0,
        )

    started = asyncio.get_running_loop().time()
    tensors, sizes = await service._prepare_mixed(model, images, check_sizes)
    preprocess_seconds = asyncio.get_running_loop().time() - started
    rows = []  # (image, detection number, index, model box, class)
    groups: dict[tuple, list[int]] = {}

    def batches() -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Each shape group's (images, classes, indices, boxes), each image's row repeated
        per detection; run in a worker thread (the stacks copy whole images)."""
        for number, (wanted, size) in enumerate(zip(detections, sizes)):
            graph_size = image_tensor_size(model, tensors[number])
            for position, detection in enumerate(wanted):
                what = f"image {number}, detection {position}"
                if detection.index is None and detection.box is None:
                    raise InvalidInput(f"{what}: give a box index or a box (and a class)")
                if detection.index is not None and detection.index < 0:
                    raise InvalidInput(f"{what}: box index {detection.index} is negative")
                box = np.zeros(4, np.float32)
                if detection.box is not None:
                    check_box(detection.box, size, what)
                    box = to_model_pixels(detection.box, size, graph_size)
                category = -1 if detection.class_index is None else detection.class_index
                rows.append((number, position,
                             -1 if detection.index is None else detection.index, box, category))
        for row, (number, *_) in enumerate(rows):
            groups.setdefault(tensors[number].shape, []).append(row)
        return [(np.stack([tensors[rows[r][0]] for r in members]),
                 np.array([rows[r][4] for r in members], np.int64),
                 np.array([rows[r][2] for r in members], np.int64),
                 np.stack([rows[r][3] for r in members]))
                for members in groups.values()]

    calls = [
        service.run(model, x, explain=request, target_class=classes,
                    detection=(indices, boxes), deadline=deadline)
        for x, classes, indices, boxes in await asyncio.to_thread(batches)
    ]
    results = await asyncio.gather(*calls)

    def explanations() -> tuple[ImageExplanation, ...]:
        maps: list[list] = [[None] * len(wanted) for wanted in detections]
        for members, result in zip(groups.values(), results):
            outputs = result.outputs
            _refuse_group(outputs, rows, members, detections, request.iou_threshold)
            weights = outputs[NAMES.gradients].mean(axis=(2, 3))
            pixel_maps = outputs.get(NAMES.pixel_map)  # the pixel-level methods' [N, C, H, W]
            if pixel_maps is not None and model.config.preprocessing.layout == "NHWC":
                pixel_maps = pixel_maps.transpose(0, 3, 1, 2)
            for k, r in enumerate(members):
                number, position = rows[r][0], rows[r][1]
                graph_size = image_tensor_size(model, tensors[number])
                heatmap = outputs[NAMES.heatmap][k]
                top = np.argsort(-weights[k], kind="stable")[:num_channels]
                category = int(outputs[NAMES.detection_class][k])
                box = to_model_pixels(outputs[NAMES.detection_box][k], graph_size, sizes[number])
                maps[number][position] = ClassMap(
                    class_index=category,
                    label=model.label(category, request.output),
                    heatmap=resize_heatmap(
                        heatmap, heatmap_size.of(sizes[number], heatmap.shape[::-1])
                    ),
                    channels=tuple((int(c), float(weights[k][c])) for c in top),
                    pixel_gradients=None if pixel_maps is None else pixel_maps[k],
                    detection=DetectedBox(
                        int(outputs[NAMES.explained_detection][k]),
                        tuple(float(v) for v in box),
                        float(outputs[NAMES.detection_score][k]),
                        float(outputs[NAMES.detection_iou][k]),
                    ),
                )
        return tuple(ImageExplanation(tuple(image_maps), ()) for image_maps in maps)

    return Explained(
        explanations=await asyncio.to_thread(explanations),
        layer=request.layer,
        method=request.method,
        target=model.explained(request),
        preprocess_seconds=preprocess_seconds,
        queue_seconds=max(r.queue_seconds for r in results),
        inference_seconds=sum(r.run_seconds for r in results),
    )


def _refuse_group(
    outputs: dict, rows: list, members: list[int], detections, threshold: float
) -> None:
    """`refuse_missing` for the rows `members` of one run, naming image and detection."""
    for k, r in enumerate(members):
        if outputs[NAMES.explained_detection][k] >= 0:
            continue
        number, position, index, _, category = rows[r]
        if index >= 0:
            raise InvalidInput(f"image {number}, detection {position}: box index {index} is out "
                               "of range of the model's pre-NMS boxes, or a padding row "
                               "without a box")
        refuse_missing([-1], [category], [detections[number][position].box], threshold,
                       label=f"image {number}, detection {position}")


def _listed(box) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"
