"""Several transformed copies of each image explained in one run: test-time augmentation
smoothing (``aug_smooth``), the scaled copies of Integrated Grad-CAM and the patches of SESS.

Test-time augmentation smoothing:

As pytorch-grad-cam 1.5.7 does it: the image goes through 6 transforms (horizontal flip or not,
times 0.9, 1 or 1.1), each transformed image is explained on its own, each map is transformed
back (flipped back) and the maps are averaged; here the mean is min-max normalised again so the
heatmap keeps spanning [0, 1].

In the graph: the image input feeds one batch of all transforms [T*N, ...] into the unchanged
network, so every item of the batch is explained in the same run. A half-precision image is
transformed in float32 and the stack cast back to its type. The model's own outputs, and
the ``activations`` and ``gradients`` outputs, are the rows of the identity transform, so their
meaning and batch size are the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .cam import mean_of_maps
from .graph import GraphBuilder


@dataclass(frozen=True)
class Patch:
    """A window of the model's input size cut from the image resized bilinearly to `size`
    (H', W'; half-pixel centres, as torch's and torchvision's bilinear resize when enlarging),
    its top-left corner at `corner` (y, x) of the resized image."""

    size: tuple[int, int]
    corner: tuple[int, int]


Transform = tuple[bool, float] | Patch  # (flip horizontally, intensity factor), or a patch
FACTORS = (0.9, 1.0, 1.1)
IDENTITY_TRANSFORM: Transform = (False, 1.0)
TRANSFORMS = tuple((flip, factor) for flip in (False, True) for factor in FACTORS)


def integration_transforms(steps: int) -> tuple[Transform, ...]:
    """The identity (for the model's own outputs), then the path x * i / steps, i < steps."""
    return (IDENTITY_TRANSFORM, *((False, i / steps) for i in range(steps)))


def tile_transforms(
    model: onnx.ModelProto,
    image: str,
    width_axis: int,
    transforms: tuple[Transform, ...] = TRANSFORMS,
) -> tuple[str, dict]:
    """Rewire `model` so its network sees the image under every transform, stacked along the
    batch [T*N, ...]; the transforms must include the identity. A `Patch` needs the image's
    static height and width (the axis before `width_axis`).

    Returns the tiled image tensor and, for each original graph output, the name of its tiled
    [T*N, ...] tensor; the original output names then hold the identity transform's rows.
    """
    identity = transforms.index(IDENTITY_TRANSFORM)
    b = GraphBuilder(model, prefix="gradcam/tta")
    tiled = b.fresh("images")
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == image:
                node.input[i] = tiled
    prologue = []
    pixels = image
    if b.compute_type(image) != b.elem_type(image):  # half precision: transform in float32
        pixels = b.fresh("pixels")
        prologue.append(helper.make_node("Cast", [image], [pixels], to=b.compute_type(image),
                                         name=b.fresh("to_float")))
    flipped = b.fresh("flipped")
    prologue.append(helper.make_node(
        "Slice", [pixels, b.ints([-1]), b.ints([-(2**63)]), b.ints([width_axis]),
                  b.ints([-1])], [flipped], name=b.fresh("flip"),
    ))
    parts = []
    for transform in transforms:
        if isinstance(transform, Patch):
            parts.append(_cut_patch(b, image, pixels, width_axis, transform, prologue))
            continue
        flip, factor = transform
        part = b.fresh("transform")
        prologue.append(helper.make_node(
            "Mul", [flipped if flip else pixels, b.const(factor)], [part], name=b.fresh("scale")
        ))
        parts.append(part)
    stacked = tiled if pixels == image else b.fresh("stacked")
    prologue.append(helper.make_node("Concat", parts, [stacked], axis=0, name=b.fresh("tile")))
    if stacked != tiled:  # back to the network's type
        prologue.append(helper.make_node("Cast", [stacked], [tiled], to=b.elem_type(image),
                                         name=b.fresh("to_image_type")))
    for node in reversed(prologue):
        model.graph.node.insert(0, node)

    tiled_outputs = {}
    for output in model.graph.output:
        full = b.fresh("all_transforms")
        for node in model.graph.node:
            for i, name in enumerate(node.output):
                if name == output.name:
                    node.output[i] = full
            for i, name in enumerate(node.input):
                if name == output.name:
                    node.input[i] = full
        model.graph.node.append(
            helper.make_node("Identity", [identity_rows(b, full, image, identity)], [output.name],
                             name=b.fresh("identity_rows"))
        )
        tiled_outputs[output.name] = full
    return tiled, tiled_outputs


def _cut_patch(
    b: GraphBuilder, image: str, pixels: str, width_axis: int, patch: Patch, prologue: list
) -> str:
    """`patch` of `pixels` (`image`, or its float32 cast): Resize to its size, Slice of the
    image's H x W at its corner. The nodes go to `prologue` (they run before the network)."""
    height_axis = width_axis - 1
    dims = b.static_shape(image)
    height, width = dims[height_axis], dims[width_axis]
    first = len(b.graph.node)
    source = pixels
    if patch.size != (height, width):
        sizes = b.op("Concat", [b.shape_slice(pixels, 0, height_axis), b.ints(patch.size),
                                b.shape_slice(pixels, width_axis + 1)], axis=0)
        source = b.op("Resize", [pixels, "", "", sizes], mode="linear",
                      coordinate_transformation_mode="half_pixel")
    (y, x) = patch.corner
    cut = b.op("Slice", [source, b.ints([y, x]), b.ints([y + height, x + width]),
                         b.ints([height_axis, width_axis])])
    prologue.extend(b.graph.node[first:])
    del b.graph.node[first:]
    return cut


def identity_rows(
    b: GraphBuilder, tiled: str, image: str, identity: int = TRANSFORMS.index(IDENTITY_TRANSFORM)
) -> str:
    """The rows [N, ...] of transform number `identity` in a tiled [T*N, ...] tensor."""
    batch = b.shape_slice(image, 0, 1)
    start = b.op("Mul", [batch, b.ints([identity])])
    return b.op("Slice", [tiled, start, b.op("Add", [start, batch]), b.ints([0])])


def tile_rows(b: GraphBuilder, tensor: str, count: int = len(TRANSFORMS)) -> str:
    """A per-item tensor [N, ...] repeated for every transform: [T*N, ...]."""
    return b.op("Concat", [tensor] * count, axis=0)


def merge_maps(b: GraphBuilder, heatmaps: str, image: str) -> str:
    """Per-transform heatmaps [T*N, H, W] flipped back, averaged and renormalised: [N, H, W]."""
    batch = b.shape_slice(image, 0, 1)
    grouped = b.op("Reshape", [heatmaps, b.op("Concat", [b.ints([len(TRANSFORMS)]), batch,
                                                          b.shape_slice(heatmaps, 1)], axis=0)])
    maps = []
    for index, (flip, _) in enumerate(TRANSFORMS):
        one = b.op("Gather", [grouped, b.const(index, np.int64)], axis=0)  # [N, H, W]
        if flip:
            one = b.op("Slice", [one, b.ints([-1]), b.ints([-(2**63)]), b.ints([2]),
                                 b.ints([-1])])
        maps.append(one)
    return mean_of_maps(b, maps)
