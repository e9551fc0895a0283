"""Faithfulness metrics of explanation maps: how much the model's confidence in the explained
class depends on the pixels a map calls relevant. Pure numpy (and scipy.sparse for ROAD's
imputation); the service makes the maps, scores the copies made here in batched runs of the
model's plain forward graph, and hands the scores back.

Contract. `MapPerturbations(x, heatmap, plan, seed)` holds one image `x` ([C, H, W], the model's
normalised input) and one map `heatmap` ([H, W] at the model's input size, in [0, 1]); it makes
`count` perturbed copies, `make(start, stop)` returning copies [start, stop) as float32
[stop - start, C, H, W] (so copies are made chunk by chunk, never all at once), and
`metrics(scores, original)` turns the explained class's score on each copy (in copy order) and
on the intact image (`original`) into one `MetricValue` per metric of the plan. The score is the
class's softmax probability (the default: RISE's and Grad-CAM++'s) or its logit (`Plan.score`;
pytorch-grad-cam's ``ClassifierOutputSoftmaxTarget`` or ``ClassifierOutputTarget``), and
"probability" below means that score. Copies, in order:

- deletion (RISE, Petsiuk et al., BMVC 2018): `steps` + 1 copies; copy i has the first
  round(i * H * W / steps) pixels, ranked by the map in descending order (ties by position,
  row-major), set to zero in every channel (the normalised input's zero, RISE's
  ``torch.zeros_like`` substrate). Value: the area under the probability curve over the
  fraction of pixels removed (trapezoids; lower is better).
- insertion (RISE): the same steps from a blurred copy (RISE's Gaussian kernel: scipy's
  ``gaussian_filter`` of an 11 x 11 delta with sigma 5, applied per channel with zero padding)
  towards the image, pixels added in the same order. Value: the area under the curve (higher
  is better).
- ROAD (Rong et al., ICML 2022), as pytorch-grad-cam 1.5.7's ``ROADMostRelevantFirstAverage``
  and ``ROADLeastRelevantFirstAverage``: per percentile p, the pixels kept are those whose map
  value is below the map's p-th percentile (MoRF; LeRF ranks 1 - map), the others replaced by
  noisy linear imputation: each removed pixel is the weighted mean of its 8 neighbours (1/6
  sideways, 1/12 diagonally), one sparse linear system for all of them, plus Gaussian noise of
  deviation 0.01 (seeded per map: a request's figures repeat). Value: the mean over the
  percentiles of (probability after imputation - original); combined: (LeRF - MoRF) / 2.
- the image times the map (pytorch-grad-cam's ``CamMultImageConfidenceChange``): one copy, O
  its probability and Y the original's. confidence_change = O - Y; average_drop = 100 *
  max(0, Y - O) / Y and increase_in_confidence = 100 * [O > Y] (Grad-CAM++, Chattopadhyay et
  al., WACV 2018; per image here, averaged over images by whoever reads them).

The pointing game (Zhang et al., ECCV 2016) needs no copy: `pointing_game` is a hit (1) where
the map's maximum, at the image's own pixel size, lies within a tolerance (15 pixels) of the
object's box or mask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gradcam_common.faithfulness import METRICS

DELETION, INSERTION, ROAD_MORF, ROAD_LERF, ROAD_COMBINED = METRICS[:5]
CONFIDENCE_CHANGE, AVERAGE_DROP, INCREASE_IN_CONFIDENCE, POINTING_GAME = METRICS[5:]
_MASKED = (CONFIDENCE_CHANGE, AVERAGE_DROP, INCREASE_IN_CONFIDENCE)

PROBABILITY = "probability"  # the class's softmax probability (RISE's, Grad-CAM++'s)
SCORES = (PROBABILITY, "logit")  # or its logit (pytorch-grad-cam's ClassifierOutputTarget)
DEFAULT_STEPS = 100
MAX_STEPS = 1000
DEFAULT_ROAD_PERCENTILES = (10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0)
MAX_ROAD_PERCENTILES = 19
ROAD_NOISE = 0.01
BLUR_SIZE = 11  # RISE's insertion substrate
BLUR_SIGMA = 5.0
POINTING_TOLERANCE = 15.0  # pixels, the pointing game paper's
# The 8 neighbours of a pixel and their weights in ROAD's linear imputation (row, column).
NEIGHBOUR_WEIGHTS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                     ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))


@dataclass(frozen=True)
class MetricValue:
    name: str
    value: float
    curve: tuple[float, ...] = ()  # deletion/insertion: per step; ROAD: per percentile


@dataclass(frozen=True)
class Plan:
    """What is measured of every map: the metrics (names of `METRICS`), deletion and
    insertion's steps and ROAD's percentiles."""

    metrics: tuple[str, ...]
    steps: int = DEFAULT_STEPS
    percentiles: tuple[float, ...] = DEFAULT_ROAD_PERCENTILES
    score: str = PROBABILITY  # what is measured of the class: one of SCORES

    def wants(self, *names: str) -> bool:
        return any(name in self.metrics for name in names)

    @property
    def copies(self) -> int:
        """Perturbed copies each map costs (each one forward row)."""
        return len(_segments(self))

    @property
    def imputations(self) -> int:
        """ROAD's sparse solves each map costs."""
        return sum(1 for kind, _ in _segments(self) if kind in (ROAD_MORF, ROAD_LERF))


def _segments(plan: Plan) -> list[tuple[str, int]]:
    """(kind, index within its kind) of each copy, in copy order."""
    kinds = []
    if plan.wants(DELETION):
        kinds.append((DELETION, plan.steps + 1))
    if plan.wants(INSERTION):
        kinds.append((INSERTION, plan.steps + 1))
    if plan.wants(ROAD_MORF, ROAD_COMBINED):
        kinds.append((ROAD_MORF, len(plan.percentiles)))
    if plan.wants(ROAD_LERF, ROAD_COMBINED):
        kinds.append((ROAD_LERF, len(plan.percentiles)))
    if plan.wants(*_MASKED):
        kinds.append((CONFIDENCE_CHANGE, 1))
    return [(kind, i) for kind, count in kinds for i in range(count)]


class MapPerturbations:
    """The perturbed copies of one image for one map, and the metrics read from their scores
    (the module's contract)."""

    def __init__(self, x: np.ndarray, heatmap: np.ndarray, plan: Plan, seed: int = 0) -> None:
        if x.ndim != 3 or heatmap.shape != x.shape[1:]:
            raise ValueError(f"a [C, H, W] image and an [H, W] map, got {x.shape} and "
                             f"{heatmap.shape}")
        self.x = np.asarray(x, np.float32)
        self.heatmap = np.asarray(heatmap, np.float32)
        self.plan = plan
        self.seed = seed
        self._segments = _segments(plan)
        self._rank: np.ndarray | None = None
        self._blurred: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self._segments)

    def make(self, start: int, stop: int) -> np.ndarray:
        """Copies [start, stop), float32 [stop - start, C, H, W]."""
        out = np.empty((stop - start, *self.x.shape), np.float32)
        for row, (kind, index) in enumerate(self._segments[start:stop]):
            if kind == DELETION:
                self._step(index, self.x, np.zeros_like(self.x), out[row])
            elif kind == INSERTION:
                if self._blurred is None:
                    self._blurred = rise_blur(self.x)
                self._step(index, self._blurred, self.x, out[row])
            elif kind in (ROAD_MORF, ROAD_LERF):
                ranked = self.heatmap if kind == ROAD_MORF else 1 - self.heatmap
                keep = road_keep_mask(ranked, self.plan.percentiles[index])
                rng = np.random.default_rng(
                    (self.seed, 0 if kind == ROAD_MORF else 1, index))
                out[row] = noisy_linear_imputation(self.x, keep, rng)
            else:
                np.multiply(self.x, self.heatmap, out=out[row])
        return out

    def _step(self, step: int, start: np.ndarray, finish: np.ndarray, out: np.ndarray) -> None:
        """Deletion/insertion copy `step`: `start` with its first pixels (by the map's rank)
        taken from `finish`."""
        if self._rank is None:
            self._rank = relevance_rank(self.heatmap)
        moved = self._rank < step_pixels(self._rank.size, self.plan.steps, step)
        np.copyto(out, start)
        np.copyto(out, finish, where=moved[None])

    def metrics(self, scores: np.ndarray, original: float) -> dict[str, MetricValue]:
        """The plan's metrics (but the pointing game) from the explained class's score on
        each copy, in copy order, and on the intact image."""
        if len(scores) != self.count:
            raise ValueError(f"{len(scores)} scores for {self.count} copies")
        by_kind: dict[str, list[float]] = {}
        for (kind, _), p in zip(self._segments, scores):
            by_kind.setdefault(kind, []).append(float(p))
        values: dict[str, MetricValue] = {}
        for kind in (DELETION, INSERTION):
            if kind in self.plan.metrics:
                curve = by_kind[kind]
                values[kind] = MetricValue(kind, area_under_curve(curve), tuple(curve))
        road = {kind: float(np.mean(np.float32(by_kind[kind]) - np.float32(original)))
                for kind in (ROAD_MORF, ROAD_LERF) if kind in by_kind}
        for kind in (ROAD_MORF, ROAD_LERF):
            if kind in self.plan.metrics:
                values[kind] = MetricValue(kind, road[kind], tuple(by_kind[kind]))
        if ROAD_COMBINED in self.plan.metrics:
            values[ROAD_COMBINED] = MetricValue(
                ROAD_COMBINED, (road[ROAD_LERF] - road[ROAD_MORF]) / 2)
        if CONFIDENCE_CHANGE in by_kind:
            masked = by_kind[CONFIDENCE_CHANGE][0]
            measured = {
                CONFIDENCE_CHANGE: masked - original,
                AVERAGE_DROP: 100 * max(0.0, original - masked) / original if original else 0.0,
                INCREASE_IN_CONFIDENCE: 100.0 if masked > original else 0.0,
            }
            for name in _MASKED:
                if name in self.plan.metrics:
                    values[name] = MetricValue(name, measured[name])
        return values


# -- deletion and insertion -------------------------------------------------------------------
def relevance_rank(heatmap: np.ndarray) -> np.ndarray:
    """Each pixel's place [H, W] in the map's descending order, ties broken by position."""
    order = np.argsort(-heatmap.ravel(), kind="stable")
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    return rank.reshape(heatmap.shape)


def step_pixels(pixels: int, steps: int, step: int) -> int:
    """Pixels moved after `step` of `steps` equal steps: round(step * pixels / steps)."""
    return (2 * step * pixels + steps) // (2 * steps)


def area_under_curve(curve: Sequence[float]) -> float:
    """The trapezoidal area under values at equally spaced points of [0, 1] (RISE's auc)."""
    values = np.asarray(curve, np.float64)
    return float((values.sum() - (values[0] + values[-1]) / 2) / (len(values) - 1))


def rise_kernel() -> np.ndarray:
    """RISE's 1-D Gaussian factor: scipy's ``gaussian_filter`` (truncate 4, mode "reflect") of
    a BLUR_SIZE-long delta at its centre; the 2-D kernel is its outer product."""
    radius = int(4 * BLUR_SIGMA + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / BLUR_SIGMA) ** 2)
    weights /= weights.sum()
    kernel = np.zeros(BLUR_SIZE)
    centre = BLUR_SIZE // 2
    for position in range(BLUR_SIZE):
        source = (position + offsets) % (2 * BLUR_SIZE)  # "reflect": d c b a | a b c d | d c
        source = np.where(source >= BLUR_SIZE, 2 * BLUR_SIZE - 1 - source, source)
        kernel[position] = weights[source == centre].sum()
    return kernel


def rise_blur(x: np.ndarray) -> np.ndarray:
    """RISE's insertion substrate: each channel of [C, H, W] convolved with the Gaussian
    kernel, zero padded (``conv2d(x, kernel, padding=5)``)."""
    kernel = rise_kernel().astype(np.float32)
    half = BLUR_SIZE // 2
    height, width = x.shape[1:]
    padded = np.pad(x, ((0, 0), (half, half), (0, 0)))
    rows = sum(kernel[k] * padded[:, k:k + height, :] for k in range(BLUR_SIZE))
    padded = np.pad(rows, ((0, 0), (0, 0), (half, half)))
    return sum(kernel[k] * padded[:, :, k:k + width] for k in range(BLUR_SIZE)).astype(
        np.float32)


# -- ROAD -------------------------------------------------------------------------------------
def road_keep_mask(ranked: np.ndarray, percentile: float) -> np.ndarray:
    """The pixels ROAD keeps: those below the map's `percentile`-th percentile (numpy's
    linear interpolation, compared in float32 as pytorch-grad-cam's torch tensors are)."""
    threshold = np.float32(np.percentile(ranked, percentile))
    return ranked.astype(np.float32) < threshold


def noisy_linear_imputation(x: np.ndarray, keep: np.ndarray,
                            rng: np.random.Generator, noise: float = ROAD_NOISE) -> np.ndarray:
    """ROAD's imputation of [C, H, W] where `keep` ([H, W]) is False: every removed pixel
    equals the weighted mean of its in-image neighbours (NEIGHBOUR_WEIGHTS; the removed ones
    are unknowns too), solved as one sparse system for all channels, plus `noise` times a
    standard normal draw."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    channels, height, width = x.shape
    flat = x.reshape(channels, -1)
    known = keep.ravel()
    unknown = np.flatnonzero(~known)
    count = unknown.size
    if count == 0:
        return x.copy()
    variable = np.full(known.size, -1, np.int64)
    variable[unknown] = np.arange(count)
    rows_of, cols_of = np.divmod(unknown, width)
    right_side = np.zeros((count, channels))
    diagonal = np.ones(count)
    entries_row, entries_col, entries_value = [], [], []
    for (d_row, d_col), weight in NEIGHBOUR_WEIGHTS:
        r, c = rows_of + d_row, cols_of + d_col
        inside = (r >= 0) & (c >= 0) & (r < height) & (c < width)
        diagonal[~inside] -= weight
        equation = np.flatnonzero(inside)
        neighbour = r[inside] * width + c[inside]
        has_value = known[neighbour]
        right_side[equation[has_value]] -= weight * flat[:, neighbour[has_value]].T
        entries_row.append(equation[~has_value])
        entries_col.append(variable[neighbour[~has_value]])
        entries_value.append(np.full((~has_value).sum(), weight))
    entries_row.append(np.arange(count))
    entries_col.append(np.arange(count))
    entries_value.append(-diagonal)
    system = csc_matrix((np.concatenate(entries_value),
                         (np.concatenate(entries_row), np.concatenate(entries_col))),
                        shape=(count, count))
    solved = spsolve(system, right_side).reshape(count, channels)
    imputed = flat.copy()
    imputed[:, unknown] = (solved.T.astype(np.float32)
                           + noise * rng.standard_normal((channels, count)).astype(np.float32))
    return imputed.reshape(x.shape)


# -- the pointing game -------------------------------------------------------------------------
def pointing_game(heatmap: np.ndarray, box: Sequence[float] | None = None,
                  mask: np.ndarray | None = None,
                  tolerance: float = POINTING_TOLERANCE) -> MetricValue:
    """A hit (1) where the maximum of `heatmap` (at the image's pixel size; its first
    maximum, row-major) lies within `tolerance` pixels of the object: a box (x1, y1, x2, y2
    in pixels) or a mask of the map's size (nonzero inside); else a miss (0). The point is
    the pixel's centre."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    y, x = row + 0.5, col + 0.5
    if box is not None:
        x1, y1, x2, y2 = box
        distance = math.hypot(max(x1 - x, 0.0, x - x2), max(y1 - y, 0.0, y - y2))
    else:
        reach = int(math.ceil(tolerance))
        top, left = max(row - reach, 0), max(col - reach, 0)
        window = np.argwhere(mask[top:row + reach + 1, left:col + reach + 1] != 0)
        if window.size == 0:
            distance = math.inf
        else:
            distance = float(np.hypot(window[:, 0] + top - row,
                                      window[:, 1] + left - col).min())
    return MetricValue(POINTING_GAME, 1.0 if distance <= tolerance else 0.0)


def class_scores(outputs: np.ndarray, classes: np.ndarray, score: str) -> np.ndarray:
    """Row i's score of its class classes[i], from the score output [N, K]: its softmax
    probability (score "probability") or its logit ("logit")."""
    outputs = outputs.astype(np.float64)
    rows = np.arange(len(outputs))
    if score == "logit":
        return outputs[rows, classes]
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted[rows, classes] / shifted.sum(axis=1)


def chunks(counts: Sequence[int], size: int) -> list[list[tuple[int, int, int]]]:
    """The copies of several maps (`counts[j]` copies of map j, in map order) cut into runs of
    at most `size` rows: each run a list of (map, start, stop)."""
    runs: list[list[tuple[int, int, int]]] = [[]]
    room = size
    for job, count in enumerate(counts):
        start = 0
        while start < count:
            if room == 0:
                runs.append([])
                room = size
            stop = min(count, start + room)
            runs[-1].append((job, start, stop))
            room -= stop - start
            start = stop
    return [run for run in runs if run]




# -- what an evaluation returns ---------------------------------------------------------------
@dataclass(frozen=True)
class ImageEvaluation:
    """One image's explained class, its score on the intact image (`Plan.score`: the class's
    probability or logit), and per method (in request order) its metrics by name."""

    class_index: int
    label: str
    score: float
    methods: tuple[tuple[str, dict[str, MetricValue]], ...]


@dataclass(frozen=True)
class Evaluated:
    images: tuple[ImageEvaluation, ...]
    plan: Plan
    copies: int  # perturbed copies scored
    batch_size: int  # rows of each forward run of the copies
    preprocess_seconds: float
    inference_seconds: float  # the methods' runs and the copies' forward runs
