"""From graph outputs to what both APIs return: heatmaps at the requested pixel size,
predictions, channel importances, explained detections, and the response-size bound checked
before anything runs. Pure functions of numpy arrays, run in worker threads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .augment.names import NAMES
from .detections import DetectedBox, to_model_pixels
from .errors import InvalidInput, shown
from .model import Graph, ServedModel
from .upsample import upsample, upsamples
from .validate import image_tensor_size, resize

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's receive and send limit
_RESPONSE_OVERHEAD_BYTES = 1024 * 1024  # what a response holds beside its tensors, at most
MAX_RESPONSE_BYTES = MAX_MESSAGE_BYTES - _RESPONSE_OVERHEAD_BYTES


@dataclass(frozen=True)
class HeatmapSize:
    """The pixel size heatmaps are returned at, as the request parameter ``heatmap_size``
    says: "image" (the default: each image's own size), "model" (the graph's map as it is, at
    the model's input size) or "WIDTHxHEIGHT"."""

    kind: str = "image"  # "image", "model" or "fixed"
    fixed: tuple[int, int] | None = None  # (width, height) of "fixed"

    @classmethod
    def parse(cls, text: str | None, max_pixels: int) -> HeatmapSize:
        if not text or text == "image":
            return cls()
        if text == "model":
            return cls("model")
        match = re.fullmatch(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})", text)
        if match is None:
            raise InvalidInput(
                f"heatmap_size must be 'image', 'model' or WIDTHxHEIGHT (e.g. 224x224), "
                f"got {shown(text)}", field="heatmap_size"
            )
        width, height = int(match[1]), int(match[2])
        if width * height > max_pixels:
            raise InvalidInput(
                f"heatmap_size {width}x{height} is over the limit of {max_pixels} pixels",
                field="heatmap_size",
            )
        return cls("fixed", (width, height))

    def of(self, image: tuple[int, int], model: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the heatmap for an image of pixel size `image` ((width,
        height)) explained by a map of size `model` ((width, height))."""
        if self.kind == "model":
            return model
        return self.fixed if self.kind == "fixed" else image


@dataclass(frozen=True)
class Prediction:
    """A class the model predicts: for a classifier its softmax probability and logit; for a
    segmentation map the share of pixels predicted as the class and its mean score."""

    class_index: int
    label: str
    score: float
    logit: float


@dataclass(frozen=True)
class ClassMap:
    """One heatmap, for one class (or detection), with its channel importances."""

    class_index: int
    label: str
    heatmap: np.ndarray  # float32 [height, width] in [0, 1], at the requested HeatmapSize
    channels: tuple[tuple[int, float], ...]  # (channel, weight), most important first
    # Pixel-level methods only: the signed input gradients [C, H, W] at the model's input size.
    pixel_gradients: np.ndarray | None = None
    detection: DetectedBox | None = None  # score "detection" only: the detection explained
    # Method dff only: each concept's score for the class; the map is the highest's concept.
    concept_scores: tuple[float, ...] = ()


@dataclass(frozen=True)
class ImageExplanation:
    maps: tuple[ClassMap, ...]
    predictions: tuple[Prediction, ...]


@dataclass(frozen=True)
class Explained:
    explanations: tuple[ImageExplanation, ...]
    layer: str | tuple[str, ...]
    method: str
    # What was explained (`ServedModel.explained`): the layout, prefix tokens and grid.
    target: dict[str, str]
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    # The decoded images (None for tensors), where the request asked to keep them (overlays).
    pictures: tuple[Image.Image | None, ...] = ()


# -- the response's bound, before anything runs ----------------------------------------------
def check_response_size(heatmap_pixels: int, other_bytes: int = 0,
                        limit: int = MAX_RESPONSE_BYTES) -> None:
    """InvalidInput when the response would hold more than `limit` bytes: `heatmap_pixels`
    float32 values of heatmaps and `other_bytes` of other data."""
    size = 4 * heatmap_pixels + other_bytes
    if size > limit:
        raise InvalidInput(
            f"the response would hold {size / 2**20:.1f} MiB, over the limit of "
            f"{limit / 2**20:.0f} MiB per response; ask for smaller heatmaps (parameter "
            "heatmap_size 'model' or WIDTHxHEIGHT), fewer classes or fewer images per "
            "request"
        )


def check_heatmap_response(
    model: ServedModel,
    sizes: Sequence[tuple[int, int]],
    heatmap_size: HeatmapSize,
    maps_per_image: int = 1,
    bytes_per_image_pixel: int = 0,
    other_bytes: int = 0,
    pixel_channels: int = 0,
    limit: int = MAX_RESPONSE_BYTES,
) -> None:
    """`check_response_size` for `maps_per_image` heatmaps of each image of pixel size
    `sizes` ((width, height)) at `heatmap_size`, `bytes_per_image_pixel` more per pixel of
    each image (an overlay), `other_bytes`, and with each map `pixel_channels` float32
    maps at the model's size (the signed gradients of the pixel-level methods)."""
    heatmap_pixels = extra_bytes = 0
    for size in sizes:
        map_width, map_height = model_map_size(model, size)
        width, height = heatmap_size.of(size, (map_width, map_height))
        pixel_values = pixel_channels * map_width * map_height
        heatmap_pixels += maps_per_image * (width * height + pixel_values)
        extra_bytes += bytes_per_image_pixel * size[0] * size[1]
    check_response_size(heatmap_pixels, extra_bytes + other_bytes, limit)


def model_map_size(model: ServedModel, image: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the graph's map for an image of pixel size `image`: the model's
    input size, or the image's own for a model that takes any size."""
    size = model.config.preprocessing.size
    return image if size is None else (size[1], size[0])


# -- maps and predictions ----------------------------------------------------------------------
def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int],
                   out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize of a [h, w] map to (width, height), clipped back into [0, 1]; into
    `out` where given (a photo-sized map is half a MiB: written into its place in the
    response's array rather than copied there after)."""
    if out is None:
        out = np.empty((size[1], size[0]), np.float32)
    return np.clip(resize(heatmap, size, out=out), 0.0, 1.0, out=out)


def map_size(outputs: dict[str, np.ndarray], heatmap_size: HeatmapSize,
             image: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) `heatmap_size` gives the maps of an image of pixel size `image`,
    the graph's heatmaps being its "model" size."""
    height, width = outputs[NAMES.heatmap].shape[1:]
    return heatmap_size.of(image, (width, height))


def heatmap_at(outputs: dict[str, np.ndarray], row: int, size: tuple[int, int],
               out: np.ndarray | None = None) -> np.ndarray:
    """Row `row`'s heatmap at `size` (width, height), as `resize_heatmap` of the graph's
    heatmap computes it: from the graph's coarse map where it outputs one and that is
    cheaper (`upsample.py`)."""
    heatmap = outputs[NAMES.heatmap][row]
    coarse = outputs.get(NAMES.coarse_heatmap)
    if coarse is None or not upsamples(coarse[row], heatmap.shape, size):
        return resize_heatmap(heatmap, size, out)
    if out is None:
        out = np.empty((size[1], size[0]), np.float32)
    return np.clip(upsample(coarse[row], heatmap.shape, size, out), 0.0, 1.0, out=out)


def channel_weights(outputs: dict[str, np.ndarray], rows: slice | list[int]) -> np.ndarray:
    """Each row's channel importances: the spatial mean of the target layer's gradients."""
    return outputs[NAMES.gradients][rows].mean(axis=(2, 3))


def top_channels(weights: np.ndarray, count: int) -> tuple[tuple[int, float], ...]:
    """The `count` channels of largest weight, (channel, weight), most important first."""
    top = np.argsort(-weights, kind="stable")[:count]
    return tuple((int(c), float(weights[c])) for c in top)


def pixel_gradients(model: ServedModel, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The pixel-level methods' signed input gradients, [N, C, H, W]; None for the others."""
    maps = outputs.get(NAMES.pixel_map)
    if maps is not None and model.config.preprocessing.layout == "NHWC":
        maps = maps.transpose(0, 3, 1, 2)
    return maps


def class_explanation(
    model: ServedModel,
    graph: Graph,
    outputs: dict[str, np.ndarray],
    rows: slice,
    size: tuple[int, int],
    class_index: int | None,
    num_predictions: int,
    num_channels: int,
    mask: np.ndarray | None,
    heatmap_size: HeatmapSize,
) -> ImageExplanation:
    """One image's maps (its rows `rows` of the run: one per rank) and predictions. Classes
    are ranked as the graph ranks them: by score; for a segmentation map by predicted area,
    or by score summed over `mask` (at the image's pixel size, resized to the map's as the
    graph does)."""
    scores = outputs[graph.output][rows][0].astype(np.float64)

    def prediction(c: int, score: float, logit: float) -> Prediction:
        return Prediction(int(c), model.label(int(c), graph.output), score, logit)

    if scores.ndim == 3:  # [classes, h, w]
        predicted = np.bincount(scores.argmax(0).ravel(), minlength=len(scores))
        shares = predicted / predicted.sum()
        means = scores.mean(axis=(1, 2))
        if mask is not None:
            mask = resize(mask, scores.shape[:0:-1], Image.NEAREST)
        ranking = shares if mask is None else (scores * mask).sum(axis=(1, 2))
        order = np.argsort(-ranking, kind="stable")
        predictions = tuple(
            prediction(c, float(shares[c]), float(means[c]))
            for c in np.argsort(-shares, kind="stable")[:num_predictions]
        )
    else:
        probabilities = np.exp(scores - scores.max())
        probabilities /= probabilities.sum()
        order = np.argsort(-scores, kind="stable")
        predictions = tuple(
            prediction(c, float(probabilities[c]), float(scores[c]))
            for c in order[:num_predictions]
        )
    weights = channel_weights(outputs, rows)
    pixel_maps = pixel_gradients(model, outputs)
    pixel_maps = None if pixel_maps is None else pixel_maps[rows]
    concept_scores = outputs.get(NAMES.concept_scores)
    concept_scores = None if concept_scores is None else concept_scores[rows]
    maps = []
    maps_size = map_size(outputs, heatmap_size, size)
    for rank, row in enumerate(range(len(outputs[NAMES.heatmap]))[rows]):
        if class_index is None:
            explained = int(order[rank])
        else:  # -r asks for the r-th highest-scoring class, as the graph resolves it
            explained = class_index if class_index >= 0 else int(order[-class_index - 1])
        maps.append(
            ClassMap(
                class_index=explained,
                label=model.label(explained, graph.output),
                heatmap=heatmap_at(outputs, row, maps_size),
                channels=top_channels(weights[rank], num_channels),
                pixel_gradients=None if pixel_maps is None else pixel_maps[rank],
                concept_scores=() if concept_scores is None else tuple(
                    float(s) for s in concept_scores[rank]),
            )
        )
    return ImageExplanation(tuple(maps), predictions)


def detection_map(
    model: ServedModel, graph: Graph, outputs: dict[str, np.ndarray], row: int,
    tensor: np.ndarray, size: tuple[int, int], num_channels: int, heatmap_size: HeatmapSize,
) -> ClassMap:
    """The map of the detection explained by row `row` of a detector's run, for an image of
    pixel size `size` fed as `tensor`."""
    graph_size = image_tensor_size(model, tensor)
    category = int(outputs[NAMES.detection_class][row])
    box = to_model_pixels(outputs[NAMES.detection_box][row], graph_size, size)
    pixel_maps = pixel_gradients(model, outputs)
    return ClassMap(
        class_index=category,
        label=model.label(category, graph.output),
        heatmap=heatmap_at(outputs, row, map_size(outputs, heatmap_size, size)),
        channels=top_channels(channel_weights(outputs, [row])[0], num_channels),
        pixel_gradients=None if pixel_maps is None else pixel_maps[row],
        detection=DetectedBox(
            int(outputs[NAMES.explained_detection][row]),
            tuple(float(v) for v in box),
            float(outputs[NAMES.detection_score][row]),
            float(outputs[NAMES.detection_iou][row]),
        ),
    )
