"""Small torch networks for what the torchvision zoo does not exercise, exported by torch's
TorchScript exporter (opset 17, dynamic batch, input "input", output "logits"):

- `UnfoldedNorms`: batch norms after ReLUs, which no exporter folds into a convolution, so the
  graph keeps BatchNormalization nodes beside convolutions with biases of their own (FullGrad's
  two kinds of biased layers);
- `Curved`: GELU and Tanh between the target layer (`Curved.body`) and the logits, so the
  score's Hessian at the layer is not zero (ShapleyCAM's second-order term).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIZE = 64  # their input's height and width


class UnfoldedNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.BatchNorm2d(16),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Curved(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Sequential(
            nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )
        with torch.no_grad():  # larger pre-activations: GELU and Tanh away from their linear parts
            self.body[2].weight.mul_(5.0)
            self.head[0].weight.mul_(5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """`cls` with seeded weights and batch-norm statistics far from the identity, in eval mode."""
    torch.manual_seed(seed)
    model = cls()
    generator = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.from_numpy(generator.normal(0.5, 0.3, channels)))
            module.running_var.copy_(torch.from_numpy(generator.uniform(0.2, 2.0, channels)))
            module.weight.data.copy_(torch.from_numpy(generator.uniform(0.5, 1.5, channels)))
            module.bias.data.copy_(torch.from_numpy(generator.normal(0.0, 0.5, channels)))
    return model.eval()


def export(model: nn.Module, path: str | Path) -> Path:
    path = Path(path)
    x = torch.zeros(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return path
