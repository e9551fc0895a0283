"""Quantized models: onnxruntime's quantize_static (QDQ, per tensor and per channel) and
quantize_dynamic (DynamicQuantizeLinear, ConvInteger, MatMulInteger), augmented as float ones.

References, none of them our own output:

- maps: the float model's maps for the same class (the float model's top-1) on the same photos;
  the difference is the quantization's own error, so the bound is a correlation, measured per
  model and format (docs/ZOO.md, "Quantized");
- gradients: a quantized graph is piecewise constant, so its gradients are defined
  straight-through (rules.py's quantization section: rounding passes the gradient, saturation
  stops it). They are the derivative of the graph's continuous relaxation (`quantized.relax`:
  each Q/DQ pair replaced by its clip, integers as floats, taken at the input explained so
  that it computes what the quantized graph computes there), and are checked against central
  finite differences of that relaxation along four directions. The score is the logits in
  front of the output's own Q/DQ pair, as the backward pass takes it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton

import quantized
import servers
import test_layouts
import zoo
from gradcam_client import GradCamClient, InvalidInputError
from gradcam_server.augment import AugmentError, augment_model, explained_target
from gradcam_server.augment.backward import build_backward
from gradcam_server.augment.graph import GraphBuilder
from gradcam_server.augment.targets import differentiated_score
from servers import export_torch, tiny_cnn

ROOT = Path(__file__).resolve().parents[1]
LITE0 = ROOT / "models" / "efficientnet_lite0" / "model.onnx"
MODELS = ("resnet18", "efficientnet_lite0")
METHODS = ("gradcam", "gradcam++", "layercam")
IMAGES = 4
TOLERANCE = 2e-3  # relative error of directional derivatives against finite differences
# Mean and least Pearson r of the quantized model's maps with the float model's over IMAGES
# photos, per model and format, about 0.01 under what was measured (docs/ZOO.md, "Quantized").
# Per tensor and dynamic, resnet18's random (calibrated) weights lose more to quantization
# than efficientnet_lite0's trained ones; per channel, lite0 stays within 0.01 of its float maps.
MAP_BOUNDS = {
    ("resnet18", "qdq"): (0.94, 0.92),
    ("resnet18", "qdq-per-channel"): (0.96, 0.94),
    ("resnet18", "dynamic"): (0.95, 0.93),
    ("efficientnet_lite0", "qdq"): (0.96, 0.92),
    ("efficientnet_lite0", "qdq-per-channel"): (0.99, 0.98),
    ("efficientnet_lite0", "dynamic"): (0.96, 0.92),
}


@pytest.fixture(scope="session")
def model_path(onnx_zoo, tmp_path_factory):
    """``get(name, fmt) -> Path``: the float model (fmt "float") or its quantized form, each
    written once per session, calibrated on all of zoo.PHOTOS."""
    folder = tmp_path_factory.mktemp("quantized")
    calibration = zoo.sample_batch(len(zoo.PHOTOS))

    @functools.cache
    def get(name: str, fmt: str) -> Path:
        source = LITE0 if name == "efficientnet_lite0" else onnx_zoo(name, "torchscript")
        if fmt == "float":
            return source
        return quantized.quantize(source, folder / f"{name}-{fmt}.onnx", fmt, calibration)

    return get


def run(model: onnx.ModelProto, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    session = zoo.ort_session(model.SerializeToString())
    feeds = {"input": x, "target_class": classes.astype(np.int64)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


@functools.cache
def float_classes(path: Path) -> np.ndarray:
    return zoo.ort_session(str(path)).run(None, {"input": zoo.sample_batch(IMAGES)})[0].argmax(1)


@functools.cache
def maps(path: Path, method: str, classes: tuple[int, ...]) -> np.ndarray:
    return run(augment_model(path, method=method), zoo.sample_batch(IMAGES),
               np.array(classes))["heatmap"]


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fmt", quantized.FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_maps_match_the_float_model(model_path, name: str, fmt: str, method: str) -> None:
    """Every augmented graph passes onnx's full checker (augment_model runs it) and loads in
    onnxruntime; the quantized model's maps follow the float model's."""
    classes = tuple(int(c) for c in float_classes(model_path(name, "float")))
    reference = maps(model_path(name, "float"), method, classes)
    ours = maps(model_path(name, fmt), method, classes)
    r = correlations(ours, reference)
    mean_bound, least_bound = MAP_BOUNDS[name, fmt]
    assert r.mean() >= mean_bound and r.min() >= least_bound, np.round(r, 4)


@pytest.mark.parametrize("fmt", ["qdq", "qdq-per-channel"])
def test_full_grad_of_a_qdq_model_follows_the_float_model(model_path, fmt: str) -> None:
    """FullGrad finds a QDQ model's convolutions through their Q/DQ pairs (each bias read from
    its DequantizeLinear) and its maps follow the float model's; without them only the input
    term would remain (r about 0.4). quantize_dynamic's ConvInteger adds its bias apart: the
    bias term cannot be found, and FullGrad is refused."""
    classes = tuple(int(c) for c in float_classes(model_path("resnet18", "float")))
    reference = maps(model_path("resnet18", "float"), "fullgrad", classes)
    r = correlations(maps(model_path("resnet18", fmt), "fullgrad", classes), reference)
    assert r.mean() >= 0.97 and r.min() >= 0.95, np.round(r, 4)
    with pytest.raises(AugmentError, match="ConvInteger node .* adds it apart"):
        augment_model(model_path("resnet18", "dynamic"), method="fullgrad")


def dequantized_of(model: onnx.ModelProto, tensor: str) -> str | None:
    """The DequantizeLinear output of the Q/DQ pair reading `tensor`, if there is one."""
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                  and n.input[0] == tensor]
    for q in quantizers:
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == q.output[0]:
                return node.output[0]
    return None


@pytest.mark.parametrize("fmt", ["qdq", "qdq-per-channel"])
@pytest.mark.parametrize("name", MODELS)
def test_default_and_named_layers_are_the_dequantized_map(model_path, name, fmt) -> None:
    """The default target of a QDQ graph is the float model's layer after its Q/DQ pair (the
    ReLU'd map the pair stands in for, not the pre-ReLU tensor that took the layer's name);
    naming the float model's layer explains the same tensor, with the same maps."""
    float_layer = explained_target(augment_model(model_path(name, "float")))["layer"]
    model = onnx.load(str(model_path(name, fmt)))
    expected = dequantized_of(model, float_layer)
    assert expected is not None
    default = augment_model(model)
    named = augment_model(model, layer=float_layer)
    assert explained_target(default) == explained_target(named) == {
        "layer": expected, "layout": "nchw"}
    x, classes = zoo.sample_batch(2), np.array([3, -1])
    np.testing.assert_array_equal(run(default, x, classes)["heatmap"],
                                  run(named, x, classes)["heatmap"])


def directional_error(gradient: np.ndarray, function, point: np.ndarray,
                      step: float = 1e-2) -> float:
    """Relative error of <gradient, v> against central differences of `function` at `point`
    along unit directions v: the gradient's own, the gradient on two random halves of the
    elements, and a random one."""
    rng = np.random.default_rng(0)
    gradient = gradient.astype(np.float64)
    directions = [gradient, *(gradient * (rng.random(point.shape) < 0.5) for _ in range(2)),
                  rng.standard_normal(point.shape)]
    analytic, numeric = [], []
    for v in directions:
        v = v / np.linalg.norm(v)
        analytic.append(float(np.sum(gradient * v)))
        numeric.append((function(point + step * v) - function(point - step * v)) / (2 * step))
    analytic, numeric = np.array(analytic), np.array(numeric)
    return float(np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric))


def score_tensor(model: onnx.ModelProto) -> str:
    """The logits as the gradients differentiate them: in front of a QDQ model's output
    quantizer (`targets.differentiated_score`)."""
    return differentiated_score(GraphBuilder(model), "logits")


def score_of(session, feeds: dict, image: str, classes: np.ndarray):
    """x -> sum over items of logits[n, classes[n]] by `session`, the other feeds fixed."""
    def score(x: np.ndarray) -> float:
        logits = session.run(None, feeds | {image: x.astype(np.float32)})[0]
        return float(logits.astype(np.float64)[np.arange(len(classes)), classes].sum())
    return score


@pytest.mark.parametrize("fmt", quantized.FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_layer_gradients_match_the_relaxation(model_path, name, fmt) -> None:
    """d score / d target layer against finite differences of the relaxed graph's head (the
    layers after the target, cut out with onnx.utils.Extractor)."""
    model = onnx.load(str(model_path(name, fmt)))
    x = zoo.sample_batch(len(zoo.PHOTOS) + 2)[-2:]  # mirrored photos, not calibrated on
    classes = np.array([3, 7])
    augmented = augment_model(model)
    layer = explained_target(augmented)["layer"]
    out = run(augmented, x, classes)
    relaxed = onnx.shape_inference.infer_shapes(quantized.relax(model, at={"input": x}))
    head = onnx.utils.Extractor(relaxed).extract_model([layer, "input"], [score_tensor(model)])
    session = zoo.ort_session(head.SerializeToString())
    score = score_of(session, {"input": x}, layer, classes)
    error = directional_error(out["gradients"], score, out["activations"])
    assert error < TOLERANCE, error


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    return export_torch(tiny_cnn(), 32, tmp_path_factory.mktemp("tiny") / "tiny.onnx",
                        dynamic_batch=True)


@pytest.mark.parametrize("fmt", quantized.FORMATS)
def test_input_gradients_match_the_relaxation(tiny_path, tmp_path, fmt) -> None:
    """d score / d image through the whole quantized network (every Conv, Q/DQ pair or
    integer op) against finite differences of the relaxed graph."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    path = quantized.quantize(tiny_path, tmp_path / "tiny-q.onnx", fmt,
                              rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    model = onnx.load(str(path))
    classes = np.array([1, 4])
    out = run(augment_model(model, input_gradients=True), x, classes)
    relaxed = onnx.shape_inference.infer_shapes(quantized.relax(model, at={"input": x}))
    network = onnx.utils.Extractor(relaxed).extract_model(["input"], [score_tensor(model)])
    session = zoo.ort_session(network.SerializeToString())
    error = directional_error(out["input_gradients"], score_of(session, {}, "input", classes), x)
    assert error < TOLERANCE, error


def backward(model: onnx.ModelProto) -> None:
    model.graph.input.append(onnx.helper.make_tensor_value_info("seed", 1, None))
    build_backward(GraphBuilder(model), {"y": "seed"}, ["x"])


REFUSED = {
    "blocked": (test_layouts.parsed("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2,3,4] x) => (float[2,3,4] y) {
            q = QuantizeLinear <axis = 2, block_size = 2> (x, s, zp)
            y = DequantizeLinear <axis = 2, block_size = 2> (q, s, zp)
        }""", s=np.full((2, 3, 2), 0.1, np.float32), zp=np.zeros((2, 3, 2), np.uint8)),
        "DequantizeLinear node .*blocked quantization"),
    "float8": (test_layouts.parsed("""
        <ir_version: 10, opset_import: ["" : 21]>
        g (float[2,3,4] x) => (float[2,3,4] y) {
            q = QuantizeLinear(x, s, zp)
            y = DequantizeLinear(q, s, zp)
        }""", s=np.float32(0.1), zp=np.zeros((), np.uint8)),
        None),
    "integer-op-in-the-chain": (test_layouts.parsed("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1,3,4,4] x) => (float[1,3,2,2] y) {
            q = QuantizeLinear(x, s, zp)
            p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (q)
            y = DequantizeLinear(p, s, zp)
        }""", s=np.float32(0.1), zp=np.uint8(0)),
        "MaxPool node .*quantized integer tensor 'q'.*QDQ format"),
    "fused-kernel": (test_layouts.parsed("""
        <ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (float[2,4] x) => (float[2,3] y) {
            y = com.microsoft.DynamicQuantizeMatMul(x, w, ws, wzp)
        }""", w=np.ones((4, 3), np.int8), ws=np.float32(0.1), wzp=np.int8(0)),
        "com.microsoft.DynamicQuantizeMatMul node .*quantized kernel.*float model"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_unsupported_quantization_is_refused_by_name(case: str) -> None:
    model, message = REFUSED[case]
    if case == "float8":  # a float8 zero point makes the Q/DQ pair float8
        model.graph.initializer[1].CopyFrom(onnx.helper.make_tensor(
            "zp", onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
        message = "DequantizeLinear node .*FLOAT8E4M3FN is not supported.*float model"
    with pytest.raises(AugmentError, match=message):
        backward(model)


def test_operator_format_is_refused_with_the_qdq_advice(tiny_path, tmp_path) -> None:
    """quantize_static's QOperator format (QLinearConv, com.microsoft.QGemm, ...) computes on the
    integers themselves: refused, naming the op and the QDQ format."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    rng = np.random.default_rng(2)
    target = tmp_path / "tiny-qoperator.onnx"
    quantize_static(str(tiny_path), str(target),
                    quantized._Images("input", rng.standard_normal((4, 3, 32, 32), np.float32)),
                    quant_format=QuantFormat.QOperator)
    with pytest.raises(AugmentError, match=r"(QLinear\w+|QGemm) node .*QDQ format"):
        augment_model(target)


@pytest.mark.parametrize("architecture", ["ChannelsLast", "ConvNeXtHead"])
def test_layouts_are_read_through_q_dq(tmp_path, architecture: str) -> None:
    """layout.py's evidence passes Q/DQ pairs: a channels-last stage (Swin-like) stays nhwc and
    ConvNeXt's head (LayerNorm on the pooled map) is stepped over, as for the float model; the
    layout given explicitly with the float model's layer name explains the same tensor."""
    model = test_layouts.build(getattr(test_layouts, architecture))
    source = tmp_path / "float.onnx"
    source.write_bytes(test_layouts.export(model))
    images = test_layouts.images(8)
    path = quantized.quantize(source, tmp_path / "qdq.onnx", "qdq-per-channel", images)
    float_target = explained_target(augment_model(source))
    default = augment_model(path)
    expected = {"layer": dequantized_of(onnx.load(str(path)), float_target["layer"]),
                "layout": float_target["layout"]}
    assert explained_target(default) == expected
    named = augment_model(path, layer=float_target["layer"], layout=float_target["layout"])
    assert explained_target(named) == expected
    classes = np.array([1, 2])
    reference = run(augment_model(source), images[:2], classes)["heatmap"]
    assert correlations(run(named, images[:2], classes)["heatmap"], reference).min() > 0.99


# -- served end to end ---------------------------------------------------------------------------

LITE0_LAYER = "/_swish_1/Clip_output_0"  # the float model's head ReLU6 (its config's layer)
EGYPTIAN_CAT = 285


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    """A server with the shipped efficientnet_lite0 (``lite0``) and its per-channel QDQ form
    (``lite0_qdq``) beside the same config.json and labels (whose target_layer names the float
    model's layer)."""
    root = tmp_path_factory.mktemp("quantized-repository")
    servers.link_lite0(root / "lite0")
    (root / "lite0_qdq").mkdir()
    (root / "lite0_qdq" / "model.onnx").symlink_to(model_path("efficientnet_lite0",
                                                              "qdq-per-channel"))
    for name in ("config.json", "labels.txt"):
        (root / "lite0_qdq" / name).symlink_to(LITE0.parent / name)
    log = tmp_path_factory.mktemp("quantized-log") / "server.log"
    with servers.serving(root, log) as process:
        yield process


def test_a_served_qdq_model_explains_like_the_float_one(served, model_path) -> None:
    """The typed API (through the SDK) explains the photo with the quantized model at the
    dequantized head map, the cat as its top class, and a map that follows the float model's;
    KServe's heatmap is the augmented graph's, run here; a layer naming an integer tensor is
    INVALID_ARGUMENT and the server keeps serving."""
    with GradCamClient(served.address, timeout=120.0) as sdk:
        float_result = sdk.explain(servers.SAMPLE, model="lite0", method="gradcam")
        ours = sdk.explain(servers.SAMPLE, model="lite0_qdq", method="gradcam")
        path = model_path("efficientnet_lite0", "qdq-per-channel")
        assert ours.layer == dequantized_of(onnx.load(str(path)), LITE0_LAYER)
        assert ours.predictions[0].class_index == float_result.predictions[0].class_index
        assert ours.predictions[0].class_index == EGYPTIAN_CAT
        assert correlations(ours.heatmap[None], float_result.heatmap[None])[0] >= 0.97
        with pytest.raises(InvalidInputError, match="not a floating-point tensor"):
            sdk.explain(servers.SAMPLE, model="lite0_qdq", layer=f"{LITE0_LAYER}"
                        "_QuantizeLinear_Output")
        assert sdk.explain(servers.SAMPLE, model="lite0_qdq").layer == ours.layer
    x = zoo.sample_batch(2)
    with triton.InferenceServerClient(served.address) as kserve:
        item = triton.InferInput("input", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        result = kserve.infer("lite0_qdq", [item], outputs=[
            triton.InferRequestedOutput("heatmap")], client_timeout=120.0)
    direct = run(augment_model(path, layer=LITE0_LAYER), x, np.array([-1, -1]))["heatmap"]
    np.testing.assert_allclose(result.as_numpy("heatmap"), direct, atol=1e-5)


def test_a_score_beyond_the_output_range_still_has_its_map(model_path) -> None:
    """A QDQ model's logits pass a Q/DQ pair calibrated on the calibration photos; a logit
    beyond that range saturates. The backward pass starts in front of that pair, so such a
    class still gets the map that follows the float model's (differentiating the pair would
    give a blank map). Of 16 photos (8 mirrored), those whose top-1 logit saturates."""
    path = model_path("resnet18", "qdq")
    model = onnx.load(str(path))
    values = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    top = (127 - int(values["logits_zero_point"])) * float(values["logits_scale"])
    x = zoo.sample_batch(16)
    logits = zoo.ort_session(str(path)).run(None, {"input": x})[0]
    saturated = np.flatnonzero(logits.max(1) >= top - 1e-6)
    assert len(saturated) > 0, "no photo saturates the output quantizer: nothing to check"
    x, classes = x[saturated], logits[saturated].argmax(1)
    ours = run(augment_model(model), x, classes)["heatmap"]
    reference = run(augment_model(model_path("resnet18", "float")), x, classes)["heatmap"]
    assert ours.max(axis=(1, 2)).min() > 0.99  # min-max normalised: not blank
    assert correlations(ours, reference).min() >= 0.9


@pytest.mark.parametrize("fmt", ["qdq", "qdq-per-channel"])
def test_guided_backprop_treats_the_pairs_that_replaced_relus_as_relus(model_path, fmt) -> None:
    """The QDQ quantizer removes the ReLUs guided backprop acts at; the pairs that stand for
    them drop negative gradients as the ReLUs did, so the pixel maps follow the float model's
    (measured r 0.93-0.98 on resnet18; about 0 when the pairs pass negative gradients)."""
    x, classes = zoo.sample_batch(2), np.array([3, 7])
    ours, reference = (
        run(augment_model(model_path("resnet18", each), method="guided-backprop"), x,
            classes)["pixel_map"]
        for each in (fmt, "float")
    )
    assert correlations(ours, reference).min() >= 0.9


def test_the_output_quantizer_is_found_by_its_parameters_values() -> None:
    """The output's Q/DQ pair is stepped over when its scale and zero point are equal
    constants under different names (as some quantizers write them), not only shared
    tensors; different values are a real requantization and are differentiated."""
    from onnx import TensorProto, helper

    def graph(dequantize_scale: float) -> onnx.ModelProto:
        nodes = [
            helper.make_node("QuantizeLinear", ["logits_float", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s2", "zp2"], ["logits"]),
        ]
        initializers = [
            onnx.numpy_helper.from_array(np.float32(0.1), "s"),
            onnx.numpy_helper.from_array(np.uint8(3), "zp"),
            onnx.numpy_helper.from_array(np.float32(dequantize_scale), "s2"),
            onnx.numpy_helper.from_array(np.uint8(3), "zp2"),
        ]
        return helper.make_model(helper.make_graph(
            nodes, "output_pair",
            [helper.make_tensor_value_info("logits_float", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
            initializers,
        ), opset_imports=[helper.make_opsetid("", 17)])

    assert differentiated_score(GraphBuilder(graph(0.1)), "logits") == "logits_float"
    assert differentiated_score(GraphBuilder(graph(0.2)), "logits") == "logits"
