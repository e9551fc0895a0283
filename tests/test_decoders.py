"""Decoder networks: a U-Net whose decoder upsamples through ConvTranspose and concatenates the
encoder's skips, explained with the region score, against torch autograd and pytorch-grad-cam's
SemanticSegmentationTarget on the same weights, through both exporters; and `gradcam-augment`
choosing the region score for a segmentation output as the server does.

The ConvTranspose rule itself (strides, pads, output_padding, dilations, groups, auto_pad,
output_shape) is checked by finite differences in test_rules.py. The U-Net is also served, from
a folder holding only its model.onnx, and explained through KServe with a target mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton
from torch import nn

import servers
import zoo
import zoo_reference
from gradcam_server.augment import augment_model, cli

pytestmark = pytest.mark.slow

SIZE = 64
CLASSES = 4


def _block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out),
        nn.ReLU(), nn.Conv2d(channels_out, channels_out, 3, padding=1),
        nn.BatchNorm2d(channels_out), nn.ReLU(),
    )


class UNet(nn.Module):
    """Three levels (64, 32, 16 pixels at a 64 x 64 input); the two upsamplings are a
    kernel-2 stride-2 ConvTranspose and a kernel-3 stride-2 one with padding and
    output_padding; each decoder level concatenates the encoder's map of its size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(zoo.model_seed("unet"))
        self.encoder1, self.encoder2 = _block(3, 8), _block(8, 16)
        self.bottleneck = _block(16, 32)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.decoder2 = _block(32, 16)
        self.up1 = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1)
        self.decoder1 = _block(16, 8)
        self.head = nn.Conv2d(8, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.encoder1(x)
        skip2 = self.encoder2(nn.functional.max_pool2d(skip1, 2))
        deepest = self.bottleneck(nn.functional.max_pool2d(skip2, 2))
        up = self.decoder2(torch.cat([self.up2(deepest), skip2], dim=1))
        up = self.decoder1(torch.cat([self.up1(up), skip1], dim=1))
        return self.head(up)


@pytest.fixture(scope="module")
def unet() -> UNet:
    return zoo.calibrate_batch_norms(UNet(), size=SIZE)


@pytest.fixture(scope="module")
def exported(unet: UNet, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("decoders")
    return lambda exporter: zoo_reference.export_model(
        unet, exporter, root / exporter / "unet.onnx", SIZE
    )


def _masks() -> np.ndarray:
    mask = np.zeros((2, SIZE, SIZE), dtype=np.float32)
    mask[0, 10:40, 20:50] = 1
    mask[1, 30:60, 5:30] = 1
    return mask


@pytest.mark.parametrize("exporter", zoo_reference.EXPORTERS)
def test_unet_region_score_matches_torch_and_pytorch_grad_cam(
    unet: UNet, exported, exporter: str
) -> None:
    """No layer named: the target is the bottleneck (the coarsest map, 16 x 16); its gradient
    for the masked class score equals torch autograd's, and the heatmap pytorch-grad-cam's."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    path = exported(exporter)
    x, mask, classes = zoo.sample_batch(2, SIZE), _masks(), [1, 3]
    session = zoo.ort_session(augment_model(path, score="region").SerializeToString())
    out = dict(zip(
        [o.name for o in session.get_outputs()],
        session.run(None, {"input": x, "target_class": np.array(classes), "target_mask": mask}),
    ))

    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["bottleneck"] = output

    hook = unet.bottleneck.register_forward_hook(keep)
    scores = unet(torch.from_numpy(x))
    hook.remove()
    masked = (scores * torch.from_numpy(mask)[:, None]).sum((2, 3))
    masked[torch.arange(2), torch.tensor(classes)].sum().backward()
    bottleneck = captured["bottleneck"]
    assert out["activations"].shape == (2, 32, 16, 16)
    assert zoo.rel_l2(out["activations"], bottleneck.detach().numpy()) <= 1e-4
    assert zoo.rel_l2(out["gradients"], bottleneck.grad.numpy()) <= 1e-4

    targets = [SemanticSegmentationTarget(c, m) for c, m in zip(classes, mask)]
    with GradCAM(model=unet, target_layers=[unet.bottleneck]) as cam:
        reference = cam(torch.from_numpy(x), targets=targets)
    lowest, flat = zoo_reference.map_agreement(out["heatmap"], reference)
    assert flat == 0 and lowest >= 0.99, (lowest, flat)


def test_gradcam_augment_picks_the_region_score_for_a_segmentation_output(
    exported, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Without --score, a 4-D output is explained by region (the graph gains
    ``target_mask``), as the server's default; --score logit on it is refused."""
    target = tmp_path / "unet.gradcam.onnx"
    assert cli.main([str(exported("torchscript")), "-o", str(target)]) == 0
    assert "region score" in capsys.readouterr().out
    inputs = {i.name for i in onnx.load(str(target)).graph.input}
    assert {"input", "target_class", "target_mask"} <= inputs

    assert cli.main([str(exported("torchscript")), "-o", str(target), "--score", "logit"]) == 1
    assert "explain it with the region score" in capsys.readouterr().err


def test_served_unet_explains_regions(exported, tmp_path: Path) -> None:
    """Served from a folder holding only model.onnx: the default score of its [N, classes, h, w]
    output is the region, and a KServe request with a target mask gets the heatmap the
    augmented graph computes."""
    repository = tmp_path / "repository"
    (repository / "unet").mkdir(parents=True)
    (repository / "unet" / "model.onnx").symlink_to(exported("torchscript"))
    x, mask = zoo.sample_batch(2, SIZE), _masks()
    expected = zoo.ort_session(augment_model(exported("torchscript"), score="region")
                               .SerializeToString()).run(
        ["heatmap"], {"input": x, "target_class": np.array([1, -1]), "target_mask": mask})[0]
    inputs = []
    for name, value, datatype in (("input", x, "FP32"), ("target_class", np.array([1, -1]),
                                                          "INT64"),
                                  ("target_mask", mask, "FP32")):
        tensor = triton.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    with servers.serving(repository, tmp_path / "server.log") as server:
        result = triton.InferenceServerClient(server.address).infer(
            "unet", inputs, outputs=[triton.InferRequestedOutput("heatmap")])
    np.testing.assert_allclose(result.as_numpy("heatmap"), expected, atol=1e-5)
