"""A model folder's optional ``config.json``, validated, with defaults detected from the graph.

Keys (all optional; unknown keys are an error, so a typo never goes unnoticed):

======================================  =====================================================
``size`` [height, width]                what images are resized to (default: the graph's
                                        static input size, else 224 x 224)
``resize``                              "bilinear" (default), "bicubic", "nearest", "area"
``mean``, ``std``                       per-channel normalisation (default: ImageNet's)
``channel_order``                       "RGB" (default) or "BGR"
``scale``                               pixel scale before normalising (default 1/255)
``layout``                              "NCHW" (default) or "NHWC"
``labels``                              a file in the folder, one class name per line, or
                                        a list of names
``input``                               the graph's image input, a name or an index among
                                        its inputs (default: its only one); other inputs
                                        are sent by name with each request
``score_output``                        the graph output explained by default, a name or an
                                        index (default: the first): class scores [N, K],
                                        or a segmentation map [N, K, h, w]
``target_layer``                        default Grad-CAM layer, a tensor name (default:
                                        detected)
``target_layout``                       how the target layer is laid out: "nchw" ([N, C,
                                        h, w], a CNN's map), "nhwc" ([N, h, w, C], Swin,
                                        ConvNeXt) or "tokens" ([N, T, C], ViT, DeiT)
                                        (default: detected from the graph); not the image
                                        input's ``layout``
``prefix_tokens``                       tokens only: class, distillation and register
                                        tokens before the patches, 0..64 (default: T - h*w)
``grid``                                tokens only: the patch grid, "14x14" or [14, 14]
                                        (rows, columns; default: the patch embedding's)
``method``                              default method (default "gradcam")
``score``                               the default score: "logit", "probability",
                                        "similarity", "region" or "detection" (default:
                                        "region" for a segmentation map, else "logit")
``boxes_output``                        detectors: the pre-NMS boxes [N, A, 4] (or
                                        [N, A, C, 4]), a name; ``score_output`` names the
                                        class scores (default: both detected from shapes)
``detection_format``                    detectors: "nac" (scores [N, A, C]), "nca"
                                        ([N, C, A]) or "yolo" (one [N, 4 + C, A] output)
                                        (default: detected)
``box_format``                          detectors: "xyxy" or "cxcywh" (default: "xyxy",
                                        "cxcywh" for "yolo")
``iou_threshold``                       detectors: the least IoU of a detection chosen by
                                        reference box (default 0.5)
``background_class``                    detectors: the class that is no object, never
                                        explained (default: 0 for a two-stage detector,
                                        none for others; -1: none)
``precision``                           "float32" (default: the graph as it is) or "float16":
                                        a float32 graph converted at load (onnxconverter-
                                        common, float32 inputs and outputs kept), for GPUs
                                        with fast float16
``max_batch_size``                      dynamic batching bound (default 8; a graph with a
                                        fixed batch dimension serves with that size)
``max_queue_delay_microseconds``        how long a batch waits to fill (default 0: no
                                        wait; requests that arrive while a batch runs
                                        still form the next batch together)
``max_queue_size``                      pending requests before RESOURCE_EXHAUSTED (default
                                        64)
``instances``                           batches of this model run at once (Triton's
                                        instance_group count; default 1, at most
                                        MAX_INSTANCES), each with the cores / instances
                                        onnxruntime threads (unless ``--threads`` sets
                                        them): for a small model on a few CPU cores, two
                                        single-threaded runs at once serve more images per
                                        second than one run on two threads
                                        (benchmarks/bench_core.py)
======================================  =====================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .augment.detection import (
    BOX_FORMATS,
    DEFAULT_IOU_THRESHOLD,
    DETECTION_FORMATS,
)
from .augment.layout import LAYOUTS, MAX_PREFIX_TOKENS
from .augment.scores import SCORES
from .errors import SHOWN_CHARS, shown
from .preprocess import Preprocessing

CONFIG_FILE = "config.json"
MAX_GRID_SIDE = 10_000  # patches per side of a token grid; more is no image model's
_PREPROCESSING_KEYS = {"size", "resize", "mean", "std", "channel_order", "scale", "layout"}
_SERVING_KEYS = {
    "labels",
    "input",
    "score_output",
    "target_layer",
    "target_layout",
    "prefix_tokens",
    "grid",
    "method",
    "score",
    "boxes_output",
    "detection_format",
    "box_format",
    "iou_threshold",
    "background_class",
    "precision",
    "max_batch_size",
    "max_queue_delay_microseconds",
    "max_queue_size",
    "instances",
}
MAX_INSTANCES = 8
PRECISIONS = ("float32", "float16")


class ConfigError(ValueError):
    """The model folder's config.json is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None = None
    input: str | int | None = None  # a name, or an index among the graph's inputs
    score_output: str | int | None = None  # a name, or an index among the graph's outputs
    target_layer: str | None = None
    # The target layer's layout and token grid (augment's `layout`, `prefix_tokens`, `grid`);
    # None: detected. They apply to the default layer, and to a layer a request names unless
    # the request gives its own.
    target_layout: str | None = None
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    method: str = "gradcam"
    score: str | None = None  # None: "region" for a segmentation output, else "logit"
    # Detectors (score "detection", augment's `detection.find_heads`): None: detected.
    boxes_output: str | None = None
    detection_format: str | None = None
    box_format: str | None = None
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    background_class: int | None = None  # None: augment's default (0 for two-stage heads)
    precision: str = "float32"  # "float16": the graph converted at load
    max_batch_size: int | None = None  # None: decided from the graph's batch dimension
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 64
    instances: int = 1


def read_config(
    folder: Path, graph_size: Callable[[str | int | None], tuple[int, int] | None],
    settings: dict | None = None, source: str = CONFIG_FILE,
) -> ModelConfig:
    """Read ``folder/config.json`` if present, or take `settings` (the same keys, read from
    elsewhere: a Triton config's parameters) where given; errors name the `source`.
    `graph_size(input)` is the static (H, W) of the graph's image input as the config names it
    (None: the only one), or None if not static."""
    raw: dict = {} if settings is None else settings
    path = folder / CONFIG_FILE
    if settings is not None and path.is_file():
        raise ConfigError(f"{CONFIG_FILE} is not read beside {source}: put its keys there")
    if settings is None and path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{CONFIG_FILE} is not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{CONFIG_FILE} must hold a JSON object")
    try:
        return _validated(folder, raw, graph_size)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error


def _validated(
    folder: Path, raw: dict, graph_size: Callable[[str | int | None], tuple[int, int] | None]
) -> ModelConfig:
    unknown = set(raw) - _PREPROCESSING_KEYS - _SERVING_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(unknown))}")
    image = _name_or_index(raw, "input")
    try:
        preprocessing = Preprocessing.from_config(
            {k: v for k, v in raw.items() if k in _PREPROCESSING_KEYS},
            default_size=graph_size(image) or (224, 224),
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error
    delay = _optional_int(raw, "max_queue_delay_microseconds", minimum=0)
    layout = _optional_str(raw, "target_layout")
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(
            f"'target_layout' must be one of {', '.join(LAYOUTS)}, got "
            f"{shown(layout)} (the image input's layout is 'layout')"
        )
    prefix_tokens = _optional_int(raw, "prefix_tokens", minimum=0)
    if prefix_tokens is not None and prefix_tokens > MAX_PREFIX_TOKENS:
        raise ConfigError(
            f"'prefix_tokens' must be an integer in 0..{MAX_PREFIX_TOKENS}"
        )
    grid = None
    if raw.get("grid") is not None:
        try:
            grid = parse_grid(raw["grid"])
        except ValueError as error:
            raise ConfigError(str(error)) from error
    if (prefix_tokens is not None or grid is not None) and layout not in (None, "tokens"):
        raise ConfigError(
            f"'prefix_tokens' and 'grid' apply to the tokens layout, not "
            f"{layout}"
        )
    detection = _detection_keys(raw)
    return ModelConfig(
        preprocessing=preprocessing,
        labels=_read_labels(folder, raw.get("labels")),
        input=image,
        score_output=_name_or_index(raw, "score_output"),
        target_layer=_optional_str(raw, "target_layer"),
        target_layout=layout,
        prefix_tokens=prefix_tokens,
        grid=grid,
        method=_optional_str(raw, "method") or "gradcam",
        **detection,
        precision=_choice(raw, "precision", PRECISIONS) or "float32",
        max_batch_size=_optional_int(raw, "max_batch_size", minimum=1),
        max_queue_delay_microseconds=0 if delay is None else delay,
        max_queue_size=_optional_int(raw, "max_queue_size", minimum=1) or 64,
        instances=_instances(raw),
    )


def _instances(raw: dict) -> int:
    instances = _optional_int(raw, "instances", minimum=1)
    if instances is not None and instances > MAX_INSTANCES:
        raise ConfigError(f"'instances' must be an integer in 1..{MAX_INSTANCES}")
    return instances or 1


def _choice(raw: dict, key: str, choices: tuple[str, ...]) -> str | None:
    value = _optional_str(raw, key)
    if value is not None and value not in choices:
        raise ConfigError(f"{key!r} must be one of {', '.join(choices)}, got {shown(value)}")
    return value


def _detection_keys(raw: dict) -> dict:
    """The score and the detector keys, checked against their choices."""
    found: dict = {}
    for key, choices in (("score", SCORES), ("detection_format", DETECTION_FORMATS),
                         ("box_format", BOX_FORMATS)):
        found[key] = _choice(raw, key, choices)
    found["boxes_output"] = _optional_str(raw, "boxes_output")
    threshold = raw.get("iou_threshold", DEFAULT_IOU_THRESHOLD)
    if (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
            or not 0 <= threshold <= 1):
        raise ConfigError("'iou_threshold' must be a number in [0, 1]")
    found["iou_threshold"] = float(threshold)
    found["background_class"] = _optional_int(raw, "background_class", minimum=-1)
    detector_keys = [k for k in ("boxes_output", "detection_format", "box_format",
                                 "background_class")
                     if found[k] is not None] + (["iou_threshold"] if "iou_threshold" in raw
                                                 else [])
    if detector_keys and found["score"] != "detection":
        raise ConfigError(f"{', '.join(map(repr, detector_keys))} apply to "
                          "detectors: set 'score' to \"detection\"")
    return found


def parse_grid(value) -> tuple[int, int]:
    """A token grid (rows, columns) from "HxW" text (e.g. "14x14") or an [h, w] pair of
    integers, each in 1..MAX_GRID_SIDE; ValueError saying what was wrong (a text echoed
    within `shown`'s cap)."""
    sizes = None
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*", value, flags=re.ASCII)
        if match:
            sizes = (int(match.group(1)), int(match.group(2)))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        sizes = (int(value[0]), int(value[1]))
    if sizes is None or not all(1 <= side <= MAX_GRID_SIDE for side in sizes):
        text = json.dumps(value, default=repr)
        got = shown(value) if isinstance(value, str) else (
            text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."
        )
        raise ValueError(
            f"grid must be rows x columns, \"HxW\" (e.g. \"14x14\") or [h, w], each in "
            f"1..{MAX_GRID_SIDE}; got {got}"
        )
    return sizes


def _read_labels(folder: Path, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError("'labels' must be a file name or a list of names")
    # Checked by name, not by resolving links: the folder may be made of symbolic links (to a
    # shared copy of the files), but the name must not lead out of it.
    relative = Path(value)
    if not value or relative.is_absolute() or ".." in relative.parts:
        raise ConfigError("'labels' must name a file inside the model folder")
    path = folder / relative
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"cannot read labels file {value!r}") from error
    return tuple(line.strip() for line in lines if line.strip())


def _optional_str(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key!r} must be a non-empty string")
    return value


def _name_or_index(raw: dict, key: str) -> str | int | None:
    if isinstance(raw.get(key), int) and not isinstance(raw.get(key), bool):
        return _optional_int(raw, key, minimum=0)
    return _optional_str(raw, key)


def _optional_int(raw: dict, key: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key!r} must be an integer >= {minimum}")
    return value
