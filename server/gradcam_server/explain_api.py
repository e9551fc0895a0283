"""The typed explain API servicer (``gradcam.v1.GradCam``): converts messages to service calls
and back; all logic lives in `GradCamService`."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np

from gradcam_common.overlay import COLORMAPS, draw_box, overlay
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc

from .datatypes import element_count, from_bytes
from .detections import MAX_DETECTIONS_PER_IMAGE, DetectionRequest, explain_detections
from .errors import MAX_TEXT_CHARS, InvalidInput, shown
from .metrics import Metrics
from .model import METHODS, Explaining, ServedModel, request_grid
from .preprocess import decode_image
from .service import ClassMap, Explained, GradCamService, HeatmapSize
from .transport import deadline_of, rpc

METHOD_NAMES = {
    pb.METHOD_GRADCAM: "gradcam",
    pb.METHOD_GRADCAM_PLUS_PLUS: "gradcam++",
    pb.METHOD_XGRADCAM: "xgradcam",
    pb.METHOD_HIRESCAM: "hirescam",
    pb.METHOD_GRADCAM_ELEMENTWISE: "gradcam-elementwise",
    pb.METHOD_LAYERCAM: "layercam",
    pb.METHOD_GUIDED_BACKPROP: "guided-backprop",
    pb.METHOD_GUIDED_GRADCAM: "guided-gradcam",
    pb.METHOD_ABLATIONCAM: "ablationcam",
    pb.METHOD_EIGENCAM: "eigencam",
    pb.METHOD_EIGENGRADCAM: "eigengradcam",
    pb.METHOD_SCORECAM: "scorecam",
    pb.METHOD_INTEGRATED_GRADCAM: "integrated-gradcam",
    pb.METHOD_GROUPCAM: "groupcam",
}
METHOD_ENUMS = {name: enum for enum, name in METHOD_NAMES.items()}
DEFAULT_PREDICTIONS = 5
DEFAULT_CHANNELS = 10
DEFAULT_OPACITY = 0.5
OVERLAY_BYTES_PER_PIXEL = 4  # an RGB PNG at most, with its filter bytes and headers


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

    async def _explain(
        self, model: ServedModel, method: str | None, request: pb.ExplainRequest,
        context: grpc.aio.ServicerContext, started: float,
    ) -> bytes:
        """The serialized response; the request's place is held by the caller."""
        options = request.options
        texts = {"layer": request.layer, "score": request.score, "output": request.output,
                 "layout": request.layout, "grid": request.grid,
                 "colormap": options.colormap, "heatmap_size": options.heatmap_size,
                 **{f"layers[{i}]": layer for i, layer in enumerate(request.layers)}}
        for field, text in texts.items():
            if len(text) > MAX_TEXT_CHARS:
                raise InvalidInput(
                    f"{field} is {len(text)} characters long; at most {MAX_TEXT_CHARS}"
                )
        if options.num_predictions < 0 or options.num_channels < 0:
            raise InvalidInput("num_predictions and num_channels must not be negative")
        if options.colormap and options.colormap not in COLORMAPS:
            raise InvalidInput(
                f"unknown colormap {shown(options.colormap)}; available: {', '.join(COLORMAPS)}"
            )
        if not 0 <= options.overlay_opacity <= 1:
            raise InvalidInput(f"overlay_opacity must be in [0, 1], got {options.overlay_opacity}")
        images = [_image(image, index) for index, image in enumerate(request.images)]
        target = request.target.WhichOneof("kind")
        explaining = Explaining(
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
        )
        heatmap_size = HeatmapSize.parse(options.heatmap_size, self.service.max_pixels)
        overlay_bytes = OVERLAY_BYTES_PER_PIXEL if options.overlay else 0
        if model.resolve(explaining).score == "detection":
            if target is not None:
                raise InvalidInput("a detector's classes are given per detection "
                                   "(detections[].class_index), not as target")
            if not request.detections:
                raise InvalidInput(
                    "score 'detection' needs the detections to explain: per image a box "
                    "index, or a box x1, y1, x2, y2 and a class (detections)"
                )
            explained = await explain_detections(
                self.service, model, images, _detections(request), request=explaining,
                num_channels=options.num_channels or DEFAULT_CHANNELS,
                heatmap_size=heatmap_size, extra_bytes_per_pixel=overlay_bytes,
                deadline=deadline_of(context),
            )
            return await asyncio.to_thread(_response, model.name, images, explained, options,
                                           self.service.max_pixels, started)
        if request.detections:
            raise InvalidInput("detections are explained with score 'detection' (a detector's "
                               "score), not "
                               f"{shown(model.resolve(explaining).score)}")
        explained = await self.service.explain(
            model,
            images,
            request=explaining,
            reference=_tensor(request, "reference_embedding", (1, 2), "[D] or [N, D]"),
            mask=_tensor(request, "target_mask", (2, 3), "[h, w] or [N, h, w]"),
            others={
                name: from_bytes(t.data, t.datatype, tuple(t.shape), f"input {name!r}")
                for name, t in request.inputs.items()
            },
            class_index=request.target.class_index if target == "class_index" else None,
            top_k=request.target.top_k if target == "top_k" else None,
            num_predictions=options.num_predictions or DEFAULT_PREDICTIONS,
            num_channels=options.num_channels or DEFAULT_CHANNELS,
            heatmap_size=heatmap_size,
            extra_bytes_per_pixel=overlay_bytes,
            deadline=deadline_of(context),
        )
        return await asyncio.to_thread(
            _response, model.name, images, explained, options, self.service.max_pixels, started
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
            methods=sorted(METHOD_ENUMS[m] for m in METHODS) if explainable else [],
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


def _response(
    model: str, images: list[bytes | np.ndarray], explained: Explained,
    options: pb.ExplainOptions, max_pixels: int, started: float,
) -> bytes:
    """The serialized ExplainResponse of `explained`; `started` is when the call began.
    Blocking (overlays are drawn here): it runs in a worker thread."""
    layers = (explained.layer,) if isinstance(explained.layer, str) else explained.layer
    target = explained.target
    response = pb.ExplainResponse(
        model=model, layer=layers[0], layers=layers, method=METHOD_ENUMS[explained.method],
        layout=target.get("layout", ""), prefix_tokens=_prefix_tokens(target),
        grid=target.get("grid", ""),
    )
    for image, explanation in zip(images, explained.explanations):
        message = response.explanations.add()
        for class_map in explanation.maps:
            message.heatmaps.append(_heatmap(class_map))
        for p in explanation.predictions:
            message.predictions.add(
                class_index=p.class_index, label=p.label, score=p.score, logit=p.logit
            )
        if options.overlay and isinstance(image, bytes):
            first = explanation.maps[0]
            message.overlay_png = _overlay_png(
                image, first.heatmap, options, max_pixels,
                None if first.detection is None else first.detection.box,
            )
    response.timings.preprocess_seconds = explained.preprocess_seconds
    response.timings.queue_seconds = explained.queue_seconds
    response.timings.inference_seconds = explained.inference_seconds
    response.timings.total_seconds = time.perf_counter() - started
    return response.SerializeToString()


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
    if method == pb.METHOD_UNSPECIFIED:
        return None
    if method not in METHOD_NAMES:
        raise InvalidInput(f"unknown method {method}")
    return METHOD_NAMES[method]


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


def _heatmap(class_map: ClassMap) -> pb.Heatmap:
    height, width = class_map.heatmap.shape
    return pb.Heatmap(
        class_index=class_map.class_index,
        label=class_map.label,
        height=height,
        width=width,
        data=np.ascontiguousarray(class_map.heatmap, dtype="<f4").tobytes(),
        channels=[pb.ChannelImportance(channel=c, weight=w) for c, w in class_map.channels],
        pixel_gradients=None if class_map.pixel_gradients is None else pb.Tensor(
            shape=list(class_map.pixel_gradients.shape),
            data=np.ascontiguousarray(class_map.pixel_gradients, dtype="<f4").tobytes(),
        ),
        detection=None if class_map.detection is None else pb.Detection(
            index=class_map.detection.index, box=list(class_map.detection.box),
            score=class_map.detection.score, iou=class_map.detection.iou,
        ),
    )


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
    data: bytes, heatmap: np.ndarray, options: pb.ExplainOptions, max_pixels: int,
    box: tuple[float, ...] | None = None,
) -> bytes:
    """The heatmap over the image, a detection's `box` (image pixels) outlined on it."""
    image = decode_image(data, max_pixels)
    blended = overlay(
        image.convert("RGB"), heatmap, colormap=options.colormap or "jet",
        opacity=options.overlay_opacity or DEFAULT_OPACITY,
    )
    if box is not None:
        blended = draw_box(blended, box)
    buffer = io.BytesIO()
    blended.save(buffer, format="PNG")
    return buffer.getvalue()
