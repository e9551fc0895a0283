"""The Python SDK: `GradCamClient` (blocking) and `AsyncGradCamClient` (asyncio) over the typed
explain API (``gradcam.v1.GradCam``) and ``grpc.health.v1``.

    from gradcam_client import GradCamClient

    with GradCamClient("127.0.0.1:8001") as client:
        result = client.explain("samples/chelsea.jpg", model="efficientnet_lite0")
        result.heatmap                  # float32 [300, 451] in [0, 1], at the photo's size
        result.predictions[0].label     # 'Egyptian cat'
        result.overlay("turbo", opacity=0.4).save("out/chelsea-turbo.png")
        guided = client.explain("samples/chelsea.jpg", model="efficientnet_lite0",
                                method="guided-backprop")
        guided.pixel_gradients.shape    # (3, 224, 224): signed input gradients, model's input size
        guided.overlay().save("out/chelsea-guided.png")  # the paper's RGB gradient image
        small = client.explain("samples/chelsea.jpg", model="efficientnet_lite0",
                               heatmap_size="model")
        small.heatmap.shape             # (224, 224): the graph's own map, at the model's input

What `explain` takes, one at a time or as a list (a list gives a list of results):

* a path (``str`` or ``os.PathLike``) or the bytes of an encoded JPEG, PNG, WebP or BMP file;
* a PIL image, or a ``uint8`` array [H, W], [H, W, 3] (RGB) or [H, W, 4]: an image, preprocessed
  by the server as the model's config says;
* a floating-point array [C, H, W]: one tensor already preprocessed as the graph expects, sent
  as float32; a 4-D float array [N, C, H, W] is N of them (and gives a list).

Heatmaps come back at the image's own size (a tensor's own H and W), or at the size
``heatmap_size`` asks for: "model" (the graph's own map at the model's input size), or
(width, height). Calls carry a deadline (30 s unless ``timeout`` says otherwise), are retried
with exponential backoff only when the server is UNAVAILABLE (not reachable, shutting down,
model still loading), and raise the `GradCamError` subclasses of `gradcam_client.errors`
(a model that failed to load, or serves inference only, raises `ModelUnavailableError` at
once). Nothing here imports onnx, onnxruntime, torch or the server.
"""

from __future__ import annotations

import asyncio
import io
import json
import numbers
import os
import random
import re
import reprlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union, overload

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc

from .errors import (
    DeadlineError,
    GradCamError,
    InvalidInputError,
    UnavailableError,
    error_from_rpc,
)
from gradcam_common.overlay import colorize, draw_box, gradient_image, overlay as blend, panels

ImageInput = Union[str, os.PathLike[str], bytes, bytearray, memoryview, Image.Image, np.ndarray]
"""One image: a path, encoded bytes, a PIL image, a uint8 image array or a float tensor."""

PemInput = Union[bytes, str, os.PathLike[str]]
"""PEM data as bytes, or the path of a PEM file."""

HeatmapSize = Union[str, tuple[int, int]]
"""The pixel size of returned heatmaps: "image", "model", (width, height) or "WIDTHxHEIGHT"."""

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.2  # seconds before the first retry; doubled each time
MAX_BACKOFF = 5.0
IMAGES_PER_REQUEST = 16  # a longer list is sent as several requests
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as the server
PIXEL_METHODS = ("guided-backprop", "guided-gradcam")  # drawn as gradient images
_METHOD_PREFIX = "METHOD_"
_HEATMAP_SIZE = re.compile(r"([0-9]+)\s*x\s*([0-9]+)")
_KEEP_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # sent as they are; others as RGB


# --- results --------------------------------------------------------------------------------


def _class_name(class_index: int, label: str) -> str:
    """How a class is named to people: its label, or "class 7" when the model has none."""
    return label or f"class {class_index}"


@dataclass(frozen=True)
class Prediction:
    """One class of an image's top predictions."""

    class_index: int
    label: str  # empty when the model has no labels
    score: float  # softmax probability
    logit: float

    @property
    def name(self) -> str:
        """The label, or "class N" when the model has no labels."""
        return _class_name(self.class_index, self.label)


@dataclass(frozen=True)
class DetectionTarget:
    """A detection of a detector to explain (score "detection"): ``index``, a pre-NMS box
    (an anchor of the raw head), or ``box`` (x1, y1, x2, y2 in the image's pixels) with
    ``class_index``, or both (the index's class score plus the IoU of its box with ``box``).
    ``class_index`` None or -1: the best class. See docs/DETECTION.md."""

    index: int | None = None
    box: Sequence[float] | None = None
    class_index: int | None = None


@dataclass(frozen=True)
class DetectedBox:
    """The detection a map explains: its pre-NMS index, its box (x1, y1, x2, y2, the image's
    pixels), its class score, and the IoU of its box with the reference box (0 without)."""

    index: int
    box: tuple[float, float, float, float]
    score: float
    iou: float


@dataclass(frozen=True, eq=False)
class ClassHeatmap:
    """The map of one explained class."""

    class_index: int
    label: str
    heatmap: np.ndarray  # float32 [height, width] in [0, 1], at the asked heatmap_size
    channels: list[tuple[int, float]]  # (channel, importance weight), most important first
    # Pixel-level methods (guided-backprop, guided-gradcam) only: the signed gradients of the
    # explained score at the image input, float32 [C, H, W] at the model's input size, channels
    # in the model's order (its config's channel_order); None for the other methods, and from a
    # server too old to send them. `heatmap` is then their per-pixel max |value|, normalised.
    pixel_gradients: np.ndarray | None = None
    # Detectors only: the detection this map explains (its box is drawn on overlays).
    detection: DetectedBox | None = None

    @property
    def name(self) -> str:
        """The label, or "class N" when the model has no labels."""
        return _class_name(self.class_index, self.label)


@dataclass(frozen=True)
class Timings:
    """Where the time of the request that held an image went (seconds)."""

    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    total_seconds: float  # inside the server
    round_trip_seconds: float  # seen by the client, retries included


@dataclass(frozen=True, eq=False)
class Explanation:
    """Everything the server said about one image.

    ``heatmaps`` holds one map per explained class: the top-1 class by default, ``top_k`` maps
    (highest score first) or the one ``target_class``, each at the ``heatmap_size`` asked for
    (default: the image's own). ``counterfactual`` says whether the negated score was explained.
    ``timings`` are those of the request that held the image (images sent together share them).
    """

    model: str
    method: str
    layer: str
    heatmaps: list[ClassHeatmap]
    predictions: list[Prediction]
    timings: Timings
    counterfactual: bool = False
    # How `layer` was seen as [N, C, h, w]: "nchw", "nhwc" or "tokens" ("" from an older
    # server), and for tokens the prefix tokens and the patch grid (rows, columns) where known.
    layout: str = ""
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    _source: _Source | None = field(default=None, repr=False)

    @property
    def heatmap(self) -> np.ndarray:
        """The first map: float32 [height, width] in [0, 1]."""
        return self.heatmaps[0].heatmap

    @property
    def pixel_gradients(self) -> np.ndarray | None:
        """The first map's signed input gradients, float32 [C, H, W] at the model's input size
        (pixel-level methods only; None otherwise, or from an older server)."""
        return self.heatmaps[0].pixel_gradients

    @property
    def image(self) -> Image.Image | None:
        """The image that was explained, as RGB; None when a tensor was sent."""
        return self._source.picture() if self._source is not None else None

    def overlay(
        self,
        colormap: str = "jet",
        opacity: float = 0.5,
        side_by_side: bool = False,
        *,
        index: int | None = None,
        image: Image.Image | np.ndarray | None = None,
        grayscale: bool = False,
    ) -> Image.Image:
        """The explanation as an RGB PIL picture, the one ``gradcam explain -o`` writes.

        Every explained class's map, drawn at the image's pixel size whatever ``heatmap_size``
        it came at, in a row (`overlay.panels`); for the default top-1 explanation that is one
        picture of the image's size. ``index`` picks one map (of ``top_k``) instead. Grad-CAM
        maps are blended over the image in ``colormap`` ("jet" or "turbo"), ``opacity`` in
        [0, 1] being the heatmap's weight. The maps of the pixel-level methods (`PIXEL_METHODS`)
        are drawn on their own as gradient images (`overlay.gradient_image`), where colormap and
        opacity play no part: as the Grad-CAM paper shows them, the signed ``pixel_gradients``
        in colour (standardised, around mid grey), resized to the image's size; with
        ``grayscale=True``, or when the server sent no gradients (an older one), their
        magnitude, the heatmap, in grayscale. The gradients' channels are in the model's order,
        so a model fed BGR (config ``channel_order``) shows red and blue swapped: the SDK cannot
        tell, ModelInfo does not say. ``side_by_side`` puts the image first and captions every picture:
        the image with its file name (when a path was explained), the model and the method
        (and "counterfactual"), each map with its class and that class's score.

        The image is the one that was sent; for a tensor pass ``image`` (a PIL image or a uint8
        array), or get the maps alone at their own size (ValueError with ``side_by_side``).
        """
        shown = self.heatmaps if index is None else [self.heatmaps[index]]
        base = image if image is not None else self.image
        if base is None and side_by_side:
            raise ValueError("a tensor was explained: pass image= to put it side by side")
        pictures = [
            self._drawn(explained, base, colormap, opacity, grayscale) for explained in shown
        ]
        if side_by_side:
            assert base is not None
            return panels([base, *pictures], self._captions(shown))
        return pictures[0] if len(pictures) == 1 else panels(pictures)

    def _drawn(
        self,
        explained: ClassHeatmap,
        base: Image.Image | np.ndarray | None,
        colormap: str,
        opacity: float,
        grayscale: bool,
    ) -> Image.Image:
        """One map as a picture of the image's size (of its own, without an image)."""
        heatmap = explained.heatmap
        if self.method in PIXEL_METHODS:
            gradients = explained.pixel_gradients
            if not grayscale and gradients is not None and gradients.shape[0] == 3:
                drawn = gradients  # signed, in colour
            else:
                drawn = heatmap  # the magnitude, in grayscale
            if base is None:
                return gradient_image(drawn)
            size = base.size if isinstance(base, Image.Image) else (base.shape[1], base.shape[0])
            return gradient_image(drawn, size=size)
        if base is None:
            return Image.fromarray(colorize(heatmap, colormap), mode="RGB")
        blended = blend(base, heatmap, colormap=colormap, opacity=opacity)
        if explained.detection is not None:
            blended = draw_box(blended, explained.detection.box)
        return blended

    def _captions(self, shown: list[ClassHeatmap]) -> list[list[str]]:
        """The image: its file name, the model and method; each map: its class and the
        class's score (the name alone when the class is not among the predictions)."""
        how = self.method + (", counterfactual" if self.counterfactual else "")
        name = self._source.name if self._source is not None else None
        captions = [([name] if name else []) + [f"{self.model}, {how}"]]
        scores = {p.class_index: p.score for p in self.predictions}
        for explained in shown:
            score = scores.get(explained.class_index)
            captions.append(
                [explained.name if score is None else f"{explained.name}  {score:.2f}"]
            )
        return captions


@dataclass(frozen=True)
class ModelStatus:
    name: str
    ready: bool
    reason: str  # why it is not ready; empty when ready


@dataclass(frozen=True)
class ModelInfo:
    """What the server knows of a model: its input, preprocessing, labels and target layer."""

    name: str
    input: str
    input_shape: tuple[int, ...]  # -1 where variable
    input_size: tuple[int, ...]  # (height, width) images are resized to
    outputs: tuple[str, ...]
    layer: str  # default target layer
    layer_shape: tuple[int, ...]
    num_classes: int
    has_labels: bool
    max_batch_size: int
    methods: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_score: str  # "logit", or "region" for a segmentation model
    other_inputs: tuple[str, ...]  # graph inputs besides the image, sent with `inputs=`
    explain_error: str = ""  # why the model serves inference only; empty when it explains
    # How `layer` is laid out: "nchw", "nhwc" or "tokens" (its [N, C, h, w] view is
    # `layer_shape`); for tokens, the prefix tokens and the patch grid (rows, columns) where
    # known. "" and None from an older server, or a model that serves inference only.
    layout: str = ""
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None


# --- inputs ---------------------------------------------------------------------------------


class _Source:
    """What an explanation was computed from, kept to draw its overlay (decoded lazily), and
    the file name of a path."""

    def __init__(
        self,
        encoded: bytes | None = None,
        picture: Image.Image | None = None,
        name: str | None = None,
    ) -> None:
        self._encoded = encoded
        self._picture = picture
        self.name = name

    def picture(self) -> Image.Image:
        if self._picture is None:
            with Image.open(io.BytesIO(self._encoded or b"")) as opened:
                self._picture = opened.convert("RGB")
        elif self._picture.mode != "RGB":
            self._picture = self._picture.convert("RGB")
        return self._picture


def _is_many(images: Any) -> bool:
    if isinstance(images, np.ndarray):
        return images.ndim == 4
    return isinstance(images, (list, tuple))


def _prepare(images: Any) -> list[tuple[pb.Image, _Source | None]]:
    """Messages for one input or many, each with what its overlay is drawn on."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if not np.issubdtype(images.dtype, np.floating):
            raise InvalidInputError(
                f"a 4-D array is a batch of preprocessed tensors and must be floating point, "
                f"got {images.dtype}"
            )
        return [_tensor(tensor) for tensor in images]
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise InvalidInputError("no image given")
    prepared = []
    for item in items:
        if isinstance(item, np.ndarray) and item.ndim == 4:
            raise InvalidInputError("a list item must be one image; pass a 4-D batch on its own")
        prepared.append(_one(item))
    return prepared


def _one(image: Any) -> tuple[pb.Image, _Source | None]:
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()  # FileNotFoundError names the path
        return pb.Image(encoded=data), _Source(encoded=data, name=path.name)
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        return pb.Image(encoded=data), _Source(encoded=data)
    if isinstance(image, Image.Image):
        return pb.Image(encoded=_png(image)), _Source(picture=image)
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint8:
            picture = _picture_of(image)
            return pb.Image(encoded=_png(picture)), _Source(picture=picture)
        if np.issubdtype(image.dtype, np.floating):
            return _tensor(image)
        raise InvalidInputError(
            f"an array must be a uint8 image or a floating-point tensor, got {image.dtype}"
        )
    raise TypeError(
        "an image must be a path, bytes, a PIL image or a numpy array, "
        f"got {type(image).__name__}"
    )


def _tensor(tensor: np.ndarray) -> tuple[pb.Image, None]:
    if tensor.ndim != 3:
        raise InvalidInputError(
            f"a preprocessed tensor must be [C, H, W] (or [N, C, H, W]), got shape {tensor.shape}"
        )
    data = np.ascontiguousarray(tensor, dtype="<f4").tobytes()
    return pb.Image(tensor=pb.Tensor(shape=list(tensor.shape), data=data)), None


def _picture_of(pixels: np.ndarray) -> Image.Image:
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(pixels), mode="L")
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        mode = "RGB" if pixels.shape[2] == 3 else "RGBA"
        return Image.fromarray(np.ascontiguousarray(pixels), mode=mode)
    raise InvalidInputError(
        f"a uint8 image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {pixels.shape}; "
        "a preprocessed tensor must be floating point"
    )


def _png(picture: Image.Image) -> bytes:
    """Lossless and quick: what the server decodes is exactly these pixels."""
    if picture.mode not in _KEEP_MODES:
        picture = picture.convert("RGB")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _method_name(value: int) -> str:
    """The server's name of an API method value: the enum's name without ``METHOD_``, lower
    case, ``_PLUS_PLUS`` written ``++`` and other underscores as hyphens
    (METHOD_GRADCAM_PLUS_PLUS is "gradcam++", METHOD_GUIDED_BACKPROP "guided-backprop").
    A value newer than these stubs reads as its number."""
    if value not in pb.Method.values():
        return str(value)
    name = pb.Method.Name(value).removeprefix(_METHOD_PREFIX).lower()
    return name.replace("_plus_plus", "++").replace("_", "-")


METHOD_OF_NAME: dict[str, int] = {
    _method_name(value): value for value in pb.Method.values() if value != pb.METHOD_UNSPECIFIED
}
"""The method names `explain` takes, and their values in the API."""
METHODS: tuple[str, ...] = tuple(METHOD_OF_NAME)


def _method_enum(method: str | None) -> int:
    """The API value of a method name (case does not matter)."""
    if method is None:
        return pb.METHOD_UNSPECIFIED
    if method.lower() not in METHOD_OF_NAME:
        raise InvalidInputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHOD_OF_NAME[method.lower()]


def heatmap_size_option(value: HeatmapSize | None) -> str:
    """The API's ``heatmap_size`` text for what `explain` takes: "" for None (the server's
    default, "image"), "image", "model", or "WIDTHxHEIGHT" for a (width, height) pair of
    positive integers or for such a text ("224x224"; case and spaces around do not matter).
    Anything else raises `InvalidInputError` (a ValueError) before anything is sent. How
    large a map may be is the server's to say (its pixel and response-size limits)."""
    if value is None:
        return ""
    size: tuple[int, int] | None = None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("image", "model"):
            return text
        match = _HEATMAP_SIZE.fullmatch(text)
        if match is not None:
            size = int(match[1]), int(match[2])
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in value
    ):
        size = int(value[0]), int(value[1])
    if size is None or min(size) < 1:
        raise InvalidInputError(
            "heatmap_size must be 'image', 'model', a (width, height) pair of positive "
            f"integers or 'WIDTHxHEIGHT' (e.g. '224x224'), got {reprlib.repr(value)}"
        )
    return f"{size[0]}x{size[1]}"


def _requests(
    images: Any,
    *,
    model: str,
    method: str | None,
    target_class: int | None,
    top_k: int | None,
    layer: str | Sequence[str] | None,
    layout: str | None,
    prefix_tokens: int | None,
    grid: str | tuple[int, int] | None,
    counterfactual: bool,
    eigen_smooth: bool,
    aug_smooth: bool,
    score: str | None,
    reference_embedding: np.ndarray | None,
    target_mask: np.ndarray | None,
    output: str | None,
    inputs: dict[str, Any] | None,
    num_predictions: int,
    num_channels: int,
    heatmap_size: HeatmapSize | None,
    detections: Any = None,
    iou_threshold: float | None = None,
) -> tuple[list[pb.ExplainRequest], list[list[_Source | None]]]:
    """The requests (at most IMAGES_PER_REQUEST images each) and the sources of their images."""
    if target_class is not None and top_k is not None:
        raise InvalidInputError("give target_class or top_k, not both")
    target = pb.Target()
    if target_class is not None:
        target.class_index = int(target_class)
    elif top_k is not None:
        target.top_k = int(top_k)
    options = pb.ExplainOptions(
        num_predictions=num_predictions, num_channels=num_channels,
        heatmap_size=heatmap_size_option(heatmap_size),
    )
    method_enum = _method_enum(method)
    grid_text = _grid_option(grid)
    if prefix_tokens is not None:
        if (not isinstance(prefix_tokens, numbers.Integral) or isinstance(prefix_tokens, bool)
                or not -2**31 <= prefix_tokens < 2**31):
            raise InvalidInputError(
                f"prefix_tokens must be an integer, got {reprlib.repr(prefix_tokens)}"
            )
        prefix_tokens = int(prefix_tokens)
    prepared = _prepare(images)
    requests, sources = [], []
    for start in range(0, len(prepared), IMAGES_PER_REQUEST):
        chunk = prepared[start : start + IMAGES_PER_REQUEST]
        rows = slice(start, start + len(chunk))
        requests.append(
            pb.ExplainRequest(
                model=model, images=[message for message, _ in chunk], method=method_enum,
                target=target, layer=layer if isinstance(layer, str) else "",
                layers=[] if layer is None or isinstance(layer, str) else list(layer),
                layout=layout or "", prefix_tokens=prefix_tokens, grid=grid_text,
                counterfactual=counterfactual,
                eigen_smooth=eigen_smooth, aug_smooth=aug_smooth, score=score or "",
                reference_embedding=_rows_tensor(reference_embedding, 2, rows),
                target_mask=_rows_tensor(target_mask, 3, rows), output=output or "",
                inputs={name: _typed_rows(value, rows) for name, value in (inputs or {}).items()},
                options=options, detections=_detections_rows(detections, rows),
                iou_threshold=iou_threshold,
            )
        )
        sources.append([source for _, source in chunk])
    return requests, sources


def _detections_rows(detections: Any, rows: slice) -> list[pb.ImageDetections]:
    """The request's detections: a flat list (every image's), or one list per image (only
    the `rows` of this request's images); [] for None."""
    if detections is None:
        return []
    if isinstance(detections, (str, bytes)) or not isinstance(detections, Sequence) or not len(
            detections):
        raise InvalidInputError("detections must be a list of DetectionTarget, or one list per "
                                "image")
    per_image = not isinstance(detections[0], DetectionTarget)
    lists = list(detections)[rows] if per_image else [detections]
    messages = []
    for wanted in lists:
        targets = []
        for target in wanted:
            if not isinstance(target, DetectionTarget):
                raise InvalidInputError(f"a detection must be a DetectionTarget, got "
                                        f"{reprlib.repr(target)}")
            targets.append(pb.DetectionTarget(
                index=None if target.index is None else int(target.index),
                box=[] if target.box is None else [float(v) for v in target.box],
                class_index=None if target.class_index is None else int(target.class_index),
            ))
        messages.append(pb.ImageDetections(detections=targets))
    return messages


def _grid_option(value: str | tuple[int, int] | None) -> str:
    """The API's ``grid`` text: "" for None, the text as given (the server checks it), or
    "HxW" for a (rows, columns) pair of integers."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in value
    ):
        return f"{int(value[0])}x{int(value[1])}"
    raise InvalidInputError(
        f"grid must be a (rows, columns) pair of integers or 'HxW', got {reprlib.repr(value)}"
    )


def _grid_of(text: str) -> tuple[int, int] | None:
    """(rows, columns) of the server's "HxW" grid text; None when empty."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def _rows_tensor(value: Any, batched_rank: int, rows: slice) -> pb.Tensor | None:
    """`value` as a float32 Tensor message; of `batched_rank` (one row per image), only the
    `rows` of this request's images."""
    if value is None:
        return None
    array = np.asarray(value, dtype="<f4")
    if array.ndim == batched_rank:
        array = array[rows]
    array = np.ascontiguousarray(array)
    return pb.Tensor(shape=list(array.shape), data=array.tobytes())


_DATATYPES = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int64": "INT64",
              "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint16": "UINT16",
              "uint8": "UINT8", "bool": "BOOL"}


def _typed_rows(value: Any, rows: slice) -> pb.TypedTensor:
    """The `rows` of a model input [N, ...] (one row per image), in its own datatype."""
    array = np.asarray(value)
    datatype = _DATATYPES.get(array.dtype.name)
    if datatype is None or array.ndim == 0:
        raise InvalidInputError(
            f"a model input must be an array with one row per image, of a numeric dtype; got "
            f"{array.dtype} {list(array.shape)}"
        )
    part = np.ascontiguousarray(array[rows], dtype=array.dtype.newbyteorder("<"))
    return pb.TypedTensor(datatype=datatype, shape=list(part.shape), data=part.tobytes())


# --- responses ------------------------------------------------------------------------------


def _explanations(
    response: pb.ExplainResponse,
    sources: list[_Source | None],
    round_trip: float,
    counterfactual: bool,
) -> list[Explanation]:
    t = response.timings
    timings = Timings(
        t.preprocess_seconds, t.queue_seconds, t.inference_seconds, t.total_seconds, round_trip
    )
    method = _method_name(response.method)
    results = []
    for message, source in zip(response.explanations, sources):
        heatmaps = [
            ClassHeatmap(
                class_index=h.class_index,
                label=h.label,
                heatmap=np.frombuffer(h.data, dtype="<f4")
                .reshape(h.height, h.width)
                .astype(np.float32),
                channels=[(c.channel, c.weight) for c in h.channels],
                pixel_gradients=_pixel_gradients(h),
                detection=DetectedBox(h.detection.index, tuple(h.detection.box),
                                      h.detection.score, h.detection.iou)
                if h.HasField("detection") else None,
            )
            for h in message.heatmaps
        ]
        predictions = [
            Prediction(p.class_index, p.label, p.score, p.logit) for p in message.predictions
        ]
        results.append(
            Explanation(response.model, method, response.layer, heatmaps, predictions, timings,
                        counterfactual=counterfactual, layout=response.layout,
                        prefix_tokens=(response.prefix_tokens
                                       if response.HasField("prefix_tokens") else None),
                        grid=_grid_of(response.grid), _source=source)
        )
    return results


def _pixel_gradients(message: pb.Heatmap) -> np.ndarray | None:
    """A heatmap's signed input gradients, float32 [C, H, W]; None when the server sent none."""
    if not message.HasField("pixel_gradients"):
        return None
    tensor = message.pixel_gradients
    return np.frombuffer(tensor.data, dtype="<f4").reshape(tuple(tensor.shape)).astype(np.float32)


def _statuses(response: pb.ListModelsResponse) -> list[ModelStatus]:
    return [ModelStatus(m.name, m.ready, m.reason) for m in response.models]


def _model_info(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=message.name,
        input=message.input,
        input_shape=tuple(message.input_shape),
        input_size=tuple(message.input_size),
        outputs=tuple(message.outputs),
        layer=message.layer,
        layer_shape=tuple(message.layer_shape),
        num_classes=message.num_classes,
        has_labels=message.has_labels,
        max_batch_size=message.max_batch_size,
        methods=tuple(_method_name(m) for m in message.methods),
        mean=tuple(message.mean),
        std=tuple(message.std),
        default_score=message.default_score,
        other_inputs=tuple(message.other_inputs),
        explain_error=message.explain_error,
        layout=message.layout,
        prefix_tokens=message.prefix_tokens if message.HasField("prefix_tokens") else None,
        grid=_grid_of(message.grid),
    )


def _health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


# --- connection -----------------------------------------------------------------------------


def _pem(value: PemInput | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


# Several replicas: calls spread over every address that passes grpc.health.v1 (gRPC's
# round_robin policy with health-checked subchannels); a failing replica leaves the rotation.
_REPLICAS_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
})


def channel_target(target: str | Sequence[str]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The gRPC target and channel options for ``target``: one "host:port"; several replicas,
    as a sequence of "host:port" or one comma-separated string (each host resolved here, all
    its addresses kept); or a resolver name such as "dns:///gradcam.example:8001" (every
    address the name resolves to). Several addresses are balanced round-robin over the
    replicas that report SERVING; one address is used as given."""
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            return target, (("grpc.service_config", _REPLICAS_SERVICE_CONFIG),)
        addresses = [a.strip() for a in target.split(",") if a.strip()]
    else:
        addresses = [str(a).strip() for a in target]
    addresses = [a.removeprefix("grpc://").removeprefix("grpcs://") for a in addresses]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0], ()
    resolved: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    families = []  # per address, the families it resolves to
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {address!r}")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(f"cannot resolve {host!r}: {error}") from error
        found = set()
        for family, _, _, _, sockaddr in infos:
            if family in resolved:
                found.add(family)
                ip = sockaddr[0] if family == socket.AF_INET else f"[{sockaddr[0]}]"
                if f"{ip}:{port}" not in resolved[family]:
                    resolved[family].append(f"{ip}:{port}")
        families.append(found)
    # gRPC's address list holds one family: IPv4 where every replica has an IPv4 address.
    family = next((f for f in (socket.AF_INET, socket.AF_INET6)
                   if all(f in found for found in families)), None)
    if family is None:
        raise ValueError("the replicas mix IPv4-only and IPv6-only addresses, and one channel "
                         "takes one family: give addresses of one family, or a dns:/// name")
    scheme = "ipv4" if family == socket.AF_INET else "ipv6"
    options = (("grpc.service_config", _REPLICAS_SERVICE_CONFIG),
               ("grpc.default_authority", addresses[0]))  # the name TLS checks
    return f"{scheme}:{','.join(resolved[family])}", options


@dataclass(frozen=True)
class _Connection:
    """Settings both clients share: where, how securely, deadlines and retries."""

    target: str
    tls: bool
    root_certificates: bytes | None
    client_certificate: bytes | None
    client_key: bytes | None
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retries: int
    backoff: float
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def make(
        cls,
        target: str | Sequence[str],
        *,
        tls: bool | None,
        root_certificates: PemInput | None,
        client_certificate: PemInput | None,
        client_key: PemInput | None,
        token: str | None,
        timeout: float | None,
        retries: int,
        backoff: float,
        options: Sequence[tuple[str, Any]],
    ) -> _Connection:
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries}")
        if (client_certificate is None) != (client_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_key")
        secure = tls if tls is not None else any(
            v is not None for v in (root_certificates, client_certificate)
        )
        if not secure and (root_certificates is not None or client_certificate is not None):
            raise ValueError("certificates were given but tls=False")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        target, balancing = channel_target(target)
        channel_options = (
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *balancing,
            *options,
        )
        return cls(
            target, secure,
            _pem(root_certificates), _pem(client_certificate), _pem(client_key),
            metadata, timeout, retries, backoff, channel_options,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )

    def deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def delay(self, retry: int, deadline: float | None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based); None: give up."""
        if retry > self.retries:
            return None
        wait = min(self.backoff * 2 ** (retry - 1), MAX_BACKOFF) * random.uniform(0.8, 1.2)
        if deadline is not None and time.monotonic() + wait >= deadline:
            return None
        return wait

    def failure(self, error: grpc.RpcError, attempts: int) -> GradCamError:
        return error_from_rpc(error, target=self.target, attempts=attempts)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def _poll_timeout(deadline: float) -> float:
    """The deadline of one health check while waiting for SERVING: at most a second."""
    return min(1.0, max(deadline - time.monotonic(), 0.05))


Response = TypeVar("Response")


# --- the clients ----------------------------------------------------------------------------


class _Client:
    """What both clients share: the connection settings, one channel, the stubs."""

    _grpc: Any = grpc  # the module whose channels the client opens (grpc or grpc.aio)

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:8001",
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: PemInput | None = None,
        client_certificate: PemInput | None = None,
        client_key: PemInput | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._connection = _Connection.make(
            target, tls=tls, root_certificates=root_certificates,
            client_certificate=client_certificate, client_key=client_key, token=token,
            timeout=timeout, retries=retries, backoff=backoff, options=options,
        )
        c = self._connection
        if c.tls:
            credentials = c.credentials()
            self._channel = self._grpc.secure_channel(c.target, credentials, options=c.options)
        else:
            self._channel = self._grpc.insecure_channel(c.target, options=c.options)
        self._stub = pb_grpc.GradCamStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)


class GradCamClient(_Client):
    """A blocking client; use it in a ``with`` block or call `close`. Safe to share between
    threads.

    ``target`` is "host:port", or several replicas: a list of "host:port" (or one string of
    them, comma-separated) or a resolver name such as "dns:///gradcam.example:8001", balanced
    round-robin over the replicas that pass their health check (`channel_target`).
    ``timeout`` (seconds, None: none) is every call's default deadline, retries included;
    ``retries`` is how many times a call that found the server (or its replica) UNAVAILABLE is
    tried again, after ``backoff`` seconds doubling each time (with jitter).
    ``token`` sends ``authorization: Bearer <token>``. TLS is on with ``tls=True`` or when
    certificates are given: ``root_certificates`` (PEM bytes or a file; default: the system's
    roots), and ``client_certificate`` with ``client_key`` for mutual TLS. ``options`` are
    extra gRPC channel options, e.g. ``("grpc.ssl_target_name_override", "gradcam.local")``.
    """


    @property
    def target(self) -> str:
        return self._connection.target

    def __enter__(self) -> GradCamClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @overload
    def explain(
        self, images: str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image, *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> Explanation: ...

    @overload
    def explain(
        self, images: np.ndarray, *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> Explanation | list[Explanation]: ...

    @overload
    def explain(
        self, images: Sequence[ImageInput], *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> list[Explanation]: ...

    def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        method: str | None = None,
        target_class: int | None = None,
        top_k: int | None = None,
        layer: str | Sequence[str] | None = None,
        layout: str | None = None,
        prefix_tokens: int | None = None,
        grid: str | tuple[int, int] | None = None,
        counterfactual: bool = False,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        score: str | None = None,
        reference_embedding: Any = None,
        target_mask: Any = None,
        output: str | None = None,
        inputs: dict[str, Any] | None = None,
        num_predictions: int = 5,
        num_channels: int = 10,
        heatmap_size: HeatmapSize | None = None,
        detections: Sequence[DetectionTarget] | Sequence[Sequence[DetectionTarget]] | None = None,
        iou_threshold: float | None = None,
        timeout: float | None = None,
    ) -> Explanation | list[Explanation]:
        """Explain one image (gives an `Explanation`) or many (a list or a 4-D tensor batch:
        gives a list, in order).

        ``method`` is a name of `METHODS` (None: the model's default). What is explained: the
        top-1 class by default, ``target_class`` (a class index) for every image, or the
        ``top_k`` highest-scoring classes of each. ``layer`` is a tensor name of the graph
        (None: the model's default target layer), or several, whose maps are fused.
        ``layout`` says how it is laid out: "nchw" ([N, C, h, w]), "nhwc" ([N, h, w, C]: Swin,
        ConvNeXt) or "tokens" ([N, T, C]: ViT, DeiT), with ``prefix_tokens`` (class and other
        tokens before the patches) and the patch ``grid`` ((rows, columns), or "HxW") for
        tokens; None: the model's (`ModelInfo.layout` for its default layer), else detected.
        ``counterfactual`` explains the negated score: the regions whose removal would raise the
        class score; ``eigen_smooth`` projects the per-channel contributions on their first
        principal component; ``aug_smooth`` averages the maps of flipped and rescaled copies of
        each image. ``score`` is "logit" (the default for classifiers), "probability",
        "similarity" of the model's output (an embedding) to ``reference_embedding`` ([D] for
        all images, or [N, D]), or "region" (the default for segmentation models): the class's
        scores summed over ``target_mask`` ([h, w] for all images or [N, h, w], any size; None:
        each class's predicted region). ``output`` names the graph output explained (None: the
        model's score output); ``inputs`` gives the model's other inputs by name, arrays with one
        row per image. ``num_predictions`` and ``num_channels`` bound the predictions and
        channel importances returned.

        ``heatmap_size`` is the pixel size the maps come back at: "image" (None, the default:
        each image's own size, a tensor's own H and W), "model" (the graph's own map, at the
        model's input size), or (width, height), also written "WIDTHxHEIGHT". A bad value raises
        `InvalidInputError` before anything is sent; an answer that would be over the server's
        size limit (63 MiB) is refused with an `InvalidInputError` that names the limit.
        `Explanation.overlay` draws every map at its image's size whatever its own.

        ``timeout`` overrides the client's deadline for each request. Raises a `GradCamError`
        subclass (`ModelUnavailableError`, never retried, for a model that failed to load or
        serves inference only), FileNotFoundError for a missing path, TypeError for something
        that is not an image.
        """
        requests, sources = _requests(
            images, model=model, method=method, target_class=target_class, top_k=top_k,
            layer=layer, layout=layout, prefix_tokens=prefix_tokens, grid=grid,
            counterfactual=counterfactual, eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth, score=score,
            reference_embedding=reference_embedding, target_mask=target_mask, output=output,
            inputs=inputs, num_predictions=num_predictions, num_channels=num_channels,
            heatmap_size=heatmap_size, detections=detections, iou_threshold=iou_threshold,
        )
        results: list[Explanation] = []
        for request, request_sources in zip(requests, sources):
            started = time.perf_counter()
            response = self._call(self._stub.Explain, request, timeout)
            round_trip = time.perf_counter() - started
            results.extend(_explanations(response, request_sources, round_trip, counterfactual))
        return results if _is_many(images) else results[0]

    def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """Every model of the server's repository, with its readiness."""
        return _statuses(self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout))

    def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """A model's input, preprocessing, labels and default target layer, and
        ``explain_error``: why it serves inference only ("" when it explains)."""
        request = pb.GetModelInfoRequest(model=model)
        return _model_info(self._call(self._stub.GetModelInfo, request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The ``grpc.health.v1`` status: "SERVING", "NOT_SERVING" (models still loading, or
        shutting down) or "SERVICE_UNKNOWN". ``service`` "" is the whole server."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = self._call(self._health.Check, request, timeout)
        except GradCamError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _health_name(reply.status)

    def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING; DeadlineError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = self.health(service, timeout=_poll_timeout(deadline))
                if last == "SERVING":
                    return
            except (UnavailableError, DeadlineError) as error:
                last = str(error)
            if time.monotonic() >= deadline:
                raise DeadlineError(f"{self.target} not SERVING after {timeout:g} s: {last}")
            time.sleep(0.1)

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None
    ) -> Response:
        connection = self._connection
        deadline = connection.deadline(timeout)
        attempt = 1
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=connection.metadata)
            except grpc.RpcError as error:
                wait = None
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    wait = connection.delay(attempt, deadline)
                if wait is None:
                    raise connection.failure(error, attempt) from None
            time.sleep(wait)
            attempt += 1


class AsyncGradCamClient(_Client):
    """The asyncio client: the same calls as `GradCamClient`, awaited. Use it in an
    ``async with`` block or await `close`. Inputs are read and encoded off the event loop, and
    the requests of a long list run concurrently (the server batches them). Its arguments are
    those of `GradCamClient`.
    """

    _grpc = grpc.aio


    @property
    def target(self) -> str:
        return self._connection.target

    async def __aenter__(self) -> AsyncGradCamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @overload
    async def explain(
        self, images: str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image, *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> Explanation: ...

    @overload
    async def explain(
        self, images: np.ndarray, *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> Explanation | list[Explanation]: ...

    @overload
    async def explain(
        self, images: Sequence[ImageInput], *,
        model: str, method: str | None = ..., target_class: int | None = ...,
        top_k: int | None = ..., layer: str | Sequence[str] | None = ...,
        layout: str | None = ..., prefix_tokens: int | None = ...,
        grid: str | tuple[int, int] | None = ...,
        counterfactual: bool = ..., eigen_smooth: bool = ..., aug_smooth: bool = ...,
        score: str | None = ..., reference_embedding: Any = ..., target_mask: Any = ...,
        output: str | None = ..., inputs: Any = ..., num_predictions: int = ...,
        num_channels: int = ..., heatmap_size: HeatmapSize | None = ...,
        detections: Any = ..., iou_threshold: float | None = ...,
        timeout: float | None = ...,
    ) -> list[Explanation]: ...

    async def explain(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        model: str,
        method: str | None = None,
        target_class: int | None = None,
        top_k: int | None = None,
        layer: str | Sequence[str] | None = None,
        layout: str | None = None,
        prefix_tokens: int | None = None,
        grid: str | tuple[int, int] | None = None,
        counterfactual: bool = False,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        score: str | None = None,
        reference_embedding: Any = None,
        target_mask: Any = None,
        output: str | None = None,
        inputs: dict[str, Any] | None = None,
        num_predictions: int = 5,
        num_channels: int = 10,
        heatmap_size: HeatmapSize | None = None,
        detections: Sequence[DetectionTarget] | Sequence[Sequence[DetectionTarget]] | None = None,
        iou_threshold: float | None = None,
        timeout: float | None = None,
    ) -> Explanation | list[Explanation]:
        """As `GradCamClient.explain`."""
        requests, sources = await asyncio.to_thread(
            _requests, images, model=model, method=method, target_class=target_class,
            top_k=top_k, layer=layer, layout=layout, prefix_tokens=prefix_tokens, grid=grid,
            counterfactual=counterfactual, eigen_smooth=eigen_smooth,
            aug_smooth=aug_smooth, score=score, reference_embedding=reference_embedding,
            target_mask=target_mask, output=output, inputs=inputs,
            num_predictions=num_predictions, num_channels=num_channels,
            heatmap_size=heatmap_size, detections=detections, iou_threshold=iou_threshold,
        )

        async def send(
            request: pb.ExplainRequest, request_sources: list[_Source | None]
        ) -> list[Explanation]:
            started = time.perf_counter()
            response = await self._call(self._stub.Explain, request, timeout)
            round_trip = time.perf_counter() - started
            return _explanations(response, request_sources, round_trip, counterfactual)

        parts = await asyncio.gather(*(send(r, s) for r, s in zip(requests, sources)))
        results = [explanation for part in parts for explanation in part]
        return results if _is_many(images) else results[0]

    async def list_models(self, *, timeout: float | None = None) -> list[ModelStatus]:
        """As `GradCamClient.list_models`."""
        return _statuses(
            await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        )

    async def model_info(self, model: str, *, timeout: float | None = None) -> ModelInfo:
        """As `GradCamClient.model_info`."""
        request = pb.GetModelInfoRequest(model=model)
        return _model_info(await self._call(self._stub.GetModelInfo, request, timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """As `GradCamClient.health`."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await self._call(self._health.Check, request, timeout)
        except GradCamError as error:
            if error.code == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise
        return _health_name(reply.status)

    async def wait_until_ready(self, timeout: float = 60.0, service: str = "") -> None:
        """As `GradCamClient.wait_until_ready`."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                last = await self.health(service, timeout=_poll_timeout(deadline))
                if last == "SERVING":
                    return
            except (UnavailableError, DeadlineError) as error:
                last = str(error)
            if time.monotonic() >= deadline:
                raise DeadlineError(f"{self.target} not SERVING after {timeout:g} s: {last}")
            await asyncio.sleep(0.1)

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        connection = self._connection
        deadline = connection.deadline(timeout)
        attempt = 1
        while True:
            try:
                return await method(
                    request, timeout=_remaining(deadline), metadata=connection.metadata
                )
            except grpc.aio.AioRpcError as error:
                wait = None
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    wait = connection.delay(attempt, deadline)
                if wait is None:
                    raise connection.failure(error, attempt) from None
            await asyncio.sleep(wait)
            attempt += 1
