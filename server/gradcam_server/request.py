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

from .detections import MAX_DETECTIONS_PER_IMAGE, DetectionRequest
from .errors import InvalidInput, shown
from .model import Explaining, Graph, ServedModel
from .postprocess import HeatmapSize
from .validate import check_count, check_target_class

MAX_TOP_K = 20


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
