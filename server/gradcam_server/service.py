"""The core's one path, shared by both gRPC APIs: a resolved request (`request.py`) is decoded
and validated (`preprocess.py`, `validate.py`), run (`engine.py`) and turned into maps and
predictions (`postprocess.py`); the servicer's `encode` makes its protocol's response from the
result. It knows the repository and nothing of gRPC.

A request costs two hops off the event loop: one worker thread decodes, validates and stacks
its rows, the engine's runtime thread runs the batch, and one worker thread post-processes and
encodes the response (resizing heatmaps, serializing tens of MiB). The response's size is
bounded before any pixel is decoded, from the images' headers.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from . import faithfulness
from .augment.names import NAMES
from .detections import DETECTION_OUTPUTS, check_box, refuse_missing, to_model_pixels
from .engine import Engine, RunResult, ServiceLimits
from .errors import InvalidInput
from .model import Explaining, Graph, Progress, ServedModel
from .postprocess import (
    ClassMap,
    Explained,
    HeatmapSize,
    ImageExplanation,
    check_heatmap_response,
    class_explanation,
    detection_map,
    heatmap_at,
    resize_heatmap,
)
from .preprocess import decode_image, image_size, to_tensor
from .repository import ModelRepository
from .request import ResolvedEvaluate, ResolvedExplain, ResolvedInfer
from .validate import Feeds, check_tensor, feeds, image_tensor_size

T = TypeVar("T")

# Evaluate: the rows of one forward run of perturbed copies, at most (and their bytes): the
# best size is measured per model and input shape among the powers of two up to this.
MAX_EVALUATION_BATCH = 64
MAX_EVALUATION_RUN_BYTES = 64 * 1024 * 1024
FIXED_BATCH_ROWS = 16
MEASURED_ROWS = 32  # rows timed per candidate size, its fastest run kept (robust to load)

__all__ = ["GradCamService", "ServiceLimits"]


class GradCamService:
    def __init__(
        self, repository: ModelRepository, limits: ServiceLimits = ServiceLimits(),
        on_batch=None,
    ) -> None:
        self.repository = repository
        self.limits = limits
        self.max_pixels = limits.max_pixels
        self.engine = Engine(limits, on_batch, nice=repository.runtime.nice)
        self.admit = self.engine.admit
        self._evaluation_batches: dict[tuple, int] = {}  # (model, input shape) -> rows
        self._measuring = asyncio.Lock()

    def model(self, name: str) -> ServedModel:
        return self.repository.get(name)

    @property
    def batchers(self) -> int:
        return self.engine.batchers

    async def close(self) -> None:
        await self.engine.close()

    async def run(
        self, model: ServedModel, x: np.ndarray, *, explain: Explaining | None,
        deadline: float | None = None, **score_inputs,
    ) -> RunResult:
        """Run a batch `x` of preprocessed images in process (tests, tools): the plain graph
        (`explain` None) or the augmented one, resolved, validated (`validate.feeds` takes
        `score_inputs`: target_class, reference, mask, others, detection) and batched as the
        APIs' requests are."""
        graph = None if explain is None else model.resolve(explain)
        checked = await asyncio.to_thread(
            lambda: feeds(model, graph, x, max_pixels=self.max_pixels, **score_inputs)
        )
        return await self.engine.run(model, graph, checked, deadline)

    def _check_response(self, model: ServedModel, sizes: Sequence[tuple[int, int]],
                        heatmap_size: HeatmapSize, maps: int, extra: int = 0,
                        other_bytes: int = 0, pixel_channels: int = 0) -> None:
        check_heatmap_response(model, sizes, heatmap_size, maps, extra, other_bytes,
                               pixel_channels, self.limits.max_response_bytes)

    # -- the typed explain API ---------------------------------------------------------------
    async def explain(
        self, request: ResolvedExplain, encode: Callable[[Explained], T] | None = None,
        deadline: float | None = None, progress: Progress | None = None,
    ) -> Explained | T:
        """Explain images of any sizes: encoded images are preprocessed to the model's size,
        tensors ([C, H, W]) taken as they are; images of one shape share a batch, each
        image's rows repeated once per rank (or detection). Returns `encode(explained)`,
        computed in the post-processing thread, or the `Explained` itself.

        `progress(done, total)` is called from runtime threads between the steps of a graph
        run in steps (Score-CAM's masked passes), summed over the request's batches: `done`
        never decreases, `total` grows as batches of other image shapes start."""
        model = request.model
        started = time.perf_counter()
        prepared = await asyncio.to_thread(self._prepare_explain, request)
        preprocess_seconds = time.perf_counter() - started
        tellers = [None] * len(prepared.groups)
        if progress is not None:
            tellers = _SummedProgress(progress).parts(len(prepared.groups))
        results = await asyncio.gather(*(
            self.engine.run(model, request.graph, group.feeds, deadline, teller)
            for group, teller in zip(prepared.groups, tellers)
        ))

        def finish():
            explained = Explained(
                explanations=_explanations(request, prepared, results),
                layer=request.graph.layer,
                method=request.graph.method,
                target=model.explained(request.graph),
                preprocess_seconds=preprocess_seconds,
                queue_seconds=max(r.queue_seconds for r in results),
                inference_seconds=sum(r.run_seconds for r in results),
                pictures=tuple(prepared.pictures) if request.keep_pictures else (),
            )
            return explained if encode is None else encode(explained)

        return await asyncio.to_thread(finish)

    def _prepare_explain(self, request: ResolvedExplain) -> _Prepared:
        """Decode the images (their sizes checked against the response bound first, from
        their headers), group them by shape and build each group's checked feeds."""
        model = request.model
        pictures: list = []
        tensors, sizes = self._tensors(model, request.images, lambda image_sizes: (
            self._check_response(
                model, image_sizes, request.heatmap_size, request.maps_per_image,
                request.extra_bytes_per_pixel, pixel_channels=request.pixel_channels,
            )
        ), pictures if request.keep_pictures else None)
        shapes: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(tensors):
            shapes.setdefault(tensor.shape, []).append(index)
        if request.detections:
            rows = _detection_rows(model, request, tensors, sizes)
            groups = []
            for indices in shapes.values():
                members = [r for r in rows if r.image in indices]
                groups.append(_Group(members, feeds(
                    model, request.graph, np.stack([tensors[r.image] for r in members]),
                    target_class=np.array([r.class_index for r in members], np.int64),
                    detection=(np.array([r.index for r in members], np.int64),
                               np.stack([r.box for r in members])),
                    max_pixels=self.max_pixels,
                )))
            return _Prepared(tensors, sizes, groups, pictures)
        ranks = request.top_k or 1
        groups = []
        for indices in shapes.values():
            x = np.repeat(np.stack([tensors[i] for i in indices]), ranks, axis=0)
            reference = request.reference
            if reference is not None and reference.ndim == 2:
                reference = np.repeat(reference[indices], ranks, axis=0)
            mask = request.mask
            if mask is not None and mask.ndim == 3:
                mask = np.repeat(mask[indices], ranks, axis=0)
            if request.class_index is not None:
                classes = np.full(len(x), request.class_index, dtype=np.int64)
            else:
                classes = np.tile(-np.arange(1, ranks + 1, dtype=np.int64), len(indices))
            group_feeds = feeds(
                model, request.graph, x, target_class=classes, reference=reference, mask=mask,
                others={n: np.repeat(v[indices], ranks, axis=0)
                        for n, v in request.others.items()},
                max_pixels=self.max_pixels,
            )
            groups.append(_Group(indices, group_feeds))
        return _Prepared(tensors, sizes, groups, pictures)

    def _tensors(
        self, model: ServedModel, images: Sequence[bytes | np.ndarray],
        check_sizes: Callable[[list[tuple[int, int]]], None], pictures: list | None = None,
    ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Each image as a preprocessed tensor, and its pixel size; `check_sizes` sees every
        image's size (the encoded ones read from their headers) before any is decoded.
        `pictures`, where given, receives each decoded image (None for a tensor)."""
        sizes = []
        for index, image in enumerate(images):
            if isinstance(image, bytes):
                sizes.append(_for_image(index, image_size, image, self.max_pixels))
            else:
                check_tensor(model, image[None], f"image {index}", self.max_pixels,
                             field=f"images[{index}]")
                sizes.append(image_tensor_size(model, image))
        check_sizes(sizes)
        tensors = []
        for index, image in enumerate(images):
            if isinstance(image, bytes):
                decoded = _for_image(index, decode_image, image, self.max_pixels)
                tensors.append(to_tensor(decoded, model.config.preprocessing))
                sizes[index] = decoded.size
            else:
                tensors.append(image)
                decoded = None
            if pictures is not None:
                pictures.append(decoded)
        return tensors, sizes

    # -- Evaluate: faithfulness metrics ------------------------------------------------------
    async def evaluate(
        self, request: ResolvedEvaluate, encode: Callable[[faithfulness.Evaluated], T] | None = None,
        deadline: float | None = None,
    ) -> faithfulness.Evaluated | T:
        """The faithfulness metrics of each method's map of each image (`faithfulness`): per
        method, the images' maps from one explain run per image shape (the target class of
        each image fixed by the first run), then every perturbed copy scored in runs of the
        model's plain forward graph, `batch_size` rows each (measured once per model and
        shape: `evaluation_batch`); the next run's copies are made in a worker thread while
        the session runs the current one. Returns `encode(evaluated)`, computed in a worker
        thread, or the `faithfulness.Evaluated` itself."""
        model, plan = request.model, request.plan
        started = time.perf_counter()
        tensors, sizes = await asyncio.to_thread(self._evaluation_tensors, request)
        preprocess_seconds = time.perf_counter() - started
        shapes: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(tensors):
            shapes.setdefault(tensor.shape, []).append(index)
        explained: dict[int, tuple[int, float]] = {}  # image -> (class, its intact score)
        measured: list[list[tuple[str, dict]]] = [[] for _ in tensors]
        inference_seconds, batch_size = 0.0, 0
        for graph in request.graphs:
            for shape, indices in shapes.items():
                heatmaps, seconds = await self._evaluated_maps(
                    request, graph, np.stack([tensors[i] for i in indices]), indices, explained,
                    deadline)
                inference_seconds += seconds
                jobs = [
                    faithfulness.MapPerturbations(
                        _channels_first(model, tensors[index]), heatmaps[row], plan, seed=index)
                    for row, index in enumerate(indices)
                ]
                if plan.copies:
                    batch_size = await self.evaluation_batch(model, shape)
                scores, seconds = await self._score_copies(
                    model, graph.output, jobs, [explained[i][0] for i in indices], batch_size,
                    deadline,
                )
                inference_seconds += seconds
                values = await asyncio.to_thread(
                    _read_metrics, request, jobs, scores, heatmaps,
                    [(index, explained[index][1], sizes[index]) for index in indices])
                for index, image_values in zip(indices, values):
                    measured[index].append((graph.method, image_values))

        def finish():
            evaluated = faithfulness.Evaluated(
                images=tuple(
                    faithfulness.ImageEvaluation(
                        explained[i][0], model.label(explained[i][0], request.graphs[0].output),
                        explained[i][1], tuple(measured[i]))
                    for i in range(len(tensors))
                ),
                plan=plan, copies=request.copies, batch_size=batch_size,
                preprocess_seconds=preprocess_seconds, inference_seconds=inference_seconds,
            )
            return evaluated if encode is None else encode(evaluated)

        return await asyncio.to_thread(finish)

    async def _evaluated_maps(
        self, request: ResolvedEvaluate, graph: Graph, x: np.ndarray, indices: list[int],
        explained: dict[int, tuple[int, float]], deadline: float | None,
    ) -> tuple[np.ndarray, float]:
        """The maps [N, H, W] of `graph` for the images `x` (numbers `indices`) from one run of
        the augmented graph, and its seconds; the first run also fills in `explained`: each
        image's class (the request's, or its rank's) and its score on the intact image."""
        model = request.model
        target = -1 if request.class_index is None else request.class_index
        checked = await asyncio.to_thread(lambda: feeds(
            model, graph, x, target_class=np.full(len(x), target, np.int64),
            max_pixels=self.max_pixels,
        ))
        result = await self.engine.run(model, graph, checked, deadline)
        scores = result.outputs[graph.output]
        for row, index in enumerate(indices):
            if index not in explained:
                category = _explained_class(scores[row], request.class_index)
                intact = faithfulness.class_scores(
                    scores[row:row + 1], np.array([category]), request.plan.score)[0]
                explained[index] = (category, float(intact))
        return result.outputs[NAMES.heatmap], result.run_seconds

    def _evaluation_tensors(
        self, request: ResolvedEvaluate
    ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """The images decoded and preprocessed; each pointing mask checked against its
        image's size (from the headers, before decoding)."""

        def check_sizes(sizes: list[tuple[int, int]]) -> None:
            for number, (target, (width, height)) in enumerate(zip(request.pointing, sizes)):
                if target.mask is not None and target.mask.shape != (height, width):
                    raise InvalidInput(
                        f"image {number}: the pointing mask is {list(target.mask.shape)}, the "
                        f"image [{height}, {width}]; give it at the image's size",
                        field=f"pointing[{number}]")

        return self._tensors(request.model, request.images, check_sizes)

    async def evaluation_batch(self, model: ServedModel, shape: tuple[int, ...]) -> int:
        """The rows per forward run with the best measured throughput for `model` on inputs
        of `shape`: powers of two up to MAX_EVALUATION_BATCH (and MAX_EVALUATION_RUN_BYTES),
        each run MEASURED_ROWS rows' worth of times (at least twice) after one untimed run, its
        fastest run kept, stopping after two sizes that gain under 5%; a model
        with a fixed batch runs its own, FIXED_BATCH_ROWS rows per request (the session runs
        them batch by batch). Measured once, then kept."""
        key = (model.name, shape)
        if key in self._evaluation_batches:
            return self._evaluation_batches[key]
        async with self._measuring:
            if key in self._evaluation_batches:
                return self._evaluation_batches[key]
            if model.fixed_batch is not None:  # runs of its batch; a request holds several
                best = model.fixed_batch * max(1, FIXED_BATCH_ROWS // model.fixed_batch)
            else:
                row_bytes = 4 * math.prod(shape)
                cap = max(1, min(MAX_EVALUATION_BATCH, MAX_EVALUATION_RUN_BYTES // row_bytes))
                best, best_seconds, idle = 1, math.inf, 0
                size = 1
                while size <= cap and idle < 2:
                    x = np.zeros((size, *shape), np.float32)
                    await self.engine.run(model, None, Feeds(x))  # allocates for the shape
                    runs = max(2, MEASURED_ROWS // size)
                    seconds = min([(await self.engine.run(model, None, Feeds(x))).run_seconds
                                   for _ in range(runs)]) / size
                    idle = idle + 1 if seconds > 0.95 * best_seconds else 0
                    if seconds < best_seconds:
                        best, best_seconds = size, seconds
                    size *= 2
            self._evaluation_batches[key] = best
            return best

    async def _score_copies(
        self, model: ServedModel, output: str, jobs: list[faithfulness.MapPerturbations],
        classes: list[int], batch_size: int, deadline: float | None,
    ) -> tuple[list[np.ndarray], float]:
        """Each job's copies scored (its class's score, as the plan says), in forward runs of
        `batch_size` rows; the copies of run k + 1 are made in a worker thread while run k
        runs. Returns the scores per job and the runs' seconds."""
        runs = faithfulness.chunks([job.count for job in jobs], batch_size)
        scores = [np.empty(job.count) for job in jobs]
        if not runs:  # the pointing game alone
            return scores, 0.0
        layout = model.config.preprocessing.layout

        def make(run: list[tuple[int, int, int]]) -> np.ndarray:
            x = np.concatenate([jobs[job].make(start, stop) for job, start, stop in run])
            return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x

        seconds = 0.0
        upcoming = asyncio.ensure_future(asyncio.to_thread(make, runs[0]))
        try:
            for number, run in enumerate(runs):
                x = await upcoming
                if number + 1 < len(runs):
                    upcoming = asyncio.ensure_future(asyncio.to_thread(make, runs[number + 1]))
                result = await self.engine.run(model, None, Feeds(x), deadline)
                seconds += result.run_seconds
                row_classes = np.concatenate(
                    [np.full(stop - start, classes[job]) for job, start, stop in run])
                measured = faithfulness.class_scores(
                    result.outputs[output], row_classes, jobs[0].plan.score)
                row = 0
                for job, start, stop in run:
                    scores[job][start:stop] = measured[row:row + stop - start]
                    row += stop - start
        finally:
            upcoming.cancel()
        return scores, seconds

    # -- KServe v2 ---------------------------------------------------------------------------
    async def infer(
        self, request: ResolvedInfer, encode: Callable[[dict[str, np.ndarray]], T],
        deadline: float | None = None,
    ) -> T:
        """Run a KServe request: the requested outputs, heatmaps at the requested size and a
        detector's boxes in the pixels of the images sent; `encode(outputs)` is computed in
        the post-processing thread."""
        model = request.model
        prepared = await asyncio.to_thread(self._prepare_infer, request)
        result = await self.engine.run(model, request.graph, prepared.feeds, deadline)
        return await asyncio.to_thread(
            lambda: encode(_infer_outputs(request, prepared, result))
        )

    def _prepare_infer(self, request: ResolvedInfer) -> _PreparedInfer:
        model, wanted = request.model, request.request
        maps = 1 if NAMES.heatmap in wanted.requested else 0
        pixel_channels = model.channels if NAMES.pixel_map in wanted.requested else 0

        def check_sizes(sizes: list[tuple[int, int]]) -> None:
            """Before decoding: one pixel size, and a response within the limit."""
            if len(set(sizes)) > 1:
                two = " and ".join(f"{w}x{h}" for w, h in sorted(set(sizes))[:2])
                raise InvalidInput(
                    f"images in one request must share one pixel size (got {two}); send them "
                    "in separate requests or use the typed Explain API, which takes mixed sizes"
                )
            other_bytes = sum(
                4 * len(sizes) * math.prod(max(d, 1) for d in model.output_shapes[name])
                for name in wanted.requested
                if name not in (NAMES.heatmap, NAMES.pixel_map, NAMES.concept_scores,
                                *DETECTION_OUTPUTS)
            )
            self._check_response(model, sizes, request.heatmap_size, maps,
                                 other_bytes=other_bytes, pixel_channels=pixel_channels)

        if wanted.encoded is not None:
            tensors, sizes = self._tensors(model, wanted.encoded, check_sizes)
            x = np.stack(tensors)
        else:
            x = wanted.x
            check_tensor(model, x, f"input {model.input.name!r}", self.max_pixels,
                         field=f"inputs[{model.input.name}]")
            sizes = [image_tensor_size(model, x[0])] * len(x)
            check_sizes(sizes)
        tensor_size = image_tensor_size(model, x[0])  # (width, height) the graph sees
        detection = None
        if request.detecting:
            detection = _kserve_detection_rows(wanted, sizes, tensor_size)
        checked = feeds(
            model, request.graph, x, target_class=wanted.target_class,
            reference=wanted.reference, mask=wanted.mask, others=wanted.others,
            detection=detection, max_pixels=self.max_pixels,
        )
        return _PreparedInfer(checked, sizes, tensor_size)


@dataclass
class _Group:
    """Images of one shape run together: `members` are image indices (their rows repeated
    per rank), or, detecting, `_DetectionRow`s."""

    members: list
    feeds: Feeds


@dataclass
class _Prepared:
    tensors: list[np.ndarray]
    sizes: list[tuple[int, int]]  # (width, height) of each image as sent
    groups: list[_Group]
    pictures: list  # the decoded images, where the request keeps them


@dataclass
class _PreparedInfer:
    feeds: Feeds
    sizes: list[tuple[int, int]]
    tensor_size: tuple[int, int]  # (width, height) the graph sees


@dataclass
class _DetectionRow:
    """One detection to explain: of image `image`, the `position`-th asked for it."""

    image: int
    position: int
    index: int  # the pre-NMS box, -1: chosen by box
    box: np.ndarray  # the reference box in the graph's pixels (zeros: none)
    class_index: int
    asked_box: tuple[float, ...] | None  # the box as the request gave it, in its pixels


def _detection_rows(model: ServedModel, request: ResolvedExplain, tensors: list[np.ndarray],
                    sizes: list[tuple[int, int]]) -> list[_DetectionRow]:
    """The typed API's detections as rows: each box checked in its image's pixels and
    scaled to the graph's."""
    rows = []
    for number, (wanted, size) in enumerate(zip(request.detections, sizes)):
        graph_size = image_tensor_size(model, tensors[number])
        for position, detection in enumerate(wanted):
            what = f"image {number}, detection {position}"
            field = f"detections[{number}].detections[{position}]"
            if detection.index is None and detection.box is None:
                raise InvalidInput(f"{what}: give a box index or a box (and a class)",
                                   field=field)
            if detection.index is not None and detection.index < 0:
                raise InvalidInput(f"{what}: box index {detection.index} is negative",
                                   field=field)
            box = np.zeros(4, np.float32)
            if detection.box is not None:
                check_box(detection.box, size, what)
                box = to_model_pixels(detection.box, size, graph_size)
            rows.append(_DetectionRow(
                number, position, -1 if detection.index is None else detection.index, box,
                -1 if detection.class_index is None else detection.class_index, detection.box,
            ))
    return rows


def _explanations(request: ResolvedExplain, prepared: _Prepared,
                  results: list[RunResult]) -> tuple[ImageExplanation, ...]:
    model, graph = request.model, request.graph
    if request.detections:
        maps: list[list[ClassMap | None]] = [[None] * len(w) for w in request.detections]
        for group, result in zip(prepared.groups, results):
            _refuse_unmatched(result.outputs, group.members, graph.iou_threshold)
            for k, row in enumerate(group.members):
                maps[row.image][row.position] = detection_map(
                    model, graph, result.outputs, k, prepared.tensors[row.image],
                    prepared.sizes[row.image], request.num_channels, request.heatmap_size,
                )
        return tuple(ImageExplanation(tuple(image_maps), ()) for image_maps in maps)
    ranks = request.top_k or 1
    explained: list[ImageExplanation | None] = [None] * len(request.images)
    for group, result in zip(prepared.groups, results):
        masks = group.feeds.mask  # at the images' pixel size, each row repeated per rank
        for position, index in enumerate(group.members):
            rows = slice(position * ranks, (position + 1) * ranks)
            mask = None if masks is None else masks[position * ranks]
            explained[index] = class_explanation(
                model, graph, result.outputs, rows, prepared.sizes[index], request.class_index,
                request.num_predictions, request.num_channels,
                mask if mask is not None and mask.max() >= 0 else None, request.heatmap_size,
            )
    return tuple(explained)


def _refuse_unmatched(outputs: dict, rows: list[_DetectionRow], threshold: float) -> None:
    """`refuse_missing` for the detections of one run that no anchor matched, naming image and
    detection."""
    for k, row in enumerate(rows):
        if outputs[NAMES.explained_detection][k] >= 0:
            continue
        what = f"image {row.image}, detection {row.position}"
        if row.index >= 0:
            raise InvalidInput(f"{what}: box index {row.index} is out of range of the model's "
                               "pre-NMS boxes, or a padding row without a box")
        refuse_missing([-1], [row.class_index], [row.asked_box], threshold, label=what)


def _kserve_detection_rows(
    request, sizes: list[tuple[int, int]], graph_size: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(detection_index, reference_box in the graph's pixels) of a detector's rows; each given
    box checked in the pixels of its image (`sizes`, (width, height)); zero rows: no box."""
    rows = len(sizes)
    boxes = request.reference_box
    if boxes is not None:
        boxes = np.asarray(boxes)
        if boxes.dtype != np.float32 or boxes.shape != (rows, 4):
            raise InvalidInput(f"input {NAMES.reference_box!r} must be FP32 [{rows}, 4] (x1, y1, "
                               f"x2, y2 per row), got {boxes.dtype} {list(boxes.shape)}")
        scaled = np.zeros((rows, 4), np.float32)
        for row, (box, size) in enumerate(zip(boxes, sizes)):
            if np.any(box != 0) or not np.isfinite(box).all():
                check_box(box, size, f"{NAMES.reference_box} row {row}")
                scaled[row] = to_model_pixels(box, size, graph_size)
        boxes = scaled
    return request.detection_index, boxes


def _infer_outputs(request: ResolvedInfer, prepared: _PreparedInfer,
                   result: RunResult) -> dict[str, np.ndarray]:
    """The requested outputs of a KServe run: heatmaps resized to the requested size, a
    detector's unmatched rows refused and its boxes in the pixels of the images sent."""
    wanted = request.request
    outputs = {name: result.outputs[name] for name in wanted.requested}
    if NAMES.heatmap in outputs:  # the images of a KServe request share one pixel size
        width, height = request.heatmap_size.of(prepared.sizes[0], prepared.tensor_size)
        resized = np.empty((len(outputs[NAMES.heatmap]), height, width), np.float32)
        for row in range(len(resized)):
            heatmap_at(result.outputs, row, (width, height), out=resized[row])
        outputs[NAMES.heatmap] = resized
    if request.detecting:
        rows = prepared.feeds.rows
        classes = prepared.feeds.target_class.tolist()
        boxes = ([wanted.reference_box[row] for row in range(rows)]
                 if wanted.reference_box is not None else [None] * rows)
        explained = result.outputs[NAMES.explained_detection]
        indices = prepared.feeds.detection[0]
        for row in np.flatnonzero((explained < 0) & (indices >= 0)):
            raise InvalidInput(f"row {row}: detection index {indices[row]} is out of range "
                               "of the model's pre-NMS boxes, or a padding row without a box")
        refuse_missing(explained, classes, boxes, request.graph.iou_threshold,
                       label="row {row}")
        if NAMES.detection_box in outputs:
            outputs[NAMES.detection_box] = np.stack([
                to_model_pixels(box, prepared.tensor_size, size)
                for box, size in zip(outputs[NAMES.detection_box], prepared.sizes)
            ])
    return outputs


def _for_image(index: int, function, data: bytes, max_pixels: int):
    """`function(data, max_pixels)`, its InvalidInput naming the image."""
    try:
        return function(data, max_pixels)
    except InvalidInput as error:
        raise InvalidInput(f"image {index}: {error}", field=f"images[{index}]") from error


class _SummedProgress:
    """The progress of several batches of one request as one (done, total), told under a
    lock (each batch reports from its own runtime thread)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self._parts: dict[int, tuple[int, int]] = {}

    def parts(self, count: int) -> list[Progress]:
        return [lambda done, total, i=i: self._tell(i, done, total) for i in range(count)]

    def _tell(self, part: int, done: int, total: int) -> None:
        with self._lock:
            self._parts[part] = (done, total)
            self._progress(sum(d for d, _ in self._parts.values()),
                           sum(t for _, t in self._parts.values()))


def _explained_class(scores: np.ndarray, class_index: int | None) -> int:
    """The class a row explains: `class_index`, or for -r (None: -1) the r-th highest-scoring
    class, as the graph ranks them."""
    if class_index is not None and class_index >= 0:
        return class_index
    rank = 1 if class_index is None else -class_index
    return int(np.argsort(-scores.astype(np.float64), kind="stable")[rank - 1])


def _channels_first(model: ServedModel, tensor: np.ndarray) -> np.ndarray:
    """A preprocessed image as [C, H, W], whatever the model's input layout."""
    if model.config.preprocessing.layout == "NHWC":
        return tensor.transpose(2, 0, 1)
    return tensor


def _read_metrics(
    request: ResolvedEvaluate, jobs: list[faithfulness.MapPerturbations],
    scores: list[np.ndarray], heatmaps: np.ndarray,
    images: list[tuple[int, float, tuple[int, int]]],
) -> list[dict[str, faithfulness.MetricValue]]:
    """Each map's metrics, in the plan's order, from its copies' `scores`; `images` holds
    per map its image's number, intact score and pixel size (the pointing game's)."""
    plan, values = request.plan, []
    for job, copies, heatmap, (index, intact, size) in zip(jobs, scores, heatmaps, images):
        metrics = job.metrics(copies, intact)
        if faithfulness.POINTING_GAME in plan.metrics:
            metrics[faithfulness.POINTING_GAME] = _pointing(request, index, heatmap, size)
        values.append({name: metrics[name] for name in plan.metrics})
    return values


def _pointing(request: ResolvedEvaluate, index: int, heatmap: np.ndarray,
              size: tuple[int, int]) -> faithfulness.MetricValue:
    """The pointing game of one map, at its image's pixel size."""
    target = request.pointing[index]
    return faithfulness.pointing_game(
        resize_heatmap(heatmap, size), box=target.box, mask=target.mask,
        tolerance=request.pointing_tolerance,
    )
