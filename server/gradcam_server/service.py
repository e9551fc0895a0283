"""The transport-agnostic core both gRPC APIs call: validation, preprocessing, batching, and
turning graph outputs into explanations. It knows the repository and nothing of gRPC.

What one client can make the server hold is bounded here (`ServiceLimits`): requests admitted
per model (checked before anything is decoded), the bytes of a response (checked before the
model runs), and the batchers, which an LRU keeps and which share one pool of runtime threads.
CPU-heavy steps (decoding, validation of large tensors, resizing heatmaps) run in worker
threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .augment.cam import PIXEL_METHODS
from .augment.passes import NAMES
from .batching import BatchStats, DynamicBatcher, StopSignal
from .detections import check_detection
from .errors import InvalidInput, QueueFull, shown
from .model import Explaining, ServedModel
from .preprocess import decode_image, image_size, to_tensor
from .repository import ModelRepository

DEFAULT_MAX_PIXELS = 50_000_000
MAX_IMAGES_PER_REQUEST = 64
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC's receive and send limit
_RESPONSE_OVERHEAD_BYTES = 1024 * 1024  # what a response holds beside its tensors, at most


@dataclass(frozen=True)
class ServiceLimits:
    """What one request, and all of them together, may make the server hold."""

    max_pixels: int = DEFAULT_MAX_PIXELS  # per decoded image, per mask, per requested heatmap
    max_response_bytes: int = MAX_MESSAGE_BYTES - _RESPONSE_OVERHEAD_BYTES
    max_batchers: int = 64  # (model, graph variant, input shape) batchers kept, LRU
    runtime_threads: int = 2  # batches of different batchers that run at once


@dataclass(frozen=True)
class HeatmapSize:
    """The pixel size heatmaps are returned at, as the request parameter ``heatmap_size``
    says: "image" (the default: each image's own size), "model" (the graph's map as it is, at
    the model's input size) or "WIDTHxHEIGHT"."""

    kind: str = "image"  # "image", "model" or "fixed"
    fixed: tuple[int, int] | None = None  # (width, height) of "fixed"

    @classmethod
    def parse(cls, text: str | None, max_pixels: int) -> HeatmapSize:
        if not text or text == "image":
            return cls()
        if text == "model":
            return cls("model")
        match = re.fullmatch(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})", text)
        if match is None:
            raise InvalidInput(
                f"heatmap_size must be 'image', 'model' or WIDTHxHEIGHT (e.g. 224x224), "
                f"got {shown(text)}"
            )
        width, height = int(match[1]), int(match[2])
        if width * height > max_pixels:
            raise InvalidInput(
                f"heatmap_size {width}x{height} is over the limit of {max_pixels} pixels"
            )
        return cls("fixed", (width, height))

    def of(self, image: tuple[int, int], model: tuple[int, int]) -> tuple[int, int]:
        """(width, height) of the heatmap for an image of pixel size `image` ((width,
        height)) explained by a map of size `model` ((width, height))."""
        if self.kind == "model":
            return model
        return self.fixed if self.kind == "fixed" else image


@dataclass
class _Call:
    """One request's rows, queued in a batcher."""

    x: np.ndarray
    target_class: np.ndarray | None
    reference: np.ndarray | None = None
    mask: np.ndarray | None = None
    others: dict[str, np.ndarray] = field(default_factory=dict)
    # score "detection": (detection_index INT64 [N], reference_box FP32 [N, 4] in the graph's
    # input pixels), `detections.check_detection`
    detection: tuple[np.ndarray, np.ndarray] | None = None
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    queue_seconds: float
    run_seconds: float


@dataclass(frozen=True)
class Prediction:
    """A class the model predicts: for a classifier its softmax probability and logit; for a
    segmentation map the share of pixels predicted as the class and its mean score."""

    class_index: int
    label: str
    score: float
    logit: float


@dataclass(frozen=True)
class ClassMap:
    """One heatmap at the image's own size, for one class, with its channel importances."""

    class_index: int
    label: str
    heatmap: np.ndarray  # float32 [height, width] in [0, 1], at the requested HeatmapSize
    channels: tuple[tuple[int, float], ...]  # (channel, weight), most important first
    # Pixel-level methods only: the signed input gradients [C, H, W] at the model's input size.
    pixel_gradients: np.ndarray | None = None
    # Score "detection" only: the detection explained (`detections.DetectedBox`).
    detection: object | None = None


@dataclass(frozen=True)
class ImageExplanation:
    maps: tuple[ClassMap, ...]
    predictions: tuple[Prediction, ...]


@dataclass(frozen=True)
class Explained:
    explanations: tuple[ImageExplanation, ...]
    layer: str | tuple[str, ...]
    method: str
    # What was explained (`ServedModel.explained`): the layout, prefix tokens and grid.
    target: dict[str, str]
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float


class GradCamService:
    def __init__(
        self,
        repository: ModelRepository,
        limits: ServiceLimits = ServiceLimits(),
        on_batch=None,
    ) -> None:
        self.repository = repository
        self.limits = limits
        self.max_pixels = limits.max_pixels
        self._on_batch = on_batch  # (model name, graph, BatchStats) -> None
        self._batchers: OrderedDict[tuple, DynamicBatcher] = OrderedDict()
        self._retired: set[asyncio.Task] = set()  # evicted batchers finishing their queue
        self._runtime = concurrent.futures.ThreadPoolExecutor(
            limits.runtime_threads, thread_name_prefix="runtime"
        )
        # Augmenting a graph takes seconds; one thread does it, so requests waiting for a new
        # variant never hold the threads that decode other requests' images.
        self._builder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="augment")
        self._admitted: dict[str, int] = {}

    def model(self, name: str) -> ServedModel:
        return self.repository.get(name)

    @property
    def batchers(self) -> int:
        """Batchers held now (bounded by `ServiceLimits.max_batchers`)."""
        return len(self._batchers)

    @contextlib.contextmanager
    def admit(self, model: ServedModel) -> Iterator[None]:
        """Hold one of the model's request places while the block runs; QueueFull at once,
        before anything is decoded, when all are taken. A model has room for its queue
        (``max_queue_size``) and one batch running (``max_batch_size``)."""
        limit = model.config.max_queue_size + model.max_batch_size
        held = self._admitted.get(model.name, 0)
        if held >= limit:
            raise QueueFull(
                f"model {model.name!r} queue is full ({held} requests in progress); retry later"
            )
        self._admitted[model.name] = held + 1
        try:
            yield
        finally:
            self._admitted[model.name] -= 1

    def check_response_size(self, heatmap_pixels: int, other_bytes: int = 0) -> None:
        """InvalidInput, before anything runs, when the response would hold more than the
        limit: `heatmap_pixels` float32 values of heatmaps and `other_bytes` of other data."""
        size = 4 * heatmap_pixels + other_bytes
        limit = self.limits.max_response_bytes
        if size > limit:
            raise InvalidInput(
                f"the response would hold {size / 2**20:.1f} MiB, over the limit of "
                f"{limit / 2**20:.0f} MiB per response; ask for smaller heatmaps (parameter "
                "heatmap_size 'model' or WIDTHxHEIGHT), fewer classes or fewer images per "
                "request"
            )

    # -- inputs ------------------------------------------------------------------------------
    async def images_to_tensor(
        self,
        model: ServedModel,
        images: Sequence[bytes],
        check_sizes: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Decode and preprocess encoded images (off the event loop): [N, ...] at the model's
        size, and each image's own (width, height). `check_sizes` sees those sizes, read from
        the headers, before any pixel is decoded (to refuse a response too large early)."""
        _check_count(len(images))

        def prepare() -> tuple[np.ndarray, list[tuple[int, int]]]:
            if check_sizes is not None:
                check_sizes([
                    _for_image(index, image_size, data, self.max_pixels)
                    for index, data in enumerate(images)
                ])
            tensors, sizes = [], []
            for index, data in enumerate(images):
                image = _for_image(index, decode_image, data, self.max_pixels)
                sizes.append(image.size)
                tensors.append(to_tensor(image, model.config.preprocessing))
            return np.stack(tensors), sizes

        return await asyncio.to_thread(prepare)

    def check_heatmap_response(
        self,
        model: ServedModel,
        sizes: Sequence[tuple[int, int]],
        heatmap_size: HeatmapSize,
        maps_per_image: int = 1,
        bytes_per_image_pixel: int = 0,
        other_bytes: int = 0,
        pixel_channels: int = 0,
    ) -> None:
        """`check_response_size` for `maps_per_image` heatmaps of each image of pixel size
        `sizes` ((width, height)) at `heatmap_size`, `bytes_per_image_pixel` more per pixel of
        each image (an overlay), `other_bytes`, and with each map `pixel_channels` float32
        maps at the model's size (the signed gradients of the pixel-level methods)."""
        heatmap_pixels = extra_bytes = 0
        for size in sizes:
            map_width, map_height = model_map_size(model, size)
            width, height = heatmap_size.of(size, (map_width, map_height))
            pixel_values = pixel_channels * map_width * map_height
            heatmap_pixels += maps_per_image * (width * height + pixel_values)
            extra_bytes += bytes_per_image_pixel * size[0] * size[1]
        self.check_response_size(heatmap_pixels, extra_bytes + other_bytes)

    def check_tensor(self, model: ServedModel, x: np.ndarray, what: str) -> None:
        """The tensor must be float32 [N, ...] matching the graph's input where it is fixed,
        and finite."""
        expected = model.input.shape
        if x.dtype != np.float32:
            raise InvalidInput(f"{what} must be FP32, got {x.dtype}")
        if x.ndim != len(expected):
            raise InvalidInput(
                f"{what} must have rank {len(expected)} {_shape(expected)}, got shape {_shape(x.shape)}"
            )
        for axis, (want, got) in enumerate(zip(expected, x.shape)):
            if axis == 0:
                continue
            if (want > 0 and got != want) or got == 0:
                raise InvalidInput(
                    f"{what} has shape {_shape(x.shape)}; the model expects {_shape(expected)}"
                )
        _check_count(x.shape[0])
        if x.shape[0] == 0:
            raise InvalidInput(f"{what} holds no image (batch dimension 0)")
        if x.size // x.shape[0] > 4 * self.max_pixels:  # a few channels of the pixel limit
            raise InvalidInput(
                f"{what} holds {x.size // x.shape[0]} values per image, over the limit of "
                f"{4 * self.max_pixels}"
            )
        if not np.isfinite(x).all():
            raise InvalidInput(f"{what} contains NaN or Inf values")

    def check_target_class(
        self, model: ServedModel, explain: Explaining, target_class: np.ndarray | None, rows: int
    ) -> np.ndarray:
        """INT64 [N]: c in [0, classes) explains class c, -1 the top-1 class (-r the r-th).
        [N, 1] is taken too: Triton declares a batched scalar so, and its clients send it.
        A detector's classes are the pre-NMS scores' (unchecked where the graph leaves them
        free)."""
        explain = model.resolve(explain)
        classes = model.output_shapes[explain.output][0]
        if explain.score == "detection":
            classes = model.num_classes if model.num_classes > 0 else np.iinfo(np.int64).max
        if target_class is None:
            return np.full(rows, -1, dtype=np.int64)
        target_class = np.asarray(target_class)
        if target_class.dtype != np.int64:
            raise InvalidInput(f"target_class must be INT64, got {target_class.dtype}")
        if target_class.shape == (rows, 1):
            target_class = target_class.reshape(rows)
        if target_class.shape != (rows,):
            raise InvalidInput(
                f"target_class must have shape [{rows}] or [{rows}, 1] (one per image), "
                f"got {_shape(target_class.shape)}"
            )
        bad = (target_class >= classes) | (target_class < -classes)
        if bad.any():
            raise InvalidInput(
                f"target_class {int(target_class[bad][0])} is out of range: the model has "
                f"{classes} classes (0..{classes - 1}, or -r for each image's r-th "
                "highest-scoring class, -1 the top one)"
            )
        background = model.background_class if explain.score == "detection" else None
        if background is not None and (target_class == background).any():
            raise InvalidInput(
                f"target_class {background} is the detector's background class, which is not "
                "explained; give an object class, or -1 for the best one"
            )
        return target_class

    def check_reference(
        self, model: ServedModel, explain: Explaining, reference: np.ndarray | None, rows: int
    ) -> np.ndarray | None:
        """The reference embedding, as FP32 [rows, D]: given exactly when the score is
        "similarity"; a single [D] vector serves every image."""
        if explain.score != "similarity":
            if reference is not None:
                raise InvalidInput("a reference embedding is only used with score 'similarity'")
            return None
        if reference is None:
            raise InvalidInput("score 'similarity' needs a reference embedding")
        reference = np.asarray(reference)
        if reference.dtype != np.float32 or reference.ndim not in (1, 2) or reference.size == 0:
            raise InvalidInput(
                f"the reference embedding must be FP32 [D] or [N, D], got {reference.dtype} "
                f"{_shape(reference.shape)}"
            )
        width = model.output_shapes[explain.output][-1]
        if width > 0 and reference.shape[-1] != width:
            raise InvalidInput(
                f"the reference embedding has {reference.shape[-1]} values per image; the "
                f"model's embedding has {width}"
            )
        if reference.ndim == 1:
            reference = np.broadcast_to(reference, (rows, len(reference)))
        if len(reference) != rows:
            raise InvalidInput(f"the reference embedding has {len(reference)} rows for {rows} images")
        if not np.isfinite(reference).all():
            raise InvalidInput("the reference embedding contains NaN or Inf values")
        return np.ascontiguousarray(reference)

    def check_mask(
        self, model: ServedModel, explain: Explaining, mask: np.ndarray | None, x: np.ndarray
    ) -> np.ndarray | None:
        """The region of the "region" score for the images `x`, as FP32 [N, H, W] at their
        pixel size (the graph resizes it to the output's): a given [h, w] (every image) or
        [N, h, w] mask of any size is resized to it (nearest pixel: a region stays a set of
        pixels); none means each class's predicted region (all -1)."""
        if explain.score != "region":
            if mask is not None:
                raise InvalidInput("a target mask is only used with score 'region'")
            return None
        rows, size = len(x), pixel_size(model, x)
        if mask is None:
            return np.full((rows, *size), -1.0, dtype=np.float32)
        mask = np.asarray(mask)
        if mask.dtype != np.float32 or mask.ndim not in (2, 3) or 0 in mask.shape:
            raise InvalidInput(
                f"the target mask must be FP32 [h, w] or [N, h, w], got {mask.dtype} "
                f"{_shape(mask.shape)}"
            )
        if mask.ndim == 3 and len(mask) != rows:
            raise InvalidInput(f"the target mask has {len(mask)} rows for {rows} images")
        if mask.shape[-2] * mask.shape[-1] > self.max_pixels:
            raise InvalidInput(f"the target mask is over the limit of {self.max_pixels} pixels")
        if not np.isfinite(mask).all():
            raise InvalidInput("the target mask contains NaN or Inf values")
        rows_of = mask if mask.ndim == 3 else [mask] * rows
        return np.stack([_resize(m, size[::-1], Image.NEAREST) for m in rows_of])

    def check_other_inputs(
        self, model: ServedModel, others: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        """The model's inputs besides the image: each one given, [rows, ...] of its dtype."""
        names = [i.name for i in model.other_inputs]
        unknown = sorted(set(others) - set(names))
        if unknown:
            raise InvalidInput(
                f"unknown input {unknown[0]!r}; the model's inputs besides the image: "
                f"{', '.join(names) or 'none'}"
            )
        missing = [i.name for i in model.other_inputs if i.name not in others]
        if missing:
            raise InvalidInput(f"the model also needs the input(s) {', '.join(missing)}")
        checked = {}
        for info in model.other_inputs:
            value = np.asarray(others[info.name])
            if value.dtype != info.dtype:
                raise InvalidInput(f"input {info.name!r} must be {info.dtype}, got {value.dtype}")
            fixed = all(w < 0 or w == g for w, g in zip(info.shape[1:], value.shape[1:]))
            if value.ndim != len(info.shape) or len(value) != rows or not fixed:
                raise InvalidInput(
                    f"input {info.name!r} has shape {_shape(value.shape)}; the model expects "
                    f"{_shape(info.shape)} with {rows} rows"
                )
            checked[info.name] = value
        return checked

    # -- running -----------------------------------------------------------------------------
    async def run(
        self,
        model: ServedModel,
        x: np.ndarray,
        *,
        explain: Explaining | None,
        target_class: np.ndarray | None = None,
        reference: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        others: dict[str, np.ndarray] | None = None,
        deadline: float | None = None,
        detection: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> RunResult:
        """Run a validated batch through the model's batcher: the plain graph (`explain` None)
        or the augmented graph `explain` asks for, built on first use. `reference` is the
        reference embedding of the "similarity" score ([D] or [N, D]), `mask` the region of
        the "region" score (`check_mask`), `others` the model's other inputs by name,
        `detection` the "detection" score's index and reference box per row, in the graph's
        input pixels (`detections.check_detection`)."""
        if explain is not None:
            explain = model.resolve(explain)

        def validate() -> _Call:
            checked = self.check_other_inputs(model, others or {}, len(x))
            if explain is None:
                return _Call(x, None, others=checked)
            classes = self.check_target_class(model, explain, target_class, len(x))
            return _Call(
                x,
                classes,
                self.check_reference(model, explain, reference, len(x)),
                self.check_mask(model, explain, mask, x),
                checked,
                check_detection(model, explain, detection, classes, x),
            )

        call = await asyncio.to_thread(validate)
        if explain is not None and not model.is_built(explain):  # InvalidInput if it can't be
            await asyncio.get_running_loop().run_in_executor(  # built as asked
                self._builder, model.explainer, explain
            )
        call.submitted = time.perf_counter()
        return await self._batcher(model, explain, x.shape[1:]).submit(
            call, size=len(x), deadline=deadline
        )

    def _batcher(
        self, model: ServedModel, explain: Explaining | None, shape: tuple[int, ...]
    ) -> DynamicBatcher:
        """The batcher of (model, graph variant, input shape); the least recently used one
        is retired (it finishes what it has queued) once `max_batchers` are held."""
        key = (model.name, explain, shape)
        batcher = self._batchers.get(key)
        if batcher is not None:
            self._batchers.move_to_end(key)
            return batcher
        batcher = self._batchers[key] = self._make_batcher(model, explain)
        while len(self._batchers) > self.limits.max_batchers:
            _, retired = self._batchers.popitem(last=False)
            task = asyncio.get_running_loop().create_task(retired.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)
        return batcher

    def _make_batcher(self, model: ServedModel, explain: Explaining | None) -> DynamicBatcher:
        graph = "forward" if explain is None else explain.graph

        def run_batch(calls: list[_Call], stop: StopSignal) -> list[RunResult]:
            start = time.perf_counter()
            x = np.concatenate([c.x for c in calls]) if len(calls) > 1 else calls[0].x
            others = {n: np.concatenate([c.others[n] for c in calls]) for n in calls[0].others}
            if explain is None:
                outputs = model.forward(x, others, stop=stop)
            else:
                classes = np.concatenate([c.target_class for c in calls])
                reference = mask = None
                if explain.score == "similarity":
                    reference = np.concatenate([c.reference for c in calls])
                if explain.score == "region":
                    mask = np.concatenate([c.mask for c in calls])
                detection = None
                if explain.score == "detection":
                    detection = tuple(np.concatenate([c.detection[i] for c in calls])
                                      for i in (0, 1))
                outputs = model.explain(x, classes, explain, reference, mask, others, stop=stop,
                                        detection=detection)
            run_seconds = time.perf_counter() - start
            results, row = [], 0
            for call in calls:
                rows = slice(row, row + len(call.x))
                row += len(call.x)
                results.append(
                    RunResult(
                        {name: value[rows] for name, value in outputs.items()},
                        queue_seconds=start - call.submitted,
                        run_seconds=run_seconds,
                    )
                )
            return results

        def on_batch(stats: BatchStats) -> None:
            if self._on_batch is not None:
                self._on_batch(model.name, graph, stats)

        return DynamicBatcher(
            run_batch,
            max_batch_size=model.max_batch_size,
            max_queue_delay_microseconds=model.config.max_queue_delay_microseconds,
            max_queue_size=model.config.max_queue_size,
            executor=self._runtime,
            name=model.name,
            on_batch=on_batch,
        )

    async def close(self) -> None:
        """Stop taking work and finish what is queued or running."""
        await asyncio.gather(*(b.close() for b in self._batchers.values()), *self._retired)
        self._runtime.shutdown(wait=False)
        self._builder.shutdown(wait=False, cancel_futures=True)

    # -- the typed explain API ---------------------------------------------------------------
    async def explain(
        self,
        model: ServedModel,
        images: Sequence[bytes | np.ndarray],
        *,
        request: Explaining = Explaining(),
        reference: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        others: dict[str, np.ndarray] | None = None,
        class_index: int | None = None,
        top_k: int | None = None,
        num_predictions: int = 5,
        num_channels: int = 10,
        heatmap_size: HeatmapSize = HeatmapSize(),
        extra_bytes_per_pixel: int = 0,
        deadline: float | None = None,
    ) -> Explained:
        """Explain images of any sizes: encoded images are preprocessed to the model's size,
        tensors ([C, H, W]) are taken as they are; images of one shape share a batch.
        `mask` is the region of the "region" score ([h, w] or [N, h, w], `check_mask`);
        `others` the model's other inputs by name, one row per image. Heatmaps come at
        `heatmap_size`; the response (heatmaps, and `extra_bytes_per_pixel` per pixel of each
        image, e.g. an overlay) is bounded before the model runs."""
        if not images:
            raise InvalidInput("the request holds no image")
        _check_count(len(images))
        request = model.resolve(request)
        class_count = model.output_shapes[request.output][0]
        if top_k is not None and not 1 <= top_k <= min(class_count, 20):
            raise InvalidInput(f"top_k must be in 1..{min(class_count, 20)}, got {top_k}")
        if class_index is not None:
            self.check_target_class(model, request, np.array([class_index], dtype=np.int64), 1)
        if reference is not None and reference.ndim == 2 and len(reference) != len(images):
            raise InvalidInput(
                f"the reference embedding has {len(reference)} rows for {len(images)} images"
            )
        if mask is not None and mask.ndim == 3 and len(mask) != len(images):
            raise InvalidInput(f"the target mask has {len(mask)} rows for {len(images)} images")
        others = others or {}
        for name, value in others.items():
            if value.ndim == 0 or len(value) != len(images):
                raise InvalidInput(
                    f"input {name!r} must have one row per image ({len(images)}), got shape "
                    f"{_shape(value.shape)}"
                )
        ranks = top_k or 1
        tensor_sizes = [  # (width, height) of the images sent as tensors
            image_tensor_size(model, image)
            for image in images if not isinstance(image, bytes) and image.ndim == 3
        ]

        def check_sizes(encoded_sizes: list[tuple[int, int]]) -> None:
            self.check_heatmap_response(
                model, [*encoded_sizes, *tensor_sizes], heatmap_size, ranks,
                extra_bytes_per_pixel,
                pixel_channels=model.channels if request.method in PIXEL_METHODS else 0,
            )

        started = time.perf_counter()
        tensors, sizes = await self._prepare_mixed(model, images, check_sizes)
        preprocess_seconds = time.perf_counter() - started

        groups: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(tensors):
            groups.setdefault(tensor.shape, []).append(index)

        def group_rows(indices: list[int]) -> tuple[dict, np.ndarray | None]:
            """run()'s arguments for the images `indices`, each repeated for its ranks, and
            their mask at their pixel size."""
            x = np.repeat(np.stack([tensors[i] for i in indices]), ranks, axis=0)
            rows_reference = reference
            if reference is not None and reference.ndim == 2:
                rows_reference = np.repeat(reference[indices], ranks, axis=0)
            group_mask = mask[indices] if mask is not None and mask.ndim == 3 else mask
            group_mask = self.check_mask(model, request, group_mask, x[::ranks])
            if class_index is not None:
                classes = np.full(len(x), class_index, dtype=np.int64)
            else:
                classes = np.tile(-np.arange(1, ranks + 1, dtype=np.int64), len(indices))
            arguments = dict(
                x=x, target_class=classes, reference=rows_reference,
                mask=None if group_mask is None else np.repeat(group_mask, ranks, axis=0),
                others={n: np.repeat(v[indices], ranks, axis=0) for n, v in others.items()},
            )
            return arguments, group_mask

        prepared = await asyncio.to_thread(lambda: [group_rows(i) for i in groups.values()])
        masks = [group_mask for _, group_mask in prepared]  # at the images' pixel size
        calls = [
            self.run(model, explain=request, deadline=deadline, **arguments)
            for arguments, _ in prepared
        ]
        results = await asyncio.gather(*calls)

        def explanations() -> tuple[ImageExplanation, ...]:
            explained: list[ImageExplanation | None] = [None] * len(images)
            for indices, result, group_mask in zip(groups.values(), results, masks):
                for position, index in enumerate(indices):
                    rows = slice(position * ranks, (position + 1) * ranks)
                    given = group_mask is not None and group_mask[position].max() >= 0
                    explained[index] = self._explanation(
                        model, request, result.outputs, rows, sizes[index], class_index,
                        num_predictions, num_channels, group_mask[position] if given else None,
                        heatmap_size,
                    )
            return tuple(explained)

        return Explained(
            explanations=await asyncio.to_thread(explanations),
            layer=request.layer,
            method=request.method,
            target=model.explained(request),
            preprocess_seconds=preprocess_seconds,
            queue_seconds=max(r.queue_seconds for r in results),
            inference_seconds=sum(r.run_seconds for r in results),
        )

    async def _prepare_mixed(
        self,
        model: ServedModel,
        images: Sequence[bytes | np.ndarray],
        check_sizes: Callable[[list[tuple[int, int]]], None],
    ) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Each image as a tensor, and its pixel size; `check_sizes` sees the encoded images'
        sizes before they are decoded (with no encoded image, an empty list)."""
        encoded = [i for i, image in enumerate(images) if isinstance(image, bytes)]
        tensors: list[np.ndarray | None] = [None] * len(images)
        sizes: list[tuple[int, int] | None] = [None] * len(images)
        if not encoded:
            check_sizes([])
        else:
            batch, encoded_sizes = await self.images_to_tensor(
                model, [images[i] for i in encoded], check_sizes
            )
            for position, index in enumerate(encoded):
                tensors[index], sizes[index] = batch[position], encoded_sizes[position]
        for index, image in enumerate(images):
            if isinstance(image, bytes):
                continue
            self.check_tensor(model, image[None], f"image {index}")
            tensors[index] = image
            sizes[index] = image_tensor_size(model, image)
        return tensors, sizes

    def _explanation(
        self,
        model: ServedModel,
        request: Explaining,
        outputs: dict[str, np.ndarray],
        rows: slice,
        size: tuple[int, int],
        class_index: int | None,
        num_predictions: int,
        num_channels: int,
        mask: np.ndarray | None,
        heatmap_size: HeatmapSize,
    ) -> ImageExplanation:
        """One image's maps and predictions. Classes are ranked as the graph ranks them: by
        score; for a segmentation map by predicted area, or by score summed over `mask` (at
        the image's pixel size, resized to the map's as the graph does)."""
        scores = outputs[request.output][rows][0].astype(np.float64)

        def prediction(c: int, score: float, logit: float) -> Prediction:
            return Prediction(int(c), model.label(int(c), request.output), score, logit)

        if scores.ndim == 3:  # [classes, h, w]
            predicted = np.bincount(scores.argmax(0).ravel(), minlength=len(scores))
            shares = predicted / predicted.sum()
            means = scores.mean(axis=(1, 2))
            if mask is not None:
                mask = _resize(mask, scores.shape[:0:-1], Image.NEAREST)
            ranking = shares if mask is None else (scores * mask).sum(axis=(1, 2))
            order = np.argsort(-ranking, kind="stable")
            predictions = tuple(
                prediction(c, float(shares[c]), float(means[c]))
                for c in np.argsort(-shares, kind="stable")[:num_predictions]
            )
        else:
            probabilities = np.exp(scores - scores.max())
            probabilities /= probabilities.sum()
            order = np.argsort(-scores, kind="stable")
            predictions = tuple(
                prediction(c, float(probabilities[c]), float(scores[c]))
                for c in order[:num_predictions]
            )
        weights = outputs[NAMES.gradients][rows].mean(axis=(2, 3))
        pixel_maps = outputs.get(NAMES.pixel_map)
        if pixel_maps is not None:
            pixel_maps = pixel_maps[rows]
            if model.config.preprocessing.layout == "NHWC":
                pixel_maps = pixel_maps.transpose(0, 3, 1, 2)
        maps = []
        for rank, heatmap in enumerate(outputs[NAMES.heatmap][rows]):
            if class_index is None:
                explained = int(order[rank])
            else:  # -r asks for the r-th highest-scoring class, as the graph resolves it
                explained = class_index if class_index >= 0 else int(order[-class_index - 1])
            top = np.argsort(-weights[rank], kind="stable")[:num_channels]
            maps.append(
                ClassMap(
                    class_index=explained,
                    label=model.label(explained, request.output),
                    heatmap=resize_heatmap(heatmap, heatmap_size.of(size, heatmap.shape[::-1])),
                    channels=tuple((int(c), float(weights[rank][c])) for c in top),
                    pixel_gradients=None if pixel_maps is None else pixel_maps[rank],
                )
            )
        return ImageExplanation(tuple(maps), predictions)


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a [h, w] map to (width, height), clipped back into [0, 1]."""
    return np.clip(_resize(heatmap, size), 0.0, 1.0)


def _resize(
    values: np.ndarray, size: tuple[int, int], resample: int = Image.BILINEAR
) -> np.ndarray:
    """Resize of a float [h, w] array to (width, height)."""
    if values.shape[::-1] == tuple(size):
        return values.astype(np.float32, copy=False)
    resized = Image.fromarray(values.astype(np.float32)).resize(size, resample)
    return np.asarray(resized, dtype=np.float32)


def model_map_size(model: ServedModel, image: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of the graph's map for an image of pixel size `image`: the model's
    input size, or the image's own for a model that takes any size."""
    size = model.config.preprocessing.size
    return image if size is None else (size[1], size[0])


def _for_image(index: int, function, data: bytes, max_pixels: int):
    """`function(data, max_pixels)`, its InvalidInput naming the image."""
    try:
        return function(data, max_pixels)
    except InvalidInput as error:
        raise InvalidInput(f"image {index}: {error}", field=f"images[{index}]") from error


def pixel_size(model: ServedModel, x: np.ndarray) -> tuple[int, int]:
    """(H, W) of a batch of preprocessed images."""
    return x.shape[1:3] if model.config.preprocessing.layout == "NHWC" else x.shape[2:4]


def image_tensor_size(model: ServedModel, image: np.ndarray) -> tuple[int, int]:
    """(width, height) of one preprocessed image ([C, H, W] or [H, W, C])."""
    height, width = pixel_size(model, image[None])
    return width, height


def _check_count(count: int) -> None:
    if count > MAX_IMAGES_PER_REQUEST:
        raise InvalidInput(
            f"a request may hold at most {MAX_IMAGES_PER_REQUEST} images, got {count}"
        )


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
