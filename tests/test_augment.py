"""The augmented model's contract, on a small CNN exported by torch, against torch autograd."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gradcam_server.augment import AugmentError, augment_model
from gradcam_server.augment.graph import infer_shapes, model_bytes


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@pytest.fixture(scope="module")
def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN().eval()


def export(model: nn.Module, path: Path, dynamic: bool = True, opset: int = 17, **kwargs) -> Path:
    torch.onnx.export(
        model, torch.randn(2, 3, 32, 32), str(path), dynamo=False, opset_version=opset,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic else None, **kwargs,
    )
    return path


@pytest.fixture(scope="module")
def small_onnx(small_cnn: SmallCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(small_cnn, tmp_path_factory.mktemp("small") / "small.onnx")


def run(model: onnx.ModelProto, x: np.ndarray, target_class) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"input": x, "target_class": np.asarray(target_class, dtype=np.int64)}
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def torch_reference(model: SmallCNN, x: np.ndarray, classes, probability: bool = False):
    activations = model.features(torch.from_numpy(x))
    activations.retain_grad()
    logits = model.fc(torch.flatten(model.pool(activations), 1))
    scores = torch.softmax(logits, 1) if probability else logits
    scores[torch.arange(len(classes)), torch.as_tensor(classes)].sum().backward()
    return activations.detach().numpy(), activations.grad.numpy(), logits.detach().numpy()


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 32, 32)).astype(np.float32)


def test_keeps_original_io_and_adds_the_explanation(small_onnx: Path) -> None:
    original = onnx.load(small_onnx)
    augmented = augment_model(small_onnx)
    inputs = [i.name for i in augmented.graph.input]
    outputs = [o.name for o in augmented.graph.output]
    assert inputs[: len(original.graph.input)] == [i.name for i in original.graph.input]
    assert inputs[-1] == "target_class"
    assert outputs == ["logits", "activations", "gradients", "heatmap"]
    batch_dim = augmented.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "N"
    for output in augmented.graph.output:
        assert output.type.tensor_type.shape.dim[0].dim_param == "N"
    onnx.checker.check_model(augmented, full_check=True)


@pytest.mark.parametrize("n", [1, 3])
def test_dynamic_batch_matches_torch(small_cnn: SmallCNN, small_onnx: Path, n: int) -> None:
    x = batch(n)
    out = run(augment_model(small_onnx), x, [-1] * n)
    classes = out["logits"].argmax(1)
    activations, gradients, logits = torch_reference(small_cnn, x, classes)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-5)
    assert rel(out["activations"], activations) < 1e-5
    assert rel(out["gradients"], gradients) < 1e-5
    assert out["heatmap"].shape == (n, 32, 32)
    assert out["heatmap"].min() >= 0 and out["heatmap"].max() <= 1


def test_fixed_batch_stays_fixed(small_cnn: SmallCNN, tmp_path: Path) -> None:
    augmented = augment_model(export(small_cnn, tmp_path / "fixed.onnx", dynamic=False))
    assert augmented.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert augmented.graph.input[-1].type.tensor_type.shape.dim[0].dim_value == 2
    out = run(augmented, batch(2), [-1, -1])
    assert out["heatmap"].shape == (2, 32, 32)


def test_explicit_and_ranked_target_classes(small_cnn: SmallCNN, small_onnx: Path) -> None:
    x = np.repeat(batch(1), 3, axis=0)
    out = run(augment_model(small_onnx), x, [-1, -2, 7])
    order = np.argsort(-out["logits"][0])
    _, gradients, _ = torch_reference(small_cnn, x, [order[0], order[1], 7])
    for i in range(3):
        assert rel(out["gradients"][i], gradients[i]) < 1e-5
    assert not np.allclose(out["gradients"][0], out["gradients"][1])


class AddmmHead(nn.Module):
    """SmallCNN's features under a last layer written as torch.addmm, which exports as a Gemm
    with transB 0 (nn.Linear's has transB 1), scaled by `alpha`."""

    def __init__(self, small_cnn: SmallCNN, alpha: float) -> None:
        super().__init__()
        self.features, self.pool, self.alpha = small_cnn.features, small_cnn.pool, alpha
        self.weight = nn.Parameter(small_cnn.fc.weight.detach().T.contiguous())
        self.bias = nn.Parameter(small_cnn.fc.bias.detach().clone())

    def head(self, activations: torch.Tensor) -> torch.Tensor:
        pooled = torch.flatten(self.pool(activations), 1)
        return torch.addmm(self.bias, pooled, self.weight, alpha=self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("head", ["linear", "addmm", "addmm-alpha"])
def test_a_class_score_through_the_last_gemm_matches_torch(
    small_cnn: SmallCNN, tmp_path: Path, head: str
) -> None:
    """The logit score's one-hot seed through the classifier's Gemm: its rows gathered from
    the weights (transB 1 or 0) where alpha is 1, the product otherwise; torch autograd on the
    same weights is the reference for all three."""
    model = (small_cnn if head == "linear" else
             AddmmHead(copy.deepcopy(small_cnn), 0.5 if "alpha" in head else 1).eval())
    path = export(model, tmp_path / "head.onnx")
    gemm, = [n for n in onnx.load(path).graph.node if n.op_type == "Gemm"]
    augmented = augment_model(path)
    backward = [n.op_type for n in augmented.graph.node if n.name.startswith("gradcam/")]
    assert ("Gemm" in backward) == (head == "addmm-alpha"), (head, gemm.attribute)
    x = np.repeat(batch(2), 2, axis=0)
    out = run(augmented, x, [-1, 3, 9, -2])
    activations = model.features(torch.from_numpy(x))
    activations.retain_grad()
    logits = (model.head(activations) if head != "linear"
              else model.fc(torch.flatten(model.pool(activations), 1)))
    order = np.argsort(-logits.detach().numpy(), axis=1)
    classes = [order[0, 0], 3, 9, order[3, 1]]
    logits[torch.arange(4), torch.as_tensor(classes)].sum().backward()
    assert rel(out["gradients"], activations.grad.numpy()) < 1e-5


def test_added_outputs_are_written_by_the_nodes_that_compute_them(small_onnx: Path) -> None:
    """No Identity copies a tensor the augmentation computed into gradients or heatmap (a
    runtime runs it, fetched or not); activations, the forward graph's own layer here, keeps
    its name in the forward graph and is copied. The values are checked against torch above."""
    augmented = augment_model(small_onnx)
    producers = {out: node for node in augmented.graph.node for out in node.output}
    for name in ("gradients", "heatmap"):
        assert producers[name].op_type != "Identity", name
    layer = producers["activations"]
    assert layer.op_type == "Identity" and not layer.input[0].startswith("gradcam/")


def test_probability_score(small_cnn: SmallCNN, small_onnx: Path) -> None:
    x = batch(2)
    out = run(augment_model(small_onnx, score="probability"), x, [3, -1])
    classes = [3, int(out["logits"][1].argmax())]
    _, gradients, _ = torch_reference(small_cnn, x, classes, probability=True)
    assert rel(out["gradients"], gradients) < 1e-4


def test_similarity_to_a_reference_embedding(small_cnn: SmallCNN, tmp_path: Path) -> None:
    embedder = torch.nn.Sequential(small_cnn.features, small_cnn.pool, torch.nn.Flatten()).eval()
    augmented = augment_model(export(embedder, tmp_path / "embedder.onnx"), score="similarity")
    assert augmented.graph.input[-1].name == "reference_embedding"
    x = batch(2)
    reference = np.random.default_rng(7).standard_normal((2, 16)).astype(np.float32)
    session = ort.InferenceSession(augmented.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    gradients, = session.run(["gradients"], {"input": x, "reference_embedding": reference,
                                             "target_class": np.array([-1, -1])})
    activations = small_cnn.features(torch.from_numpy(x))
    activations.retain_grad()
    embedding = torch.flatten(small_cnn.pool(activations), 1)
    torch.nn.functional.cosine_similarity(embedding, torch.from_numpy(reference)).sum().backward()
    assert rel(gradients, activations.grad.numpy()) < 1e-4


def test_heatmap_is_normalised_grad_cam(small_cnn: SmallCNN, small_onnx: Path) -> None:
    x = batch(2)
    out = run(augment_model(small_onnx), x, [-1, -1])
    activations, gradients, _ = torch_reference(small_cnn, x, out["logits"].argmax(1))
    weights = gradients.mean(axis=(2, 3), keepdims=True)
    cam = torch.relu(torch.from_numpy((weights * activations).sum(1, keepdims=True)))
    cam = torch.nn.functional.interpolate(cam, size=(32, 32), mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    for i in range(2):
        expected = (cam[i] - cam[i].min()) / (cam[i].max() - cam[i].min() + 1e-7)
        np.testing.assert_allclose(out["heatmap"][i], expected, atol=1e-4)


def test_input_gradients_mode(small_cnn: SmallCNN, small_onnx: Path) -> None:
    x = batch(2)
    out = run(augment_model(small_onnx, input_gradients=True), x, [1, 2])
    image = torch.from_numpy(x).requires_grad_(True)
    small_cnn(image)[torch.arange(2), torch.tensor([1, 2])].sum().backward()
    assert rel(out["input_gradients"], image.grad.numpy()) < 1e-4


def test_named_layer(small_cnn: SmallCNN, small_onnx: Path) -> None:
    model = onnx.load(small_onnx)
    first_relu = next(n for n in model.graph.node if n.op_type == "Relu").output[0]
    out = run(augment_model(small_onnx, layer=first_relu), batch(2), [4, 5])
    assert out["activations"].shape == (2, 8, 32, 32)
    image = torch.from_numpy(batch(2))
    early = small_cnn.features[:3](image)
    early.retain_grad()
    logits = small_cnn.fc(torch.flatten(small_cnn.pool(small_cnn.features[3:](early)), 1))
    logits[torch.arange(2), torch.tensor([4, 5])].sum().backward()
    assert rel(out["gradients"], early.grad.numpy()) < 1e-4


def test_bad_layers_are_clear_errors(small_onnx: Path) -> None:
    with pytest.raises(AugmentError, match="'nope' is not a tensor"):
        augment_model(small_onnx, layer="nope")
    flat = onnx.load(small_onnx).graph.node[-2].output[0]
    with pytest.raises(AugmentError, match=r"has rank 2: a target must be a feature map") as error:
        augment_model(small_onnx, layer=flat)
    assert "Candidate layers (last first): /features/features.5/Relu_output_0 [N, 16, 8, 8] nchw" \
        in str(error.value)
    with pytest.raises(AugmentError, match="unknown score"):
        augment_model(small_onnx, score="margin")


def test_shape_inference_on_the_skeleton_knows_what_the_whole_model_does(small_onnx: Path):
    """Shapes are inferred with the weights as typed inputs (so models over 2 GiB can be):
    every type onnx infers on the whole model is the same, and model_bytes is its size."""
    model = onnx.load(small_onnx)
    whole = onnx.shape_inference.infer_shapes(model, data_prop=True)
    skeleton = infer_shapes(model)
    inferred = {v.name: v.type for v in skeleton.graph.value_info}
    assert whole.graph.value_info and all(
        inferred[v.name] == v.type for v in whole.graph.value_info
    )
    kept = {i.name for i in skeleton.graph.initializer}
    declared = {i.name for i in skeleton.graph.input}
    assert all(int(np.prod(i.dims)) <= 4096 for i in skeleton.graph.initializer)
    assert all(i.name in kept | declared for i in model.graph.initializer)
    assert 0.95 * model.ByteSize() <= model_bytes(model) <= model.ByteSize()  # tiny model: headers count


def test_external_data_model(small_cnn: SmallCNN, small_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(small_onnx)
    path = tmp_path / "external" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert (path.parent / "model.onnx.data").stat().st_size > 5000
    x = batch(2)
    np.testing.assert_allclose(
        run(augment_model(path), x, [-1, -1])["gradients"],
        run(augment_model(small_onnx), x, [-1, -1])["gradients"],
    )


def test_old_opset_is_upgraded(small_cnn: SmallCNN, tmp_path: Path) -> None:
    path = export(small_cnn, tmp_path / "opset11.onnx", opset=11)
    augmented = augment_model(path)
    assert max(o.version for o in augmented.opset_import if o.domain in ("", "ai.onnx")) >= 17
    x = batch(2)
    out = run(augmented, x, [-1, -1])
    _, gradients, _ = torch_reference(small_cnn, x, out["logits"].argmax(1))
    assert rel(out["gradients"], gradients) < 1e-5


def test_command_line(small_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "gradcam_server.augment.cli", str(small_onnx), "-o", str(target),
         "--score", "probability"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "target layer" in done.stdout
    assert [o.name for o in onnx.load(target).graph.output][-1] == "heatmap"
    failed = subprocess.run(
        [sys.executable, "-m", "gradcam_server.augment.cli", str(small_onnx), "-o",
         str(target), "--layer", "missing"],
        capture_output=True, text=True,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip() == (
        "gradcam-augment: target layer 'missing' is not a tensor of the graph"
    )


class TwoInputsTwoOutputs(nn.Module):
    """(metadata, image) -> (class logits, attribute logits scaled by the metadata)."""

    def __init__(self, small_cnn: SmallCNN) -> None:
        super().__init__()
        self.cnn = small_cnn
        self.attributes = nn.Linear(16, 4)

    def forward(self, meta: torch.Tensor, image: torch.Tensor):
        features = self.cnn.features(image)
        pooled = torch.flatten(self.cnn.pool(features), 1)
        return self.cnn.fc(pooled), self.attributes(pooled) * meta


@pytest.fixture(scope="module")
def two_io_onnx(small_cnn: SmallCNN, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("two_io") / "two_io.onnx"
    torch.manual_seed(3)
    torch.onnx.export(
        TwoInputsTwoOutputs(small_cnn).eval(), (torch.ones(2, 1), torch.randn(2, 3, 32, 32)),
        str(path), dynamo=False, opset_version=17, input_names=["meta", "image"],
        output_names=["classes", "attributes"],
        dynamic_axes={n: {0: "N"} for n in ("meta", "image", "classes", "attributes")},
    )
    return path


def test_input_and_output_chosen_by_name_or_index(small_cnn: SmallCNN, two_io_onnx: Path) -> None:
    """The second output explained, the image being the second input; the other input stays an
    input of the augmented graph. Against torch autograd of attributes[n, c]."""
    with pytest.raises(AugmentError, match="expected one image input, found 2: meta, image"):
        augment_model(two_io_onnx)
    torch.manual_seed(3)
    model = TwoInputsTwoOutputs(small_cnn).eval()
    x, meta = batch(2), np.array([[0.5], [2.0]], dtype=np.float32)
    features = small_cnn.features(torch.from_numpy(x))
    features.retain_grad()
    attributes = model.attributes(torch.flatten(small_cnn.pool(features), 1)) * torch.from_numpy(meta)
    attributes[torch.arange(2), torch.tensor([1, 3])].sum().backward()

    by_index = augment_model(two_io_onnx, input=1, output=1)
    by_name = augment_model(two_io_onnx, input="image", output="attributes")
    for augmented in (by_index, by_name):
        assert [i.name for i in augmented.graph.input] == ["meta", "image", "target_class"]
        session = ort.InferenceSession(augmented.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        gradients, = session.run(["gradients"], {
            "meta": meta, "image": x, "target_class": np.array([1, 3]),
        })
        assert rel(gradients, features.grad.numpy()) < 1e-4


def test_bad_input_or_output_choices_are_clear_errors(two_io_onnx: Path) -> None:
    with pytest.raises(AugmentError, match="no input at index 2; the model's inputs are: meta, image"):
        augment_model(two_io_onnx, input=2)
    with pytest.raises(AugmentError, match="'x' is not an input of the model"):
        augment_model(two_io_onnx, input="x")
    with pytest.raises(AugmentError, match="the image input 'meta' must be 4-D"):
        augment_model(two_io_onnx, input="meta")
    with pytest.raises(AugmentError, match="no output at index 5; the model's outputs are: "
                                           "classes, attributes"):
        augment_model(two_io_onnx, input=1, output=5)
    with pytest.raises(AugmentError, match="scorecam .* also depends on the input.s. meta"):
        augment_model(two_io_onnx, input=1, output=1, method="scorecam")


def test_command_line_takes_indices(two_io_onnx: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "gradcam_server.augment.cli", str(two_io_onnx), "-o", str(target),
         "--input", "1", "--score-output", "attributes"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    assert [i.name for i in onnx.load(target).graph.input] == ["meta", "image", "target_class"]


def test_loop_bodies_copy_weights_within_one_budget(
    small_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Score-CAM on two fused layers has two Loop bodies; with room for one copy of the
    network's weights, the first body holds its own and the second reads the outer ones.
    The heatmap is the same either way."""
    from gradcam_server.augment import graph

    model = onnx.load(small_onnx)
    relus = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    weights = sum(init.ByteSize() for init in model.graph.initializer)

    def bodies(augmented: onnx.ModelProto) -> list[int]:
        return [len(n.attribute[0].g.initializer) for n in augmented.graph.node
                if n.op_type == "Loop"]

    copied = augment_model(small_onnx, layer=relus, method="scorecam")
    monkeypatch.setattr(graph, "MAX_COPIED_WEIGHT_BYTES", weights)
    bounded = augment_model(small_onnx, layer=relus, method="scorecam")
    assert len(bodies(copied)) == 2 and all(bodies(copied))
    assert bodies(bounded)[0] > 0 and bodies(bounded)[1] == 0
    x = batch(2)
    np.testing.assert_allclose(run(bounded, x, [1, 2])["heatmap"],
                               run(copied, x, [1, 2])["heatmap"], atol=1e-5)


def test_an_invalid_input_graph_is_named_as_such() -> None:
    """A graph that fails onnx's checker before any change (a Cast whose declared output type
    contradicts its `to`, as a float16 conversion can leave behind) is refused as the model's
    own fault, not as the augmented graph's."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Conv", ["input", "w"], ["features"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["features"], ["cast"], to=TensorProto.FLOAT),
        helper.make_node("GlobalAveragePool", ["cast"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "invalid",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")],
        value_info=[helper.make_tensor_value_info("cast", TensorProto.FLOAT16, ["N", 4, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(AugmentError, match="the model itself fails onnx's checker.*Cast"):
        augment_model(model, layer="features")


# -- the coarse heatmap: the map the heatmap is resized from ------------------------------------
@pytest.mark.parametrize("method", ["gradcam", "layercam", "eigencam", "kpcacam", "scorecam"])
def test_the_coarse_heatmap_resized_as_torch_resizes_is_the_heatmap(
    small_onnx: Path, method: str,
) -> None:
    """Where the heatmap is one layer's map resized, ``coarse_heatmap`` is that map at the
    layer's 8x8, normalised as the heatmap is: torch's bilinear upsampling of it (half-pixel
    centres, as ONNX's linear Resize) is the heatmap."""
    out = run(augment_model(small_onnx, method=method, coarse_heatmap=True), batch(3), [-1, 2, 5])
    coarse = out["coarse_heatmap"]
    assert coarse.shape == (3, 8, 8)
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[:, None], size=(32, 32), mode="bilinear", align_corners=False,
    )[:, 0].numpy()
    np.testing.assert_allclose(upsampled, out["heatmap"], atol=1e-6)
    assert out["heatmap"].max() > 0.99  # normalised maps, not a blank one matching a blank one


def test_no_coarse_heatmap_where_the_heatmap_is_not_one_resized_map(small_onnx: Path) -> None:
    """Fused layers, averaged copies and pixel-level maps have no one map before a resize:
    asked for, the coarse heatmap is left out rather than approximated."""
    relus = [n.output[0] for n in onnx.load(small_onnx).graph.node if n.op_type == "Relu"]
    for options in (dict(layer=relus), dict(aug_smooth=True), dict(method="guided-gradcam"),
                    dict(method="fullgrad")):
        augmented = augment_model(small_onnx, coarse_heatmap=True, **options)
        assert "coarse_heatmap" not in [o.name for o in augmented.graph.output], options
