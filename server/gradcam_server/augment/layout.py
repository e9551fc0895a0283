"""The layout of a target layer, and its CNN-shaped view [N, C, h, w] built in ONNX ops.

Every CAM method works on a feature map [N, C, h, w]. Target tensors come in three layouts:

- ``nchw``:   [N, C, h, w], a CNN's feature map (the view is the tensor itself);
- ``nhwc``:   [N, h, w, C], channels last (Swin's blocks, ConvNeXt's LayerNorm): transposed;
- ``tokens``: [N, T, C] with T = prefix + h * w (ViT, DeiT, BEiT: class, distillation and register
  tokens first, then the patches row by row): the prefix tokens are sliced off, the patches
  reshaped to [N, h, w, C] and transposed, as pytorch-grad-cam's ``reshape_transform`` does.

The view is linear, so the gradient of the view is the view of the gradient: the backward pass
runs to the raw tensor and both are viewed alike.

Detection reads the graph; sizes only confirm it, or decide a grid no Conv shows:

- rank 4: the ops that produce and consume the tensor (and the element-wise ops around it) say
  where its channels are: Conv, BatchNormalization, pooling and ReduceMean over (2, 3) mean NCHW;
  LayerNormalization over the last axis, a MatMul with a weight matrix, ReduceMean over (1, 2) and
  a Transpose (0, 3, 1, 2) mean NHWC. No evidence, or evidence both ways, is refused.
- rank 3: tokens. The grid is the patch embedding's: the last Conv output [N, C, h, w] the tokens
  are computed from; prefix = T - h * w. Sizes are static where shape inference knows them and
  read with Shape at run time otherwise. Without a Conv (patches cut by reshapes and embedded by
  a Linear), the grid is the one that tiles the static input size with T - prefix patches, if
  exactly one does.
- a detected layout whose grid does not cover a static image with one stride along both axes
  (attention's [N, heads, T, d] read as a map) is refused; so is a given layout or grid that
  the graph refutes.

A view always checks at run time that the tensor's dim 0 is the image batch (a Reshape to the
batch of the image fails otherwise), so a tensor whose dim 0 is not the batch (attention's
[T, N, ...], windows [N * windows, ...]) fails loudly instead of giving a wrong map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from onnx import helper

from .backward import ancestors
from .errors import AugmentError
from .graph import GraphBuilder, axes_are_input

LAYOUTS = ("nchw", "nhwc", "tokens")
MAX_PREFIX_TOKENS = 64  # class, distillation and register tokens; more is not a patch grid
MAX_INFERRED_PREFIX = 8  # the most prefix tokens a grid is inferred with from the input size

# Ops whose output has the layout of their (first) input: evidence flows through them.
_LAYOUT_PRESERVING = {
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu",
    "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Erf", "Softplus", "Mish", "Identity",
    "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Abs", "Neg",
    "Sqrt", "Pow", "Exp",
}
_NCHW_OPS = {
    "Conv", "ConvInteger", "ConvTranspose", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool",
    "DepthToSpace", "SpaceToDepth",
}


@dataclass(frozen=True)
class TargetView:
    """A target layer and how to see it as [N, C, h, w].

    `prefix_tokens` and `grid` are only for ``tokens``; `grid` is (h, w) where it is known
    statically (always when given by the user), else None (read at run time from `grid_source`,
    the patch embedding's [N, C, h, w] output)."""

    tensor: str
    layout: str
    prefix_tokens: int | None = None
    grid: tuple[int, int] | None = None
    grid_source: str | None = None

    @property
    def channel_axis(self) -> int:
        """The channel axis of the raw tensor."""
        return 1 if self.layout == "nchw" else -1

    def describe(self) -> str:
        if self.layout != "tokens":
            return self.layout
        grid = f"{self.grid[0]}x{self.grid[1]}" if self.grid else "read at run time"
        prefix = self.prefix_tokens if self.prefix_tokens is not None else "T - h*w"
        return f"tokens (prefix {prefix}, grid {grid})"

    def metadata(self) -> dict[str, str]:
        """The view as the augmented model's metadata (`passes.record_target`)."""
        entries = {"layer": self.tensor, "layout": self.layout}
        if self.layout == "tokens":
            if self.prefix_tokens is not None:
                entries["prefix_tokens"] = str(self.prefix_tokens)
            if self.grid is not None:
                entries["grid"] = f"{self.grid[0]}x{self.grid[1]}"
        return entries

    def apply(self, b: GraphBuilder, tensor: str, image: str) -> str:
        """`tensor` (the target layer or its gradient, laid out as the layer) as [N, C, h, w],
        N checked against `image`'s batch at run time."""
        if self.layout == "nchw":
            if _batch_is_proven(b, self.tensor, image):
                return tensor
            return _with_batch_of(b, tensor, image)
        if self.layout == "nhwc":
            return _with_batch_of(b, b.op("Transpose", [tensor], perm=[0, 3, 1, 2]), image)
        patches = tensor
        if self.prefix_tokens != 0:
            start = (b.ints([self.prefix_tokens]) if self.prefix_tokens is not None
                     else b.op("Sub", [b.shape_slice(tensor, 1, 2), self._cells(b)]))
            patches = b.op("Slice", [tensor, start, b.ints([2**62]), b.ints([1])])
        grid = b.ints(self.grid) if self.grid else b.shape_slice(self.grid_source, 2, 4)
        shape = b.op("Concat", [b.shape_slice(image, 0, 1), grid, b.shape_slice(tensor, 2, 3)],
                     axis=0)
        return b.op("Transpose", [b.op("Reshape", [patches, shape])], perm=[0, 3, 1, 2])

    def _cells(self, b: GraphBuilder) -> str:
        if self.grid:
            return b.ints([self.grid[0] * self.grid[1]])
        return b.reduce("ReduceProd", b.shape_slice(self.grid_source, 2, 4), [0], keepdims=True)


def detect_view(
    b: GraphBuilder,
    tensor: str,
    image: str,
    layout: str | None = None,
    prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
) -> TargetView:
    """The view of target `tensor`: `layout`, `prefix_tokens` and `grid` where given, detected
    from the graph otherwise. Raises `AugmentError` naming the problem where the layout cannot be
    told, the tensor is not a feature map, its grid is 1 x 1, or a given value contradicts what
    the graph shows (a layout against unanimous evidence, a grid the patch embedding refutes)."""
    layout, prefix_tokens, grid = check_view_options(layout, prefix_tokens, grid)
    rank = b.rank(tensor)
    detected = layout is None
    if detected:
        layout = _detect_layout(b, tensor, rank)
    elif rank == 4 and layout != "tokens":
        shown = _layout_evidence(b, tensor)
        if len(shown) == 1 and layout not in shown:
            raise AugmentError(
                f"layout {layout} contradicts the graph: the ops around target layer "
                f"{tensor!r} (shape {_shape_text(b, tensor)}) lay it out as {shown.pop()}"
            )
    expected_rank = 3 if layout == "tokens" else 4
    if rank != expected_rank:
        raise AugmentError(
            f"target layer {tensor!r} has rank {rank}; the {layout} layout needs rank "
            f"{expected_rank} ([N, T, C] tokens, or a [N, C, h, w] / [N, h, w, C] feature map)"
        )
    if (prefix_tokens is not None or grid is not None) and layout != "tokens":
        raise AugmentError(f"prefix_tokens and grid apply to the tokens layout, not {layout}")
    _check_batch(b, tensor, image)
    if layout == "tokens":
        view = _token_view(b, tensor, image, prefix_tokens, grid)
    else:
        view = TargetView(tensor, layout)
    spatial = _static_grid(b, view)
    if spatial is None and _image_size(b, image) is not None:
        spatial = _static_grid(b, view, at_batch_one=True)  # dims the batch's symbol hid
    if spatial is not None and spatial[0] * spatial[1] <= 1:
        raise AugmentError(
            f"target layer {tensor!r} has a 1 x 1 spatial grid ({view.describe()}, shape "
            f"{_shape_text(b, tensor)}): its heatmap would be constant; choose a layer before "
            "the global pooling"
        )
    if detected and spatial is not None and not _tiles_the_image(b, image, spatial):
        raise AugmentError(
            f"target layer {tensor!r} read as {layout} has a {spatial[0]}x{spatial[1]} grid "
            f"(shape {_shape_text(b, tensor)}), which does not cover the image with one stride "
            "along both axes: it is not laid out as a feature map; give the layout if it is"
        )
    return view


def _tiles_the_image(b: GraphBuilder, image: str, grid: tuple[int, int]) -> bool:
    """Whether a grid h x w could be a feature map of the image: where the image's H x W is
    static, the strides H / h and W / w agree within a factor 1.5 (padding and rounding make
    them differ a little; attention's [N, heads, T, d] read as a map makes them differ a
    lot)."""
    size = _image_size(b, image)
    if size is None:
        return True
    height, width = size
    if grid[0] > height or grid[1] > width:
        return False
    strides = (height / grid[0], width / grid[1])
    return max(strides) / min(strides) <= 1.5


def _image_size(b: GraphBuilder, image: str) -> tuple[int, int] | None:
    """The image's static (H, W), NCHW unless a channel dim of 1 or 3 says NHWC; None where
    either is dynamic."""
    dims = b.static_shape(image) or ()
    if len(dims) != 4:
        return None
    height, width = (dims[1], dims[2]) if dims[3] in (1, 3) and dims[1] not in (1, 3) else dims[2:]
    if isinstance(height, int) and isinstance(width, int):
        return height, width
    return None


def check_view_options(
    layout: str | None, prefix_tokens: int | None, grid: Sequence[int] | None
) -> tuple[str | None, int | None, tuple[int, int] | None]:
    """The layout options, validated on their own (before any graph is read)."""
    if layout is not None and layout not in LAYOUTS:
        raise AugmentError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        if len(grid) != 2 or min(grid) < 1:
            raise AugmentError(f"grid must be two positive sizes (h, w); got {grid}")
    if prefix_tokens is not None and not 0 <= prefix_tokens <= MAX_PREFIX_TOKENS:
        raise AugmentError(f"prefix_tokens must be 0..{MAX_PREFIX_TOKENS}; got {prefix_tokens}")
    if (prefix_tokens is not None or grid is not None) and layout not in (None, "tokens"):
        raise AugmentError(f"prefix_tokens and grid apply to the tokens layout, not {layout}")
    return layout, prefix_tokens, grid


def _detect_layout(b: GraphBuilder, tensor: str, rank: int) -> str:
    if rank == 3:
        return "tokens"
    if rank != 4:
        raise AugmentError(
            f"target layer {tensor!r} has rank {rank}: a target must be a feature map "
            "[N, C, h, w] or [N, h, w, C], or tokens [N, T, C]"
        )
    votes = _layout_evidence(b, tensor)
    if votes == {"nchw"} or votes == {"nhwc"}:
        return votes.pop()
    why = "its neighbours say both NCHW and NHWC" if votes else "no op near it shows its channels"
    raise AugmentError(
        f"the layout of target layer {tensor!r} (shape {_shape_text(b, tensor)}) is ambiguous: "
        f"{why}; give the layout (nchw or nhwc)"
    )


def _layout_evidence(b: GraphBuilder, tensor: str) -> set[str]:
    """NCHW / NHWC votes from the ops around `tensor`, through element-wise ops."""
    producers = {out: node for node in b.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in b.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    votes: set[str] = set()
    seen, frontier = set(), [tensor]
    while frontier and len(seen) < 64:
        current = frontier.pop()
        if current in seen or b.static_shape(current) is None or b.rank(current) != 4:
            continue
        seen.add(current)
        producer = producers.get(current)
        linked = [(producer, "out")] if producer is not None else []
        linked += [(node, "in") for node in consumers.get(current, [])]
        for node, role in linked:
            vote = _vote(b, node, current, role)
            if vote:
                votes.add(vote)
            elif node.op_type in _LAYOUT_PRESERVING:
                frontier.extend(t for t in (*node.input, *node.output) if t and t not in seen)
    return votes


def _vote(b: GraphBuilder, node, tensor: str, role: str) -> str | None:
    """What `node`, producing (role "out") or consuming ("in") rank-4 `tensor`, says."""
    op = node.op_type
    if op in _NCHW_OPS and (role == "out" or node.input[0] == tensor):
        return "nchw"
    if op == "LayerNormalization" and _attr(node, "axis", -1) in (-1, 3):
        return "nhwc"
    if op == "MatMul" and role == "in" and node.input[0] == tensor:
        weight = node.input[1]
        if b.initializer_value(weight) is not None and len(b.static_shape(weight) or ()) == 2:
            return "nhwc"
    if op == "Transpose" and role == "in":
        perm = list(_attr(node, "perm", []))
        return {(0, 3, 1, 2): "nhwc", (0, 2, 3, 1): "nchw"}.get(tuple(perm))
    if op == "Transpose" and role == "out":
        perm = list(_attr(node, "perm", []))
        return {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(perm))
    if op in ("ReduceMean", "ReduceMax", "ReduceSum") and role == "in":
        axes = _reduce_axes(b, node)
        return {(2, 3): "nchw", (1, 2): "nhwc"}.get(axes)
    return None


def _reduce_axes(b: GraphBuilder, node) -> tuple[int, ...] | None:
    if axes_are_input(node.op_type, b.opset):
        value = b.initializer_value(node.input[1]) if len(node.input) > 1 else None
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    else:
        axes = _attr(node, "axes", None)
    return None if axes is None else tuple(sorted(a % 4 for a in axes))


def _token_view(
    b: GraphBuilder,
    tensor: str,
    image: str,
    prefix_tokens: int | None,
    grid: tuple[int, int] | None,
) -> TargetView:
    """Tokens [N, T, C]: the grid from `grid`, the patch embedding, or else the input size; the
    prefix from `prefix_tokens` or T - h * w (static where T and the grid are). Where T is
    symbolic but the input's size fixes it (`static_shape_at_batch_one`), the grid is checked
    against it all the same: tokens merged after the patch embedding (LeViT's later stages)
    are refused with the grids that fit, rather than failing at run time."""
    shape = b.static_shape(tensor)
    tokens = shape[1] if shape and isinstance(shape[1], int) else None
    counted = _token_count(b, tensor, image)
    source = None
    if grid is not None and counted is not None:
        _check_grid_against_embedding(b, tensor, image, grid, counted)
    if grid is None:
        source = _patch_embedding(b, tensor, image)
        if source is None:
            fits = _grids_tiling_the_input(b, image, tokens, prefix_tokens)
            if len(fits) != 1:
                why = ("; it fits " + ", ".join(f"{h}x{w} after {p}" for p, h, w in fits)
                       if fits else "")
                raise AugmentError(
                    f"cannot tell the patch grid of tokens {tensor!r} (shape "
                    f"{_shape_text(b, tensor)}): no patch-embedding Conv feeds them and the "
                    f"input size does not decide it{why}; give the grid (h, w) and prefix_tokens"
                )
            prefix_tokens, *grid = fits[0]
            grid = tuple(grid)
        if grid is None:
            known = b.static_shape(source)
            if known and all(isinstance(d, int) for d in known[2:]):
                grid = (known[2], known[3])
    if grid is not None and counted is not None:
        cells = grid[0] * grid[1]
        prefix = prefix_tokens if prefix_tokens is not None else counted - cells
        if prefix != counted - cells or not 0 <= prefix <= MAX_PREFIX_TOKENS:
            fits = _grids_tiling_the_input(b, image, counted, prefix_tokens)
            tiling = ("; they tile the input as " + ", ".join(
                f"{h}x{w} after {p} prefix tokens" for p, h, w in fits) if fits else "")
            raise AugmentError(
                f"tokens {tensor!r} (T = {counted}) do not fit a {grid[0]}x{grid[1]} patch grid "
                f"after {prefix} prefix tokens (T - h*w = {counted - cells}){tiling}; give the "
                "grid and prefix_tokens"
            )
        if tokens is not None:
            prefix_tokens = prefix
    return TargetView(tensor, "tokens", prefix_tokens, grid, source if grid is None else None)


def tiling_view_options(b: GraphBuilder, tensor: str, image: str) -> dict | None:
    """For tokens [N, T, C] whose T (static, or at batch one) tiles the static input in one
    way only: the view options that say so (layout, prefix_tokens, grid). What a candidate
    layer needs where its tokens were merged after the patch embedding."""
    fits = _grids_tiling_the_input(b, image, _token_count(b, tensor, image), None)
    if len(fits) != 1:
        return None
    prefix, height, width = fits[0]
    return {"layout": "tokens", "prefix_tokens": prefix, "grid": (height, width)}


def _token_count(b: GraphBuilder, tensor: str, image: str) -> int | None:
    """T of tokens [N, T, C]: static, or as shape inference finds it with the batch fixed to
    1; not looked for there where the image's size is dynamic (T is then too)."""
    shape = b.static_shape(tensor)
    if shape is None or len(shape) != 3:
        return None
    if isinstance(shape[1], int):
        return shape[1]
    if _image_size(b, image) is None:
        return None
    shape = b.static_shape_at_batch_one(tensor)
    return shape[1] if shape and len(shape) == 3 and isinstance(shape[1], int) else None


def _grids_tiling_the_input(
    b: GraphBuilder, image: str, tokens: int | None, prefix_tokens: int | None
) -> list[tuple[int, int, int]]:
    """(prefix, h, w) for which T - prefix patches tile the static input H x W with one integer
    stride s >= 2 (H = s h, W = s w): `prefix_tokens` where given, else any of 0 ..
    MAX_INFERRED_PREFIX (class, distillation and a few register tokens)."""
    size = _image_size(b, image)
    if tokens is None or size is None:
        return []
    height, width = size
    prefixes = [prefix_tokens] if prefix_tokens is not None else range(MAX_INFERRED_PREFIX + 1)
    fits = []
    for prefix in prefixes:
        cells = tokens - prefix
        if cells < 2 or (height * width) % cells:
            continue
        stride = math.isqrt(height * width // cells)
        if (stride >= 2 and stride * stride * cells == height * width
                and height % stride == 0 and width % stride == 0):
            fits.append((prefix, height // stride, width // stride))
    return fits


def _check_grid_against_embedding(
    b: GraphBuilder, tensor: str, image: str, grid: tuple[int, int], tokens: int
) -> None:
    """Refuse a given grid that the patch embedding refutes: the embedding's grid fits the
    tokens (T - h*w prefix tokens) and the given one differs. Where the embedding's grid does
    not fit (tokens merged after it), telling the grid is the override's purpose."""
    source = _patch_embedding(b, tensor, image)
    known = b.static_shape(source) if source else None
    if not known or not all(isinstance(d, int) for d in known[2:]):
        return
    embedded = (known[2], known[3])
    if embedded != grid and 0 <= tokens - embedded[0] * embedded[1] <= MAX_PREFIX_TOKENS:
        raise AugmentError(
            f"grid {grid[0]}x{grid[1]} contradicts the patch embedding {source!r}, whose grid "
            f"is {embedded[0]}x{embedded[1]}"
        )


def _patch_embedding(b: GraphBuilder, tensor: str, image: str) -> str | None:
    """The last Conv output (graph order) that `tensor` is computed from, on the image's path:
    the patch embedding whose grid the tokens keep."""
    feeding = ancestors(list(b.graph.node), {tensor})
    last = None
    for node in b.graph.node:
        if node.op_type == "Conv" and node.output[0] in feeding and node.output[0] != tensor:
            last = node.output[0]
    return last


def _check_batch(b: GraphBuilder, tensor: str, image: str) -> None:
    """Refuse a tensor whose static dim 0 shows it is not the image batch (the run-time check
    of `TargetView.apply` catches the rest)."""
    dim, batch = (b.static_shape(tensor) or (None,))[0], (b.static_shape(image) or (None,))[0]
    if isinstance(dim, int) and (dim != batch if isinstance(batch, int) else dim != 1):
        raise AugmentError(
            f"target layer {tensor!r} (shape {_shape_text(b, tensor)}) does not have the image "
            "batch as dim 0 (attention and window layouts put other axes first); choose a "
            "layer laid out per image"
        )


def _batch_is_proven(b: GraphBuilder, tensor: str, image: str) -> bool:
    dim, batch = (b.static_shape(tensor) or (None,))[0], (b.static_shape(image) or (None,))[0]
    return dim is not None and dim == batch


def _with_batch_of(b: GraphBuilder, view: str, image: str) -> str:
    """`view` reshaped to its own shape with dim 0 from `image`: fails at run time unless
    dim 0 is the image batch."""
    shape = b.op("Concat", [b.shape_slice(image, 0, 1), b.shape_slice(view, 1)], axis=0)
    return b.op("Reshape", [view, shape])


def _static_grid(b: GraphBuilder, view: TargetView,
                 at_batch_one: bool = False) -> tuple[int, int] | None:
    if view.layout == "tokens":
        return view.grid
    shape = (b.static_shape_at_batch_one if at_batch_one else b.static_shape)(view.tensor)
    if shape is None:
        return None
    dims = shape[2:] if view.layout == "nchw" else shape[1:3]
    return tuple(dims) if all(isinstance(d, int) for d in dims) else None


def _shape_text(b: GraphBuilder, tensor: str) -> str:
    shape = b.static_shape(tensor)
    if shape is None:
        return "unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _attr(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default

