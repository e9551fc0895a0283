"""Float16 and bfloat16 models, against the float32 model they were converted from.

float16: onnxconverter-common's ``convert_float_to_float16``, with ``keep_io_types`` (float32
inputs and outputs, a Cast at each end) and without (float16 ones), of calibrated torchvision CNNs
at 64 x 64 and of the shipped EfficientNet-Lite0 (pretrained weights, 224 x 224). Every augmented
graph passes onnx's full checker and runs in onnxruntime, and its added outputs are float32.
Each heatmap is compared with two float32 references (`check_against_float32`): the float32
network holding the float16 weights, which the float16 graph's maps must match (r >= 0.999;
measured 1.0000: onnxruntime's CPU provider computes most float16 ops in float32), and the
original float32 model, r >= 0.999 except where rounding the weights to float16 moves the map
itself (Group-CAM's 33 softmax probabilities, guided backprop's path through every ReLU6 to
the pixels; the thresholds say by how much, docs/ZOO.md has the figures).

bfloat16: onnxruntime's CPU provider has bfloat16 kernels for data movement only (Cast,
Reshape, Transpose, Slice, Concat, LayerNormalization...), none for Conv, Add or Relu. A CNN
computing in bfloat16 (opset 22, where Conv takes it) augments into graphs that pass the full
checker but cannot run there, and the server refuses it at load, naming the missing kernel; a
network that stores activations in bfloat16 between float32 ops runs, and is checked for every
method (r >= 0.99: bfloat16 keeps 8 significant bits).

A server with a float16 model answers KServe requests with FP16 or FP32 tensors and encoded
images, and the typed API, as the augmented graph run directly.
"""

from __future__ import annotations

import functools
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import onnx
import onnx.version_converter
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper
from onnxconverter_common import float16

import servers
import zoo
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc as pb_grpc
from gradcam_server.augment import AugmentError, augment_model
from gradcam_server.augment.passes import ALL_METHODS
from gradcam_server.model import ServedModel, UnservableModel
from gradcam_server.runtime import RuntimeOptions

SIZE = 64
LITE0_SIZE = 224
FLOAT16_R = 0.999
GROUP_CAM_R = 0.998  # 33 probabilities from float16 logits per image
# Finer-CAM explains the small difference between a logit and its nearest classes' logits,
# which the float16 weights' rounding moves (measured 0.973 against the original float32
# model; against the same network in float32 it holds FLOAT16_R).
FINER_CAM_R = 0.95
# RandomCAM's map is a new random draw in every run: nothing to agree with (test_methods checks
# its weights); here it only has to run.
RANDOM_METHODS = ("randomcam",)
COMPARABLE_METHODS = tuple(m for m in ALL_METHODS if m not in RANDOM_METHODS)
LITE0_GUIDED_R = 0.97  # through every ReLU6 of the float16 network, to the pixels
LITE0_GUIDED_SAME_NETWORK_R = 0.99
BFLOAT16_R = 0.99
# Measured against the original float32 model: 0.950 / 0.984, 0.902 / 0.937 and 0.9988 / 1.0.
MOBILENET_V2_FLOAT16_R = {"groupcam": 0.94, "guided-backprop": 0.89, "eigencam": 0.998}
VARIANTS = ("float16", "float16-io")  # without and with keep_io_types
# Score-CAM re-runs the whole network per channel: at layer1's 64 channels, not layer4's 512.
RESNET18_EARLY_LAYER = "/layer1/layer1.1/relu_1/Relu_output_0"
RESNET18_LAYER3 = "/layer3/layer3.1/relu_1/Relu_output_0"
CALL_TIMEOUT_S = 60.0


def to_float16(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    return float16.convert_float_to_float16(model, keep_io_types=keep_io_types)


@pytest.fixture(scope="session")
def half_models(tmp_path_factory: pytest.TempPathFactory):
    """``get(name, variant) -> Path``: "float32", "float16", "float16-io" (keep_io_types) or
    "float16-weights" (float32, its weights rounded to float16) of a zoo model exported at SIZE
    (the shipped EfficientNet-Lite0 at its own 224); each made once per session."""
    root = tmp_path_factory.mktemp("half")
    paths: dict[tuple[str, str], Path] = {}

    def get(name: str, variant: str) -> Path:
        if (name, variant) not in paths:
            if variant == "float32":
                if name == zoo.LITE0:
                    paths[name, variant] = servers.LITE0_DIR / "model.onnx"
                else:
                    paths[name, variant] = zoo.export_onnx(
                        name, "torchscript", root / f"{name}.onnx", check=False, size=SIZE
                    )
            elif variant == "float16-weights":
                model = onnx.load(get(name, "float32"))
                for index, weight in enumerate(model.graph.initializer):
                    if weight.data_type == TensorProto.FLOAT:
                        rounded = numpy_helper.to_array(weight).astype(np.float16)
                        model.graph.initializer[index].CopyFrom(numpy_helper.from_array(
                            rounded.astype(np.float32), weight.name))
                paths[name, variant] = root / f"{name}-{variant}.onnx"
                onnx.save(model, paths[name, variant])
            else:
                model = to_float16(onnx.load(get(name, "float32")), variant == "float16-io")
                paths[name, variant] = root / f"{name}-{variant}.onnx"
                onnx.save(model, paths[name, variant])
        return paths[name, variant]

    return get


def run(path: Path, x: np.ndarray, outputs=("heatmap",), **options) -> dict[str, np.ndarray]:
    """The augmented graph's `outputs` for float32 images `x` (cast to the input's type) and
    each image's top-1 class (a seeded FP32 reference embedding for the similarity score, the
    top-left quarter as the region score's mask); the graph is checked with onnx's full
    checker first."""
    augmented = augment_model(path, **options)
    onnx.checker.check_model(augmented, full_check=True)
    session = zoo.ort_session(augmented.SerializeToString())
    dtype = helper.tensor_dtype_to_np_dtype(session_input_type(augmented))
    feeds = {"input": x.astype(dtype), "target_class": np.full(len(x), -1, np.int64)}
    if options.get("score") == "similarity":
        width = session.get_inputs()[-1].shape[-1]
        feeds["reference_embedding"] = np.random.default_rng(0).standard_normal(
            (len(x), width)).astype(np.float32)
    if options.get("score") == "region":
        feeds["target_mask"] = np.zeros((len(x), 8, 8), np.float32)
        feeds["target_mask"][:, :4, :4] = 1.0
    return dict(zip(outputs, session.run(list(outputs), feeds)))


def session_input_type(model: onnx.ModelProto) -> int:
    return next(i for i in model.graph.input if i.name == "input").type.tensor_type.elem_type


@functools.cache
def float32_heatmaps(path: Path, x_key: tuple, options: tuple) -> np.ndarray:
    """The float32 graph's heatmaps for the images `x_key` (size, count, rounded to float16)."""
    size, images, rounded = x_key
    x = zoo.sample_batch(images, size)
    if rounded:
        x = x.astype(np.float16).astype(np.float32)
    return run(path, x, **dict(options))["heatmap"]


def assert_maps_agree(heatmaps: np.ndarray, reference: np.ndarray, minimum: float) -> None:
    """Pearson r >= `minimum` per image; a map flat in the reference (a ReLU'd-away
    counterfactual) must be flat here too."""
    assert heatmaps.dtype == np.float32 and heatmaps.shape == reference.shape
    assert np.isfinite(heatmaps).all()
    for got, want in zip(heatmaps, reference):
        if np.ptp(want) == 0:
            np.testing.assert_allclose(got, want, atol=1e-6)
            continue
        r = np.corrcoef(got.ravel(), want.ravel())[0, 1]
        assert r >= minimum, f"r = {r:.5f}"


def check_against_float32(half_models, name: str, variant: str, size: int, images: int,
                          minimum: float, same_network_minimum: float = FLOAT16_R,
                          **options) -> None:
    """The float16 graph's heatmaps against two float32 references augmented from the float32
    graph: (1) the network computing what the float16 one computes (its weights rounded to
    float16, and the images too for the float16 input) at r >= `same_network_minimum`, so the
    augmented graph adds no error of its own; (2) the original float32 model at r >= `minimum`,
    which measures the float16 network's own rounding."""
    key = tuple(sorted(options.items()))
    heatmaps = run(half_models(name, variant), zoo.sample_batch(images, size),
                   **options)["heatmap"]
    same_network = float32_heatmaps(half_models(name, "float16-weights"),
                                    (size, images, variant == "float16"), key)
    assert_maps_agree(heatmaps, same_network, same_network_minimum)
    original = float32_heatmaps(half_models(name, "float32"), (size, images, False), key)
    assert_maps_agree(heatmaps, original, minimum)


def method_options(method: str) -> dict:
    return {"method": method, "layer": RESNET18_EARLY_LAYER} if method == "scorecam" else {
        "method": method}


# -- float16 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", COMPARABLE_METHODS)
def test_float16_resnet18_every_method(half_models, method: str, variant: str) -> None:
    minimum = {"groupcam": GROUP_CAM_R, "finercam": FINER_CAM_R}.get(method, FLOAT16_R)
    images = 1 if method == "scorecam" else 2  # float16 convs run slowly in its Loop
    check_against_float32(half_models, "resnet18", variant, SIZE, images, minimum,
                          **method_options(method))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("options", "minimum"), [
    ({"score": "probability"}, FLOAT16_R),
    # layer4's counterfactual maps are flat (ReLU'd away); at layer3 the map depends on four
    # more float16 convolutions (measured 0.9967 against the original float32 model)
    ({"counterfactual": True, "layer": RESNET18_LAYER3}, 0.995),
    ({"eigen_smooth": True}, FLOAT16_R),
    ({"aug_smooth": True, "method": "layercam"}, FLOAT16_R),
    ({"layer": (RESNET18_LAYER3, "/layer4/layer4.1/relu_1/Relu_output_0")}, 0.995),
    ({"score": "similarity"}, FLOAT16_R),
], ids=["probability", "counterfactual", "eigen_smooth", "aug_smooth", "two_layers",
        "similarity"])
def test_float16_resnet18_options(half_models, options: dict, minimum: float,
                                  variant: str) -> None:
    check_against_float32(half_models, "resnet18", variant, SIZE, 2, minimum, **options)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_added_outputs_are_float32(half_models, variant: str) -> None:
    """activations, gradients, input_gradients and pixel_map are FP32 (KServe carries them;
    the backward pass runs in float32), near the float32 model's."""
    names = ("logits", "activations", "gradients", "input_gradients", "heatmap", "pixel_map")
    x = zoo.sample_batch(2, SIZE)
    half = run(half_models("resnet18", variant), x, names, method="guided-gradcam",
               input_gradients=True)
    single = run(half_models("resnet18", "float32"), x, names, method="guided-gradcam",
                 input_gradients=True)
    assert half["logits"].dtype == (np.float16 if variant == "float16" else np.float32)
    for name in names[1:]:
        assert half[name].dtype == np.float32 and half[name].shape == single[name].shape
    assert zoo.rel_l2(half["activations"], single["activations"]) < 1e-2
    assert zoo.rel_l2(half["gradients"], single["gradients"]) < 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["gradcam++", "eigencam", "ablationcam", "groupcam",
                                    "integrated-gradcam", "guided-backprop"])
def test_float16_mobilenet_v2(half_models, method: str, variant: str) -> None:
    """On this random-weight MobileNet at 64 x 64 the maps of Group-CAM, guided backprop and
    EigenCAM move with the weights' rounding to float16 (the float32 network with rounded
    weights moves as far), so only the first reference is held to 0.999 for them."""
    minimum = MOBILENET_V2_FLOAT16_R.get(method, FLOAT16_R)
    check_against_float32(half_models, "mobilenet_v2", variant, SIZE, 2, minimum,
                          method=method)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "guided-gradcam"])
def test_float16_shipped_efficientnet_lite0(half_models, method: str, variant: str) -> None:
    """Guided Grad-CAM's pixel map differs even from the float32 network holding the float16
    weights (r 0.995): onnxruntime computes part of this network in float16 itself."""
    guided = method == "guided-gradcam"
    check_against_float32(half_models, zoo.LITE0, variant, LITE0_SIZE, 1,
                          LITE0_GUIDED_R if guided else FLOAT16_R,
                          LITE0_GUIDED_SAME_NETWORK_R if guided else FLOAT16_R, method=method)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_segmenter_region_score(variant: str, tmp_path: Path) -> None:
    """A segmentation output explained for a region (HiResCAM: Grad-CAM's channel means cancel
    the mask through this model's linear head, as test_server_targets says)."""
    single = tmp_path / "float32.onnx"
    servers.export_segmenter(single)
    half = tmp_path / f"{variant}.onnx"
    onnx.save(to_float16(onnx.load(single), variant == "float16-io"), half)
    x = np.random.default_rng(2).standard_normal((2, 3, servers.TINY_SIZE, servers.TINY_SIZE))
    options = dict(score="region", method="hirescam")
    got = run(half, x.astype(np.float32), **options)["heatmap"]
    want = run(single, x.astype(np.float32), **options)["heatmap"]
    assert_maps_agree(got, want, FLOAT16_R)


# -- bfloat16 --------------------------------------------------------------------------------


def stored_in_bfloat16(stored: int) -> onnx.ModelProto:
    """conv -> relu -> layer norm -> transpose -> conv -> relu -> pool -> linear on 3 x 32 x 32;
    with `stored` BFLOAT16 the relu, layer norm and transpose outputs are bfloat16 (between
    Casts), all else float32. Seeded, so both precisions hold the same weights."""
    rng = np.random.default_rng(0)
    low = TensorProto.FLOAT if stored == TensorProto.FLOAT else stored
    as_low = helper.tensor_dtype_to_np_dtype(low)
    weights = [
        numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)
        for name, shape, scale in (("w1", (8, 3, 3, 3), 0.3), ("w2", (16, 8, 3, 3), 0.2),
                                   ("fc", (10, 16), 0.5))
    ]
    weights += [
        numpy_helper.from_array(np.linspace(0.5, 1.5, 32).astype(as_low), "scale"),
        numpy_helper.from_array(np.linspace(-0.2, 0.2, 32).astype(as_low), "bias"),
    ]
    cast = [helper.make_node("Cast", ["r1"], ["r1_low"], to=low)] if low != TensorProto.FLOAT \
        else [helper.make_node("Identity", ["r1"], ["r1_low"])]
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        *cast,
        helper.make_node("LayerNormalization", ["r1_low", "scale", "bias"], ["n1"], axis=-1),
        helper.make_node("Transpose", ["n1"], ["t1"], perm=[0, 1, 3, 2]),
        helper.make_node("Cast", ["t1"], ["t1_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["t1_float"], ["a1"], perm=[0, 1, 3, 2]),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("GlobalAveragePool", ["a2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "stored", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                        ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_float16_resnet18_random_method_runs(half_models, method: str, variant: str) -> None:
    (heatmap,) = run(half_models("resnet18", variant), zoo.sample_batch(2, SIZE),
                     method=method).values()
    assert heatmap.shape == (2, SIZE, SIZE) and np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0 and heatmap.max() <= 1.0 + 1e-6


@pytest.mark.parametrize("method", COMPARABLE_METHODS)
def test_bfloat16_activations_every_method(method: str) -> None:
    """The transposed bfloat16 layer norm output t1 as the target layer (its float32 twin in
    the float32 model): every method runs on the CPU provider and agrees with float32."""
    x = zoo.sample_batch(2, 32)
    options = dict(method=method, layout="nchw")
    layer = "t1"
    if method == "dff":  # its concepts go through the classifier head, which pools a2
        with pytest.raises(AugmentError, match="global average pooling"):
            run(stored_in_bfloat16(TensorProto.BFLOAT16), x, layer=layer, **options)
        layer = "a2"  # float32, computed from the bfloat16 t1
    got = run(stored_in_bfloat16(TensorProto.BFLOAT16), x, layer=layer, **options)["heatmap"]
    want = run(stored_in_bfloat16(TensorProto.FLOAT), x, layer=layer, **options)["heatmap"]
    assert_maps_agree(got, want, BFLOAT16_R)


def to_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 model as bfloat16 (at opset 22, where Conv and pooling take bfloat16)."""
    model = onnx.version_converter.convert_version(model, 22)
    graph = model.graph
    for index, initializer in enumerate(graph.initializer):
        if initializer.data_type == TensorProto.FLOAT16:
            values = numpy_helper.to_array(initializer).astype(ml_dtypes.bfloat16)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(values, initializer.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and \
                    attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.BFLOAT16
            if attribute.type == onnx.AttributeProto.TENSOR and \
                    attribute.t.data_type == TensorProto.FLOAT16:
                values = numpy_helper.to_array(attribute.t).astype(ml_dtypes.bfloat16)
                attribute.t.CopyFrom(numpy_helper.from_array(values))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_network_augments_but_the_cpu_provider_cannot_run_it(
    half_models, variant: str, tmp_path: Path
) -> None:
    model = to_bfloat16(onnx.load(half_models("resnet18", variant)))
    for method in ("gradcam", "ablationcam", "scorecam", "integrated-gradcam",
                   "guided-gradcam"):
        augmented = augment_model(model, **method_options(method))
        onnx.checker.check_model(augmented, full_check=True)
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(UnservableModel, match=r"computes in bfloat16.*Conv.*float16"):
        ServedModel("resnet18-bf16", tmp_path, RuntimeOptions(device="cpu"))


# -- served ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny: the servers' tiny CNN in float16 (float16 input and logits); tiny_io: with
    keep_io_types; tiny_bf16: in bfloat16 (refused at load)."""
    root = tmp_path_factory.mktemp("half-repository")
    single = servers.export_torch(servers.tiny_cnn(), servers.TINY_SIZE,
                                  root / "float32" / "model.onnx", dynamic_batch=True)
    for name, keep in (("tiny", False), ("tiny_io", True)):
        (root / name).mkdir()
        onnx.save(to_float16(onnx.load(single), keep), root / name / "model.onnx")
    (root / "tiny_bf16").mkdir()
    onnx.save(to_bfloat16(onnx.load(root / "tiny" / "model.onnx")),
              root / "tiny_bf16" / "model.onnx")
    (root / "float32" / "model.onnx").unlink()
    (root / "float32").rmdir()
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("half-server-log") / "server.log"
    with servers.serving(repository, log) as process:
        yield process


def direct(path: Path, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """The augmented graph's logits and heatmap, run here."""
    augmented = augment_model(path)
    session = zoo.ort_session(augmented.SerializeToString())
    dtype = helper.tensor_dtype_to_np_dtype(session_input_type(augmented))
    feeds = {"input": x.astype(dtype), "target_class": classes}
    return dict(zip(("logits", "heatmap"), session.run(["logits", "heatmap"], feeds)))


@pytest.mark.parametrize("model", ["tiny", "tiny_io"])
def test_served_float16_model_over_kserve(server, repository: Path, model: str) -> None:
    """FP16 and FP32 tensors (each compared with the graph fed those values: onnxruntime drops
    the keep_io_types graph's first Cast to float16 with the Cast it inserts back to float32
    for Conv, so the two differ there) and encoded images."""
    x = np.random.default_rng(0).standard_normal((2, 3, servers.TINY_SIZE, servers.TINY_SIZE))
    logits_type = "FP16" if model == "tiny" else "FP32"
    with triton.InferenceServerClient(server.address) as client:
        metadata = client.get_model_metadata(model)
        assert metadata.inputs[0].datatype == ("FP16" if model == "tiny" else "FP32")
        for datatype, values in (("FP16", x.astype(np.float16)), ("FP32", x.astype(np.float32))):
            tensor = triton.InferInput("input", list(values.shape), datatype)
            tensor.set_data_from_numpy(values)
            result = client.infer(model, [tensor], client_timeout=CALL_TIMEOUT_S)
            response = {o.name: o for o in result.get_response().outputs}
            assert response["logits"].datatype == logits_type
            assert response["heatmap"].datatype == "FP32"
            expected = direct(repository / model / "model.onnx", values.astype(np.float32),
                              np.array([-1, -1]))["heatmap"]
            np.testing.assert_allclose(result.as_numpy("heatmap"), expected, atol=1e-5)
        image = triton.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([servers.SAMPLE.read_bytes()], dtype=object))
        result = client.infer(model, [image], client_timeout=CALL_TIMEOUT_S)
        heatmap = result.as_numpy("heatmap")  # preprocessed as float32, fed as the graph's type
        assert heatmap.shape == (1, 300, 451) and np.isfinite(heatmap).all()
        assert heatmap.min() >= 0 and heatmap.max() > 0.9


def test_served_float16_model_over_the_typed_api(server, repository: Path) -> None:
    """A preprocessed float32 tensor, explained for class 4; predictions from float16 logits."""
    x = np.random.default_rng(1).standard_normal((3, servers.TINY_SIZE, servers.TINY_SIZE))
    x = x.astype(np.float32)
    expected = direct(repository / "tiny" / "model.onnx", x[None], np.array([4]))
    request = pb.ExplainRequest(
        model="tiny", images=[pb.Image(tensor=pb.Tensor(shape=list(x.shape),
                                                        data=x.astype("<f4").tobytes()))],
        target=pb.Target(class_index=4), options=pb.ExplainOptions(num_predictions=3),
    )
    with grpc.insecure_channel(server.address) as channel:
        response = pb_grpc.GradCamStub(channel).Explain(request, timeout=CALL_TIMEOUT_S)
    (explanation,) = response.explanations
    (heatmap,) = explanation.heatmaps
    assert heatmap.class_index == 4
    values = np.frombuffer(heatmap.data, "<f4").reshape(heatmap.height, heatmap.width)
    np.testing.assert_allclose(values, expected["heatmap"][0], atol=1e-5)
    logits = expected["logits"][0].astype(np.float32)
    top = np.argsort(-logits)[:3]
    assert [p.class_index for p in explanation.predictions] == list(top)
    np.testing.assert_allclose([p.logit for p in explanation.predictions], logits[top])


def test_served_bfloat16_model_is_refused_at_load_with_the_reason(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        servers.expect_error(
            lambda: pb_grpc.GradCamStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(model="tiny_bf16"), timeout=CALL_TIMEOUT_S),
            grpc.StatusCode.FAILED_PRECONDITION, "bfloat16", "Conv", "float16",
        )
