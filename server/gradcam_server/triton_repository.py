"""Triton model repositories, both ways: an augmented graph written as a model Triton serves
(`write_model`), and a Triton-layout model folder read by our server (`read_model`).

Triton's layout is ``<root>/<name>/config.pbtxt`` beside version folders ``<root>/<name>/<v>/``
holding ``model.onnx`` (or the config's ``default_model_filename``). The config is text of
Triton's ``inference.ModelConfig``; `gradcam_proto.triton_model_config` is the part of that
schema used here, with Triton's field names and numbers.

Writing (``gradcam-augment MODEL --triton-repository DIR``): the onnxruntime backend; every
graph input and output with its datatype and dims. A graph with a dynamic batch dimension gets
``max_batch_size`` and ``dynamic_batching``, the batch dimension left out of every dims, and
the per-image INT64 [N] ``target_class`` (and any other [N] tensor) declared as dims [1]
reshaped to [] (Triton's way to batch a scalar: clients send [N, 1], as they do to our server).
One instance of kind KIND_AUTO: on a GPU where Triton has one (the onnxruntime backend then runs
the CUDA execution provider), else on the CPU. What the graph explains (method, score, layer)
is recorded in ``parameters``.

Reading (``gradcam-server`` on such a repository): the newest version the version policy allows
is served (the highest number; ``specific`` picks the highest listed); ``max_batch_size``,
``dynamic_batching.max_queue_delay_microseconds`` and, among several declared inputs, the one
image-shaped input ([C, H, W] past the batch) are read; our own settings, the keys of a
folder's config.json (`config.py`), come from ``parameters``, each value JSON where it parses
as JSON (``[224, 224]``, ``8``, ``"NCHW"``) and a plain string otherwise (``gradcamplusplus``).
Fields of Triton's schema not named here are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import text_format

from gradcam_proto import triton_model_config_pb2 as triton

from .augment.graph import save_model

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
BACKEND = "onnxruntime"

_DATA_TYPES = {
    onnx.TensorProto.BOOL: triton.TYPE_BOOL,
    onnx.TensorProto.UINT8: triton.TYPE_UINT8,
    onnx.TensorProto.UINT16: triton.TYPE_UINT16,
    onnx.TensorProto.UINT32: triton.TYPE_UINT32,
    onnx.TensorProto.UINT64: triton.TYPE_UINT64,
    onnx.TensorProto.INT8: triton.TYPE_INT8,
    onnx.TensorProto.INT16: triton.TYPE_INT16,
    onnx.TensorProto.INT32: triton.TYPE_INT32,
    onnx.TensorProto.INT64: triton.TYPE_INT64,
    onnx.TensorProto.FLOAT16: triton.TYPE_FP16,
    onnx.TensorProto.FLOAT: triton.TYPE_FP32,
    onnx.TensorProto.DOUBLE: triton.TYPE_FP64,
    onnx.TensorProto.STRING: triton.TYPE_STRING,
    onnx.TensorProto.BFLOAT16: triton.TYPE_BF16,
}


class TritonConfigError(ValueError):
    """A Triton-layout model folder that cannot be served; the message says why."""


@dataclass(frozen=True)
class TritonModel:
    """A Triton-layout folder, read: the graph to serve and our settings from its config."""

    model_file: Path
    version: int
    settings: dict


def model_config(
    model: onnx.ModelProto, name: str, max_batch_size: int = 8,
    parameters: dict[str, str] | None = None,
) -> triton.ModelConfig:
    """The Triton config serving `model` (an ONNX graph, augmented or not) as `name`."""
    batched = bool(model.graph.input) and all(
        _batch_is_dynamic(value) for value in _graph_inputs(model)
    )
    config = triton.ModelConfig(name=name, backend=BACKEND,
                                max_batch_size=max_batch_size if batched else 0)
    for value in _graph_inputs(model):
        dims, reshape = _dims(value, batched)
        entry = config.input.add(name=value.name, data_type=_data_type(value), dims=dims)
        if reshape is not None:
            entry.reshape.shape.extend(reshape)
    for value in model.graph.output:
        dims, reshape = _dims(value, batched)
        entry = config.output.add(name=value.name, data_type=_data_type(value), dims=dims)
        if reshape is not None:
            entry.reshape.shape.extend(reshape)
    if batched:
        config.dynamic_batching.SetInParent()
    config.instance_group.add(kind=triton.ModelInstanceGroup.KIND_AUTO, count=1)
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def write_model(
    model: onnx.ModelProto, root: Path, name: str, max_batch_size: int = 8,
    parameters: dict[str, str] | None = None, version: int = 1,
) -> Path:
    """Write `model` as ``root/name/<version>/model.onnx`` with ``root/name/config.pbtxt``;
    returns the model file's path. Weights past protobuf's 2 GiB go to a data file beside it."""
    if not name or "/" in name or name in (".", ".."):
        raise TritonConfigError(f"invalid model name {name!r}")
    folder = root / name
    model_file = folder / str(version) / DEFAULT_MODEL_FILENAME
    save_model(model, model_file)
    config = model_config(model, name, max_batch_size, parameters)
    (folder / CONFIG_FILE).write_text(text_format.MessageToString(config), encoding="utf-8")
    return model_file


def is_triton_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file()


def read_model(folder: Path) -> TritonModel:
    """The newest servable version of a Triton-layout folder and our settings from its
    config (module docstring); TritonConfigError naming the problem otherwise."""
    try:
        config = text_format.Parse(
            _lists_expanded((folder / CONFIG_FILE).read_text(encoding="utf-8")),
            triton.ModelConfig(), allow_unknown_field=True,
        )
    except (OSError, UnicodeDecodeError, text_format.ParseError) as error:
        raise TritonConfigError(f"{CONFIG_FILE} cannot be read: {error}") from error
    if config.backend not in ("", BACKEND) or config.platform not in ("", "onnxruntime_onnx"):
        raise TritonConfigError(
            f"{CONFIG_FILE} names backend {config.backend or config.platform!r}; only ONNX "
            "models (backend onnxruntime) can be served"
        )
    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
    versions = sorted(
        int(p.name) for p in folder.iterdir()
        if p.is_dir() and p.name.isascii() and p.name.isdigit() and (p / filename).is_file()
    )
    policy = config.version_policy
    if policy.WhichOneof("policy_choice") == "specific":
        versions = [v for v in versions if v in set(policy.specific.versions)]
    if not versions:
        raise TritonConfigError(f"no version folder holds {filename} (expected <number>/"
                                f"{filename} beside {CONFIG_FILE})")
    settings = {key: _setting(value.string_value) for key, value in config.parameters.items()
                if not key.startswith("gradcam.")}
    images = [i.name for i in config.input
              if len(i.dims) == (3 if config.max_batch_size > 0 else 4)]
    if len(images) == 1 and len(config.input) > 1:  # the one image among several inputs
        settings.setdefault("input", images[0])
    if config.max_batch_size > 0:
        settings.setdefault("max_batch_size", config.max_batch_size)
    if config.HasField("dynamic_batching"):
        delay = config.dynamic_batching.max_queue_delay_microseconds
        settings.setdefault("max_queue_delay_microseconds", delay)
    return TritonModel(folder / str(versions[-1]) / filename, versions[-1], settings)


_OPENING = {"[": "]", "{": "}", "<": ">"}


def _lists_expanded(text: str) -> str:
    """The text-format `text` with each list, ``name: [a, b]`` or ``name [{...}, {...}]``,
    written as repeated fields, ``name: a name: b``: protobuf's parser skips a field its
    schema does not know (one of the many Triton fields not named here) when it is a scalar or
    a message, but not when it is a list."""
    tokens = []
    tokenizer = text_format.Tokenizer(text.splitlines())
    while not tokenizer.AtEnd():
        tokens.append(tokenizer.token)
        tokenizer.NextToken()
    return " ".join(_expand(tokens))


def _expand(tokens: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        start = i + 2 if tokens[i + 1:i + 2] == [":"] else i + 1
        if not (token[:1].isalpha() or token[:1] == "_") or tokens[start:start + 1] != ["["]:
            out.append(token)
            i += 1
            continue
        end = _closing(tokens, start)
        element: list[str] = []
        for inner in [*tokens[start + 1:end], ","]:
            if inner == "," and _balanced(element):
                if element:
                    out += [token, ":", *_expand(element)]
                element = []
            else:
                element.append(inner)
        i = end + 1
    return out


def _closing(tokens: list[str], start: int) -> int:
    """The index of the bracket closing the one at `start`."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] in _OPENING:
            depth += 1
        elif tokens[i] in _OPENING.values():
            depth -= 1
            if depth == 0:
                return i
    raise text_format.ParseError(f"unclosed {tokens[start]!r}")


def _balanced(tokens: list[str]) -> bool:
    return sum(t in _OPENING for t in tokens) == sum(t in _OPENING.values() for t in tokens)


def _setting(text: str):
    """A parameter's value: JSON where it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    """Dims with -1 for each dynamic one."""
    return [d.dim_value if d.HasField("dim_value") else -1
            for d in value.type.tensor_type.shape.dim]


def _batch_is_dynamic(value: onnx.ValueInfoProto) -> bool:
    shape = _shape(value)
    return bool(shape) and shape[0] == -1


def _dims(value: onnx.ValueInfoProto, batched: bool) -> tuple[list[int], list[int] | None]:
    """Triton's dims (the batch dimension left out where batched) and the reshape, if any:
    a per-image scalar ([N]) is declared [1] and reshaped to []."""
    shape = _shape(value)
    if not batched:
        return shape, None
    if len(shape) == 1:
        return [1], []
    return shape[1:], None


def _data_type(value: onnx.ValueInfoProto) -> int:
    elem_type = value.type.tensor_type.elem_type
    if elem_type not in _DATA_TYPES:
        raise TritonConfigError(
            f"tensor {value.name!r} has type {onnx.TensorProto.DataType.Name(elem_type)}, "
            "which Triton's config cannot declare"
        )
    return _DATA_TYPES[elem_type]
