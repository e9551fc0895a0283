"""What the server answers, as plain values: the explanation of one image (`Explanation`, with
its class maps `ClassHeatmap`, its `Prediction`s, its `Timings` and, for detectors, the
`DetectedBox` each map explains), and what it says of its models (`ModelStatus`, `ModelInfo`).

Heatmaps are float32 numpy arrays [height, width] in [0, 1]; `Explanation.overlay` draws them
with `gradcam_common.overlay`, over the image that was sent (kept as an `ImageSource`, decoded
only when drawn). Nothing here talks to a server; `protocol` builds these from the responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from gradcam_common.methods import PIXEL_METHODS
from gradcam_common.overlay import colorize, draw_box, gradient_image, overlay as blend, panels

if TYPE_CHECKING:
    from .images import ImageSource


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
    # Method dff only: each concept's score for this class (softmax of the classifier head's
    # output for the concept), in concept order; `heatmap` is the highest's concept map.
    concept_scores: tuple[float, ...] = ()

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


@dataclass(frozen=True)
class Progress:
    """How far a long request has come (``on_progress`` of `GradCamClient.explain`): the
    masked forward passes of Score-CAM done and needed over the request's images, the seconds
    since the server received it, and the seconds it estimates are left. ``request`` is which
    request of a long list (sent as several) this is about, 0 for most calls."""

    passes_done: int
    passes_total: int
    elapsed_seconds: float
    remaining_seconds: float
    request: int = 0

    @property
    def fraction(self) -> float:
        return self.passes_done / self.passes_total if self.passes_total else 0.0


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
    _source: ImageSource | None = field(default=None, repr=False)

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
        tell, ModelInfo does not say. ``side_by_side`` puts the image first and captions every
        picture: the image with its file name (when a path was explained), the model and the method
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
    """A model of the server's repository and whether it is ready."""

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



@dataclass(frozen=True)
class MetricResult:
    """One faithfulness metric of one map: its value and, for deletion, insertion and ROAD,
    its curve (the class score after each step, or at each ROAD percentile)."""

    name: str
    value: float
    curve: np.ndarray  # float32; empty for the metrics without one


@dataclass(frozen=True)
class ImageEvaluation:
    """One image's explained class, its score on the intact image, and per method (in the
    order asked) its metrics by name."""

    class_index: int
    label: str
    score: float
    methods: dict[str, dict[str, MetricResult]]

    @property
    def name(self) -> str:
        """The label, or "class N" when the model has no labels."""
        return _class_name(self.class_index, self.label)


@dataclass(frozen=True)
class Evaluation:
    """What `GradCamClient.evaluate` returns: per image, per method, per metric a
    `MetricResult`; the score measured ("probability" or "logit"), the deletion/insertion
    steps and ROAD percentiles, the perturbed copies the server scored and the rows of each
    of its forward runs."""

    model: str
    images: list[ImageEvaluation]
    score: str
    steps: int
    road_percentiles: tuple[float, ...]
    copies: int
    batch_size: int
    timings: Timings

    @property
    def methods(self) -> list[str]:
        return list(self.images[0].methods) if self.images else []

    @property
    def metrics(self) -> list[str]:
        first = self.images[0].methods if self.images else {}
        return list(next(iter(first.values()), {}))

    def mean(self, method: str, metric: str) -> float:
        """The metric's mean over the images (Grad-CAM++'s average drop and increase in
        confidence are such means)."""
        return float(np.mean([image.methods[method][metric].value for image in self.images]))

    def mean_curve(self, method: str, metric: str) -> np.ndarray:
        """The metric's curve averaged over the images."""
        return np.mean([image.methods[method][metric].curve for image in self.images], axis=0)
