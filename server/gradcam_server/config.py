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
``method``                              default method (default "gradcam")
``max_batch_size``                      dynamic batching bound (default 8; a graph with a
                                        fixed batch dimension serves with that size)
``max_queue_delay_microseconds``        how long a batch waits to fill (default 0: no
                                        wait; requests that arrive while a batch runs
                                        still form the next batch together)
``max_queue_size``                      pending requests before RESOURCE_EXHAUSTED (default
                                        64)
======================================  =====================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .preprocess import Preprocessing

CONFIG_FILE = "config.json"
_PREPROCESSING_KEYS = {"size", "resize", "mean", "std", "channel_order", "scale", "layout"}
_SERVING_KEYS = {
    "labels",
    "input",
    "score_output",
    "target_layer",
    "method",
    "max_batch_size",
    "max_queue_delay_microseconds",
    "max_queue_size",
}


class ConfigError(ValueError):
    """The model folder's config.json is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    preprocessing: Preprocessing
    labels: tuple[str, ...] | None = None
    input: str | int | None = None  # a name, or an index among the graph's inputs
    score_output: str | int | None = None  # a name, or an index among the graph's outputs
    target_layer: str | None = None
    method: str = "gradcam"
    max_batch_size: int | None = None  # None: decided from the graph's batch dimension
    max_queue_delay_microseconds: int = 0
    max_queue_size: int = 64


def read_config(
    folder: Path, graph_size: Callable[[str | int | None], tuple[int, int] | None]
) -> ModelConfig:
    """Read ``folder/config.json`` if present. `graph_size(input)` is the static (H, W) of the
    graph's image input as the config names it (None: the only one), or None if not static."""
    path = folder / CONFIG_FILE
    raw: dict = {}
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"{CONFIG_FILE} is not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ConfigError(f"{CONFIG_FILE} must hold a JSON object")
    unknown = set(raw) - _PREPROCESSING_KEYS - _SERVING_KEYS
    if unknown:
        raise ConfigError(f"{CONFIG_FILE}: unknown key(s) {', '.join(sorted(unknown))}")
    image = _name_or_index(raw, "input")
    try:
        preprocessing = Preprocessing.from_config(
            {k: v for k, v in raw.items() if k in _PREPROCESSING_KEYS},
            default_size=graph_size(image) or (224, 224),
        )
    except ValueError as error:
        raise ConfigError(f"{CONFIG_FILE}: {error}") from error
    delay = _optional_int(raw, "max_queue_delay_microseconds", minimum=0)
    return ModelConfig(
        preprocessing=preprocessing,
        labels=_read_labels(folder, raw.get("labels")),
        input=image,
        score_output=_name_or_index(raw, "score_output"),
        target_layer=_optional_str(raw, "target_layer"),
        method=_optional_str(raw, "method") or "gradcam",
        max_batch_size=_optional_int(raw, "max_batch_size", minimum=1),
        max_queue_delay_microseconds=0 if delay is None else delay,
        max_queue_size=_optional_int(raw, "max_queue_size", minimum=1) or 64,
    )


def _read_labels(folder: Path, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(f"{CONFIG_FILE}: 'labels' must be a file name or a list of names")
    # Checked by name, not by resolving links: the folder may be made of symbolic links (to a
    # shared copy of the files), but the name must not lead out of it.
    relative = Path(value)
    if not value or relative.is_absolute() or ".." in relative.parts:
        raise ConfigError(f"{CONFIG_FILE}: 'labels' must name a file inside the model folder")
    path = folder / relative
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"{CONFIG_FILE}: cannot read labels file {value!r}") from error
    return tuple(line.strip() for line in lines if line.strip())


def _optional_str(raw: dict, key: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{CONFIG_FILE}: {key!r} must be a non-empty string")
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
        raise ConfigError(f"{CONFIG_FILE}: {key!r} must be an integer >= {minimum}")
    return value
