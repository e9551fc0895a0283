"""Validation as pure functions: what a request sends, checked against the model and the
resolved graph, turned into the typed `Feeds` one run takes. Nothing here touches a session,
a batcher or the event loop; every function raises `InvalidInput` naming what was wrong (and,
where one part of the request is wrong, its field).

Every check runs once per request: both APIs resolve their request at the edge (`request.py`)
and call `feeds` once, in a worker thread (a mask or a tensor can be tens of MiB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .arrow import float_pixels
from .detections import check_detection
from .errors import InvalidInput
from .model import Graph, ServedModel

MAX_IMAGES_PER_REQUEST = 64


@dataclass
class Feeds:
    """One request's rows, as the graph takes them: images [N, ...] and, explaining, the
    score's inputs per row."""

    x: np.ndarray
    target_class: np.ndarray | None = None  # INT64 [N]
    reference: np.ndarray | None = None  # score "similarity": FP32 [N, D]
    mask: np.ndarray | None = None  # score "region": FP32 [N, H, W] at the images' pixels
    others: dict[str, np.ndarray] = field(default_factory=dict)  # the model's other inputs
    # score "detection": (detection_index INT64 [N], reference_box FP32 [N, 4] in the graph's
    # input pixels), `detections.check_detection`
    detection: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def rows(self) -> int:
        return len(self.x)


def feeds(
    model: ServedModel, graph: Graph | None, x: np.ndarray, *,
    target_class: np.ndarray | None = None, reference: np.ndarray | None = None,
    mask: np.ndarray | None = None, others: dict[str, np.ndarray] | None = None,
    detection: tuple[np.ndarray | None, np.ndarray | None] | None = None, max_pixels: int,
) -> Feeds:
    """The checked feeds of a batch `x` of preprocessed images: the plain forward graph's
    (`graph` None: only the model's other inputs) or the augmented graph's."""
    checked = check_other_inputs(model, others or {}, len(x))
    if graph is None:
        return Feeds(x, others=checked)
    classes = check_target_class(model, graph, target_class, len(x))
    return Feeds(
        x, classes, check_reference(model, graph, reference, len(x)),
        check_mask(model, graph, mask, x, max_pixels), checked,
        check_detection(model, graph, detection, classes, x),
    )


def check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(
            f"a request may hold at most {MAX_IMAGES_PER_REQUEST} images, got {count}"
        )


def check_tensor(model: ServedModel, x: np.ndarray, what: str, max_pixels: int,
                 field: str | None = None) -> None:
    """The tensor must be float32 [N, ...] matching the graph's input where it is fixed,
    and finite."""
    expected = model.input.shape

    def refuse(message: str) -> InvalidInput:
        return InvalidInput(message, field=field)

    if x.dtype != np.float32:
        raise refuse(f"{what} must be FP32, got {x.dtype}")
    if x.ndim != len(expected):
        raise refuse(
            f"{what} must have rank {len(expected)} {shape_text(expected)}, got shape "
            f"{shape_text(x.shape)}"
        )
    for axis, (want, got) in enumerate(zip(expected, x.shape)):
        if axis == 0:
            continue
        if (want > 0 and got != want) or got == 0:
            raise refuse(
                f"{what} has shape {shape_text(x.shape)}; the model expects {shape_text(expected)}"
            )
    check_count(x.shape[0])
    if x.shape[0] == 0:
        raise refuse(f"{what} holds no image (batch dimension 0)")
    if x.size // x.shape[0] > 4 * max_pixels:  # a few channels of the pixel limit
        raise refuse(
            f"{what} holds {x.size // x.shape[0]} values per image, over the limit of "
            f"{4 * max_pixels}"
        )
    if not np.isfinite(x).all():
        raise refuse(f"{what} contains NaN or Inf values")


def check_target_class(
    model: ServedModel, graph: Graph, target_class: np.ndarray | None, rows: int
) -> np.ndarray:
    """INT64 [N]: c in [0, classes) explains class c, -1 the top-1 class (-r the r-th).
    [N, 1] is taken too: Triton declares a batched scalar so, and its clients send it.
    A detector's classes are the pre-NMS scores' (unchecked where the graph leaves them
    free)."""
    classes = model.output_shapes[graph.output][0]
    if graph.score == "detection":
        classes = model.num_classes if model.num_classes > 0 else np.iinfo(np.int64).max
    if target_class is None:
        return np.full(rows, -1, dtype=np.int64)
    target_class = np.asarray(target_class)
    if target_class.dtype != np.int64:
        raise InvalidInput(f"target_class must be INT64, got {target_class.dtype}",
                           field="target_class")
    if target_class.shape == (rows, 1):
        target_class = target_class.reshape(rows)
    if target_class.shape != (rows,):
        raise InvalidInput(
            f"target_class must have shape [{rows}] or [{rows}, 1] (one per image), "
            f"got {shape_text(target_class.shape)}", field="target_class"
        )
    bad = (target_class >= classes) | (target_class < -classes)
    if bad.any():
        raise InvalidInput(
            f"target_class {int(target_class[bad][0])} is out of range: the model has "
            f"{classes} classes (0..{classes - 1}, or -r for each image's r-th "
            "highest-scoring class, -1 the top one)", field="target_class"
        )
    background = model.background_class if graph.score == "detection" else None
    if background is not None and (target_class == background).any():
        raise InvalidInput(
            f"target_class {background} is the detector's background class, which is not "
            "explained; give an object class, or -1 for the best one", field="target_class"
        )
    return target_class


def check_reference(
    model: ServedModel, graph: Graph, reference: np.ndarray | None, rows: int
) -> np.ndarray | None:
    """The reference embedding, as FP32 [rows, D]: given exactly when the score is
    "similarity"; a single [D] vector serves every image."""
    what = "reference_embedding"
    if graph.score != "similarity":
        if reference is not None:
            raise InvalidInput("a reference embedding is only used with score 'similarity'",
                               field=what)
        return None
    if reference is None:
        raise InvalidInput("score 'similarity' needs a reference embedding", field=what)
    reference = np.asarray(reference)
    if reference.dtype != np.float32 or reference.ndim not in (1, 2) or reference.size == 0:
        raise InvalidInput(
            f"the reference embedding must be FP32 [D] or [N, D], got {reference.dtype} "
            f"{shape_text(reference.shape)}", field=what
        )
    width = model.output_shapes[graph.output][-1]
    if width > 0 and reference.shape[-1] != width:
        raise InvalidInput(
            f"the reference embedding has {reference.shape[-1]} values per image; the "
            f"model's embedding has {width}", field=what
        )
    if reference.ndim == 1:
        reference = np.broadcast_to(reference, (rows, len(reference)))
    if len(reference) != rows:
        raise InvalidInput(f"the reference embedding has {len(reference)} rows for {rows} images",
                           field=what)
    if not np.isfinite(reference).all():
        raise InvalidInput("the reference embedding contains NaN or Inf values", field=what)
    return np.ascontiguousarray(reference)


def check_mask(
    model: ServedModel, graph: Graph, mask: np.ndarray | None, x: np.ndarray, max_pixels: int
) -> np.ndarray | None:
    """The region of the "region" score for the images `x`, as FP32 [N, H, W] at their
    pixel size (the graph resizes it to the output's): a given [h, w] (every image) or
    [N, h, w] mask of any size is resized to it (nearest pixel: a region stays a set of
    pixels); none means each class's predicted region (all -1)."""
    what = "target_mask"
    if graph.score != "region":
        if mask is not None:
            raise InvalidInput("a target mask is only used with score 'region'", field=what)
        return None
    rows, size = len(x), pixel_size(model, x)
    if mask is None:
        return np.full((rows, *size), -1.0, dtype=np.float32)
    mask = np.asarray(mask)
    if mask.dtype != np.float32 or mask.ndim not in (2, 3) or 0 in mask.shape:
        raise InvalidInput(
            f"the target mask must be FP32 [h, w] or [N, h, w], got {mask.dtype} "
            f"{shape_text(mask.shape)}", field=what
        )
    if mask.ndim == 3 and len(mask) != rows:
        raise InvalidInput(f"the target mask has {len(mask)} rows for {rows} images", field=what)
    if mask.shape[-2] * mask.shape[-1] > max_pixels:
        raise InvalidInput(f"the target mask is over the limit of {max_pixels} pixels",
                           field=what)
    if not np.isfinite(mask).all():
        raise InvalidInput("the target mask contains NaN or Inf values", field=what)
    rows_of = mask if mask.ndim == 3 else [mask] * rows
    return np.stack([resize(m, size[::-1], Image.NEAREST) for m in rows_of])


def check_other_inputs(
    model: ServedModel, others: dict[str, np.ndarray], rows: int
) -> dict[str, np.ndarray]:
    """The model's inputs besides the image: each one given, [rows, ...] of its dtype."""
    names = [i.name for i in model.other_inputs]
    unknown = sorted(set(others) - set(names))
    if unknown:
        raise InvalidInput(
            f"unknown input {unknown[0]!r}; the model's inputs besides the image: "
            f"{', '.join(names) or 'none'}", field=f"inputs[{unknown[0]}]"
        )
    missing = [i.name for i in model.other_inputs if i.name not in others]
    if missing:
        raise InvalidInput(f"the model also needs the input(s) {', '.join(missing)}",
                           field=f"inputs[{missing[0]}]")
    checked = {}
    for info in model.other_inputs:
        value = np.asarray(others[info.name])
        if value.dtype != info.dtype:
            raise InvalidInput(f"input {info.name!r} must be {info.dtype}, got {value.dtype}",
                               field=f"inputs[{info.name}]")
        fixed = all(w < 0 or w == g for w, g in zip(info.shape[1:], value.shape[1:]))
        if value.ndim != len(info.shape) or len(value) != rows or not fixed:
            raise InvalidInput(
                f"input {info.name!r} has shape {shape_text(value.shape)}; the model expects "
                f"{shape_text(info.shape)} with {rows} rows", field=f"inputs[{info.name}]"
            )
        checked[info.name] = value
    return checked


def pixel_size(model: ServedModel, x: np.ndarray) -> tuple[int, int]:
    """(H, W) of a batch of preprocessed images."""
    return x.shape[1:3] if model.config.preprocessing.layout == "NHWC" else x.shape[2:4]


def image_tensor_size(model: ServedModel, image: np.ndarray) -> tuple[int, int]:
    """(width, height) of one preprocessed image ([C, H, W] or [H, W, C])."""
    height, width = pixel_size(model, image[None])
    return width, height


def resize(values: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR,
           out: np.ndarray | None = None) -> np.ndarray:
    """Resize of a float [h, w] array to (width, height) (Pillow's filters), into `out` where
    given."""
    if values.shape[::-1] == tuple(size):
        values = values.astype(np.float32, copy=False)
        if out is None:
            return values
        np.copyto(out, values)
        return out
    resized = Image.fromarray(values.astype(np.float32, copy=False)).resize(size, resample)
    return float_pixels(resized, out)


def shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
