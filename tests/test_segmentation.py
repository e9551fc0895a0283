"""A segmentation network explained for a region of its output (score "region"), against torch
autograd: torchvision's LR-ASPP, whose head upsamples through two bilinear Resize ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import zoo
from gradcam_server.augment import AugmentError, augment_model

pytestmark = pytest.mark.slow


class Segmenter(torch.nn.Module):
    """LR-ASPP returning its "out" map alone, [N, 21, H, W]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(zoo.model_seed("lraspp"))
        self.net = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return zoo.calibrate_batch_norms(Segmenter())


@pytest.fixture(scope="module")
def exported(segmenter: Segmenter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("segmentation") / "lraspp.onnx"
    torch.onnx.export(
        segmenter, torch.from_numpy(zoo.sample_batch(2)), str(path), dynamo=False,
        opset_version=17, input_names=["input"], output_names=["out"],
        dynamic_axes={"input": {0: "N"}, "out": {0: "N"}},
    )
    return path


def _backbone_high(segmenter: Segmenter, x: np.ndarray) -> torch.Tensor:
    """The backbone's "high" features (output stride 16) for the images `x`."""
    captured = {}
    hook = segmenter.net.backbone.register_forward_hook(
        lambda module, inputs, output: captured.update(high=output["high"])
    )
    with torch.no_grad():
        segmenter(torch.from_numpy(x))
    hook.remove()
    return captured["high"]


@pytest.mark.parametrize("mask_scale", [1, 2])
def test_region_score_gradients_match_torch(
    segmenter: Segmenter, exported: Path, mask_scale: int
) -> None:
    """The mask given at the output's size, or at half of it (resized in the graph: nearest,
    exact for this block mask)."""
    x = zoo.sample_batch(2)
    layer = zoo.find_matching_tensor(exported, x, _backbone_high(segmenter, x).numpy())

    mask = np.zeros((2, 224, 224), dtype=np.float32)
    mask[0, 60:160, 40:120] = 1
    mask[1, 100:200, 120:220] = 1
    session = zoo.ort_session(
        augment_model(exported, layer=layer, score="region").SerializeToString()
    )
    given = mask[:, ::mask_scale, ::mask_scale]
    out = dict(zip(
        [o.name for o in session.get_outputs()],
        session.run(None, {"input": x, "target_class": np.array([3, -1]), "target_mask": given}),
    ))

    image = torch.from_numpy(x)
    high = {}

    def keep(module, inputs, output):
        output["high"].retain_grad()
        high["value"] = output["high"]

    hook = segmenter.net.backbone.register_forward_hook(keep)
    scores = segmenter(image)
    hook.remove()
    masked = (scores * torch.from_numpy(mask)[:, None]).sum((2, 3))
    classes = [3, int(masked[1].argmax())]
    masked[torch.arange(2), torch.tensor(classes)].sum().backward()
    assert zoo.rel_l2(out["gradients"], high["value"].grad.numpy()) <= 1e-4
    assert out["heatmap"].shape == (2, 224, 224)


def _torch_region_gradients(
    segmenter: Segmenter, x: np.ndarray, weights: torch.Tensor, classes: list[int]
) -> np.ndarray:
    """d (sum of weights[n] * scores[n, classes[n]]) / d p, by torch autograd, for the head's
    coarsest map p = cbr(high) * s with s = scale(high) > 0 (a sigmoid): the gradient reaching
    cbr's output is (d / d p) * s."""
    head, captured = segmenter.net.classifier, {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["cbr"] = output

    hooks = [head.cbr.register_forward_hook(keep), head.scale.register_forward_hook(
        lambda module, inputs, output: captured.update(scale=output.detach()))]
    scores = segmenter(torch.from_numpy(x))
    for hook in hooks:
        hook.remove()
    masked = (scores * weights[:, None]).sum((2, 3))
    masked[torch.arange(len(x)), torch.tensor(classes)].sum().backward()
    return (captured["cbr"].grad / captured["scale"]).numpy()


def test_detected_layer_is_the_coarsest_map_of_the_head(
    segmenter: Segmenter, exported: Path
) -> None:
    """No layer named: the target is the last 14 x 14 map (output stride 16), the head's
    cbr(high) * scale(high) before it is upsampled, not the 1 x 1 pooled scale branch."""
    x = zoo.sample_batch(2)
    head, high = segmenter.net.classifier, _backbone_high(segmenter, x)
    with torch.no_grad():
        coarsest = head.cbr(high) * head.scale(high)
    session = zoo.ort_session(augment_model(exported, score="region").SerializeToString())
    mask = np.ones((2, 224, 224), dtype=np.float32)
    activations = session.run(
        ["activations"], {"input": x, "target_class": np.array([1, 2]), "target_mask": mask}
    )[0]
    assert activations.shape == (2, 128, 14, 14)
    assert zoo.rel_l2(activations, coarsest.numpy()) <= 1e-4


def test_negative_mask_explains_the_predicted_region(
    segmenter: Segmenter, exported: Path
) -> None:
    """An all-negative mask row stands for the pixels predicted as the class (the mask
    pytorch-grad-cam's segmentation tutorial builds); class -1 is then the class with the
    largest predicted area."""
    x = zoo.sample_batch(2)
    session = zoo.ort_session(augment_model(exported, score="region").SerializeToString())
    feeds = {"input": x, "target_mask": np.full((2, 224, 224), -1.0, dtype=np.float32)}
    scores = session.run(["out"], feeds | {"target_class": np.array([0, 0])})[0]
    # The region is the arg-max of the graph's own scores: torch's float32 differs from
    # onnxruntime's at a few near-tied pixels, which would move them between regions.
    predicted = torch.from_numpy(scores.argmax(1))
    areas = torch.stack([torch.bincount(p.flatten(), minlength=21) for p in predicted])
    largest = int(areas[1].argmax())
    present = int(torch.argsort(areas[0], descending=True)[1])  # a class with some pixels
    assert areas[0, present] > 0
    classes = [present, largest]
    weights = torch.stack([(predicted[n] == c).float() for n, c in enumerate(classes)])

    gradients = session.run(["gradients"], feeds | {"target_class": np.array([present, -1])})[0]
    reference = _torch_region_gradients(segmenter, x, weights, classes)
    assert zoo.rel_l2(gradients, reference) <= 1e-4


def test_a_classifier_score_on_a_segmentation_output_is_refused(exported: Path) -> None:
    with pytest.raises(AugmentError, match=r"needs an output \[N, classes\].*region score"):
        augment_model(exported, layer=None, score="logit")
