"""Every CAM method against pytorch-grad-cam 1.5.7 on the same weights and input, or against
its authors' definition in torch autograd: `REFERENCE_TESTS` names each method's reference test
(tests/test_registry.py checks that every registered method has one, and that it runs it)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torchvision
from pytorch_grad_cam import (
    FEM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    KPCA_CAM,
    LayerCAM,
    SegEigenCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

import small_nets
import zoo
from gradcam_server.augment import (
    AugmentError,
    PixelNormalisation,
    augment_model,
    explained_target,
)
from gradcam_server.augment.factorization import CONCEPTS, NMF_ITERATIONS, initial_factors
from gradcam_server.augment.methods import INTEGRATION_STEPS
from gradcam_server.augment.sess import SESS_SCALES
from gradcam_server.augment.smoothing import IDENTITY_TRANSFORM
from gradcam_server.augment.sess import patches as sess_patches

pytestmark = pytest.mark.slow

REFERENCES = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "hirescam": HiResCAM,
    "gradcam-elementwise": GradCAMElementWise,
    "layercam": LayerCAM,
    "fem": FEM,
    "kpcacam": KPCA_CAM,
}
SUBJECTS = [("resnet18", "torchscript", "layer4"), ("mobilenet_v2", "dynamo", "features")]


class NegatedTarget:
    """The counterfactual score: minus the class logit."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return -output[..., self.category]


def explain(path, x: np.ndarray, classes, **options) -> np.ndarray:
    session = zoo.ort_session(augment_model(path, **options).SerializeToString())
    feeds = {"input": x, "target_class": np.asarray(classes, dtype=np.int64)}
    return session.run(["heatmap"], feeds)[0]


def assert_correlated(ours: np.ndarray, theirs: np.ndarray, minimum: float = 0.99) -> None:
    informative = 0
    for a, b in zip(ours, theirs):
        if np.ptp(b) == 0:
            np.testing.assert_allclose(a, b, atol=1e-6)
            continue
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= minimum
        informative += 1
    assert informative >= 1


@pytest.mark.parametrize(("name", "exporter", "layer"), SUBJECTS)
@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_method_matches_pytorch_grad_cam(name, exporter, layer, method, onnx_zoo) -> None:
    model = zoo.build_torch_model(name)
    x = zoo.sample_batch(2)
    classes = [int(zoo.torch_logits(name, x)[0].argmax()), 7]
    ours = explain(onnx_zoo(name, exporter), x, classes, method=method)
    with REFERENCES[method](model=model, target_layers=[getattr(model, layer)]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(ours, theirs)


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_counterfactual_negates_the_score(method, onnx_zoo) -> None:
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    classes = [7, 11]  # a top-1 class's negated map is often flat: every region supports it
    path = onnx_zoo("resnet18", "torchscript")
    ours = explain(path, x, classes, method=method, counterfactual=True)
    with REFERENCES[method](model=model, target_layers=[model.layer4]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[NegatedTarget(c) for c in classes])
    assert_correlated(ours, theirs)
    factual = explain(path, x, classes, method=method)
    assert not np.allclose(ours, factual, atol=1e-3)


def test_guided_backprop_matches_pytorch_grad_cam_per_image(onnx_zoo) -> None:
    from pytorch_grad_cam import GuidedBackpropReLUModel

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    session = zoo.ort_session(
        augment_model(onnx_zoo("resnet18", "torchscript"), method="guided-backprop")
        .SerializeToString()
    )
    pixels, heatmap = session.run(
        ["pixel_map", "heatmap"], {"input": x, "target_class": np.array(classes)}
    )
    reference = GuidedBackpropReLUModel(model=model, device="cpu")
    for i, category in enumerate(classes):
        theirs = reference(torch.from_numpy(x[i:i + 1]).clone(), target_category=category)
        assert zoo.rel_l2(pixels[i], theirs.transpose(2, 0, 1)) <= 1e-3
        expected = np.abs(pixels[i]).max(axis=0)
        expected = (expected - expected.min()) / (np.ptp(expected) + 1e-7)
        np.testing.assert_allclose(heatmap[i], expected, atol=1e-5)


def test_guided_grad_cam_is_guided_backprop_times_grad_cam(onnx_zoo) -> None:
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    feeds = {"input": x, "target_class": np.array([-1, 7])}
    guided = zoo.ort_session(augment_model(path, method="guided-backprop").SerializeToString())
    combined = zoo.ort_session(augment_model(path, method="guided-gradcam").SerializeToString())
    grad_cam = zoo.ort_session(augment_model(path).SerializeToString())
    expected = guided.run(["pixel_map"], feeds)[0] * grad_cam.run(["heatmap"], feeds)[0][:, None]
    assert zoo.rel_l2(combined.run(["pixel_map"], feeds)[0], expected) <= 1e-4


@pytest.mark.parametrize(("name", "exporter"), [("resnet18", "dynamo"), ("vgg11_bn", "torchscript")])
def test_ablation_cam_matches_the_definition_in_torch(name, exporter, onnx_zoo) -> None:
    """w_k = (y^c - y^c with channel k zeroed) / y^c, the head re-run in torch per channel."""
    model = zoo.build_torch_model(name)
    x = zoo.sample_batch(2)
    classes = [int(zoo.torch_logits(name, x)[0].argmax()), 7]
    ours = explain(onnx_zoo(name, exporter), x, classes, method="ablationcam")
    features_fn, head_fn = zoo.torch_split(name, model)
    with torch.no_grad():
        activations = features_fn(torch.from_numpy(x))
        assert float(activations.min()) == 0.0  # ReLU maps: ablation zeroes the channel
        reference = []
        for i, category in enumerate(classes):
            a = activations[i:i + 1]
            ablated = a.repeat(a.shape[1], 1, 1, 1) * (1 - torch.eye(a.shape[1]))[:, :, None, None]
            original = head_fn(a)[0, category]
            weights = (original - head_fn(ablated)[:, category]) / original
            cam = torch.relu((weights[None, :, None, None] * a).sum(1, keepdim=True))
            cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear",
                                                  align_corners=False)[0, 0]
            reference.append(((cam - cam.min()) / (cam.max() - cam.min() + 1e-7)).numpy())
    assert_correlated(ours, np.stack(reference), minimum=0.999)


def test_ablation_cam_matches_pytorch_grad_cam(onnx_zoo) -> None:
    from pytorch_grad_cam import AblationCAM

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(1)
    ours = explain(onnx_zoo("resnet18", "torchscript"), x, [-1], method="ablationcam")
    category = int(zoo.torch_logits("resnet18", x)[0].argmax())
    with AblationCAM(model=model, target_layers=[model.layer4], batch_size=64) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(category)])
    assert_correlated(ours, theirs)


def sign_fixed_projection_maps(contributions: np.ndarray, size) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection, its sign fixed as ours (largest magnitude positive),
    then the tail: ReLU, bilinear resize, min-max normalisation."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    maps = []
    for projection in get_2d_projection(contributions):
        if projection.max() < -projection.min():
            projection = -projection
        cam = torch.relu(torch.from_numpy(projection)[None, None])
        cam = torch.nn.functional.interpolate(cam, size=size, mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        maps.append((cam - cam.min()) / (cam.max() - cam.min() + 1e-7))
    return np.stack(maps)


@pytest.mark.parametrize(("name", "exporter", "layer"), SUBJECTS)
@pytest.mark.parametrize(
    ("method", "eigen_smooth", "contributions"),
    [
        ("eigencam", False, lambda a, g: a),
        ("eigengradcam", False, lambda a, g: g * a),
        ("gradcam", True, lambda a, g: g.mean(axis=(2, 3), keepdims=True) * a),
        ("layercam", True, lambda a, g: np.maximum(g, 0) * a),
    ],
)
def test_principal_component_projection(
    name, exporter, layer, method, eigen_smooth, contributions, onnx_zoo
) -> None:
    """The SVD's sign is arbitrary, so pytorch-grad-cam's own maps may be our maps' negatives
    before the ReLU: the projection is compared with its sign fixed the same way."""
    x = zoo.sample_batch(2)
    session = zoo.ort_session(
        augment_model(onnx_zoo(name, exporter), method=method, eigen_smooth=eigen_smooth)
        .SerializeToString()
    )
    heatmap, a, g = session.run(["heatmap", "activations", "gradients"],
                                {"input": x, "target_class": np.array([-1, 7])})
    assert_correlated(heatmap, sign_fixed_projection_maps(contributions(a, g), x.shape[2:]))


def resnet18_layer3(model: torch.nn.Module, path, x: np.ndarray) -> str:
    """The ONNX tensor of `path` that holds resnet18's layer3 output for `x`."""
    return resnet18_layer(model, path, x, "layer3")


def resnet18_layer(model: torch.nn.Module, path, x: np.ndarray, layer: str) -> str:
    """The ONNX tensor of `path` that holds the output of resnet18's `layer` for `x`."""
    captured = {}
    hook = getattr(model, layer).register_forward_hook(
        lambda m, i, o: captured.setdefault("a", o))
    with torch.no_grad():
        model(torch.from_numpy(x))
    hook.remove()
    return zoo.find_matching_tensor(path, x, captured["a"].numpy())


def test_seg_eigen_cam_matches_pytorch_grad_cam_where_gradient_signs_vary(onnx_zoo) -> None:
    """Seg-Eigen-CAM against pytorch-grad-cam's SegEigenCAM on resnet18's layer3, where the
    gradients vary over positions and in sign (at the last layer they are one value per
    channel, and |G| * A projects as G * A does); there EigenGradCAM's map (G * A) is
    measurably another."""
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    layer3 = resnet18_layer3(model, path, x)
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    ours = explain(path, x, classes, method="seg-eigencam", layer=layer3)
    with SegEigenCAM(model=model, target_layers=[model.layer3]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(ours, theirs)
    signed = explain(path, x, classes, method="eigengradcam", layer=layer3)
    assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(signed, theirs)) < 0.99


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_several_layers_fused_as_pytorch_grad_cam(method, onnx_zoo) -> None:
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    layer3 = resnet18_layer3(model, path, x)
    layer4 = explained_target(augment_model(path))["layer"]
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    ours = explain(path, x, classes, method=method, layer=[layer3, layer4])
    with REFERENCES[method](model=model, target_layers=[model.layer3, model.layer4]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(ours, theirs)
    single = explain(path, x, classes, method=method, layer=layer4)
    assert not np.allclose(ours, single, atol=1e-3)


def test_score_cam_matches_pytorch_grad_cam(onnx_zoo) -> None:
    """On resnet18's layer2 (128 channels): 128 masked forward passes per image."""
    from pytorch_grad_cam import ScoreCAM

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "dynamo")
    with torch.no_grad():
        layer2 = zoo.torch_mid_split("resnet18", model)[0](torch.from_numpy(x)).numpy()
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    layer = zoo.find_matching_tensor(path, x, layer2)
    ours = explain(path, x, classes, method="scorecam", layer=layer)
    with ScoreCAM(model=model, target_layers=[model.layer2]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(ours, theirs)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "fullgrad", "shapleycam"])
def test_aug_smooth_matches_pytorch_grad_cam(method, onnx_zoo) -> None:
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "dynamo")
    session = zoo.ort_session(augment_model(path, method=method, aug_smooth=True)
                              .SerializeToString())
    feeds = {"input": x, "target_class": np.array([-1, 7])}
    heatmap, logits, activations = session.run(["heatmap", "logits", "activations"], feeds)
    plain = zoo.ort_session(augment_model(path).SerializeToString())
    expected_logits, expected_activations = plain.run(["logits", "activations"], feeds)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(activations, expected_activations, rtol=1e-4, atol=1e-4)
    from pytorch_grad_cam import FullGrad, ShapleyCAM

    reference = {**REFERENCES, "fullgrad": FullGrad, "shapleycam": ShapleyCAM}[method]
    layers = [] if method == "fullgrad" else [model.layer4]
    with reference(model=model, target_layers=layers) as cam:
        # top-1 per transform for the first image, as pytorch-grad-cam does without targets
        first = cam(torch.from_numpy(x[:1]), targets=None, aug_smooth=True)
        second = cam(torch.from_numpy(x[1:]), targets=[ClassifierOutputTarget(7)],
                     aug_smooth=True)
    assert_correlated(heatmap, np.concatenate([first, second]))


def test_integrated_grad_cam_follows_the_authors_definition(onnx_zoo) -> None:
    """Integrated Grad-CAM (Sattarzadeh et al., ICASSP 2021) as the authors' code computes it:
    the ReLU'd Grad-CAM maps of x * i / m (i = 0 .. m - 1, black baseline) for the original
    image's class, summed; here in torch autograd, one scaled copy at a time."""
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    ours = explain(path, x, [-1, 7], method="integrated-gradcam")
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    features_fn, head_fn = zoo.torch_split("resnet18", model)
    reference = []
    for i, category in enumerate(classes):
        total = 0
        for step in range(INTEGRATION_STEPS):
            scaled = torch.from_numpy(x[i:i + 1]) * (step / INTEGRATION_STEPS)
            a = features_fn(scaled)
            (g,) = torch.autograd.grad(head_fn(a)[0, category], a)
            total = total + torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
        cam = torch.nn.functional.interpolate(total.detach(), size=x.shape[2:], mode="bilinear",
                                              align_corners=False)[0, 0]
        reference.append(((cam - cam.min()) / (cam.max() - cam.min() + 1e-7)).numpy())
    assert_correlated(ours, np.stack(reference), minimum=0.999)
    plain = explain(path, x, [-1, 7], method="gradcam")
    assert not np.allclose(ours, plain, atol=1e-2)  # the path changes the map


def torch_group_cam(model, split, x: torch.Tensor, category: int) -> np.ndarray:
    """Group-CAM (Zhang et al., 2021) for one image, step by step as the authors' code does it:
    32 torch.chunk groups of the Grad-CAM weighted channels, each ReLU'd sum kept above its
    70th percentile (numpy), upsampled, normalised, skipped when flat, and scored by the softmax
    gain of keeping it sharp over a 51 x 51, sigma 50 Gaussian blur with reflected borders."""
    features_fn, head_fn = split
    a = features_fn(x)
    (g,) = torch.autograd.grad(head_fn(a)[0, category], a)
    weighted = (g.mean((2, 3), keepdim=True) * a).detach()
    offsets = torch.arange(51, dtype=torch.float64) - 25
    kernel = torch.exp(-offsets**2 / (2 * 50.0**2))
    kernel = (kernel / kernel.sum()).float()

    def blur(image: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(image, (25, 25, 0, 0), mode="reflect")
        image = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, 51).repeat(3, 1, 1, 1),
                                           groups=3)
        padded = torch.nn.functional.pad(image, (0, 0, 25, 25), mode="reflect")
        return torch.nn.functional.conv2d(padded, kernel.view(1, 1, 51, 1).repeat(3, 1, 1, 1),
                                          groups=3)

    with torch.no_grad():
        soft = blur(x)
        baseline = torch.softmax(model(soft), -1)[0, category]
        total = torch.zeros(1, 1, *x.shape[2:])
        for group in weighted.chunk(32, 1):
            mask = torch.relu(group.sum(1, keepdim=True))
            threshold = np.percentile(mask.numpy(), 70)
            mask = torch.where(mask > threshold, mask, torch.zeros_like(mask))
            mask = torch.nn.functional.interpolate(mask, size=x.shape[2:], mode="bilinear",
                                                   align_corners=False)
            if mask.max() == mask.min():
                continue
            mask = (mask - mask.min()) / (mask.max() - mask.min())
            gain = torch.softmax(model(x * mask + soft * (1 - mask)), -1)[0, category] - baseline
            total += gain * mask
        total = torch.relu(total)[0, 0]
    return ((total - total.min()) / (total.max() - total.min() + 1e-7)).numpy()


def test_group_cam_follows_the_authors_definition(onnx_zoo) -> None:
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    ours = explain(onnx_zoo("resnet18", "torchscript"), x, [classes[0], 7], method="groupcam")
    split = zoo.torch_split("resnet18", model)
    reference = np.stack([
        torch_group_cam(model, split, torch.from_numpy(x[i:i + 1]), c)
        for i, c in enumerate(classes)
    ])
    assert_correlated(ours, reference, minimum=0.99)
    assert not np.allclose(ours, explain(onnx_zoo("resnet18", "torchscript"), x, classes),
                           atol=1e-2)


def test_finer_cam_matches_pytorch_grad_cam(onnx_zoo) -> None:
    """Finer-CAM against pytorch-grad-cam's FinerCAM (Grad-CAM base, comparison ranks 1-3,
    alpha 1), one image at a time as its target_idx is one class for the batch; a rank (-2)
    is resolved in the session. The comparison classes matter: the maps are measurably not
    Grad-CAM's of the class logit."""
    from pytorch_grad_cam.finer_cam import FinerCAM

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(3)
    logits = zoo.torch_logits("resnet18", x)
    path = onnx_zoo("resnet18", "torchscript")
    ours = explain(path, x, [-1, 7, -2], method="finercam")
    classes = [int(logits[0].argmax()), 7, int(np.argsort(logits[2])[-2])]
    with FinerCAM(model=model, target_layers=[model.layer4]) as cam:
        theirs = np.concatenate([cam(torch.from_numpy(x[i:i + 1]), target_idx=c)
                                 for i, c in enumerate(classes)])
    assert_correlated(ours, theirs, minimum=0.999)
    plain = explain(path, x, classes, method="gradcam")
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, plain)]
    assert max(correlations) < 0.99 and min(correlations) < 0.9


def test_finer_cam_refuses_another_score(onnx_zoo) -> None:
    with pytest.raises(AugmentError, match="finercam compares the class logit"):
        augment_model(onnx_zoo("resnet18", "torchscript"), method="finercam",
                      score="probability")


def shared_tail(raw: torch.Tensor, size) -> np.ndarray:
    """pytorch-grad-cam's tail on raw maps [N, 1, h, w]: ReLU, bilinear resize (half-pixel
    centres), min-max normalisation with its 1e-7: [N, H, W]."""
    cam = torch.nn.functional.interpolate(torch.relu(raw), size=size, mode="bilinear",
                                          align_corners=False)[:, 0]
    low = cam.amin((1, 2), keepdim=True)
    return ((cam - low) / ((cam - low).amax((1, 2), keepdim=True) + 1e-7)).numpy()


def test_random_cam_is_the_shared_tail_of_uniform_random_weights(onnx_zoo) -> None:
    """RandomCAM cannot match a reference map: its weights (the RandomUniformLike's output,
    exposed here) are checked instead: uniform on [-1, 1] (Kolmogorov-Smirnov), drawn anew for
    every row and run (onnxruntime did not fold the draw), and the heatmap is pytorch-grad-cam's
    tail of sum_k w_k A^k. Over 8 photos and 5 runs its maps are no closer to Grad-CAM's than
    chance, where Grad-CAM++'s clearly are."""
    from onnx import TensorProto, helper
    from scipy.stats import kstest

    path = onnx_zoo("resnet18", "torchscript")
    augmented = augment_model(path, method="randomcam")
    (draw,) = [n for n in augmented.graph.node if n.op_type == "RandomUniformLike"]
    augmented.graph.output.append(
        helper.make_tensor_value_info(draw.output[0], TensorProto.FLOAT, None))
    session = zoo.ort_session(augmented.SerializeToString())
    x = zoo.sample_batch(8)
    feeds = {"input": x, "target_class": np.full(len(x), -1)}
    runs = [session.run(["heatmap", "activations", draw.output[0]], feeds) for _ in range(5)]
    weights = np.stack([w for _, _, w in runs])  # [runs, N, C, 1, 1]
    assert weights.shape[1:] == (len(x), 512, 1, 1)
    assert weights.min() >= -1.0 and weights.max() <= 1.0
    assert kstest(weights.ravel(), "uniform", args=(-1, 2)).statistic < 0.02
    assert abs(weights.mean()) < 0.03 and abs(weights.std() - 1 / np.sqrt(3)) < 0.02
    assert not np.allclose(weights[0, 0], weights[0, 1])  # rows differ
    assert not np.allclose(weights[0], weights[1])  # runs differ
    for heatmap, activations, w in runs:
        raw = torch.from_numpy((w * activations).sum(1, keepdims=True))
        np.testing.assert_allclose(heatmap, shared_tail(raw, x.shape[2:]), atol=1e-5)

    def mean_correlation(maps, reference) -> float:
        return float(np.mean([np.corrcoef(a.ravel(), b.ravel())[0, 1]
                              for a, b in zip(maps, reference) if np.ptp(a) > 0]))

    grad_cam = explain(path, x, [-1] * len(x))
    chance = mean_correlation(np.concatenate([h for h, _, _ in runs]), np.tile(grad_cam, (5, 1, 1)))
    assert abs(chance) < 0.2
    assert mean_correlation(explain(path, x, [-1] * len(x), method="gradcam++"), grad_cam) > 0.4


@pytest.mark.parametrize("pixels", [
    PixelNormalisation(),  # ImageNet's, the default
    PixelNormalisation(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=1.0,
                       channel_order="BGR"),  # Caffe's
])
def test_sobel_matches_pytorch_grad_cam_on_the_photo(pixels, onnx_zoo) -> None:
    """The Sobel baseline against pytorch-grad-cam's sobel_cam (cv2) on the 8-bit RGB photos
    themselves, while the graph is given them normalised as the model's preprocessing says:
    the pixels are recovered in the graph (their |derivatives| saturate at 255 as cv2's, on up
    to 6 % of these photos' pixels)."""
    from PIL import Image
    from pytorch_grad_cam.sobel_cam import sobel_cam

    photos = [np.asarray(zoo._photo(name).resize((224, 224), Image.BILINEAR))
              for name in ("astronaut.png", "motorcycle_left.png", "coffee.png", "chelsea.png")]
    channels = [2, 1, 0] if pixels.channel_order == "BGR" else [0, 1, 2]
    x = np.stack([((photo[..., channels] * pixels.scale - np.asarray(pixels.mean))
                   / np.asarray(pixels.std)).transpose(2, 0, 1) for photo in photos])
    session = zoo.ort_session(augment_model(onnx_zoo("resnet18", "torchscript"), method="sobel",
                                            pixels=pixels).SerializeToString())
    (ours,) = session.run(["heatmap"], {"input": x.astype(np.float32),
                                        "target_class": np.full(len(x), -1)})
    assert_correlated(ours, np.stack([sobel_cam(photo).astype(np.float32) for photo in photos]),
                      minimum=0.999)
    assert all(row.min() == 0.0 and row.max() > 0.99 for row in ours)


@pytest.mark.parametrize("layers", [("layer3", "layer4"), ("layer2", "layer3", "layer4")])
def test_refine_cam_matches_pytorch_grad_cam(layers, onnx_zoo) -> None:
    """RefineCAM against pytorch-grad-cam's RefineCAM (Grad-CAM++ base) on two and three of
    resnet18's layers: the product is measurably not the maps' mean, and with one layer it is
    that layer's Grad-CAM++ map."""
    from pytorch_grad_cam.refine_cam import RefineCAM

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    tensors = [resnet18_layer(model, path, x, layer) for layer in layers]
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    ours = explain(path, x, classes, method="refinecam", layer=tensors)
    cam = RefineCAM(model=model, target_layers=[getattr(model, n) for n in layers])
    theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    for base in cam.base_cam_per_layer:  # RefineCAM is no context manager: unhook its bases
        base.activations_and_grads.release()
    assert_correlated(ours, theirs, minimum=0.999)
    mean = explain(path, x, classes, method="gradcam++", layer=tensors)
    assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, mean)) < 0.98
    np.testing.assert_allclose(explain(path, x, classes, method="refinecam", layer=tensors[-1]),
                               explain(path, x, classes, method="gradcam++", layer=tensors[-1]),
                               atol=1e-6)


def test_sobel_takes_the_preprocessing_on_the_command_line(tmp_path, onnx_zoo) -> None:
    """gradcam-augment's --mean, --std, --scale and --channel-order give augment_model's
    pixels: the same map as the API's, another than the default's (ImageNet's)."""
    from gradcam_server.augment.cli import main as augment_command

    path, target = onnx_zoo("resnet18", "torchscript"), tmp_path / "sobel.onnx"
    caffe = ["--mean", "104,117,123", "--std", "1,1,1", "--scale", "1", "--channel-order", "BGR"]
    assert augment_command([str(path), "-o", str(target), "--method", "sobel", *caffe]) == 0
    x = np.asarray(zoo._photo("astronaut.png").resize((224, 224)), dtype=np.float32)
    x = (x[None, ..., ::-1] - np.array([104.0, 117.0, 123.0], np.float32)).transpose(0, 3, 1, 2)
    feeds = {"input": np.ascontiguousarray(x), "target_class": np.array([-1])}
    (command_line,) = zoo.ort_session(str(target)).run(["heatmap"], feeds)
    pixels = PixelNormalisation(mean=(104.0, 117.0, 123.0), std=(1.0, 1.0, 1.0), scale=1.0,
                                channel_order="BGR")
    (api,) = zoo.ort_session(augment_model(path, method="sobel", pixels=pixels)
                             .SerializeToString()).run(["heatmap"], feeds)
    np.testing.assert_allclose(command_line, api, atol=1e-6)
    (default,) = zoo.ort_session(augment_model(path, method="sobel").SerializeToString()).run(
        ["heatmap"], feeds)
    assert not np.allclose(command_line, default, atol=1e-2)
def small_net(cls, tmp_path):
    """A `small_nets` network, its export and two photos at its size."""
    model = small_nets.build(cls)
    return model, small_nets.export(model, tmp_path / f"{cls.__name__}.onnx"), \
        zoo.sample_batch(2, small_nets.SIZE)


@pytest.mark.parametrize("subject", ["resnet18", "unfolded-norms"])
def test_full_grad_matches_pytorch_grad_cam(subject, onnx_zoo, tmp_path) -> None:
    """On resnet18, whose batch norms the exporter folds into its convolutions (the folded
    bias stands where torch's batch-norm term is), and on a network whose graph keeps
    BatchNormalization nodes beside convolutions with biases of their own. The target layer
    takes no part in the map: another layer gives the same heatmap."""
    from pytorch_grad_cam import FullGrad

    if subject == "resnet18":
        model, path, x = zoo.build_torch_model("resnet18"), onnx_zoo("resnet18", "torchscript"), \
            zoo.sample_batch(2)
    else:
        model, path, x = small_net(small_nets.UnfoldedNorms, tmp_path)
        assert "BatchNormalization" in zoo.op_types(path)
    with torch.no_grad():
        classes = [int(model(torch.from_numpy(x))[0].argmax()), 7]
    ours = explain(path, x, classes, method="fullgrad")
    with FullGrad(model=model, target_layers=[]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(ours, theirs)
    grad_cam = explain(path, x, classes, method="gradcam")
    assert min(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(grad_cam, theirs)) < 0.9
    if subject == "unfolded-norms":
        with torch.no_grad():
            early = model.features[:3](torch.from_numpy(x)).numpy()
        layer = zoo.find_matching_tensor(path, x, early)
        np.testing.assert_allclose(explain(path, x, classes, method="fullgrad", layer=layer),
                                   ours, atol=1e-6)


def test_full_grad_eigen_smooth_matches_pytorch_grad_cam(onnx_zoo) -> None:
    """eigen_smooth projects the image's channels and the layers' maps on their first
    principal component. Its sign is LAPACK's choice in pytorch-grad-cam and ours makes the
    projection's largest magnitude positive; the projection is centred, so that is where the
    normalised map's mean (the value of 0) is at most 1/2: the reference is turned, m -> 1 - m,
    where it is not."""
    from pytorch_grad_cam import FullGrad

    model, path, x = zoo.build_torch_model("resnet18"), onnx_zoo("resnet18", "torchscript"), \
        zoo.sample_batch(2)
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    ours = explain(path, x, classes, method="fullgrad", eigen_smooth=True)
    with FullGrad(model=model, target_layers=[]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes],
                     eigen_smooth=True)
    signed = np.where(theirs.mean(axis=(1, 2), keepdims=True) <= 0.5, theirs, 1 - theirs)
    assert_correlated(ours, signed)
    plain = explain(path, x, classes, method="fullgrad")
    assert not np.allclose(ours, plain, atol=1e-2)


def curved_layer(model, path, x: np.ndarray) -> str:
    """The ONNX tensor holding `small_nets.Curved`'s body output (its GELU) for `x`."""
    with torch.no_grad():
        return zoo.find_matching_tensor(path, x, model.body(torch.from_numpy(x)).numpy())


@pytest.mark.parametrize("subject", ["resnet18-probability", "curved-logit"])
def test_shapley_cam_matches_pytorch_grad_cam(subject, onnx_zoo, tmp_path) -> None:
    """Where the score has curvature after the target layer (a ReLU network's logit has none
    there, and ShapleyCAM is Grad-CAM): resnet18's softmax probability at layer4, and a network
    with GELU and Tanh after the layer, explaining its logit."""
    from pytorch_grad_cam import ShapleyCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    if subject == "resnet18-probability":
        model, path, x = zoo.build_torch_model("resnet18"), onnx_zoo("resnet18", "torchscript"), \
            zoo.sample_batch(2)
        options, target_layer, target = {"score": "probability"}, model.layer4, \
            ClassifierOutputSoftmaxTarget
    else:
        model, path, x = small_net(small_nets.Curved, tmp_path)
        options, target_layer, target = {"layer": curved_layer(model, path, x)}, model.body, \
            ClassifierOutputTarget
    with torch.no_grad():
        classes = [int(model(torch.from_numpy(x))[0].argmax()), 7]
    ours = explain(path, x, classes, method="shapleycam", **options)
    with ShapleyCAM(model=model, target_layers=[target_layer]) as cam:
        theirs = cam(torch.from_numpy(x), targets=[target(c) for c in classes])
    assert_correlated(ours, theirs)


def test_shapley_cam_on_tokens_follows_the_definition_in_torch(tmp_path) -> None:
    """On a ViT's tokens [N, T, C] (the class token before an 8 x 8 grid; pytorch-grad-cam
    1.5.7's ShapleyCAM cannot reshape tokens): H A is taken over all tokens, as torch's
    autograd.grad(g, A, grad_outputs=A) on the raw layer, then both it and g are viewed as the
    patch grid, as pytorch-grad-cam's reshape_transform views them. Here the Hessian term
    moves the map measurably away from Grad-CAM's."""
    import servers
    from test_served_layouts import GRID, SIZE, TinyViT

    torch.manual_seed(0)
    model = TinyViT().eval()
    path = servers.export_torch(model, SIZE, tmp_path / "vit.onnx", dynamic_batch=True)
    x = zoo.sample_batch(2, SIZE)
    classes = [3, 7]
    ours = explain(path, x, classes, method="shapleycam")  # the default layer: blocks.1.norm1

    captured = {}
    hook = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    logits = model(torch.from_numpy(x))
    hook.remove()
    a = captured["a"]
    (g,) = torch.autograd.grad(logits[torch.arange(2), classes].sum(), a, create_graph=True)
    (hessian_a,) = torch.autograd.grad(g, a, grad_outputs=a.detach())

    def grid(tokens: torch.Tensor) -> np.ndarray:
        patches = tokens.detach()[:, 1:].reshape(len(tokens), GRID, GRID, -1)
        return patches.permute(0, 3, 1, 2).numpy()

    def cam(gradients: torch.Tensor) -> np.ndarray:
        return grad_cam_of(torch.from_numpy(grid(a)), torch.from_numpy(grid(gradients)), SIZE)

    assert_correlated(ours, cam(g - 0.5 * hessian_a), minimum=0.999)
    assert min(np.corrcoef(o.ravel(), r.ravel())[0, 1] for o, r in zip(ours, cam(g))) < 0.995


def grad_cam_of(a: torch.Tensor, gradients: torch.Tensor, size: int) -> np.ndarray:
    """Grad-CAM's map of a layer [N, C, h, w] for the given gradients, as pytorch-grad-cam
    computes it (ReLU, min-max with 1e-7, cv2's bilinear resize): [N, size, size]."""
    import cv2

    weights = gradients.detach().numpy().mean(axis=(2, 3), keepdims=True)
    maps = np.maximum((weights * a.detach().numpy()).sum(axis=1), 0)
    maps = maps - maps.min(axis=(1, 2), keepdims=True)
    maps = maps / (maps.max(axis=(1, 2), keepdims=True) + 1e-7)
    return np.stack([cv2.resize(m.astype(np.float32), (size, size)) for m in maps])


def test_shapley_cam_of_a_detection_follows_the_definition_in_torch(tmp_path) -> None:
    """A detection's score (its class's sigmoid probability plus the IoU of its box with a
    reference box, both curved in the last feature map), against torch autograd: the second
    reverse pass walks the detection seeds' own nodes too, and onnx's shape inference stops
    inside the first pass (a Split with computed sizes), where the ranks are propagated."""
    from test_detection import TinyHeads, run

    model = TinyHeads("per-class").eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(model, (torch.from_numpy(x),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["scores", "boxes"],
                      dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}, "boxes": {0: "N"}})
    box, chosen = np.array([6.0, 6.0, 18.0, 16.0], np.float32), [(21, 1), (17, 2)]
    rows = ([c for _, c in chosen], [anchor for anchor, _ in chosen], [box, box])
    ours = run(augment_model(path, score="detection", method="shapleycam"), x, *rows)["heatmap"]

    captured = {}
    hook = model.features.register_forward_hook(lambda m, i, o: captured.setdefault("a", o))
    scores, boxes = model(torch.from_numpy(x))
    hook.remove()
    reference = torch.from_numpy(box[None])
    total = sum(scores[n, i, c] + torchvision.ops.box_iou(boxes[n, i, c][None], reference)[0, 0]
                for n, (i, c) in enumerate(chosen))
    a = captured["a"]
    (g,) = torch.autograd.grad(total, a, create_graph=True)
    (hessian_a,) = torch.autograd.grad(g, a, grad_outputs=a.detach())
    shapley, grad_cam = grad_cam_of(a, g - 0.5 * hessian_a, 32), grad_cam_of(a, g, 32)
    assert_correlated(ours, shapley, minimum=0.999)
    # the Hessian term is small here: what it changes must be what it changes in torch
    ours_grad_cam = run(augment_model(path, score="detection", method="gradcam"), x,
                        *rows)["heatmap"]
    assert np.abs(shapley - grad_cam).max() > 0.01
    assert_correlated(ours - ours_grad_cam, shapley - grad_cam, minimum=0.99)


def test_hessian_vector_product_matches_torch_autograd(tmp_path) -> None:
    """H A, ShapleyCAM's second-order term, by reverse-over-reverse through our rules, against
    torch's autograd.grad(g, A, grad_outputs=A) with g built with create_graph=True."""
    from onnx import TensorProto

    from gradcam_server.augment.graph import GraphBuilder
    from gradcam_server.augment.hessian import hessian_vector_product
    from gradcam_server.augment.targets import append_backward

    model, path, x = small_net(small_nets.Curved, tmp_path)
    layer = curved_layer(model, path, x)
    classes = [2, 7]
    proto = onnx.load(str(path))
    b = GraphBuilder(proto)
    seed = b.const(np.eye(10, dtype=np.float32)[classes])
    gradient = append_backward(b, {"logits": seed}, [layer])[layer]
    product = hessian_vector_product(b, layer, gradient, layer)
    b.add_output(product, "hessian_a", TensorProto.FLOAT, [2, 32, None, None])
    ours = zoo.ort_session(proto.SerializeToString()).run(["hessian_a"], {"input": x})[0]

    a = model.body(torch.from_numpy(x)).detach().requires_grad_(True)
    score = model.head(a)[torch.arange(2), classes].sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    (theirs,) = torch.autograd.grad(g, a, grad_outputs=a.detach())
    assert zoo.rel_l2(ours, theirs.numpy()) <= 1e-4
    assert np.abs(theirs.numpy()).mean() >= 0.1 * np.abs(g.detach().numpy()).mean()


# Each method's reference test: parametrized over the method, or augmenting with it by name.
def test_sess_matches_pytorch_grad_cam(onnx_zoo) -> None:
    """pytorch-grad-cam's SESS with Grad-CAM as its base method and the same scales (its
    defaults otherwise: window and stride the input's 224, theta 0, mean pooling, the 11 x 11
    blur): its patches are cut from torchvision's antialiased bilinear resize and pasted back
    with cv2.resize, ours by ONNX Resize (half-pixel bilinear) in one batch."""
    from pytorch_grad_cam.sess import SESS

    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    path = onnx_zoo("resnet18", "torchscript")
    session = zoo.ort_session(augment_model(path, method="sess").SerializeToString())
    feeds = {"input": x, "target_class": np.array([-1, 7])}
    heatmap, logits = session.run(["heatmap", "logits"], feeds)
    np.testing.assert_allclose(logits, zoo.torch_logits("resnet18", x), rtol=1e-3, atol=1e-3)
    classes = [int(logits[0].argmax()), 7]
    with SESS(model=model, target_layers=[model.layer4], num_scales=SESS_SCALES) as cam:
        theirs = cam(torch.from_numpy(x), targets=[ClassifierOutputTarget(c) for c in classes])
    assert_correlated(heatmap, theirs, minimum=0.999)
    plain = explain(path, x, classes, method="gradcam")
    assert max(np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(plain, theirs)) < 0.9


def test_sess_patches_and_refusals(tmp_path) -> None:
    """The windows of pytorch-grad-cam's SESS for a square input, and a clear refusal where
    the input's size is not fixed or the score is not the class logit."""
    from pytorch_grad_cam.sess import window_starts as reference_starts

    found = [((224, 224), (0, 0)) if p == IDENTITY_TRANSFORM else (p.size, p.corner)
             for p in sess_patches(224, 224, 12)]
    expected = [((side, side), (y, x)) for side in range(224, 224 + 64 * 12, 64)
                for y in reference_starts(side, 224, 224) for x in reference_starts(side, 224, 224)]
    assert found == expected and len(found) == 122
    assert len(sess_patches(224, 224)) == len(sess_patches(320, 480)) == 13
    model = zoo.build_torch_model("resnet18")
    path = tmp_path / "dynamic.onnx"
    torch.onnx.export(model, torch.from_numpy(zoo.sample_batch(1)), str(path),
                      input_names=["input"], output_names=["logits"], dynamo=False,
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(AugmentError, match="needs a fixed height and width"):
        augment_model(path, method="sess")
    with pytest.raises(AugmentError, match="class logit only"):
        augment_model(path, method="sess", score="probability")


class SameStartNMF:
    """scikit-learn's NMF with our factorisation's settings, in place of the one
    pytorch-grad-cam's DFF builds (``NMF(n_components, init="random", random_state=0)``):
    multiplicative updates for the Frobenius norm, NMF_ITERATIONS of them (tol 0), from our
    documented start avg * U (`factorization.initial_factors`) in place of the random one."""

    def __init__(self, n_components: int, **_ignored) -> None:
        self.n_components = n_components

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        from sklearn.decomposition import NMF

        u_w, u_h = initial_factors(x.shape[0], x.shape[1], self.n_components)
        average = np.sqrt(x.mean() / self.n_components)
        nmf = NMF(self.n_components, init="custom", solver="mu", max_iter=NMF_ITERATIONS,
                  tol=0)
        w = nmf.fit_transform(x, W=(average * u_w).astype(x.dtype),
                              H=(average * u_h).astype(x.dtype))
        self.components_ = nmf.components_
        return w


def test_deep_feature_factorization_matches_pytorch_grad_cam(monkeypatch, onnx_zoo) -> None:
    """pytorch-grad-cam's DeepFeatureFactorization on resnet18's layer4 with its classifier
    (model.fc) as the computation on the concepts, one image at a time, scikit-learn's NMF
    run as ours (`SameStartNMF`): the concepts' softmax scores for the class are
    ``concept_scores``, and the heatmap is the map of the concept scoring highest."""
    from pytorch_grad_cam.feature_factorization import deep_feature_factorization as reference

    monkeypatch.setattr(reference, "NMF", SameStartNMF)
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(2)
    session = zoo.ort_session(augment_model(onnx_zoo("resnet18", "torchscript"), method="dff")
                              .SerializeToString())
    heatmap, scores = session.run(["heatmap", "concept_scores"],
                                  {"input": x, "target_class": np.array([-1, 7])})
    classes = [int(zoo.torch_logits("resnet18", x)[0].argmax()), 7]
    expected_maps, expected_scores = [], []
    for i, category in enumerate(classes):
        dff = reference.DeepFeatureFactorization(model=model, target_layer=model.layer4,
                                                 computation_on_concepts=model.fc)
        _, maps, outputs = dff(torch.from_numpy(x[i:i + 1]), CONCEPTS)
        probabilities = torch.softmax(torch.from_numpy(outputs), dim=-1).numpy()[:, category]
        expected_scores.append(probabilities)
        expected_maps.append(maps[0][probabilities.argmax()])
    np.testing.assert_allclose(scores, np.stack(expected_scores), rtol=1e-3)
    assert_correlated(heatmap, np.stack(expected_maps), minimum=0.999)


def test_deep_feature_factorization_refuses_a_layer_the_classifier_does_not_pool(
    onnx_zoo,
) -> None:
    model = zoo.build_torch_model("resnet18")
    x = zoo.sample_batch(1)
    path = onnx_zoo("resnet18", "torchscript")
    with pytest.raises(AugmentError, match="global average pooling"):
        augment_model(path, method="dff", layer=resnet18_layer3(model, path, x))
    with pytest.raises(AugmentError, match="class logit only"):
        augment_model(path, method="dff", score="probability")


REFERENCE_TESTS = {
    **{method: test_method_matches_pytorch_grad_cam for method in REFERENCES},
    "eigencam": test_principal_component_projection,
    "eigengradcam": test_principal_component_projection,
    "seg-eigencam": test_seg_eigen_cam_matches_pytorch_grad_cam_where_gradient_signs_vary,
    "ablationcam": test_ablation_cam_matches_pytorch_grad_cam,
    "scorecam": test_score_cam_matches_pytorch_grad_cam,
    "groupcam": test_group_cam_follows_the_authors_definition,
    "integrated-gradcam": test_integrated_grad_cam_follows_the_authors_definition,
    "sess": test_sess_matches_pytorch_grad_cam,
    "dff": test_deep_feature_factorization_matches_pytorch_grad_cam,
    "finercam": test_finer_cam_matches_pytorch_grad_cam,
    "randomcam": test_random_cam_is_the_shared_tail_of_uniform_random_weights,
    "sobel": test_sobel_matches_pytorch_grad_cam_on_the_photo,
    "refinecam": test_refine_cam_matches_pytorch_grad_cam,
    "guided-backprop": test_guided_backprop_matches_pytorch_grad_cam_per_image,
    "guided-gradcam": test_guided_grad_cam_is_guided_backprop_times_grad_cam,
    "fullgrad": test_full_grad_matches_pytorch_grad_cam,
    "shapleycam": test_shapley_cam_matches_pytorch_grad_cam,
}
