"""`upsample.py`: a coarse map straight to an image's size, against the two resizes it stands
for, computed independently: torch's bilinear upsampling to the model's input size (half-pixel
centres, as the graph's Resize) and then Pillow's bilinear resize to the image's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_server.upsample import upsample, upsamples


def two_resizes(coarse: np.ndarray, input_hw: tuple[int, int], size: tuple[int, int]):
    at_input = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None, None], size=input_hw, mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    return np.asarray(Image.fromarray(at_input).resize(size, Image.BILINEAR))


@pytest.mark.parametrize("coarse_hw, input_hw, size", [
    ((7, 7), (224, 224), (451, 300)),  # the bundled photo on EfficientNet-Lite0
    ((7, 7), (224, 224), (100, 50)),  # smaller than the input: Pillow's antialiased filter
    ((14, 10), (224, 160), (37, 901)),  # neither square, one axis up and one down
    ((8, 8), (32, 32), (33, 31)),
    ((1, 1), (16, 16), (5, 7)),  # a flat map
    ((56, 56), (224, 224), (1000, 667)),
])
def test_upsample_is_the_graphs_resize_then_pillows(coarse_hw, input_hw, size) -> None:
    coarse = np.random.default_rng(sum(size)).random(coarse_hw).astype(np.float32)
    out = np.empty((size[1], size[0]), np.float32)
    result = upsample(coarse, input_hw, size, out)
    assert result is out
    np.testing.assert_allclose(out, two_resizes(coarse, input_hw, size), atol=1e-6)


def test_upsample_only_where_it_is_the_cheaper_way() -> None:
    assert upsamples(np.zeros((7, 7)), (224, 224), (451, 300))
    assert upsamples(np.zeros((56, 56)), (224, 224), (451, 300))  # stride 4
    assert not upsamples(np.zeros((7, 7)), (224, 224), (224, 224))  # the heatmap as it is
    assert not upsamples(np.zeros((57, 56)), (224, 224), (451, 300))  # stride under 4
    assert not upsamples(np.zeros((65, 65)), (1024, 1024), (451, 300))  # a side over 64
    assert not upsamples(np.zeros((32, 32)), (1025, 1024), (451, 300))  # an input over 1024


def test_a_long_sides_matrix_is_built_for_its_call_and_not_kept() -> None:
    """Matrices are cached per size, and a request chooses the size: sides past CACHED_SIDE
    are not kept, so that the cache stays within 32 matrices of at most 1 MiB."""
    from gradcam_server import upsample as module

    module._cached_axis.cache_clear()
    coarse = np.random.default_rng(1).random((7, 7)).astype(np.float32)
    long = (module.CACHED_SIDE + 1, 3)
    out = upsample(coarse, (224, 224), long, np.empty(long[::-1], np.float32))
    np.testing.assert_allclose(out, two_resizes(coarse, (224, 224), long), atol=1e-6)
    assert module._cached_axis.cache_info().currsize == 1  # the short side's only
