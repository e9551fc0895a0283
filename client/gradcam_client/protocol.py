"""The typed explain API's messages, built and read without any I/O: what both clients send and
how they read what comes back.

`explain_call(images, model=..., options=...)` turns `explain`'s images and `ExplainOptions` into
an `ExplainCall`: its ``pb.ExplainRequest`` parts of at most IMAGES_PER_REQUEST images each, in
order, every part with the `ImageSource` of each of its images and the place of its first image
in the call. Per-image arrays (``reference_embedding`` [N, D], ``target_mask`` [N, h, w], the
model's other ``inputs`` [N, ...] and per-image ``detections``) are cut into the same rows; one
that is the same for every image ([D], [h, w], one detection list) goes whole into every part.
Every option is checked here, before anything is sent: a refusal is an `InvalidInputError` whose
``code`` is None. A part reads its ``pb.ExplainResponse`` into one `Explanation` per image
(`RequestPart.explanations`), and the call puts the parts' results back together
(`ExplainCall.answer`: one `Explanation` for one image, a list for many).

The other answers: `model_statuses` (ListModels), `model_info` (GetModelInfo) and
`health_status` (``grpc.health.v1``). Method names and their wire values are
`gradcam_common.methods`'; tensor datatypes `gradcam_common.datatypes`'.
"""

from __future__ import annotations

import numbers
import re
import reprlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from grpc_health.v1 import health_pb2

from gradcam_common.datatypes import datatype_of
from gradcam_common.methods import METHOD_NAMES, enum_value, name_of
from gradcam_proto import gradcam_pb2 as pb

from .errors import InvalidInputError, images_counted_from
from .images import ImageSource, encode_images, is_many
from .options import DetectionTarget, ExplainOptions, HeatmapSize
from .results import (
    ClassHeatmap,
    DetectedBox,
    Evaluation,
    Explanation,
    ImageEvaluation,
    MetricResult,
    ModelInfo,
    ModelStatus,
    Prediction,
    Progress,
    Timings,
)

IMAGES_PER_REQUEST = 16  # a longer list is sent as several requests
METHODS: tuple[str, ...] = tuple(sorted(METHOD_NAMES, key=enum_value))
"""The method names `explain` takes, in the order of their API values (as
`ModelInfo.methods` lists them)."""
METHOD_OF_NAME: dict[str, int] = {name: enum_value(name) for name in METHODS}
"""The method names and their values in the API."""
METRICS: tuple[str, ...] = tuple(
    name.removeprefix("METRIC_").lower() for name in pb.Metric.keys()
    if name != "METRIC_UNSPECIFIED"
)
"""The faithfulness metrics `evaluate` takes (docs/FAITHFULNESS.md), in API order."""
_SIZE_TEXT = re.compile(r"([0-9]+)\s*x\s*([0-9]+)")
_GRID_TEXT = re.compile(r"(\d+)x(\d+)")


# --- requests -------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RequestPart:
    """One request of an explain call, the images it holds, and where they are in the call."""

    request: pb.ExplainRequest
    sources: list[ImageSource | None]  # per image: what its overlay is drawn on
    first_image: int  # the call's index of the request's first image
    counterfactual: bool

    def explanations(self, response: pb.ExplainResponse, round_trip: float) -> list[Explanation]:
        """The response's explanations, one per image of the request, in order; ``round_trip``
        is the seconds the client waited for it, retries included."""
        return explanations(response, self.sources, round_trip, self.counterfactual)

    def images_counted_in_call(self) -> AbstractContextManager[None]:
        """Around the request's call: an `InvalidInputError`'s field violations renumbered
        from the request's images (images[0] ...) to the call's."""
        return images_counted_from(self.first_image)


@dataclass(frozen=True, eq=False)
class ExplainCall:
    """The requests of one `explain` call, and how their answers make its result."""

    parts: list[RequestPart]
    many: bool  # several images were given: the result is a list

    def answer(self, results: Sequence[list[Explanation]]) -> Explanation | list[Explanation]:
        """The call's result from each part's explanations, in the parts' order."""
        flat = [explanation for part in results for explanation in part]
        return flat if self.many else flat[0]


def explain_call(images: Any, *, model: str, options: ExplainOptions) -> ExplainCall:
    """The requests explaining ``images`` (one image or many, as `explain` takes them) with
    ``model`` and ``options``; `InvalidInputError` for an option or an image refused."""
    if options.target_class is not None and options.top_k is not None:
        raise InvalidInputError("give target_class or top_k, not both")
    target = pb.Target()
    if options.target_class is not None:
        target.class_index = int(options.target_class)
    elif options.top_k is not None:
        target.top_k = int(options.top_k)
    layer = options.layer
    shared = dict(
        model=model,
        method=method_enum(options.method),
        target=target,
        layer=layer if isinstance(layer, str) else "",
        layers=[] if layer is None or isinstance(layer, str) else list(layer),
        layout=options.layout or "",
        prefix_tokens=_prefix_tokens(options.prefix_tokens),
        grid=grid_option(options.grid),
        counterfactual=options.counterfactual,
        eigen_smooth=options.eigen_smooth,
        aug_smooth=options.aug_smooth,
        score=options.score or "",
        output=options.output or "",
        options=pb.ExplainOptions(
            num_predictions=options.num_predictions, num_channels=options.num_channels,
            heatmap_size=heatmap_size_option(options.heatmap_size),
        ),
        iou_threshold=options.iou_threshold,
    )
    inputs = options.inputs or {}
    encoded = encode_images(images)
    parts = []
    for start in range(0, len(encoded), IMAGES_PER_REQUEST):
        chunk = encoded[start : start + IMAGES_PER_REQUEST]
        rows = slice(start, start + len(chunk))
        request = pb.ExplainRequest(
            images=[message for message, _ in chunk],
            reference_embedding=_rows_tensor(options.reference_embedding, 2, rows),
            target_mask=_rows_tensor(options.target_mask, 3, rows),
            inputs={name: _typed_rows(value, rows) for name, value in inputs.items()},
            detections=_detections_rows(options.detections, rows),
            **shared,
        )
        sources = [source for _, source in chunk]
        parts.append(RequestPart(request, sources, start, options.counterfactual))
    return ExplainCall(parts, is_many(images))


def method_enum(method: str | None) -> int:
    """The API value of a method name (case does not matter); 0, the model's default, for
    None."""
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
        match = _SIZE_TEXT.fullmatch(text)
        if match is not None:
            size = int(match[1]), int(match[2])
    elif _is_integer_pair(value):
        size = int(value[0]), int(value[1])
    if size is None or min(size) < 1:
        raise InvalidInputError(
            "heatmap_size must be 'image', 'model', a (width, height) pair of positive "
            f"integers or 'WIDTHxHEIGHT' (e.g. '224x224'), got {reprlib.repr(value)}"
        )
    return f"{size[0]}x{size[1]}"


def grid_option(value: str | tuple[int, int] | None) -> str:
    """The API's ``grid`` text: "" for None, the text as given (the server checks it), or
    "HxW" for a (rows, columns) pair of integers."""
    if value is None or isinstance(value, str):
        return value or ""
    if _is_integer_pair(value):
        return f"{int(value[0])}x{int(value[1])}"
    raise InvalidInputError(
        f"grid must be a (rows, columns) pair of integers or 'HxW', got {reprlib.repr(value)}"
    )


def _is_integer_pair(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(side, numbers.Integral) and not isinstance(side, bool) for side in value
    )


def _prefix_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or not -2**31 <= value < 2**31):
        raise InvalidInputError(f"prefix_tokens must be an integer, got {reprlib.repr(value)}")
    return int(value)


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


def _typed_rows(value: Any, rows: slice) -> pb.TypedTensor:
    """The `rows` of a model input [N, ...] (one row per image), in its own datatype."""
    array = np.asarray(value)
    try:
        datatype = datatype_of(array.dtype) if array.ndim else None
    except TypeError:
        datatype = None
    if datatype is None:
        raise InvalidInputError(
            f"a model input must be an array with one row per image, of a numeric dtype; got "
            f"{array.dtype} {list(array.shape)}"
        )
    part = np.ascontiguousarray(array[rows], dtype=array.dtype.newbyteorder("<"))
    return pb.TypedTensor(datatype=datatype, shape=list(part.shape), data=part.tobytes())


def evaluate_request(
    images: Any, *, model: str, methods: Sequence[str | None] = (), metrics: Sequence[str] = (),
    target_class: int | None = None, steps: int | None = None,
    road_percentiles: Sequence[float] = (), pointing: Sequence[Any] | None = None,
    pointing_tolerance: float | None = None, layer: str | None = None,
    score: str | None = None,
) -> pb.EvaluateRequest:
    """The Evaluate request of `GradCamClient.evaluate`'s arguments; `InvalidInputError`
    for an unknown method or metric, or a pointing target that is neither a box nor a mask."""
    for metric in metrics:
        if metric.lower() not in METRICS:
            raise InvalidInputError(f"unknown metric {metric!r}; available: {', '.join(METRICS)}")
    request = pb.EvaluateRequest(
        model=model,
        images=[message for message, _ in encode_images(images)],
        methods=[method_enum(method) for method in methods],
        metrics=[pb.Metric.Value(f"METRIC_{metric.upper()}") for metric in metrics],
        steps=steps or 0,
        road_percentiles=list(road_percentiles),
        layer=layer or "",
        score=score or "",
    )
    if target_class is not None:
        request.target.class_index = int(target_class)
    if pointing_tolerance is not None:
        request.pointing_tolerance = pointing_tolerance
    for number, target in enumerate(pointing or ()):
        message = request.pointing.add()
        array = np.asarray(target)
        if array.ndim == 1 and array.size == 4:
            x1, y1, x2, y2 = (float(v) for v in array)
            message.box.CopyFrom(pb.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2))
        elif array.ndim == 2:
            mask = np.ascontiguousarray(array, dtype="<f4")
            message.mask.CopyFrom(pb.Tensor(shape=list(mask.shape), data=mask.tobytes()))
        else:
            raise InvalidInputError(f"pointing target {number}: a box (x1, y1, x2, y2) or a "
                                    f"mask [H, W], got shape {list(array.shape)}")
    return request


def evaluation(response: pb.EvaluateResponse, round_trip: float) -> Evaluation:
    """The `Evaluation` of an EvaluateResponse."""
    t = response.timings
    timings = Timings(
        t.preprocess_seconds, t.queue_seconds, t.inference_seconds, t.total_seconds, round_trip
    )
    images = [
        ImageEvaluation(
            image.class_index, image.label, image.score,
            {
                method_name(method.method): {
                    _metric_name(value.metric): MetricResult(
                        _metric_name(value.metric), value.value,
                        np.asarray(value.curve, np.float32))
                    for value in method.metrics
                }
                for method in image.methods
            },
        )
        for image in response.images
    ]
    return Evaluation(
        response.model, images, response.score, response.steps,
        tuple(response.road_percentiles), response.copies, response.batch_size, timings,
    )


def _metric_name(value: int) -> str:
    """A metric's name; a value newer than these stubs reads as its number."""
    try:
        return pb.Metric.Name(value).removeprefix("METRIC_").lower()
    except ValueError:
        return str(value)


# --- responses ------------------------------------------------------------------------------


def explanations(
    response: pb.ExplainResponse,
    sources: Sequence[ImageSource | None],
    round_trip: float,
    counterfactual: bool,
) -> list[Explanation]:
    """One `Explanation` per image of ``response``, each keeping its image's source."""
    t = response.timings
    timings = Timings(
        t.preprocess_seconds, t.queue_seconds, t.inference_seconds, t.total_seconds, round_trip
    )
    method = method_name(response.method)
    prefix_tokens = response.prefix_tokens if response.HasField("prefix_tokens") else None
    return [
        Explanation(
            response.model, method, response.layer,
            [_class_heatmap(h) for h in message.heatmaps],
            [Prediction(p.class_index, p.label, p.score, p.logit) for p in message.predictions],
            timings, counterfactual=counterfactual, layout=response.layout,
            prefix_tokens=prefix_tokens, grid=grid_of(response.grid), _source=source,
        )
        for message, source in zip(response.explanations, sources)
    ]


def _class_heatmap(message: pb.Heatmap) -> ClassHeatmap:
    detection = message.detection if message.HasField("detection") else None
    return ClassHeatmap(
        class_index=message.class_index,
        label=message.label,
        heatmap=_float32(message.data, (message.height, message.width)),
        channels=[(c.channel, c.weight) for c in message.channels],
        pixel_gradients=(_float32(message.pixel_gradients.data, message.pixel_gradients.shape)
                         if message.HasField("pixel_gradients") else None),
        concept_scores=tuple(message.concept_scores),
        detection=None if detection is None else DetectedBox(
            detection.index, tuple(detection.box), detection.score, detection.iou
        ),
    )


def _float32(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """A writable float32 array of the wire's little-endian float32 bytes."""
    return np.frombuffer(data, dtype="<f4").reshape(tuple(shape)).astype(np.float32)


def method_name(value: int) -> str:
    """The method name of an API value; a value newer than these stubs reads as its
    number, and METHOD_UNSPECIFIED as ""."""
    try:
        return name_of(value) or ""
    except (KeyError, ValueError):
        return str(value)


def grid_of(text: str) -> tuple[int, int] | None:
    """(rows, columns) of the server's "HxW" grid text; None when empty."""
    match = _GRID_TEXT.fullmatch(text)
    return (int(match[1]), int(match[2])) if match else None


def progress(message: pb.ExplainProgress, request: int = 0) -> Progress:
    return Progress(message.passes_done, message.passes_total, message.elapsed_seconds,
                    message.remaining_seconds, request)


def model_statuses(response: pb.ListModelsResponse) -> list[ModelStatus]:
    return [ModelStatus(m.name, m.ready, m.reason) for m in response.models]


def model_info(message: pb.ModelInfo) -> ModelInfo:
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
        methods=tuple(method_name(m) for m in message.methods),
        mean=tuple(message.mean),
        std=tuple(message.std),
        default_score=message.default_score,
        other_inputs=tuple(message.other_inputs),
        explain_error=message.explain_error,
        layout=message.layout,
        prefix_tokens=message.prefix_tokens if message.HasField("prefix_tokens") else None,
        grid=grid_of(message.grid),
    )


SERVICE_UNKNOWN = "SERVICE_UNKNOWN"  # health of a service the server does not know (NOT_FOUND)


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    """The reply's status name: "SERVING", or "NOT_SERVING" (models still loading, or the
    server shutting down)."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
