"""A CI subset of benchmarks/zoo.py: transformer-era timm models, augmented with the defaults,
against pytorch-grad-cam at the same layer and torch autograd (tests/zoo_reference.py, the
comparison the benchmark runs).

- DeiT-tiny distilled: tokens with 2 prefix tokens (class, distillation) on a 14 x 14 grid; the
  default layer is the norm in front of the last attention block (pytorch-grad-cam's recipe).
- Swin-T: NHWC blocks; the same recipe gives the last block's norm1, channels last.
- ConvNeXt-atto: a CNN whose head applies LayerNorm to the pooled map; the default layer is the
  last stage's output, before the pooling.

Each model is built and exported once per test session (random weights, BatchNorm calibrated,
tiny layer scales revived: `zoo_reference.build_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import zoo_reference as zr

pytestmark = pytest.mark.slow

# name: (torch module of the default layer, layout, prefix tokens, grid)
EXPECTED = {
    "deit_tiny_distilled_patch16_224": ("blocks.11.norm1", "tokens", 2, "14x14"),
    "swin_tiny_patch4_window7_224": ("layers.3.blocks.1.norm1", "nhwc", None, None),
    "convnext_atto": ("stages.3.blocks.1", "nchw", None, None),
}
CASES = [(name, exporter) for name in EXPECTED for exporter in zr.EXPORTERS]


@functools.cache
def timm_model(name: str) -> torch.nn.Module:
    return zr.build_model("timm", name)


@pytest.fixture(scope="session")
def timm_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``get(name, exporter) -> Path``: each model exported at most once per test session."""
    root = tmp_path_factory.mktemp("timm_zoo")
    paths: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        if (name, exporter) not in paths:
            paths[name, exporter] = zr.export_model(
                timm_model(name), exporter, root / f"{name}-{exporter}.onnx",
                zr.input_size("timm", name),
            )
        return paths[name, exporter]

    return get


@pytest.mark.parametrize(("name", "exporter"), CASES)
def test_default_layer_matches_pytorch_grad_cam(name: str, exporter: str, timm_export) -> None:
    path = timm_export(name, exporter)
    result, _ = zr.compare(timm_model(name), path, zr.input_size("timm", name))
    module, layout, prefix, grid = EXPECTED[name]
    assert result.outcome == "match", result
    assert (result.module, result.layout, result.prefix_tokens, result.grid) == (
        module, layout, prefix, grid
    ), result
    assert result.r >= zr.R_MIN and result.flat_maps < zr.BATCH, result
    assert result.gradient_error <= zr.GRADIENT_RTOL, result
    assert result.activation_error <= zr.VALUE_RTOL, result
