"""A heatmap at an image's size, resized from the small map the graph resized.

The graph's heatmap is a map of the target layer's size (7x7 for a 224x224 input) resized to
the input's size (linear, half-pixel) and min-max normalised; the augmented graph also outputs
that small map, normalised alike (``coarse_heatmap``, `cam.coarse_heatmap`). Answering at an
image's own size means one more resize, Pillow's bilinear, of the input-sized heatmap
(`validate.resize`). Both resizes are linear maps along each axis, so the two together are
one small matrix per axis:

    heatmap at the image's size = A_y @ coarse @ A_x.T,    A = Pillow's resize @ the graph's

with A of shape [image size, coarse size]: for a 451x300 photo, 0.03 ms of products against
0.4 ms of Pillow's resize of the 224x224 map, the same values within float rounding. A_y and
A_x are built per (coarse, input, image) size along an axis, and the last 32 kept: the graph's
resize from onnxruntime's formula, Pillow's by resizing an identity matrix along that axis.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

# The longest coarse side `upsample` takes: its products cost about one multiply-add per output
# pixel per coarse column (56 columns: 0.14 ms for 451x300, against Pillow's 0.4 ms). It also
# bounds a matrix to 64 floats per pixel of an image's side.
MAX_COARSE_SIDE = 64
# The longest input side it takes: the identity Pillow resizes stays within 4 MiB, even for a
# model that takes any size (its input is then the photo itself).
MAX_INPUT_SIDE = 1024
CACHED_SIDE = 4096  # image sides whose matrices are kept


def upsample(coarse: np.ndarray, input_hw: tuple[int, int], size: tuple[int, int],
             out: np.ndarray) -> np.ndarray:
    """`coarse` [h, w], as the graph resizes it to `input_hw` (H, W) and Pillow resizes that
    to `size` (width, height), into `out` [height, width] (float32)."""
    (h, w), (height, width) = coarse.shape, input_hw
    rows = _axis(h, height, size[1])
    columns = _axis(w, width, size[0])
    return np.matmul(rows @ coarse, columns.T, out=out)


def upsamples(coarse: np.ndarray, input_hw: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether `upsample` is the cheaper way for a map of `coarse`'s shape: a map smaller than
    the input, by at least a stride of 4, and at most MAX_COARSE_SIDE on a side, of an input
    at most MAX_INPUT_SIDE on a side."""
    return all(side <= min(MAX_COARSE_SIDE, full // 4) and full <= MAX_INPUT_SIDE
               for side, full in zip(coarse.shape, input_hw)) and size != input_hw[::-1]


def _axis(coarse: int, full: int, image: int) -> np.ndarray:
    """A [image, coarse] (float32): the graph's resize coarse -> full, then Pillow's
    full -> image, along one axis. Kept for image sides up to CACHED_SIDE (32 matrices of at
    most 1 MiB); a longer side's is built for its call."""
    if image <= CACHED_SIDE:
        return _cached_axis(coarse, full, image)
    return _axis_matrix(coarse, full, image)


def _axis_matrix(coarse: int, full: int, image: int) -> np.ndarray:
    return (_pillow_bilinear(full, image) @ _graph_linear(coarse, full)).astype(np.float32)


_cached_axis = lru_cache(maxsize=32)(_axis_matrix)


def _graph_linear(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] of ONNX Resize (mode linear, coordinate_transformation_mode half_pixel,
    the output size given) as onnxruntime computes it: each output pixel's centre mapped
    into the input, clamped to its first and last pixel, between its two neighbours."""
    centres = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    left = np.floor(centres).astype(np.intp)
    right = np.minimum(left + 1, n_in - 1)
    weight = centres - left
    matrix = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, left), 1 - weight)
    np.add.at(matrix, (rows, right), weight)
    return matrix


def _pillow_bilinear(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] of Pillow's bilinear resize along one axis (antialiased downwards):
    the identity resized along its rows."""
    identity = Image.fromarray(np.eye(n_in, dtype=np.float32))
    return np.asarray(identity.resize((n_in, n_out), Image.BILINEAR), dtype=np.float64)
