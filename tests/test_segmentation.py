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


def test_region_score_gradients_match_torch(segmenter: Segmenter, exported: Path) -> None:
    x = zoo.sample_batch(2)
    captured = {}
    hook = segmenter.net.backbone.register_forward_hook(
        lambda module, inputs, output: captured.update(high=output["high"])
    )
    with torch.no_grad():
        segmenter(torch.from_numpy(x))
    hook.remove()
    layer = zoo.find_matching_tensor(exported, x, captured["high"].numpy())

    mask = np.zeros((2, 224, 224), dtype=np.float32)
    mask[0, 60:160, 40:120] = 1
    mask[1, 100:200, 120:220] = 1
    session = zoo.ort_session(
        augment_model(exported, layer=layer, score="region").SerializeToString()
    )
    out = dict(zip(
        [o.name for o in session.get_outputs()],
        session.run(None, {"input": x, "target_class": np.array([3, -1]), "target_mask": mask}),
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


def test_region_score_needs_a_named_layer(exported: Path) -> None:
    with pytest.raises(AugmentError, match="could not detect a target layer"):
        augment_model(exported, score="region")
