"""The edge of the core: a request as a servicer decoded it from its protocol (`ExplainRequest`
from the typed API, `InferRequest` from KServe v2), resolved once against the model into a
`ResolvedExplain` / `ResolvedInfer`: the model's defaults filled in (`ServedModel.resolve`
makes the `Graph`), every request-level fact checked (counts, ranks, rows, sizes). Below this,
nothing resolves again: validation (`validate.py`), the engine and post-processing take the
resolved request.

Checks here are cheap (no image decoded, no large tensor scanned): they run on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gradcam_common.methods import method as method_entry

from . import faithfulness
from .detections import MAX_DETECTIONS_PER_IMAGE, DetectionRequest
from .errors import InvalidInput, shown
from .model import Explaining, Graph, ServedModel
from .postprocess import HeatmapSize
from .validate import check_count, check_target_class

MAX_TOP_K = 20
# Evaluate: what one request may make the server compute, images x methods x copies per map.
MAX_EVALUATION_COPIES = 20_000  # perturbed copies scored (forward rows)
MAX_EVALUATION_IMPUTATIONS = 2_000  # ROAD's sparse solves


@dataclass(frozen=True)
class ExplainRequest:
    """What a typed explain request asks, protocol-neutral; nothing checked yet."""

    images: Sequence[bytes | np.ndarray]  # encoded images, or preprocessed tensors [C, H, W]
    graph: Explaining = Explaining()
    class_index: int | None = None  # one class for every image (-r: each image's r-th)
    top_k: int | None = None  # or each image's k best classes
    reference: np.ndarray | None = None  # score "similarity": [D] or [N, D]
    mask: np.ndarray | None = None  # score "region": [h, w] or [N, h, w]
    others: dict[str, np.ndarray] = field(default_factory=dict)  # one row per image
    detections: Sequence[Sequence[DetectionRequest]] = ()  # score "detection": per image
    num_predictions: int = 5
    num_channels: int = 10
    heatmap_size: str | None = None  # `HeatmapSize.parse`
    extra_bytes_per_pixel: int = 0  # per pixel of each image the response also holds
    keep_pictures: bool = False  # keep the decoded images for the response (overlays)


@dataclass(frozen=True)
class ResolvedExplain:
    """An `ExplainRequest` resolved against its model (`resolve_explain`)."""

    model: ServedModel
    graph: Graph
    images: Sequence[bytes | np.ndarray]
    class_index: int | None
    top_k: int | None
    reference: np.ndarray | None
    mask: np.ndarray | None
    others: dict[str, np.ndarray]
    detections: Sequence[Sequence[DetectionRequest]]  # one list per image; () unless detecting
    num_predictions: int
    num_channels: int
    heatmap_size: HeatmapSize
    extra_bytes_per_pixel: int
    keep_pictures: bool

    @property
    def maps_per_image(self) -> int:
        """Heatmaps each image gets: its ranks, or its detections (the most of any image)."""
        if self.detections:
            return max(len(wanted) for wanted in self.detections)
        return self.top_k or 1

    @property
    def pixel_channels(self) -> int:
        """Float32 maps at the model's size that come with each heatmap: the pixel-level
        methods' signed gradients, one per input channel."""
        return self.model.channels if method_entry(self.graph.method).pixel_level else 0


def resolve_explain(
    model: ServedModel, request: ExplainRequest, max_pixels: int
) -> ResolvedExplain:
    images = request.images
    if not images:
        raise InvalidInput("the request holds no image", field="images")
    check_count(len(images))
    graph = model.resolve(request.graph)
    heatmap_size = HeatmapSize.parse(request.heatmap_size, max_pixels)
    detections = _detections(graph, request, len(images))
    class_count = model.output_shapes[graph.output][0]
    top_k = request.top_k
    if top_k is not None and not 1 <= top_k <= min(class_count, MAX_TOP_K):
        raise InvalidInput(f"top_k must be in 1..{min(class_count, MAX_TOP_K)}, got {top_k}",
                           field="target.top_k")
    if request.class_index is not None:
        check_target_class(model, graph, np.array([request.class_index], dtype=np.int64), 1)
    reference, mask = request.reference, request.mask
    if reference is not None and reference.ndim == 2 and len(reference) != len(images):
        raise InvalidInput(
            f"the reference embedding has {len(reference)} rows for {len(images)} images",
            field="reference_embedding",
        )
    if mask is not None and mask.ndim == 3 and len(mask) != len(images):
        raise InvalidInput(f"the target mask has {len(mask)} rows for {len(images)} images",
                           field="target_mask")
    for name, value in request.others.items():
        if value.ndim == 0 or len(value) != len(images):
            raise InvalidInput(
                f"input {name!r} must have one row per image ({len(images)}), got shape "
                f"[{','.join(str(d) for d in value.shape)}]", field=f"inputs[{name}]"
            )
    return ResolvedExplain(
        model, graph, images, request.class_index, top_k, reference, mask,
        dict(request.others), detections, request.num_predictions, request.num_channels,
        heatmap_size, request.extra_bytes_per_pixel, request.keep_pictures,
    )


def _detections(graph: Graph, request: ExplainRequest,
                images: int) -> Sequence[Sequence[DetectionRequest]]:
    """The detections to explain, one list per image, for the score "detection" (which needs
    them, and takes its classes from them); none for any other score."""
    detections = request.detections
    if graph.score != "detection":
        if detections:
            raise InvalidInput("detections are explained with score 'detection' (a detector's "
                               f"score), not {shown(graph.score)}", field="detections")
        return ()
    if request.class_index is not None or request.top_k is not None:
        raise InvalidInput("a detector's classes are given per detection "
                           "(detections[].class_index), not as target", field="target")
    if not detections:
        raise InvalidInput(
            "score 'detection' needs the detections to explain: per image a box "
            "index, or a box x1, y1, x2, y2 and a class (detections)", field="detections"
        )
    if len(detections) == 1 and images > 1:
        detections = list(detections) * images
    if len(detections) != images:
        raise InvalidInput(f"{len(detections)} lists of detections for {images} images "
                           "(give one per image, or one for all)", field="detections")
    for number, wanted in enumerate(detections):
        if not 1 <= len(wanted) <= MAX_DETECTIONS_PER_IMAGE:
            raise InvalidInput(f"image {number}: give 1..{MAX_DETECTIONS_PER_IMAGE} detections "
                               f"to explain, got {len(wanted)}", field=f"detections[{number}]")
    return detections


@dataclass(frozen=True)
class InferRequest:
    """What a KServe v2 request asks, protocol-neutral: encoded images or the model's own
    input tensor (exactly one), the outputs wanted, the graph options and the score's
    inputs; nothing checked yet beyond the protocol's decoding."""

    encoded: list[bytes] | None
    x: np.ndarray | None  # float32 [N, ...], preprocessed
    requested: Sequence[str]  # output names
    explaining: bool  # a requested output needs the augmented graph (heatmap, detections)
    graph: Explaining = Explaining()
    target_class: np.ndarray | None = None
    reference: np.ndarray | None = None
    mask: np.ndarray | None = None
    others: dict[str, np.ndarray] = field(default_factory=dict)
    detection_index: np.ndarray | None = None
    reference_box: np.ndarray | None = None  # in the pixels of the images sent
    heatmap_size: str | None = None


@dataclass(frozen=True)
class ResolvedInfer:
    """An `InferRequest` resolved against its model (`resolve_infer`): `graph` None runs the
    plain forward graph."""

    model: ServedModel
    graph: Graph | None
    request: InferRequest
    heatmap_size: HeatmapSize

    @property
    def detecting(self) -> bool:
        return self.graph is not None and self.graph.score == "detection"


def resolve_infer(model: ServedModel, request: InferRequest, max_pixels: int) -> ResolvedInfer:
    heatmap_size = HeatmapSize.parse(request.heatmap_size, max_pixels)
    graph = model.resolve(request.graph) if request.explaining else None
    detecting = graph is not None and graph.score == "detection"
    if not detecting and (request.detection_index is not None
                          or request.reference_box is not None):
        raise InvalidInput("inputs 'detection_index' and 'reference_box' are only used with "
                           "score 'detection', explaining (heatmap output)")
    if detecting and request.detection_index is None and request.reference_box is None:
        raise InvalidInput("score 'detection' explains one detection per row: send "
                           "'detection_index' (INT64 [N]) or 'reference_box' (FP32 [N, 4]) and "
                           "'target_class'")
    return ResolvedInfer(model, graph, request, heatmap_size)


@dataclass(frozen=True)
class PointingTarget:
    """The object a map should point at, in the pixels of the image as sent: a box (x1, y1,
    x2, y2) or a mask [H, W] of the image's size (nonzero inside)."""

    box: tuple[float, ...] | None = None
    mask: np.ndarray | None = None


@dataclass(frozen=True)
class EvaluateRequest:
    """What an Evaluate request asks, protocol-neutral; nothing checked yet."""

    images: Sequence[bytes | np.ndarray]
    methods: Sequence[str | None] = (None,)  # None: the model's default method
    layer: str | None = None
    class_index: int | None = None  # one class for every image (-r: each image's r-th)
    metrics: Sequence[str] = ()  # names of `faithfulness.METRICS`; empty: all that apply
    steps: int | None = None
    percentiles: Sequence[float] = ()
    pointing: Sequence[PointingTarget] = ()  # one per image, or none
    pointing_tolerance: float | None = None
    score: str | None = None  # `faithfulness.SCORES`; None: the probability


@dataclass(frozen=True)
class ResolvedEvaluate:
    """An `EvaluateRequest` resolved against its model (`resolve_evaluate`): one `Graph` per
    method, the metrics as a `faithfulness.Plan`."""

    model: ServedModel
    graphs: tuple[Graph, ...]
    images: Sequence[bytes | np.ndarray]
    class_index: int | None
    plan: faithfulness.Plan
    pointing: Sequence[PointingTarget]
    pointing_tolerance: float

    @property
    def copies(self) -> int:
        return len(self.images) * len(self.graphs) * self.plan.copies


def resolve_evaluate(model: ServedModel, request: EvaluateRequest) -> ResolvedEvaluate:
    """Every limit of an Evaluate request checked before anything is decoded: a classifier
    with the image as its only input, known and distinct methods and metrics, steps and
    percentiles in range, one pointing target per image, and the work bounded
    (`MAX_EVALUATION_COPIES`, `MAX_EVALUATION_IMPUTATIONS`)."""
    images = request.images
    if not images:
        raise InvalidInput("the request holds no image", field="images")
    check_count(len(images))
    if model.other_inputs:
        raise InvalidInput(f"model {model.name!r} takes inputs besides the image; Evaluate "
                           "perturbs the image alone and takes models without them")
    if len(set(request.methods)) != len(request.methods):
        raise InvalidInput("each method may be compared once", field="methods")
    graphs = tuple(model.resolve(Explaining(method=method, layer=request.layer or None))
                   for method in request.methods)
    for graph in graphs:
        if graph.score != "logit" or len(model.output_shapes[graph.output]) != 1:
            raise InvalidInput(
                f"model {model.name!r} is not a classifier (its score is {shown(graph.score)} "
                "of an output that is not [N, classes]); Evaluate measures class "
                "probabilities")
    if request.class_index is not None:
        check_target_class(model, graphs[0], np.array([request.class_index], np.int64), 1)
    plan = _plan(request)
    pointing = request.pointing
    if pointing and len(pointing) != len(images):
        raise InvalidInput(f"{len(pointing)} pointing targets for {len(images)} images (give "
                           "one per image)", field="pointing")
    if faithfulness.POINTING_GAME in plan.metrics and not pointing:
        raise InvalidInput("the pointing game needs a box or a mask per image", field="pointing")
    for number, target in enumerate(pointing):
        _check_pointing(number, target)
    tolerance = request.pointing_tolerance
    tolerance = faithfulness.POINTING_TOLERANCE if tolerance is None else tolerance
    if not 0 <= tolerance <= 1000:
        raise InvalidInput(f"pointing_tolerance must be in [0, 1000] pixels, got {tolerance}",
                           field="pointing_tolerance")
    maps = len(images) * len(graphs)
    if maps * plan.copies > MAX_EVALUATION_COPIES:
        raise InvalidInput(
            f"{len(images)} images x {len(graphs)} methods x {plan.copies} perturbed copies per "
            f"map is over the limit of {MAX_EVALUATION_COPIES} copies per request; send fewer "
            "images or methods, or fewer steps", field="steps")
    if maps * plan.imputations > MAX_EVALUATION_IMPUTATIONS:
        raise InvalidInput(
            f"{len(images)} images x {len(graphs)} methods x {plan.imputations} ROAD "
            f"imputations per map is over the limit of {MAX_EVALUATION_IMPUTATIONS} per "
            "request; send fewer images, methods or percentiles", field="road_percentiles")
    return ResolvedEvaluate(model, graphs, images, request.class_index, plan,
                            tuple(pointing), float(tolerance))


def _plan(request: EvaluateRequest) -> faithfulness.Plan:
    for name in request.metrics:
        if name not in faithfulness.METRICS:
            raise InvalidInput(f"unknown metric {shown(name)}; available: "
                               f"{', '.join(faithfulness.METRICS)}", field="metrics")
    if len(set(request.metrics)) != len(request.metrics):
        raise InvalidInput("each metric may be asked once", field="metrics")
    metrics = tuple(request.metrics) or tuple(
        m for m in faithfulness.METRICS
        if m != faithfulness.POINTING_GAME or request.pointing
    )
    steps = request.steps or faithfulness.DEFAULT_STEPS
    if not 1 <= steps <= faithfulness.MAX_STEPS:
        raise InvalidInput(f"steps must be in 1..{faithfulness.MAX_STEPS}, got {steps}",
                           field="steps")
    percentiles = tuple(float(p) for p in request.percentiles) or (
        faithfulness.DEFAULT_ROAD_PERCENTILES)
    if len(percentiles) > faithfulness.MAX_ROAD_PERCENTILES:
        raise InvalidInput(f"at most {faithfulness.MAX_ROAD_PERCENTILES} ROAD percentiles, got "
                           f"{len(percentiles)}", field="road_percentiles")
    for p in percentiles:
        if not 0 < p < 100:
            raise InvalidInput(f"ROAD percentiles must be in (0, 100), got {p}",
                               field="road_percentiles")
    score = request.score or faithfulness.PROBABILITY
    if score not in faithfulness.SCORES:
        raise InvalidInput(f"unknown score {shown(score)}; available: "
                           f"{', '.join(faithfulness.SCORES)}", field="score")
    return faithfulness.Plan(metrics, steps, percentiles, score)


def _check_pointing(number: int, target: PointingTarget) -> None:
    field = f"pointing[{number}]"
    if (target.box is None) == (target.mask is None):
        raise InvalidInput(f"image {number}: give a pointing box or a mask", field=field)
    if target.box is not None:
        box = target.box
        if len(box) != 4 or not all(np.isfinite(box)) or box[0] > box[2] or box[1] > box[3]:
            raise InvalidInput(f"image {number}: a pointing box is x1, y1, x2, y2 with x1 <= "
                               f"x2 and y1 <= y2, got {list(box)}", field=field)
    elif target.mask.ndim != 2:
        raise InvalidInput(f"image {number}: a pointing mask is [H, W], got shape "
                           f"{list(target.mask.shape)}", field=field)
