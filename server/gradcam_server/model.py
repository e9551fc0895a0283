"""One served model: its sessions (plain forward, and one augmented graph per target layer),
its preprocessing, and the facts clients may ask about it.

A model explains one of its outputs: class scores [N, classes] (scores "logit",
"probability"), an embedding [N, D] ("similarity") or a segmentation map [N, classes, h, w]
("region", the default for such an output). Inputs other than the image are fed as they are.

Half precision: images are preprocessed in float32 and cast to the image input's type (float16,
bfloat16) as they are fed; bfloat16 outputs are returned as float32, which every protocol carries
(float16 ones stay float16, KServe's FP16). A model that onnxruntime cannot run at all on the
chosen provider (onnxruntime's CPU provider has no bfloat16 arithmetic kernel) is refused at load
with `UnservableModel`, naming the op that has no kernel.

A graph the augmenter cannot explain (an op without a backward rule on the gradient path, a
layer it cannot find) still serves plain inference: `explain_error` says why, and every explain
request is refused with that reason (`ExplainUnavailable`).

Everything here is synchronous and thread-safe: the batchers call `forward` and `explain` from
their worker threads, never from the event loop. A run takes a `StopSignal`: once it is set,
onnxruntime is told to stop (``RunOptions.terminate``) and the run raises `RunStopped`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

from .augment import (
    LAYOUTS,
    AugmentError,
    PixelNormalisation,
    augment_model,
    explained_target,
    load_model,
)
from .augment.layout import check_view_options
from .augment.names import NAMES
from .augment.passes import ALL_METHODS
from .augment.score import ScoreCamSteps, score_cam_steps
from .augment.scores import SCORES
from .augment.targets import default_score, image_input, score_output_name, spatial_axes
from .batching import StopSignal
from .config import CONFIG_FILE, ConfigError, ModelConfig, parse_grid, read_config
from .errors import ExplainUnavailable, InvalidInput, RunStopped, shown
from .runtime import CUDA, RuntimeOptions, create_session, run_bound
from .triton_repository import CONFIG_FILE as TRITON_CONFIG_FILE
from .triton_repository import TritonModel

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
METHODS = ALL_METHODS
DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_VARIANTS = 4  # augmented sessions kept beside the default (method, layer), LRU
_MAX_TARGETS = 256  # explained targets remembered per model (a few strings each), LRU
_FATAL_ONLY = 4  # onnxruntime log severity
STEP_SECONDS = 5.0  # the work of one session run of a Score-CAM request run in steps

Progress = Callable[[int, int], None]  # (masked passes done, masked passes in all)


class UnservableModel(Exception):
    """The model cannot run on this server's execution provider (its message says why)."""


@dataclass(frozen=True)
class Explaining:
    """What an explain request asks of the augmented graph; each distinct value is one
    augmented session. None means the model's default method or layer."""

    method: str | None = None
    layer: str | tuple[str, ...] | None = None  # several: their maps are fused
    counterfactual: bool = False
    eigen_smooth: bool = False
    aug_smooth: bool = False
    score: str | None = None  # "logit" (or "region" for a segmentation output) when None
    output: str | int | None = None  # the output explained: a name or an index
    # How the layer is laid out (augment's `layout.py`): "nchw", "nhwc" or "tokens" with
    # `prefix_tokens` before an h x w `grid` of patches; None: the model's (config.json's, or
    # what was detected for its default layer), else detected.
    layout: str | None = None
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    # Score "detection" only: the least IoU of a detection chosen by reference box; None: the
    # model's (config.json's iou_threshold).
    iou_threshold: float | None = None

    @property
    def metrics_name(self) -> str:
        """A short name of the graph, for metrics: the method and its options."""
        options = [
            o for o in ("counterfactual", "eigen_smooth", "aug_smooth") if getattr(self, o)
        ]
        if self.score not in (None, "logit", "region"):
            options.append(self.score)
        return "/".join([self.method or "default", *options])


@dataclass(frozen=True)
class Graph(Explaining):
    """A resolved `Explaining`: every default filled in by `ServedModel.resolve` and checked;
    the key of one augmented session. Only `resolve` makes one, once per request, at the edge;
    what runs below (validation, sessions, batchers) takes a Graph and never resolves again."""


def _to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """config.json's "precision": "float16": a float32 graph's weights and arithmetic in
    float16, its inputs and outputs kept float32 (onnxconverter-common's conversion); the
    augmentation then runs its backward pass and CAM math in float32 as for any float16
    graph."""
    from onnxconverter_common import float16  # only models that ask for it need it

    for value in model.graph.input:
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
            raise ConfigError("'precision' float16 converts a float32 graph; this one is "
                              "float16 already: leave 'precision' out")
    return float16.convert_float_to_float16(model, keep_io_types=True)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # -1 where the graph leaves a dimension free
    dtype: np.dtype = np.dtype(np.float32)


class ServedModel:
    """A model folder, loaded, augmented for its default layer and warmed up."""

    def __init__(
        self, name: str, folder: Path, runtime: RuntimeOptions,
        max_variants: int = DEFAULT_MAX_VARIANTS, triton: TritonModel | None = None,
    ) -> None:
        """`folder` holds model.onnx and an optional config.json, or, where `triton` is given,
        is a Triton-layout folder: the graph and the settings come from `triton`."""
        self.name = name
        self.runtime = runtime
        self.max_variants = max_variants
        self._proto = load_model(triton.model_file if triton else folder / MODEL_FILE)
        self.config: ModelConfig = read_config(
            folder, lambda name: _static_size(image_input(self._proto, name)),
            settings=triton.settings if triton else None,
            source=f"{TRITON_CONFIG_FILE} parameters" if triton else CONFIG_FILE,
        )
        if self.config.instances > 1 and runtime.intra_op_threads == 0:
            # Several runs at once share the cores: each gets its part of them.
            threads = max(1, (os.cpu_count() or 1) // self.config.instances)
            self.runtime = runtime = dataclasses.replace(runtime, intra_op_threads=threads)
        if self.config.precision == "float16":
            self._proto = _to_float16(self._proto)
        image = image_input(self._proto, self.config.input)
        self.input = _info(image)
        self.score_output = score_output_name(self._proto, self.config.score_output)
        self.outputs = tuple(_info(o) for o in self._proto.graph.output)
        initializers = {init.name for init in self._proto.graph.initializer}
        self.other_inputs = tuple(  # fed as they are, by name
            _info(i) for i in self._proto.graph.input
            if i.name not in initializers and i.name != image.name
        )
        self.fixed_batch = self.input.shape[0] if self.input.shape[0] > 0 else None
        self.max_batch_size = (
            self.fixed_batch or self.config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
        )

        self._forward = _forward_session(self._proto, runtime)
        self._lock = threading.Lock()
        self._explainers: OrderedDict[Explaining, ort.InferenceSession] = OrderedDict()
        if self.config.method not in METHODS:
            raise AugmentError(
                f"unknown method {self.config.method!r} in config.json; available: "
                f"{', '.join(METHODS)}"
            )
        self.explain_error: str | None = None
        self.default_target: dict[str, str] = {}  # explained_target of the default graph
        self._targets: OrderedDict[Explaining, dict[str, str]] = OrderedDict()
        self._targets_lock = threading.Lock()  # never held while a graph is built
        default = Explaining(
            method=self.config.method, layer=self.config.target_layer,
            score=self.default_score(self.score_output), output=self.score_output,
            layout=self.config.target_layout, prefix_tokens=self.config.prefix_tokens,
            grid=self.config.grid,
            iou_threshold=self.config.iou_threshold if self.is_detector else None,
        )
        try:
            augmented = self._augment(default)
        except AugmentError as error:
            self.explain_error = str(error)
            self.default_layer: str | tuple[str, ...] | None = None
            self._default = self._default_explainer = None
            log.warning("model %s serves inference only: %s", name, error)
        else:
            self.default_target = explained_target(augmented)
            self.default_layer = _exposed_layer(augmented)
            self._default = self.resolve(Explaining(self.config.method, self.default_layer))
            self._default_explainer = create_session(augmented, runtime)
            del augmented
        self.providers = tuple(self._forward.get_providers())
        self.output_shapes, self.layer_shape = self._warm_up()  # shapes at `input_hw`
        self.num_classes = self.output_shapes[self.score_output][0]
        self.num_anchors = -1  # detectors: the pre-NMS boxes, -1 where the graph leaves it free
        self.background_class: int | None = None  # detectors: the class never explained
        if self.is_detector:
            self.num_classes = int(self.default_target.get("detection_classes", -1))
            self.num_anchors = int(self.default_target.get("detection_anchors", -1))
            if "detection_background" in self.default_target:
                self.background_class = int(self.default_target["detection_background"])
        if (self.config.labels is not None and self.num_classes > 0
                and len(self.config.labels) != self.num_classes):
            raise AugmentError(
                f"labels list {len(self.config.labels)} names for {self.num_classes} classes"
            )

    # -- facts -------------------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...] | None:
        return self.config.labels

    def label(self, index: int, output: str) -> str:
        """The name of class `index` of `output`; labels name the default output's classes."""
        return self.labels[index] if self.labels and output == self.score_output else ""

    @property
    def channels(self) -> int:
        """Channels of the image input (3 where the graph leaves them free)."""
        axis = 3 if self.config.preprocessing.layout == "NHWC" else 1
        return self.input.shape[axis] if self.input.shape[axis] > 0 else 3

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) the graph is fed at: images are resized to this."""
        return self.config.preprocessing.size

    def default_score(self, output: str) -> str:
        """config.json's score for the model's score output; else "region" for a
        segmentation output [N, classes, h, w], else "logit" (`targets.default_score`)."""
        if self.config.score is not None and output == self.score_output:
            return self.config.score
        return default_score(len(self.output_info(output).shape))

    @property
    def is_detector(self) -> bool:
        """Whether the model's score is "detection" (config.json): one map per detection."""
        return self.config.score == "detection"

    def _augment(self, key: Explaining) -> onnx.ModelProto:
        """The augmented graph of a resolved request (AugmentError as augment_model raises)."""
        detection = {}
        if key.score == "detection":
            detection = dict(
                boxes=self.config.boxes_output, detection_format=self.config.detection_format,
                box_format=self.config.box_format, iou_threshold=key.iou_threshold,
                background_class=self.config.background_class,
            )
        return augment_model(
            self._proto, layer=key.layer, output=key.output, method=key.method,
            counterfactual=key.counterfactual, eigen_smooth=key.eigen_smooth,
            aug_smooth=key.aug_smooth, score=key.score, input=self.input.name,
            layout=key.layout, prefix_tokens=key.prefix_tokens, grid=key.grid,
            pixels=self._pixels, coarse_heatmap=True, **detection,
        )

    @property
    def _pixels(self) -> PixelNormalisation:
        """How this model's image input is made from 8-bit pixels (what "sobel" undoes)."""
        pre = self.config.preprocessing
        return PixelNormalisation(mean=pre.mean, std=pre.std, scale=pre.scale,
                                  channel_order=pre.channel_order)

    def output_info(self, name: str) -> TensorInfo:
        return next(o for o in self.outputs if o.name == name)

    @property
    def variants(self) -> int:
        """Augmented graphs (sessions) held now: the default one and the LRU's."""
        return len(self._explainers) + (self._default_explainer is not None)

    def resolve(self, request: Explaining) -> Graph:
        """`request` with the model's defaults filled in, as a `Graph`; InvalidInput for an
        unknown method, score, output or layout, or a negative prefix_tokens;
        ExplainUnavailable when the graph cannot be explained at all."""
        if self.explain_error is not None:
            raise ExplainUnavailable(
                f"model {self.name!r} serves inference only; it cannot be explained: "
                f"{self.explain_error}"
            )
        method = request.method or self.config.method
        if method not in METHODS:
            raise InvalidInput(f"unknown method {shown(method)}; available: {', '.join(METHODS)}")
        try:
            output = score_output_name(
                self._proto, self.score_output if request.output is None else request.output
            )
        except AugmentError as error:
            raise InvalidInput(str(error)) from error
        score = request.score or self.default_score(output)
        if score not in SCORES:
            raise InvalidInput(
                f"unknown score {shown(score)}; available: {', '.join(SCORES)}"
            )
        layer = request.layer or self.default_layer
        layout, prefix_tokens, grid = self._layout_of(request, layer)
        iou_threshold = None
        if score == "detection":
            if not self.is_detector:
                raise InvalidInput(
                    f"model {self.name!r} is not served as a detector: its config.json sets "
                    "\"score\": \"detection\" (and the heads, where not detected)"
                )
            iou_threshold = (self.config.iou_threshold if request.iou_threshold is None
                             else request.iou_threshold)
            if not 0 <= iou_threshold <= 1:
                raise InvalidInput(f"iou_threshold must be in [0, 1], got {iou_threshold}")
            # Baked into the graph: in steps of 0.01, so that requests can make at most 101
            # variants (float32 and float64 senders of one value share theirs).
            iou_threshold = round(float(iou_threshold), 2)
        fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(Explaining)}
        fields.update(method=method, layer=layer, score=score, output=output, layout=layout,
                      prefix_tokens=prefix_tokens, grid=grid, iou_threshold=iou_threshold)
        return Graph(**fields)

    def _layout_of(
        self, request: Explaining, layer: str | tuple[str, ...]
    ) -> tuple[str | None, int | None, tuple[int, int] | None]:
        """The (layout, prefix_tokens, grid) `layer` is explained with: the request's where
        given, else the model's: for its default layer what was explained at load (so that a
        request naming it shares the default graph), for another layer config.json's. The
        model's prefix_tokens and grid go with the tokens layout only: a request asking for
        "nchw" or "nhwc" drops them."""
        if request.layout is not None and request.layout not in LAYOUTS:
            raise InvalidInput(
                f"unknown layout {shown(request.layout)}; expected one of {', '.join(LAYOUTS)}"
            )
        try:
            check_view_options(request.layout, request.prefix_tokens, request.grid)
        except AugmentError as error:
            raise InvalidInput(str(error)) from None
        if layer == self.default_layer:
            target = self.default_target
            model_layout = target.get("layout")
            model_prefix = int(target["prefix_tokens"]) if "prefix_tokens" in target else None
            model_grid = parse_grid(target["grid"]) if "grid" in target else None
        else:
            model_layout = self.config.target_layout
            model_prefix, model_grid = self.config.prefix_tokens, self.config.grid
        layout = request.layout or model_layout
        if layout not in (None, "tokens"):
            model_prefix = model_grid = None
        prefix_tokens = model_prefix if request.prefix_tokens is None else request.prefix_tokens
        grid = model_grid if request.grid is None else tuple(request.grid)
        return layout, prefix_tokens, grid

    def explained(self, request: Graph) -> dict[str, str]:
        """What the graph of `request` explains: {"layer", "layout", and for tokens
        "prefix_tokens" and "grid" ("hxw") where known}, as `explained_target` reads it from
        the augmented graph; from the request itself for a graph no longer remembered."""
        if request == self._default:
            return self.default_target
        with self._targets_lock:
            if request in self._targets:
                return self._targets[request]
        layers = (request.layer,) if isinstance(request.layer, str) else request.layer
        known = {"layer": ",".join(layers), "layout": request.layout or ""}
        if request.prefix_tokens is not None:
            known["prefix_tokens"] = str(request.prefix_tokens)
        if request.grid is not None:
            known["grid"] = f"{request.grid[0]}x{request.grid[1]}"
        return known

    def _remember_target(self, key: Explaining, target: dict[str, str]) -> None:
        with self._targets_lock:
            self._targets[key] = target
            self._targets.move_to_end(key)
            if len(self._targets) > _MAX_TARGETS:
                self._targets.popitem(last=False)

    # -- running -----------------------------------------------------------------------------
    def forward(
        self, x: np.ndarray, others: dict[str, np.ndarray] | None = None,
        stop: StopSignal | None = None,
    ) -> dict:
        """The plain graph's outputs for a batch [N, ...] of preprocessed images (and the
        model's other inputs, [N, ...] each)."""
        return self._run(self._forward, {self.input.name: self._fed(x), **(others or {})}, stop)

    def explain(
        self,
        x: np.ndarray,
        target_class: np.ndarray,
        graph: Graph,
        reference: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        others: dict[str, np.ndarray] | None = None,
        stop: StopSignal | None = None,
        detection: tuple[np.ndarray, np.ndarray] | None = None,
        progress: Progress | None = None,
    ) -> dict:
        """The augmented graph's outputs: the model's own, activations, gradients, heatmap.
        `reference` [N, D] is the reference embedding of the "similarity" score, `mask`
        [N, h, w] (any size) the region of the "region" score (all negative: the predicted
        region), `detection` the "detection" score's (detection_index INT64 [N],
        reference_box FP32 [N, 4] in the graph's input pixels).

        A Score-CAM graph runs in steps (`_run_in_steps`), `progress` told the masked passes
        done after each; on a graph of fixed batch size it runs whole."""
        feeds = {self.input.name: self._fed(x), NAMES.target_class: target_class,
                 **(others or {})}
        if detection is not None:
            feeds[NAMES.detection_index], feeds[NAMES.reference_box] = detection
        if reference is not None:
            feeds[NAMES.reference_embedding] = reference
        if mask is not None:
            feeds[NAMES.target_mask] = mask
        session = self.explainer(graph)
        loops = score_cam_steps(i.name for i in session.get_overridable_initializers())
        if loops and self.fixed_batch is None:
            return self._run_in_steps(session, feeds, loops, stop, progress)
        return self._run(session, feeds, stop)

    def _fed(self, x: np.ndarray) -> np.ndarray:
        """Preprocessed float32 images as the image input's type (a float16 or bfloat16
        graph's)."""
        return x.astype(self.input.dtype, copy=False)

    def is_built(self, graph: Graph) -> bool:
        """Whether the session for `graph` exists already (no augmentation needed)."""
        return graph == self._default or graph in self._explainers

    def explainer(self, key: Graph) -> ort.InferenceSession:
        """The augmented session of `key`; built on first use, a few kept. Raises
        InvalidInput when the graph cannot be augmented as asked (layer, options)."""
        if not isinstance(key, Graph):
            raise TypeError("explainer() takes a Graph, made by resolve()")
        if key == self._default:
            return self._default_explainer
        with self._lock:
            if key in self._explainers:
                self._explainers.move_to_end(key)
                return self._explainers[key]
            try:
                augmented = self._augment(key)
            except AugmentError as error:
                raise InvalidInput(str(error)) from error
            session = create_session(augmented, self.runtime)
            self._remember_target(key, explained_target(augmented))
            self._explainers[key] = session
            if len(self._explainers) > self.max_variants:
                self._explainers.popitem(last=False)
                release_freed_memory()
            return session

    def _run(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
        stop: StopSignal | None = None,
    ) -> dict:
        """Run `feeds` (all [N, ...]); a graph with a fixed batch runs them chunk by chunk,
        the last chunk padded with copies of its first row. RunStopped once `stop` is set."""
        n = len(next(iter(feeds.values())))
        names = _row_outputs(session)
        options = _run_options(stop)
        parts = [feeds]
        if self.fixed_batch is not None and n != self.fixed_batch:
            parts = [
                {k: v[start:start + self.fixed_batch] for k, v in feeds.items()}
                for start in range(0, n, self.fixed_batch)
            ]
        chunks = []
        for part in parts:
            rows = len(next(iter(part.values())))
            if self.fixed_batch is not None and rows < self.fixed_batch:
                part = {k: _pad_rows(v, self.fixed_batch) for k, v in part.items()}
            outputs = _session_run(session, part, names, options, stop)
            chunks.append([_carried(out[:rows]) for out in outputs])
        if len(chunks) == 1:
            return dict(zip(names, chunks[0]))
        return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}

    def _run_in_steps(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray],
        loops: list[ScoreCamSteps], stop: StopSignal | None, progress: Progress | None,
    ) -> dict:
        """Run a Score-CAM graph's Loops a few iterations per session run (`ScoreCamSteps`),
        the scores fed back, each run about STEP_SECONDS of work (timed as it goes; the first
        runs one iteration): between runs `progress(masked passes done, in all)` is told and
        the stop is checked, as it is within a run. The run that completes the last Loop's
        scores gives the outputs."""
        names = _row_outputs(session)
        step_names = [name for loop in loops for name in loop.outputs]
        options = _run_options(stop)
        known = {loop: np.zeros(0, np.float32) for loop in loops}
        passes: dict[ScoreCamSteps, int] = {}  # masked passes each Loop needs
        chunk: dict[ScoreCamSteps, int] = {}  # masked passes per iteration
        seconds_per_pass = None
        for current in loops:
            while current not in passes or len(known[current]) < passes[current]:
                steps = 1 if seconds_per_pass is None else max(
                    1, int(STEP_SECONDS / (seconds_per_pass * chunk[current])))
                run_feeds = dict(feeds)
                for loop in loops:
                    run_feeds[loop.known] = known[loop]
                    run_feeds[loop.steps] = np.array([steps if loop is current else 0])
                started = time.perf_counter()
                before = len(known[current])
                outputs = _session_run(session, run_feeds, names + step_names, options, stop)
                values = dict(zip(names + step_names, outputs))
                for loop in loops:
                    known[loop] = values[loop.scores]
                    passes[loop] = int(values[loop.passes][0])
                    chunk[loop] = passes[loop] // max(int(values[loop.iterations][0]), 1)
                ran = len(known[current]) - before
                if ran <= 0 and len(known[current]) < passes[current]:
                    raise RuntimeError("a Score-CAM step ran no masked pass")
                seconds_per_pass = (time.perf_counter() - started) / max(ran, 1)
                if progress is not None:
                    progress(sum(len(known[loop]) for loop in loops), sum(passes.values()))
        return {name: _carried(values[name]) for name in names}

    def _warm_up(self) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
        """One run of each session on blank inputs; returns each output's shape past the batch
        axis, and the default layer's."""
        height, width = self.input_hw
        channels = self.input.shape[1] if self.input.shape[1] > 0 else 3
        batch = self.fixed_batch or 1
        if self.config.preprocessing.layout == "NHWC":
            x = np.zeros((batch, height, width, self.input.shape[3]), dtype=np.float32)
        else:
            x = np.zeros((batch, channels, height, width), dtype=np.float32)
        others = {
            i.name: np.zeros((batch, *(max(d, 1) for d in i.shape[1:])), dtype=i.dtype)
            for i in self.other_inputs
        }
        shapes = {name: value.shape[1:] for name, value in self.forward(x, others).items()}
        if self._default is None:
            return shapes, ()
        mask = None
        if self._default.score == "region":
            mask = np.full((batch, 1, 1), -1.0, dtype=np.float32)  # the predicted regions
        detection = None
        if self._default.score == "detection":  # anchor 0, no reference box
            detection = (np.zeros(batch, dtype=np.int64), np.zeros((batch, 4), np.float32))
        explained = self.explain(x, np.full(batch, -1, dtype=np.int64), self._default,
                                 mask=mask, others=others, detection=detection)
        return shapes, tuple(explained[NAMES.activations].shape[1:])


def request_grid(text: str | None) -> tuple[int, int] | None:
    """A request's token grid, "HxW"; InvalidInput saying what was wrong."""
    if text is None:
        return None
    try:
        return parse_grid(text)
    except ValueError as error:
        raise InvalidInput(str(error)) from None


def release_freed_memory() -> None:
    """Give the memory of a dropped session back to the system: glibc keeps freed blocks in
    its arenas (one per thread that allocated), so without this the process only grows."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def _static_size(image: onnx.ValueInfoProto) -> tuple[int, int] | None:
    """The graph's static (H, W) for `image`, if both are fixed."""
    dims = _dims(image)
    size = tuple(dims[axis] for axis in spatial_axes(image))
    return size if all(d > 0 for d in size) else None


def _forward_session(model: onnx.ModelProto, runtime: RuntimeOptions) -> ort.InferenceSession:
    """The plain session; UnservableModel where the provider has no kernel for an op of a
    bfloat16 graph (onnxruntime's CPU provider implements bfloat16 for data movement only)."""
    try:
        return create_session(model, runtime)
    except Exception as error:
        if not _has_bfloat16(model) or "NOT_IMPLEMENTED" not in str(error):
            raise
        missing = str(error).split("NOT_IMPLEMENTED : ", 1)[-1].strip()
        raise UnservableModel(
            "the model computes in bfloat16, which onnxruntime's "
            f"{' and '.join(runtime.providers())} cannot run ({missing}); serve a float16 or "
            "float32 version of it (e.g. converted with onnxconverter-common's "
            "float16.convert_float_to_float16)"
        ) from None


def _has_bfloat16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    typed = [*graph.input, *graph.output, *graph.value_info]
    return (any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in typed)
            or any(i.data_type == onnx.TensorProto.BFLOAT16 for i in graph.initializer)
            or any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16
                   for node in graph.node for a in node.attribute))


def _row_outputs(session: ort.InferenceSession) -> list[str]:
    """The session's outputs of one row per image: all but Score-CAM's step outputs."""
    loops = score_cam_steps(i.name for i in session.get_overridable_initializers())
    steps = {name for loop in loops for name in loop.outputs}
    return [o.name for o in session.get_outputs() if o.name not in steps]


def _run_options(stop: StopSignal | None) -> ort.RunOptions:
    """RunOptions told to terminate once `stop` is set."""
    options = ort.RunOptions()
    # A failed run raises with onnxruntime's message, which the caller reports; its own
    # error log line would only repeat it (and a stopped run is no error).
    options.log_severity_level = _FATAL_ONLY
    if stop is not None:
        stop.add_callback(lambda: setattr(options, "terminate", True))
    return options


def _session_run(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], names: list[str],
    options: ort.RunOptions, stop: StopSignal | None,
) -> list[np.ndarray]:
    """One session run (bound to the device on CUDA); RunStopped once `stop` is set."""
    if stop is not None and stop.is_set():
        raise RunStopped("the run was stopped: no request waits for it")
    try:
        if session.get_providers()[0] == CUDA:
            return run_bound(session, feeds, names, options)
        return session.run(names, feeds, options)
    except Exception:
        if stop is not None and stop.is_set():
            raise RunStopped("the run was stopped: no request waits for it") from None
        raise


def _carried(value: np.ndarray) -> np.ndarray:
    """An output as the protocols carry it: bfloat16 (no KServe datatype) as float32."""
    return value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    elem_type = value.type.tensor_type.elem_type or onnx.TensorProto.FLOAT
    return TensorInfo(value.name, _dims(value),
                      np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))


def _dims(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim
    )


def _exposed_layer(augmented: onnx.ModelProto) -> str | tuple[str, ...]:
    """The layer the graph explains, or its layers where it fuses several (a two-stage
    detector's pooled FPN levels), as a request names them."""
    layers = tuple(explained_target(augmented)["layer"].split(","))
    return layers[0] if len(layers) == 1 else layers


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    missing = rows - len(array)
    return np.concatenate([array, np.repeat(array[:1], missing, axis=0)])
