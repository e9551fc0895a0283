"""What an explain call asks for besides its images and model: `ExplainOptions`, one frozen value
holding every option, and the keywords `explain` takes for them (`ExplainKwargs`, the same names).

    options = ExplainOptions(top_k=3, method="gradcam++", heatmap_size="model")
    client.explain(photo, model="efficientnet_lite0", options=options)
    client.explain(photo, model="efficientnet_lite0", options=options, top_k=5)  # a keyword wins
    client.explain(photo, model="efficientnet_lite0", top_k=3, method="gradcam++")  # the same

`merged_options` is the one place where the keywords become options: each keyword given replaces
that field of ``options`` (of the defaults when none is given), and an unknown keyword is a
TypeError. The values are checked when the requests are built (`protocol`), before anything is
sent: every refusal there is an `InvalidInputError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, Union

HeatmapSize = Union[str, tuple[int, int]]
"""The pixel size of returned heatmaps: "image", "model", (width, height) or "WIDTHxHEIGHT"."""


@dataclass(frozen=True)
class DetectionTarget:
    """A detection of a detector to explain (score "detection"): ``index``, a pre-NMS box
    (an anchor of the raw head), or ``box`` (x1, y1, x2, y2 in the image's pixels) with
    ``class_index``, or both (the index's class score plus the IoU of its box with ``box``).
    ``class_index`` None or -1: the best class. See docs/DETECTION.md."""

    index: int | None = None
    box: Sequence[float] | None = None
    class_index: int | None = None


@dataclass(frozen=True, eq=False)
class ExplainOptions:
    """Every option of an explain call; the defaults ask for the model's defaults. Compared by
    identity, as it may hold arrays."""

    method: str | None = None
    """A name of `METHODS` ("gradcam", "gradcam++", ..., case does not matter); None: the
    model's default."""

    target_class: int | None = None
    """The class explained for every image (a negative -r: each image's r-th highest-scoring
    class); None: the top-1 class. Not with ``top_k``."""

    top_k: int | None = None
    """Explain each image's k highest-scoring classes, one map each, highest first. Not with
    ``target_class``."""

    layer: str | Sequence[str] | None = None
    """The target layer, a tensor name of the graph, or several, whose maps are fused; None:
    the model's default target layer."""

    layout: str | None = None
    """How the layer is laid out: "nchw" ([N, C, h, w]), "nhwc" ([N, h, w, C]: Swin, ConvNeXt)
    or "tokens" ([N, T, C]: ViT, DeiT); None: the model's (`ModelInfo.layout` for its default
    layer), else detected."""

    prefix_tokens: int | None = None
    """Tokens only: the class and other tokens before the patches; None: the model's, else
    T - h * w."""

    grid: str | tuple[int, int] | None = None
    """Tokens only: the patch grid, (rows, columns) or "HxW"; None: the model's, else the
    patch embedding's."""

    counterfactual: bool = False
    """Explain the negated score: the regions whose removal would raise the class score."""

    eigen_smooth: bool = False
    """Project the per-channel contributions on their first principal component."""

    aug_smooth: bool = False
    """Average the maps of flipped and rescaled copies of each image."""

    score: str | None = None
    """What is explained: "logit" (the default for classifiers), "probability", "similarity"
    (of the model's output, an embedding, to ``reference_embedding``), "region" (the default
    for segmentation models: the class's scores summed over ``target_mask``) or "detection"
    (detectors); None: the model's."""

    reference_embedding: Any = None
    """The reference of the "similarity" score: [D] for every image, or [N, D]."""

    target_mask: Any = None
    """The region of the "region" score: [h, w] for every image or [N, h, w], any size; None:
    each explained class's predicted region."""

    output: str | None = None
    """The graph output explained, by name; None: the model's score output."""

    inputs: Mapping[str, Any] | None = None
    """The model's other inputs (`ModelInfo.other_inputs`) by name: arrays with one row per
    image, sent in their own numeric dtype."""

    num_predictions: int = 5
    """How many top predictions come back per image."""

    num_channels: int = 10
    """How many channel importances come back per map, most important first."""

    heatmap_size: HeatmapSize | None = None
    """The pixel size the maps come back at: "image" (None, the default: each image's own size,
    a tensor's own H and W), "model" (the graph's own map, at the model's input size), or
    (width, height), also written "WIDTHxHEIGHT"."""

    detections: Sequence[DetectionTarget] | Sequence[Sequence[DetectionTarget]] | None = None
    """Detectors: the detections explained, one map each: one list for every image, or one
    list per image."""

    iou_threshold: float | None = None
    """Detectors: the least IoU of a detection chosen by box with that box; None: the model's
    (0.5 unless its config says otherwise)."""


class EvaluateKwargs(TypedDict, total=False):
    """The keywords of `evaluate` past the images and the model (`protocol.evaluate_request`
    builds the request from them; `GradCamClient.evaluate` says what each means)."""

    methods: Sequence[str | None]
    metrics: Sequence[str]
    target_class: int | None
    steps: int | None
    road_percentiles: Sequence[float]
    pointing: Sequence[Any] | None
    pointing_tolerance: float | None
    layer: str | None
    score: str | None


class ExplainKwargs(TypedDict, total=False):
    """`ExplainOptions`' fields as keywords of `explain`: the same names, types and meaning."""

    method: str | None
    target_class: int | None
    top_k: int | None
    layer: str | Sequence[str] | None
    layout: str | None
    prefix_tokens: int | None
    grid: str | tuple[int, int] | None
    counterfactual: bool
    eigen_smooth: bool
    aug_smooth: bool
    score: str | None
    reference_embedding: Any
    target_mask: Any
    output: str | None
    inputs: Mapping[str, Any] | None
    num_predictions: int
    num_channels: int
    heatmap_size: HeatmapSize | None
    detections: Sequence[DetectionTarget] | Sequence[Sequence[DetectionTarget]] | None
    iou_threshold: float | None


OPTION_NAMES: frozenset[str] = frozenset(f.name for f in dataclasses.fields(ExplainOptions))


def merged_options(options: ExplainOptions | None, overrides: Mapping[str, Any]) -> ExplainOptions:
    """``options`` (the defaults when None) with the fields ``overrides`` names replaced: what
    `explain(images, model=..., options=..., **overrides)` asks for. TypeError for a keyword
    that is no option, or for ``options`` that is no `ExplainOptions`."""
    unknown = sorted(set(overrides) - OPTION_NAMES)
    if unknown:
        raise TypeError(f"explain() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return ExplainOptions(**overrides)
    if not isinstance(options, ExplainOptions):
        raise TypeError(f"options must be ExplainOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options
