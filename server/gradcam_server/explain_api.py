"""The typed explain API servicer (``gradcam.v1.GradCam``), thin: it decodes an
``ExplainRequest`` message into the core's `request.ExplainRequest`, resolves it once
(`request.resolve_explain`), lets the service run it, and encodes the ``ExplainResponse`` (overlays
drawn here) in the service's post-processing thread."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
from PIL import Image

from gradcam_common.methods import METHOD_NAMES as _NAMES
from gradcam_common.methods import enum_value, name_of
from gradcam_common.overlay import COLORMAPS, draw_box, overlay
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc

from . import faithfulness, wire
from .datatypes import element_count, from_bytes
from .detections import MAX_DETECTIONS_PER_IMAGE, DetectionRequest
from .errors import MAX_TEXT_CHARS, InvalidInput, shown
from .metrics import Metrics
from .model import Explaining, request_grid
from .postprocess import ClassMap, Explained
from .request import (
    EvaluateRequest,
    ExplainRequest,
    PointingTarget,
    resolve_evaluate,
    resolve_explain,
)
from .service import GradCamService
from .transport import deadline_of, rpc

METHOD_ENUMS = {name: enum_value(name) for name in _NAMES}  # the typed API's value of a method
METHOD_NAMES = {value: name for name, value in METHOD_ENUMS.items()}
# Evaluate's metrics: METRIC_DELETION is "deletion", and so on.
METRIC_ENUMS = {name: pb.Metric.Value(f"METRIC_{name.upper()}") for name in faithfulness.METRICS}
METRIC_NAMES = {value: name for name, value in METRIC_ENUMS.items()}
DEFAULT_PREDICTIONS = 5
DEFAULT_CHANNELS = 10
DEFAULT_OPACITY = 0.5
OVERLAY_BYTES_PER_PIXEL = 4  # an RGB PNG at most, with its filter bytes and headers
# Field numbers of the large fields written by `wire`.
_EXPLANATIONS = pb.ExplainResponse.EXPLANATIONS_FIELD_NUMBER
_HEATMAPS = pb.Explanation.HEATMAPS_FIELD_NUMBER
_HEATMAP_DATA = pb.Heatmap.DATA_FIELD_NUMBER
_PIXEL_GRADIENTS = pb.Heatmap.PIXEL_GRADIENTS_FIELD_NUMBER
_TENSOR_DATA = pb.Tensor.DATA_FIELD_NUMBER
_UPDATE_RESPONSE = pb.ExplainUpdate.RESPONSE_FIELD_NUMBER


class GradCamServicer(pb_grpc.GradCamServicer):
    def __init__(self, service: GradCamService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics

    @rpc("explain")
    async def Explain(self, request: pb.ExplainRequest, context, labels) -> pb.ExplainResponse:
        started = time.perf_counter()
        model = self.service.model(request.model)
        labels["model"] = model.name
        method = _method_name(request.method)
        labels["method"] = method or model.config.method
        with self.service.admit(model):
            return await self._explain(model, method, request, context, started)

    @rpc("explain", streaming=True)
    async def ExplainStream(self, request: pb.ExplainRequest, context, labels) -> bytes:
        """Explain, streamed: an ExplainProgress after each step of a request run in steps
        (Score-CAM's masked passes), then the response, the last ExplainUpdate (returned, for
        `rpc` to write). A cancelled call cancels the explanation, which stops its run."""
        started = time.perf_counter()
        model = self.service.model(request.model)
        labels["model"] = model.name
        method = _method_name(request.method)
        labels["method"] = method or model.config.method
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int, float]] = asyncio.Queue()

        def progress(done: int, total: int) -> None:  # told from a runtime thread
            loop.call_soon_threadsafe(steps.put_nowait, (done, total, time.perf_counter()))

        with self.service.admit(model):
            explaining = asyncio.ensure_future(
                self._explain(model, method, request, context, started, progress))
            pace = _Pace(started)
            try:
                while not explaining.done():
                    step = asyncio.ensure_future(steps.get())
                    await asyncio.wait({explaining, step}, return_when=asyncio.FIRST_COMPLETED)
                    if not step.done():
                        step.cancel()
                        continue
                    await context.write(pace.update(*step.result()))
                while not steps.empty():
                    await context.write(pace.update(*steps.get_nowait()))
                response = explaining.result()
            finally:
                explaining.cancel()
        return wire.join(wire.field(_UPDATE_RESPONSE, [response]))

    async def _explain(
        self, model, method: str | None, request: pb.ExplainRequest,
        context: grpc.aio.ServicerContext, started: float, progress=None,
    ) -> bytes:
        """The serialized response; the request's place is held by the caller. `progress`
        (done, total), where given, is told of the steps of a request run in steps."""
        options = request.options
        _check_options(request)
        target = request.target.WhichOneof("kind")
        resolved = resolve_explain(model, ExplainRequest(
            images=[_image(image, index) for index, image in enumerate(request.images)],
            graph=Explaining(
                method=method,
                layer=tuple(request.layers) or request.layer or None,
                counterfactual=request.counterfactual,
                eigen_smooth=request.eigen_smooth,
                aug_smooth=request.aug_smooth,
                score=request.score or None,
                output=request.output or None,
                layout=request.layout or None,
                prefix_tokens=(
                    request.prefix_tokens if request.HasField("prefix_tokens") else None
                ),
                grid=request_grid(request.grid or None),
                iou_threshold=(
                    request.iou_threshold if request.HasField("iou_threshold") else None
                ),
            ),
            class_index=request.target.class_index if target == "class_index" else None,
            top_k=request.target.top_k if target == "top_k" else None,
            reference=_tensor(request, "reference_embedding", (1, 2), "[D] or [N, D]"),
            mask=_tensor(request, "target_mask", (2, 3), "[h, w] or [N, h, w]"),
            others={
                name: from_bytes(t.data, t.datatype, tuple(t.shape), f"input {name!r}")
                for name, t in request.inputs.items()
            },
            detections=_detections(request),
            num_predictions=options.num_predictions or DEFAULT_PREDICTIONS,
            num_channels=options.num_channels or DEFAULT_CHANNELS,
            heatmap_size=options.heatmap_size,
            extra_bytes_per_pixel=OVERLAY_BYTES_PER_PIXEL if options.overlay else 0,
            keep_pictures=options.overlay,
        ), self.service.max_pixels)
        return await self.service.explain(
            resolved, lambda explained: _response(model.name, explained, options, started),
            deadline=deadline_of(context), progress=progress,
        )

    @rpc("explain")
    async def Evaluate(self, request: pb.EvaluateRequest, context, labels) -> pb.EvaluateResponse:
        started = time.perf_counter()
        model = self.service.model(request.model)
        labels["model"] = model.name
        labels["method"] = "evaluate"
        for field, text in (("layer", request.layer), ("score", request.score)):
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidInput(f"{field} is {len(text)} characters long; at most "
                                   f"{MAX_TEXT_CHARS}", field=field)
        target = request.target.WhichOneof("kind")
        if target == "top_k":
            raise InvalidInput("Evaluate explains one class per image: give target.class_index "
                               "or leave target unset (the top-1 class)", field="target.top_k")
        if len(request.methods) > len(METHOD_ENUMS) or len(request.metrics) > len(METRIC_ENUMS):
            raise InvalidInput("each method and metric may be asked once")
        with self.service.admit(model):
            resolved = resolve_evaluate(model, EvaluateRequest(
                images=[_image(image, index) for index, image in enumerate(request.images)],
                methods=[_method_name(m) for m in request.methods] or [None],
                layer=request.layer or None,
                class_index=request.target.class_index if target == "class_index" else None,
                metrics=[_metric_name(m) for m in request.metrics],
                steps=request.steps,
                percentiles=list(request.road_percentiles),
                pointing=_pointing(request),
                pointing_tolerance=(request.pointing_tolerance
                                    if request.HasField("pointing_tolerance") else None),
                score=request.score or None,
            ))
            return await self.service.evaluate(
                resolved, lambda evaluated: _evaluation(model.name, evaluated, started),
                deadline=deadline_of(context),
            )

    @rpc("explain")
    async def ListModels(self, request, context, labels) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelStatus(name=s.name, ready=s.ready, reason=s.reason)
                for s in self.service.repository.statuses()
            ]
        )

    @rpc("explain")
    async def GetModelInfo(self, request, context, labels) -> pb.ModelInfo:
        model = self.service.model(request.model)
        labels["model"] = model.name
        prep = model.config.preprocessing
        explainable = model.explain_error is None
        target = model.default_target
        return pb.ModelInfo(
            name=model.name,
            input=model.input.name,
            input_shape=list(model.input.shape),
            input_size=list(model.input_hw),
            outputs=[o.name for o in model.outputs],
            layer=",".join(_layers(model.default_layer)),
            layer_shape=[-1, *model.layer_shape] if explainable else [],
            num_classes=model.num_classes,
            has_labels=model.labels is not None,
            max_batch_size=model.max_batch_size,
            methods=sorted(METHOD_ENUMS.values()) if explainable else [],
            num_boxes=model.num_anchors if model.is_detector else 0,
            mean=list(prep.mean),
            std=list(prep.std),
            default_score=model.resolve(Explaining()).score if explainable else "",
            other_inputs=[i.name for i in model.other_inputs],
            explain_error=model.explain_error or "",
            layout=target.get("layout", ""),
            prefix_tokens=_prefix_tokens(target),
            grid=target.get("grid", ""),
        )


class _Pace:
    """ExplainStream's progress messages: the remaining time estimated from the pace since
    the first step was reported (that step also ran the forward pass and waited in the
    queue), or, at the first, from the time since the request came."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: tuple[int, float] | None = None

    def update(self, done: int, total: int, now: float) -> pb.ExplainUpdate:
        elapsed = now - self.started
        if self.first is None or done <= self.first[0]:
            per_pass = elapsed / done if done else 0.0
            self.first = self.first or (done, now)
        else:
            per_pass = (now - self.first[1]) / (done - self.first[0])
        return pb.ExplainUpdate(progress=pb.ExplainProgress(
            passes_done=done, passes_total=total, elapsed_seconds=elapsed,
            remaining_seconds=max(total - done, 0) * per_pass,
        ))


def _check_options(request: pb.ExplainRequest) -> None:
    """The request's texts and display options, bounded and known."""
    options = request.options
    texts = {"layer": request.layer, "score": request.score, "output": request.output,
             "layout": request.layout, "grid": request.grid,
             "options.colormap": options.colormap, "options.heatmap_size": options.heatmap_size,
             **{f"layers[{i}]": layer for i, layer in enumerate(request.layers)}}
    for field, text in texts.items():
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidInput(
                f"{field.removeprefix('options.')} is {len(text)} characters long; at most "
                f"{MAX_TEXT_CHARS}", field=field,
            )
    if options.num_predictions < 0 or options.num_channels < 0:
        raise InvalidInput("num_predictions and num_channels must not be negative",
                           field="options")
    if options.colormap and options.colormap not in COLORMAPS:
        raise InvalidInput(
            f"unknown colormap {shown(options.colormap)}; available: {', '.join(COLORMAPS)}",
            field="options.colormap",
        )
    if not 0 <= options.overlay_opacity <= 1:
        raise InvalidInput(f"overlay_opacity must be in [0, 1], got {options.overlay_opacity}",
                           field="options.overlay_opacity")


def _response(
    model: str, explained: Explained, options: pb.ExplainOptions, started: float,
) -> bytes:
    """The serialized ExplainResponse of `explained`; `started` is when the call began.
    Heatmaps and gradients are written straight from their arrays' memory (`wire`); overlays
    are drawn here, on the images the service decoded. Blocking: it runs in the service's
    post-processing thread."""
    pictures = explained.pictures or (None,) * len(explained.explanations)
    explanations = []
    for picture, explanation in zip(pictures, explained.explanations):
        message = pb.Explanation()
        for p in explanation.predictions:
            message.predictions.add(
                class_index=p.class_index, label=p.label, score=p.score, logit=p.logit
            )
        if options.overlay and picture is not None:
            first = explanation.maps[0]
            message.overlay_png = _overlay_png(
                picture, first.heatmap, options,
                None if first.detection is None else first.detection.box,
            )
        heatmaps = [part for class_map in explanation.maps
                    for part in wire.field(_HEATMAPS, _heatmap(class_map))]
        explanations += wire.field(_EXPLANATIONS, [*heatmaps, message.SerializeToString()])
    layers = (explained.layer,) if isinstance(explained.layer, str) else explained.layer
    target = explained.target
    response = pb.ExplainResponse(
        model=model, layer=layers[0], layers=layers, method=METHOD_ENUMS[explained.method],
        layout=target.get("layout", ""), prefix_tokens=_prefix_tokens(target),
        grid=target.get("grid", ""),
    )
    response.timings.preprocess_seconds = explained.preprocess_seconds
    response.timings.queue_seconds = explained.queue_seconds
    response.timings.inference_seconds = explained.inference_seconds
    response.timings.total_seconds = time.perf_counter() - started
    return wire.join([response.SerializeToString(), *explanations])


def _layers(layer: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A layer, several fused layers, or none, as a tuple of names."""
    if layer is None:
        return ()
    return (layer,) if isinstance(layer, str) else tuple(layer)


def _prefix_tokens(target: dict[str, str]) -> int | None:
    """The prefix tokens of an explained target (`ServedModel.explained`); None (the field
    left unset) where not known or not tokens."""
    return int(target["prefix_tokens"]) if "prefix_tokens" in target else None


def _method_name(method: int) -> str | None:
    try:
        return name_of(method)
    except (KeyError, ValueError):
        raise InvalidInput(f"unknown method {method}", field="method") from None


def _metric_name(metric: int) -> str:
    if metric not in METRIC_NAMES:
        raise InvalidInput(f"unknown metric {metric}; available: "
                           f"{', '.join(pb.Metric.Name(v) for v in METRIC_NAMES)}",
                           field="metrics")
    return METRIC_NAMES[metric]


def _pointing(request: pb.EvaluateRequest) -> list[PointingTarget]:
    """The pointing targets, one per image; bounded in number before any mask is read."""
    if len(request.pointing) > max(len(request.images), 1):
        raise InvalidInput(f"{len(request.pointing)} pointing targets for "
                           f"{len(request.images)} images (give one per image)",
                           field="pointing")
    targets = []
    for number, target in enumerate(request.pointing):
        region = target.WhichOneof("region")
        if region == "box":
            box = target.box
            targets.append(PointingTarget(box=(box.x1, box.y1, box.x2, box.y2)))
        elif region == "mask":
            shape = tuple(target.mask.shape)
            count = element_count(shape, f"pointing[{number}].mask")
            if len(shape) != 2 or count * 4 != len(target.mask.data):
                raise InvalidInput(
                    f"image {number}: a pointing mask is [H, W] float32 with 4 bytes per "
                    f"value; got shape {list(shape)} and {len(target.mask.data)} bytes",
                    field=f"pointing[{number}]")
            targets.append(PointingTarget(
                mask=np.frombuffer(target.mask.data, dtype="<f4").reshape(shape)))
        else:
            targets.append(PointingTarget())
    return targets


def _evaluation(model: str, evaluated: faithfulness.Evaluated, started: float) -> bytes:
    """The serialized EvaluateResponse; it runs in the service's post-processing thread."""
    plan = evaluated.plan
    response = pb.EvaluateResponse(
        model=model, score=plan.score, steps=plan.steps, road_percentiles=list(plan.percentiles),
        copies=evaluated.copies, batch_size=evaluated.batch_size,
    )
    for image in evaluated.images:
        message = response.images.add(class_index=image.class_index, label=image.label,
                                      score=image.score)
        for method, values in image.methods:
            evaluation = message.methods.add(method=METHOD_ENUMS[method])
            for value in values.values():
                evaluation.metrics.add(metric=METRIC_ENUMS[value.name], value=value.value,
                                       curve=value.curve)
    response.timings.preprocess_seconds = evaluated.preprocess_seconds
    response.timings.inference_seconds = evaluated.inference_seconds
    response.timings.total_seconds = time.perf_counter() - started
    return response.SerializeToString()


def _image(image: pb.Image, index: int) -> bytes | np.ndarray:
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return image.encoded
    if kind == "tensor":
        shape = tuple(image.tensor.shape)
        count = element_count(shape, f"image {index}")
        if len(shape) != 3 or count * 4 != len(image.tensor.data):
            raise InvalidInput(
                f"image {index}: a tensor must be [C, H, W] float32 with 4 bytes per value; "
                f"got shape {list(shape)} and {len(image.tensor.data)} bytes"
            )
        return np.frombuffer(image.tensor.data, dtype="<f4").reshape(shape).astype(np.float32)
    raise InvalidInput(f"image {index} is empty: set encoded or tensor")


def _tensor(
    request: pb.ExplainRequest, field: str, ranks: tuple[int, ...], shapes: str
) -> np.ndarray | None:
    """The float32 tensor `field` of the request, of one of `ranks`; None when unset."""
    if not request.HasField(field):
        return None
    tensor = getattr(request, field)
    shape = tuple(tensor.shape)
    count = element_count(shape, field)
    if len(shape) not in ranks or count * 4 != len(tensor.data):
        raise InvalidInput(
            f"{field} must be {shapes} float32 with 4 bytes per value; got shape {list(shape)} "
            f"and {len(tensor.data)} bytes"
        )
    return np.frombuffer(tensor.data, dtype="<f4").reshape(shape).astype(np.float32)


def _heatmap(class_map: ClassMap) -> list[wire.Part]:
    """A serialized Heatmap message, its map and gradients read from their arrays."""
    height, width = class_map.heatmap.shape
    message = pb.Heatmap(
        class_index=class_map.class_index,
        label=class_map.label,
        height=height,
        width=width,
        channels=[pb.ChannelImportance(channel=c, weight=w) for c, w in class_map.channels],
        concept_scores=list(class_map.concept_scores),
        detection=None if class_map.detection is None else pb.Detection(
            index=class_map.detection.index, box=list(class_map.detection.box),
            score=class_map.detection.score, iou=class_map.detection.iou,
        ),
    )
    parts = [message.SerializeToString(),
             *wire.field(_HEATMAP_DATA, [wire.array_bytes(class_map.heatmap)])]
    gradients = class_map.pixel_gradients
    if gradients is not None:
        shape = pb.Tensor(shape=list(gradients.shape)).SerializeToString()
        parts += wire.field(_PIXEL_GRADIENTS, [
            shape, *wire.field(_TENSOR_DATA, [wire.array_bytes(gradients)])
        ])
    return parts


def _detections(request: pb.ExplainRequest) -> list[list[DetectionRequest]]:
    """The request's detections per image, as the service takes them; bounded before any is
    converted (a 64 MiB message could otherwise hold millions of them, or one huge box)."""
    if len(request.detections) > max(len(request.images), 1):
        raise InvalidInput(f"{len(request.detections)} lists of detections for "
                           f"{len(request.images)} images (give one per image, or one for all)")
    for number, image in enumerate(request.detections):
        if len(image.detections) > MAX_DETECTIONS_PER_IMAGE:
            raise InvalidInput(f"image {number}: give 1..{MAX_DETECTIONS_PER_IMAGE} detections "
                               f"to explain, got {len(image.detections)}")
        for position, target in enumerate(image.detections):
            if len(target.box) not in (0, 4):
                raise InvalidInput(f"image {number}, detection {position}: a box is 4 numbers "
                                   f"x1, y1, x2, y2, got {len(target.box)}")
    return [
        [
            DetectionRequest(
                index=target.index if target.HasField("index") else None,
                box=tuple(target.box) if len(target.box) else None,
                class_index=target.class_index if target.HasField("class_index") else None,
            )
            for target in image.detections
        ]
        for image in request.detections
    ]


def _overlay_png(
    image: Image.Image, heatmap: np.ndarray, options: pb.ExplainOptions,
    box: tuple[float, ...] | None = None,
) -> bytes:
    """The heatmap over the image, a detection's `box` (image pixels) outlined on it."""
    blended = overlay(
        image.convert("RGB"), heatmap, colormap=options.colormap or "jet",
        opacity=options.overlay_opacity or DEFAULT_OPACITY,
    )
    if box is not None:
        blended = draw_box(blended, box)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()
