"""Reverse-mode rules: one small function per ONNX op type.

Rule contract
-------------
A rule is registered with ``@rule("OpType", ...)`` and called as ``rule(ctx)`` for one forward
node that a gradient reaches. ``ctx`` (a `RuleContext`) gives:

- ``ctx.node``: the forward node; ``ctx.x(i)`` / ``ctx.y(i)`` its input / output names (``""``
  where an optional one is absent), in their compute type (see below); ``ctx.attr(name,
  default)`` its attributes;
- ``ctx.dy(i)``: the name of d score / d output ``i`` (None where no gradient reaches that output;
  fan-out contributions are already summed by the walker);
- ``ctx.needs(i)``: whether input ``i`` needs a gradient (it lies on the path from the target
  layer, so weights, biases and shape inputs never do);
- ``ctx.b``: the `GraphBuilder` to emit nodes with; ``ctx.guided``: guided-backprop mode.

It returns one entry per input: the name of d score / d input, or None where none is needed or none
flows (integer inputs, masks, weights). The integer tensors of a quantized chain are the exception:
their gradient is d score / d the integer value (the quantization section at the end). Rules
registered with ``broadcasting=True`` may return gradients at the shape of output 0; the walker
sums them down to each input's shape. Every other rule returns gradients already at the input's
shape.

Rules emit standard ``ai.onnx`` ops only (never a runtime's private training kernels), read sizes
with ``Shape`` at run time rather than trusting static shapes, and reuse forward outputs where the
math allows (Relu masks, Sigmoid, Tanh, Exp, Softmax). A node whose op has no rule is an error only
when a gradient actually reaches it (`MissingRuleError` names the op, node and opset).

Half precision: gradients are float32 for float16 and bfloat16 tensors
(`GraphBuilder.compute_type`); ``ctx.x(i)`` and ``ctx.y(i)`` name such a tensor's float32 cast
(`GraphBuilder.computed`, made once per tensor), so rules read forward tensors' values through
them (``ctx.node.input`` only for sizes), and their float32 constants always meet float32 tensors.
``ctx.b.shape`` of a cast reads the source's shape, so reading only a size costs no cast.

Models reach the rules at opset 17 or later (the `upgrade_opset` pass), so rules may emit any
opset-17 op but must read attributes that later opsets moved to inputs (Reduce* axes) at the
model's own opset; `_require_opset` gives a clear error to a caller with an older graph.
"""

from __future__ import annotations

import itertools
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .errors import AugmentError
from .graph import GraphBuilder, axes_are_input

Gradients = Sequence[str | None]


@dataclass(frozen=True)
class Rule:
    fn: Callable[["RuleContext"], Gradients]
    broadcasting: bool


RULES: dict[str, Rule] = {}


def rule(*op_types: str, broadcasting: bool = False):
    """Register the decorated function as the backward rule of `op_types`."""

    def register(fn: Callable[["RuleContext"], Gradients]):
        for op_type in op_types:
            RULES[op_type] = Rule(fn, broadcasting)
        return fn

    return register


@dataclass
class RuleContext:
    node: onnx.NodeProto
    b: GraphBuilder
    grad_outputs: list[str | None]
    needs_grad: list[bool]
    guided: bool = False

    def x(self, i: int) -> str:
        return self.b.computed(self.node.input[i]) if self.input_name(i) else ""

    def y(self, i: int) -> str:
        name = self.node.output[i] if i < len(self.node.output) else ""
        return self.b.computed(name) if name else ""

    def input_name(self, i: int) -> str:
        """The forward node's input `i` as named in the graph (``""`` where absent)."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def dy(self, i: int = 0) -> str | None:
        return self.grad_outputs[i] if i < len(self.grad_outputs) else None

    def needs(self, i: int) -> bool:
        return i < len(self.needs_grad) and self.needs_grad[i]

    def attr(self, name: str, default=None):
        for attribute in self.node.attribute:
            if attribute.name == name:
                value = helper.get_attribute_value(attribute)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def const_input(self, i: int) -> np.ndarray | None:
        """The value of input `i` when it is a constant (initializer or Constant node)."""
        if not self.input_name(i):
            return None
        return self.b.initializer_value(self.input_name(i))

    def unsupported(self, why: str) -> AugmentError:
        return AugmentError(
            f"cannot differentiate {self.node.op_type} node {self.node.name!r} "
            f"(opset {self.b.opset}): {why}"
        )


# ---------------------------------------------------------------------------------------------
# Pass-through and shape ops
# ---------------------------------------------------------------------------------------------


@rule("Identity", "Dropout")
def _identity(ctx: RuleContext) -> Gradients:
    return [ctx.dy()]


@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx: RuleContext) -> Gradients:
    b = ctx.b
    return [b.op("Reshape", [ctx.dy(), b.shape(ctx.x(0))])]


@rule("Transpose")
def _transpose(ctx: RuleContext) -> Gradients:
    perm = ctx.attr("perm") or list(reversed(range(ctx.b.rank(ctx.x(0)))))
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return [ctx.b.op("Transpose", [ctx.dy()], perm=inverse)]


@rule("Expand", broadcasting=True)
def _expand(ctx: RuleContext) -> Gradients:
    return [ctx.dy(), None]


@rule("Cast", "CastLike")
def _cast(ctx: RuleContext) -> Gradients:
    """dy cast back to the input's compute type (a float16 <-> float32 cast passes the float32
    gradient on unchanged)."""
    b = ctx.b
    to = b.compute_type(ctx.input_name(0))
    if to == b.compute_type(ctx.node.output[0]):
        return [ctx.dy(), None]
    return [b.op("Cast", [ctx.dy()], to=to), None]


@rule("Concat")
def _concat(ctx: RuleContext) -> Gradients:
    b, axis = ctx.b, ctx.attr("axis")
    sizes = b.op(
        "Concat",
        [b.op("Gather", [b.shape(x), b.ints([axis])], axis=0) for x in ctx.node.input],
        axis=0,
    )
    return b.op_multi("Split", [ctx.dy(), sizes], len(ctx.node.input), axis=axis)


@rule("Split")
def _split(ctx: RuleContext) -> Gradients:
    b = ctx.b
    pieces = [
        ctx.dy(i) if ctx.dy(i) is not None else b.zeros_like(ctx.y(i))
        for i in range(len(ctx.node.output))
    ]
    return [b.op("Concat", pieces, axis=ctx.attr("axis", 0)), None]


@rule("Slice")
def _slice(ctx: RuleContext) -> Gradients:
    """Pad the incoming gradient back to the input's size; other steps than 1 (box decoding's
    ``deltas[:, 0::4]``) by `_strided_slice_grad`."""
    b, x = ctx.b, ctx.x(0)
    rank = b.rank(x)
    steps = ctx.const_input(4)
    if ctx.x(4) and (steps is None or np.any(steps != 1)):
        return [_strided_slice_grad(ctx), None, None, None, None]
    axes_value = ctx.const_input(3)
    if ctx.x(3) and axes_value is None:
        raise ctx.unsupported("its axes must be constant")
    axes = [int(a) % rank for a in axes_value] if ctx.x(3) else list(range(rank))
    axes_tensor = b.ints(axes)
    dims = b.op("Gather", [b.shape(x), axes_tensor], axis=0)
    begin = _clamp_index(b, ctx.x(1), dims)
    end = _clamp_index(b, ctx.x(2), dims)
    end = b.op("Max", [end, begin])
    after = b.op("Sub", [dims, end])
    zeros = b.ints([0] * rank)
    pads_begin = b.op("ScatterElements", [zeros, axes_tensor, begin], axis=0)
    pads_end = b.op("ScatterElements", [zeros, axes_tensor, after], axis=0)
    pads = b.op("Concat", [pads_begin, pads_end], axis=0)
    return [b.op("Pad", [ctx.dy(), pads]), None, None, None, None]


def _strided_slice_grad(ctx: RuleContext) -> str:
    """Any steps, negative too: the same Slice of x's flat positions says where each element of
    dy came from, and dy is scattered there (no position is taken twice)."""
    b, x = ctx.b, ctx.x(0)
    count = b.op("Size", [x])
    positions = b.op("Range", [b.const(0, np.int64), count, b.const(1, np.int64)])
    taken = b.op("Slice", [b.op("Reshape", [positions, b.shape(x)]), *ctx.node.input[1:]])
    flat = b.ints([-1])
    grad = b.op("ScatterElements", [b.op("Reshape", [b.zeros_like(x), flat]),
                                    b.op("Reshape", [taken, flat]),
                                    b.op("Reshape", [ctx.dy(), flat])], axis=0)
    return b.op("Reshape", [grad, b.shape(x)])


def _clamp_index(b: GraphBuilder, index: str, dims: str) -> str:
    """Slice's index normalisation: negative counts from the end, then clamp to [0, dim]."""
    index = b.op("Cast", [index], to=onnx.TensorProto.INT64)
    wrapped = b.op("Add", [index, dims])
    index = b.op("Where", [b.op("Less", [index, b.ints([0])]), wrapped, index])
    return b.op("Min", [b.op("Max", [index, b.ints([0])]), dims])


@rule("Pad")
def _pad(ctx: RuleContext) -> Gradients:
    """Crop the incoming gradient back to the input (constant mode, non-negative pads)."""
    b, x = ctx.b, ctx.x(0)
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        raise ctx.unsupported(f"mode {mode!r} is not supported, only 'constant'")
    pads_value = ctx.const_input(1)
    if pads_value is not None and np.any(pads_value < 0):
        raise ctx.unsupported("negative pads are not supported")
    rank = b.rank(x)
    if ctx.x(3):
        axes_value = ctx.const_input(3)
        if axes_value is None:
            raise ctx.unsupported("its axes must be constant")
        axes = [int(a) % rank for a in axes_value]
    else:
        axes = list(range(rank))
    pads = b.op("Cast", [ctx.x(1)], to=onnx.TensorProto.INT64)
    starts = b.op("Slice", [pads, b.ints([0]), b.ints([len(axes)])])
    axes_tensor = b.ints(axes)
    ends = b.op("Add", [starts, b.op("Gather", [b.shape(x), axes_tensor], axis=0)])
    return [b.op("Slice", [ctx.dy(), starts, ends, axes_tensor]), None, None, None]


@rule("Tile")
def _tile(ctx: RuleContext) -> Gradients:
    """dy viewed as [r0, d0, r1, d1, ...] (repeats r, input dims d) summed over the repeats."""
    b, x = ctx.b, ctx.x(0)
    pairs = b.op("Concat", [b.unsqueeze(ctx.x(1), [1]), b.unsqueeze(b.shape(x), [1])], axis=1)
    blocks = b.op("Reshape", [ctx.dy(), b.op("Reshape", [pairs, b.ints([-1])])])
    repeat_axes = list(range(0, 2 * b.rank(x), 2))
    return [b.reduce("ReduceSum", blocks, repeat_axes, keepdims=False), None]


@rule("DepthToSpace")
def _depth_to_space(ctx: RuleContext) -> Gradients:
    """A permutation, undone: DCR mode by SpaceToDepth; CRD mode, y = reshape(transpose(
    reshape(x, [N, C', b, b, H, W]), [0, 1, 4, 2, 5, 3])), by those steps in reverse."""
    b, x, dy, block = ctx.b, ctx.x(0), ctx.dy(), ctx.attr("blocksize")
    if ctx.attr("mode", "DCR") == "DCR":
        return [b.op("SpaceToDepth", [dy], blocksize=block)]
    size = b.ints([block])
    n, h, w = (b.shape_slice(x, axis, axis + 1) for axis in (0, 2, 3))
    blocks = b.op("Concat", [n, b.ints([-1]), h, size, w, size], axis=0)
    grad = b.op("Transpose", [b.op("Reshape", [dy, blocks])], perm=[0, 1, 3, 5, 2, 4])
    return [b.op("Reshape", [grad, b.shape(x)])]


@rule("SpaceToDepth")
def _space_to_depth(ctx: RuleContext) -> Gradients:
    """A permutation, undone by its inverse, DepthToSpace in DCR mode."""
    return [ctx.b.op("DepthToSpace", [ctx.dy()], blocksize=ctx.attr("blocksize"), mode="DCR")]


@rule("CumSum")
def _cum_sum(ctx: RuleContext) -> Gradients:
    """The adjoint of a running sum is the running sum in the other direction."""
    grad = ctx.b.op(
        "CumSum",
        [ctx.dy(), ctx.x(1)],
        exclusive=ctx.attr("exclusive", 0),
        reverse=1 - ctx.attr("reverse", 0),
    )
    return [grad, None]


@rule("Trilu")
def _trilu(ctx: RuleContext) -> Gradients:
    """A fixed mask: dx = the same triangle of dy."""
    k = [ctx.x(1)] if ctx.x(1) else []
    return [ctx.b.op("Trilu", [ctx.dy(), *k], upper=ctx.attr("upper", 1)), None]


# ---------------------------------------------------------------------------------------------
# Indexing: gathers scatter dy back, scatters gather it
# ---------------------------------------------------------------------------------------------


@rule("Gather")
def _gather(ctx: RuleContext) -> Gradients:
    """dx = zeros with dy added at the gathered positions along `axis`; for one constant index
    (q, k or v taken from a stacked tensor) dy padded into place, which needs no rank."""
    x, index = ctx.x(0), ctx.const_input(1)
    if index is not None and index.ndim == 0:
        return [_padded_row(ctx, x, ctx.dy(), ctx.attr("axis", 0), int(index)), None]
    axis = _nonnegative_axis(ctx, ctx.attr("axis", 0), x)
    return [_ungather(ctx, x, ctx.x(1), ctx.dy(), axis), None]


def _padded_row(ctx: RuleContext, x: str, dy: str, axis: int, index: int) -> str:
    """dy as row `index` of x along `axis` (either may count from the end), zeros elsewhere:
    a Pad, far cheaper than a scatter-add into a large tensor."""
    b = ctx.b
    dims = b.shape(x)
    axes = b.ints([axis])
    length = b.op("Gather", [dims, axes], axis=0)
    start = b.ints([index]) if index >= 0 else b.op("Add", [length, b.ints([index])])
    zeros = b.op("Mul", [dims, b.ints([0])])
    before = b.op("ScatterElements", [zeros, axes, start], axis=0)
    rest = b.op("Sub", [b.op("Sub", [length, start]), b.ints([1])])
    after = b.op("ScatterElements", [zeros, axes, rest], axis=0)
    return b.op("Pad", [b.unsqueeze(dy, [axis]), b.op("Concat", [before, after], axis=0)])


@rule("Compress")
def _compress(ctx: RuleContext) -> Gradients:
    """A Gather of the positions where the condition holds (of the flattened input when there
    is no axis)."""
    b, x = ctx.b, ctx.x(0)
    positions = b.op("Reshape", [b.op("NonZero", [ctx.x(1)]), b.ints([-1])])
    if ctx.attr("axis") is None:
        flat = b.op("Reshape", [x, b.ints([-1])])
        grad = _ungather(ctx, flat, positions, ctx.dy(), 0)
        return [b.op("Reshape", [grad, b.shape(x)]), None]
    axis = _nonnegative_axis(ctx, ctx.attr("axis"), x)
    return [_ungather(ctx, x, positions, ctx.dy(), axis), None]


def _ungather(ctx: RuleContext, x: str, indices: str, dy: str, axis: int) -> str:
    """Gather's adjoint: dy, viewed as [x's dims before axis, all indices, x's dims after],
    added into zeros like x by ScatterElements with the indices broadcast to that view.
    Needs no rank: the views are built from Shape slices."""
    b = ctx.b
    before, after = b.shape_slice(x, 0, axis), b.shape_slice(x, axis + 1)
    flat_dy = b.op("Reshape", [dy, b.op("Concat", [before, b.ints([-1]), after], axis=0)])
    ones_after = b.op(
        "ConstantOfShape",
        [b.shape(after)],
        value=helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1]),
    )
    index_view = b.op("Concat", [b.ints([1] * axis + [-1]), ones_after], axis=0)
    flat_indices = b.op("Expand", [b.op("Reshape", [indices, index_view]), b.shape(flat_dy)])
    return _scatter_add(ctx, "ScatterElements", b.zeros_like(x), flat_indices, flat_dy, axis=axis)


def _scatter_add(
    ctx: RuleContext, op_type: str, zeros: str, indices: str, updates: str, **attrs
) -> str:
    """`op_type` (ScatterElements or ScatterND) adding `updates` into `zeros`, so that indices
    naming one position twice add up (reduction='add', from opset 16)."""
    _require_opset(ctx, 16)
    return ctx.b.op(op_type, [zeros, indices, updates], reduction="add", **attrs)


def _nonnegative_axis(ctx: RuleContext, axis: int, tensor: str) -> int:
    return axis if axis >= 0 else axis + ctx.b.rank(tensor)


@rule("GatherElements")
def _gather_elements(ctx: RuleContext) -> Gradients:
    """dx = ScatterElements(add) of dy into zeros at the gathered positions."""
    b, x = ctx.b, ctx.x(0)
    grad = _scatter_add(
        ctx, "ScatterElements", b.zeros_like(x), ctx.x(1), ctx.dy(), axis=ctx.attr("axis", 0)
    )
    return [grad, None]


@rule("GatherND")
def _gather_nd(ctx: RuleContext) -> Gradients:
    """dx = ScatterND(add) of dy into zeros, negative indices first counted from the end."""
    b, x, indices = ctx.b, ctx.x(0), ctx.x(1)
    if ctx.attr("batch_dims", 0):
        raise ctx.unsupported("only batch_dims=0 is supported")
    dims = b.op("Slice", [b.shape(x), b.ints([0]), b.shape_slice(indices, -1)])
    negative = b.op("Less", [indices, b.ints([0])])
    wrapped = b.op("Where", [negative, b.op("Add", [indices, dims]), indices])
    return [_scatter_add(ctx, "ScatterND", b.zeros_like(x), wrapped, ctx.dy()), None]


@rule("ScatterND", "ScatterElements")
def _scatter(ctx: RuleContext) -> Gradients:
    """y = data with `updates` written at `indices`: d data = dy with those positions zeroed
    (reduction 'add': dy itself); d updates = dy gathered at them."""
    b, dy, indices = ctx.b, ctx.dy(), ctx.x(1)
    reduction = ctx.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise ctx.unsupported(f"reduction {reduction!r} is not supported, only 'none' and 'add'")
    elements = ctx.node.op_type == "ScatterElements"
    axis = {"axis": ctx.attr("axis", 0)} if elements else {}
    grad_data = grad_updates = None
    if ctx.needs(0) and reduction == "add":
        grad_data = dy
    elif ctx.needs(0):
        grad_data = b.op(ctx.node.op_type, [dy, indices, b.zeros_like(ctx.x(2))], **axis)
    if ctx.needs(2):
        grad_updates = b.op("GatherElements" if elements else "GatherND", [dy, indices], **axis)
    return [grad_data, None, grad_updates]


@rule("TopK")
def _top_k(ctx: RuleContext) -> Gradients:
    """The values' gradient goes back to where they were taken (their indices never repeat)."""
    b, x = ctx.b, ctx.x(0)
    grad = b.op(
        "ScatterElements", [b.zeros_like(x), ctx.y(1), ctx.dy(0)], axis=ctx.attr("axis", -1)
    )
    return [grad, None]


# ---------------------------------------------------------------------------------------------
# Elementwise arithmetic (broadcasting: the walker reduces to each input's shape)
# ---------------------------------------------------------------------------------------------


@rule("Add", "Sum", broadcasting=True)
def _add(ctx: RuleContext) -> Gradients:
    return [ctx.dy()] * len(ctx.node.input)


@rule("Sub", broadcasting=True)
def _sub(ctx: RuleContext) -> Gradients:
    return [ctx.dy(), ctx.b.op("Neg", [ctx.dy()]) if ctx.needs(1) else None]


@rule("Mul", broadcasting=True)
def _mul(ctx: RuleContext) -> Gradients:
    b, dy = ctx.b, ctx.dy()
    return [
        b.op("Mul", [dy, ctx.x(1)]) if ctx.needs(0) else None,
        b.op("Mul", [dy, ctx.x(0)]) if ctx.needs(1) else None,
    ]


@rule("Div", broadcasting=True)
def _div(ctx: RuleContext) -> Gradients:
    b, dy = ctx.b, ctx.dy()
    grad_a = b.op("Div", [dy, ctx.x(1)]) if ctx.needs(0) else None
    grad_b = None
    if ctx.needs(1):  # d(a/b)/db = -y/b
        grad_b = b.op("Neg", [b.op("Div", [b.op("Mul", [dy, ctx.y(0)]), ctx.x(1)])])
    return [grad_a, grad_b]


@rule("Pow", broadcasting=True)
def _pow(ctx: RuleContext) -> Gradients:
    b, dy, base, exponent = ctx.b, ctx.dy(), ctx.x(0), ctx.x(1)
    grad_base = grad_exponent = None
    if ctx.needs(0):  # e * a^(e-1)
        exponent_f = b.op("Cast", [exponent], to=b.elem_type(base))
        lowered = b.op("Sub", [exponent_f, b.const(1.0)])
        grad_base = b.op("Mul", [dy, b.op("Mul", [exponent_f, b.op("Pow", [base, lowered])])])
    if ctx.needs(1):  # y * ln(a)
        grad_exponent = b.op("Mul", [dy, b.op("Mul", [ctx.y(0), b.op("Log", [base])])])
    return [grad_base, grad_exponent]


@rule("Max", "Min", broadcasting=True)
def _max_min(ctx: RuleContext) -> Gradients:
    """dx_i = dy [x_i == y] / (number of inputs equal to y): tied inputs share the gradient
    evenly, as torch.maximum / torch.minimum."""
    b, y = ctx.b, ctx.y(0)
    masks = [b.op("Cast", [b.op("Equal", [ctx.x(i), y])], to=b.elem_type(y))
             for i in range(len(ctx.node.input))]
    share = b.op("Div", [ctx.dy(), b.op("Sum", masks)]) if len(masks) > 1 else ctx.dy()
    return [b.op("Mul", [share, mask]) if ctx.needs(i) else None for i, mask in enumerate(masks)]


@rule("Mean", broadcasting=True)
def _mean(ctx: RuleContext) -> Gradients:
    scaled = ctx.b.op("Mul", [ctx.dy(), ctx.b.const(1.0 / len(ctx.node.input))])
    return [scaled] * len(ctx.node.input)


@rule("Where", broadcasting=True)
def _where(ctx: RuleContext) -> Gradients:
    b, dy, condition = ctx.b, ctx.dy(), ctx.x(0)
    zeros = b.zeros_like(dy)
    return [
        None,
        b.op("Where", [condition, dy, zeros]) if ctx.needs(1) else None,
        b.op("Where", [condition, zeros, dy]) if ctx.needs(2) else None,
    ]


@rule("Neg")
def _neg(ctx: RuleContext) -> Gradients:
    return [ctx.b.op("Neg", [ctx.dy()])]


@rule("Abs")
def _abs(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Sign", [ctx.x(0)]))


@rule("Floor", "Ceil", "Round", "Sign", "Hardmax")
def _piecewise_constant(ctx: RuleContext) -> Gradients:
    """Constant between jumps: a zero gradient (Hardmax too, a one-hot of the argmax)."""
    return [None]


def _scaled(ctx: RuleContext, slope: str) -> Gradients:
    """dx = dy * slope: the rule of a one-input elementwise op, given its derivative."""
    return [ctx.b.op("Mul", [ctx.dy(), slope])]


def _kept(b: GraphBuilder, mask: str, grad: str) -> str:
    """`grad` where `mask` holds, 0 elsewhere."""
    return b.op("Where", [mask, grad, b.zeros_like(grad)])


def _by_sign(ctx: RuleContext, negative_slope: str, positive_slope: str | None = None) -> str:
    """dx = dy * (positive_slope where x > 0, else negative_slope); no positive_slope means 1."""
    b, dy = ctx.b, ctx.dy()
    positive = b.op("Greater", [ctx.x(0), b.const(0.0)])
    above = dy if positive_slope is None else b.op("Mul", [dy, positive_slope])
    return b.op("Where", [positive, above, b.op("Mul", [dy, negative_slope])])


# ---------------------------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------------------------


@rule("Relu")
def _relu(ctx: RuleContext) -> Gradients:
    """dx = dy where y > 0; guided backprop also drops negative incoming gradients."""
    b, dy = ctx.b, ctx.dy()
    zero = b.const(0.0)
    mask = b.op("Greater", [ctx.y(0), zero])
    if ctx.guided:
        mask = b.op("And", [mask, b.op("Greater", [dy, zero])])
    return [_kept(b, mask, dy)]


@rule("ThresholdedRelu")
def _thresholded_relu(ctx: RuleContext) -> Gradients:
    """y = x where x > alpha, else 0."""
    b = ctx.b
    return [_kept(b, b.op("Greater", [ctx.x(0), b.const(ctx.attr("alpha", 1.0))]), ctx.dy())]


@rule("Shrink")
def _shrink(ctx: RuleContext) -> Gradients:
    """y = x -+ bias where |x| > lambd, else 0: dx = dy where |x| > lambd."""
    b = ctx.b
    outside = b.op("Greater", [b.op("Abs", [ctx.x(0)]), b.const(ctx.attr("lambd", 0.5))])
    return [_kept(b, outside, ctx.dy())]


@rule("LeakyRelu")
def _leaky_relu(ctx: RuleContext) -> Gradients:
    return [_by_sign(ctx, ctx.b.const(ctx.attr("alpha", 0.01)))]


@rule("PRelu", broadcasting=True)
def _prelu(ctx: RuleContext) -> Gradients:
    if ctx.needs(1):
        raise ctx.unsupported("a gradient for the slope input is not supported")
    return [_by_sign(ctx, ctx.x(1)), None]


@rule("Elu")
def _elu(ctx: RuleContext) -> Gradients:
    """x <= 0: y = alpha (e^x - 1), slope y + alpha."""
    return [_by_sign(ctx, ctx.b.op("Add", [ctx.y(0), ctx.b.const(ctx.attr("alpha", 1.0))]))]


@rule("Selu")
def _selu(ctx: RuleContext) -> Gradients:
    """y = gamma x for x > 0, else gamma alpha (e^x - 1), whose slope is y + gamma alpha."""
    b = ctx.b
    alpha = ctx.attr("alpha", 1.67326319217681884765625)
    gamma = ctx.attr("gamma", 1.05070102214813232421875)
    negative_slope = b.op("Add", [ctx.y(0), b.const(gamma * alpha)])
    return [_by_sign(ctx, negative_slope, b.const(gamma))]


@rule("Celu")
def _celu(ctx: RuleContext) -> Gradients:
    """x <= 0: y = alpha (e^(x/alpha) - 1), slope y / alpha + 1."""
    b = ctx.b
    alpha = b.const(ctx.attr("alpha", 1.0))
    return [_by_sign(ctx, b.op("Add", [b.op("Div", [ctx.y(0), alpha]), b.const(1.0)]))]


@rule("Clip")
def _clip(ctx: RuleContext) -> Gradients:
    """dx = dy strictly inside (min, max), as torch's hardtanh/ReLU6 backward."""
    b, x, dy = ctx.b, ctx.x(0), ctx.dy()
    bounds = [(ctx.attr("min"), 1, "Greater"), (ctx.attr("max"), 2, "Less")]
    mask = None
    for attribute_value, input_index, compare in bounds:
        if ctx.x(input_index):
            bound = ctx.x(input_index)
        elif attribute_value is not None:
            bound = b.const(attribute_value)
        else:
            continue
        inside = b.op(compare, [x, bound])
        mask = inside if mask is None else b.op("And", [mask, inside])
    if mask is None:
        return [dy, None, None]
    return [_kept(b, mask, dy), None, None]


@rule("Sigmoid")
def _sigmoid(ctx: RuleContext) -> Gradients:
    b, y = ctx.b, ctx.y(0)
    return _scaled(ctx, b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])]))


@rule("HardSigmoid")
def _hard_sigmoid(ctx: RuleContext) -> Gradients:
    """y = clip(alpha x + beta, 0, 1): dx = alpha dy strictly inside the linear part."""
    b = ctx.b
    alpha = ctx.attr("alpha", 0.2)
    linear = b.op("Add", [b.op("Mul", [ctx.x(0), b.const(alpha)]), b.const(ctx.attr("beta", 0.5))])
    inside = b.op(
        "And", [b.op("Greater", [linear, b.const(0.0)]), b.op("Less", [linear, b.const(1.0)])]
    )
    return [_kept(b, inside, b.op("Mul", [ctx.dy(), b.const(alpha)]))]


@rule("HardSwish")
def _hard_swish(ctx: RuleContext) -> Gradients:
    """y = x relu6(x + 3) / 6: slope 0 below -3, x/3 + 1/2 up to 3, 1 above (as torch)."""
    b, x = ctx.b, ctx.x(0)
    middle = b.op("Add", [b.op("Div", [x, b.const(3.0)]), b.const(0.5)])
    slope = b.op(
        "Where",
        [
            b.op("Less", [x, b.const(-3.0)]),
            b.const(0.0),
            b.op("Where", [b.op("LessOrEqual", [x, b.const(3.0)]), middle, b.const(1.0)]),
        ],
    )
    return _scaled(ctx, slope)


@rule("Mish")
def _mish(ctx: RuleContext) -> Gradients:
    """y = x tanh(softplus(x)): slope t + x sigmoid(x) (1 - t^2), t = tanh(softplus(x))."""
    b, x = ctx.b, ctx.x(0)
    t = b.op("Tanh", [b.op("Softplus", [x])])
    x_sigmoid = b.op("Mul", [x, b.op("Sigmoid", [x])])
    return _scaled(ctx, b.op("Add", [t, b.op("Mul", [x_sigmoid, _one_minus_square(b, t)])]))


@rule("Softsign")
def _softsign(ctx: RuleContext) -> Gradients:
    """y = x / (1 + |x|): slope 1 / (1 + |x|)^2."""
    b = ctx.b
    denominator = b.op("Add", [b.const(1.0), b.op("Abs", [ctx.x(0)])])
    return [b.op("Div", [ctx.dy(), b.op("Mul", [denominator, denominator])])]


@rule("Tanh")
def _tanh(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, _one_minus_square(ctx.b, ctx.y(0)))


def _one_minus_square(b: GraphBuilder, tensor: str) -> str:
    return b.op("Sub", [b.const(1.0), b.op("Mul", [tensor, tensor])])


@rule("Exp")
def _exp(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.y(0))


@rule("Log")
def _log(ctx: RuleContext) -> Gradients:
    return [ctx.b.op("Div", [ctx.dy(), ctx.x(0)])]


@rule("Sqrt")
def _sqrt(ctx: RuleContext) -> Gradients:
    b = ctx.b
    return [b.op("Div", [ctx.dy(), b.op("Mul", [ctx.y(0), b.const(2.0)])])]


@rule("Reciprocal")
def _reciprocal(ctx: RuleContext) -> Gradients:
    b, y = ctx.b, ctx.y(0)
    return [b.op("Neg", [b.op("Mul", [ctx.dy(), b.op("Mul", [y, y])])])]


@rule("Erf")
def _erf(ctx: RuleContext) -> Gradients:
    b, x = ctx.b, ctx.x(0)
    gaussian = b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])])
    return _scaled(ctx, b.op("Mul", [gaussian, b.const(2.0 / math.sqrt(math.pi))]))


@rule("Softplus")
def _softplus(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Sigmoid", [ctx.x(0)]))


@rule("Gelu")
def _gelu(ctx: RuleContext) -> Gradients:
    """Exact Gelu: dx = dy (Phi(x) + x phi(x)); approximate="tanh", y = x (1 + t) / 2 with
    t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3): dx = dy ((1 + t) / 2 + x (1 - t^2) u' / 2),
    u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    b, x = ctx.b, ctx.x(0)
    approximate = ctx.attr("approximate", "none")
    if approximate == "tanh":
        scale, cubic = math.sqrt(2 / math.pi), 0.044715
        square = b.op("Mul", [x, x])
        inner = b.op("Mul", [b.op("Add", [x, b.op("Mul", [b.op("Mul", [square, x]),
                                                          b.const(cubic)])]), b.const(scale)])
        t = b.op("Tanh", [inner])
        inner_slope = b.op("Mul", [b.op("Add", [b.const(1.0), b.op("Mul", [square,
                                                                          b.const(3 * cubic)])]),
                                   b.const(scale)])
        half = b.const(0.5)
        slope = b.op("Add", [
            b.op("Mul", [b.op("Add", [b.const(1.0), t]), half]),
            b.op("Mul", [b.op("Mul", [x, b.op("Sub", [b.const(1.0), b.op("Mul", [t, t])])]),
                         b.op("Mul", [inner_slope, half])]),
        ])
        return _scaled(ctx, slope)
    if approximate != "none":
        raise ctx.unsupported(f"approximate={approximate!r} is not a Gelu of the ONNX standard")
    cdf = b.op(
        "Mul",
        [b.op("Add", [b.op("Erf", [b.op("Mul", [x, b.const(1 / math.sqrt(2))])]), b.const(1.0)]),
         b.const(0.5)],
    )
    pdf = b.op(
        "Mul",
        [b.op("Exp", [b.op("Mul", [b.op("Mul", [x, x]), b.const(-0.5)])]),
         b.const(1 / math.sqrt(2 * math.pi))],
    )
    return _scaled(ctx, b.op("Add", [cdf, b.op("Mul", [x, pdf])]))


@rule("Softmax")
def _softmax(ctx: RuleContext) -> Gradients:
    """dx = y (dy - sum(dy y)) along the softmax axis (opset >= 13 semantics)."""
    b, y, dy = ctx.b, ctx.y(0), ctx.dy()
    _require_opset(ctx, 13)
    axis = ctx.attr("axis", -1)
    dot = b.reduce("ReduceSum", b.op("Mul", [dy, y]), [axis], keepdims=True)
    return [b.op("Mul", [y, b.op("Sub", [dy, dot])])]


@rule("LogSoftmax")
def _log_softmax(ctx: RuleContext) -> Gradients:
    b, dy = ctx.b, ctx.dy()
    _require_opset(ctx, 13)
    total = b.reduce("ReduceSum", dy, [ctx.attr("axis", -1)], keepdims=True)
    return [b.op("Sub", [dy, b.op("Mul", [b.op("Exp", [ctx.y(0)]), total])])]


def _require_opset(ctx: RuleContext, minimum: int) -> None:
    if ctx.b.opset < minimum:
        raise ctx.unsupported(f"its semantics before opset {minimum} are not supported")


# ---------------------------------------------------------------------------------------------
# Trigonometric and hyperbolic
# ---------------------------------------------------------------------------------------------


@rule("Sin")
def _sin(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Cos", [ctx.x(0)]))


@rule("Cos")
def _cos(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Neg", [ctx.b.op("Sin", [ctx.x(0)])]))


@rule("Tan")
def _tan(ctx: RuleContext) -> Gradients:
    """slope 1 + y^2."""
    b, y = ctx.b, ctx.y(0)
    return _scaled(ctx, b.op("Add", [b.const(1.0), b.op("Mul", [y, y])]))


@rule("Sinh")
def _sinh(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Cosh", [ctx.x(0)]))


@rule("Cosh")
def _cosh(ctx: RuleContext) -> Gradients:
    return _scaled(ctx, ctx.b.op("Sinh", [ctx.x(0)]))


@rule("Asin", "Acos")
def _asin_acos(ctx: RuleContext) -> Gradients:
    """slope +-1 / sqrt(1 - x^2)."""
    b = ctx.b
    grad = b.op("Div", [ctx.dy(), b.op("Sqrt", [_one_minus_square(b, ctx.x(0))])])
    return [b.op("Neg", [grad]) if ctx.node.op_type == "Acos" else grad]


@rule("Atan")
def _atan(ctx: RuleContext) -> Gradients:
    """slope 1 / (1 + x^2)."""
    b, x = ctx.b, ctx.x(0)
    return [b.op("Div", [ctx.dy(), b.op("Add", [b.const(1.0), b.op("Mul", [x, x])])])]


@rule("Asinh", "Acosh")
def _asinh_acosh(ctx: RuleContext) -> Gradients:
    """slope 1 / sqrt(x^2 + 1) (Asinh), 1 / sqrt(x^2 - 1) (Acosh)."""
    b, x = ctx.b, ctx.x(0)
    shift = b.const(1.0 if ctx.node.op_type == "Asinh" else -1.0)
    return [b.op("Div", [ctx.dy(), b.op("Sqrt", [b.op("Add", [b.op("Mul", [x, x]), shift])])])]


@rule("Atanh")
def _atanh(ctx: RuleContext) -> Gradients:
    """slope 1 / (1 - x^2)."""
    return [ctx.b.op("Div", [ctx.dy(), _one_minus_square(ctx.b, ctx.x(0))])]


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


@rule("BatchNormalization")
def _batch_norm(ctx: RuleContext) -> Gradients:
    """Inference mode: dx = dy * scale / sqrt(var + eps), per channel (axis 1)."""
    b, x = ctx.b, ctx.x(0)
    if ctx.attr("training_mode", 0):
        raise ctx.unsupported("training_mode=1 is not supported")
    std = b.op("Sqrt", [b.op("Add", [ctx.x(4), b.const(ctx.attr("epsilon", 1e-5))])])
    per_channel = b.op("Div", [ctx.x(1), std])
    per_channel = b.unsqueeze(per_channel, [0, *range(2, b.rank(x))])
    return [b.op("Mul", [ctx.dy(), per_channel]), None, None, None, None]


@rule("InstanceNormalization")
def _instance_norm(ctx: RuleContext) -> Gradients:
    b, x = ctx.b, ctx.x(0)
    rank = b.rank(x)
    g = b.op("Mul", [ctx.dy(), b.unsqueeze(ctx.x(1), list(range(1, rank - 1)))])
    grad = _normalization_grad(b, x, g, list(range(2, rank)), ctx.attr("epsilon", 1e-5))
    return [grad, None, None]


@rule("LayerNormalization")
def _layer_norm(ctx: RuleContext) -> Gradients:
    b, x = ctx.b, ctx.x(0)
    rank = b.rank(x)
    axis = ctx.attr("axis", -1) % rank
    if ctx.attr("stash_type", 1) != 1:
        raise ctx.unsupported("only stash_type=1 (float) is supported")
    g = b.op("Mul", [ctx.dy(), ctx.x(1)])
    grad = _normalization_grad(b, x, g, list(range(axis, rank)), ctx.attr("epsilon", 1e-5))
    return [grad, None, None]


@rule("GroupNormalization")
def _group_norm(ctx: RuleContext) -> Gradients:
    """Normalisation of each group of channels (with the spatial axes) on an [N, G, -1] view;
    the scale is per group at opset 18, per channel from opset 21."""
    b, x, dy, scale = ctx.b, ctx.x(0), ctx.dy(), ctx.x(1)
    grouped = b.ints([0, ctx.attr("num_groups"), -1])
    if b.opset >= 21:
        per_channel = b.unsqueeze(scale, list(range(1, b.rank(x) - 1)))
        g = b.op("Reshape", [b.op("Mul", [dy, per_channel]), grouped])
    else:
        g = b.op("Mul", [b.op("Reshape", [dy, grouped]), b.unsqueeze(scale, [1])])
    x_grouped = b.op("Reshape", [x, grouped])
    grad = _normalization_grad(b, x_grouped, g, [2], ctx.attr("epsilon", 1e-5))
    return [b.op("Reshape", [grad, b.shape(x)]), None, None]


@rule("MeanVarianceNormalization")
def _mean_variance_norm(ctx: RuleContext) -> Gradients:
    """y = (x - mean) / (std + 1e-9) over `axes`; the 1e-9 is taken inside the square root as
    1e-18, a difference far below float precision unless the variance vanishes."""
    axes = list(ctx.attr("axes", [0, 2, 3]))
    return [_normalization_grad(ctx.b, ctx.x(0), ctx.dy(), axes, 1e-18)]


@rule("LpNormalization")
def _lp_normalization(ctx: RuleContext) -> Gradients:
    """y = x / ||x||_p along `axis`: dx = (dy - sum(dy y) d||x||_p/dx) / ||x||_p."""
    b, x, y, dy = ctx.b, ctx.x(0), ctx.y(0), ctx.dy()
    p = ctx.attr("p", 2)
    if p not in (1, 2):
        raise ctx.unsupported(f"p={p} is not supported, only 1 and 2")
    axes = [ctx.attr("axis", -1)]
    norm = b.reduce("ReduceL1" if p == 1 else "ReduceL2", x, axes, keepdims=True)
    dot = b.reduce("ReduceSum", b.op("Mul", [dy, y]), axes, keepdims=True)
    slope = b.op("Sign", [x]) if p == 1 else y
    return [b.op("Div", [b.op("Sub", [dy, b.op("Mul", [dot, slope])]), _nonzero(b, norm)])]


def _normalization_grad(b: GraphBuilder, x: str, g: str, axes: list[int], epsilon: float) -> str:
    """Input gradient of y = scale (x - mean) / sqrt(var + eps) + bias over `axes`:
    dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + eps), given g = dy scale."""
    mean = b.reduce("ReduceMean", x, axes, keepdims=True)
    centered = b.op("Sub", [x, mean])
    variance = b.reduce("ReduceMean", b.op("Mul", [centered, centered]), axes, keepdims=True)
    inv_std = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [variance, b.const(epsilon)])])])
    normalized = b.op("Mul", [centered, inv_std])
    mean_g = b.reduce("ReduceMean", g, axes, keepdims=True)
    mean_g_xhat = b.reduce("ReduceMean", b.op("Mul", [g, normalized]), axes, keepdims=True)
    inner = b.op("Sub", [b.op("Sub", [g, mean_g]), b.op("Mul", [normalized, mean_g_xhat])])
    return b.op("Mul", [inner, inv_std])


# ---------------------------------------------------------------------------------------------
# Reductions and pooling
# ---------------------------------------------------------------------------------------------


@dataclass
class _Reduction:
    """A Reduce* node as its rule sees it: the reduced axes (none where the node reduces
    nothing) and dy and y with those axes kept, so that both broadcast against x."""

    b: GraphBuilder
    axes: list[int]
    dy: str
    y: str

    @classmethod
    def of(cls, ctx: RuleContext) -> "_Reduction":
        b, x, op_type = ctx.b, ctx.x(0), ctx.node.op_type
        rank = b.rank(x)
        axes_input = axes_are_input(op_type, b.opset)
        if axes_input and ctx.x(1):
            axes_value = ctx.const_input(1)
            if axes_value is None:
                raise ctx.unsupported("its axes must be constant")
            axes = [int(a) % rank for a in axes_value]
        elif not axes_input and ctx.attr("axes") is not None:
            axes = [a % rank for a in ctx.attr("axes")]
        elif ctx.attr("noop_with_empty_axes", 0):
            axes = []  # runtimes then apply the op elementwise (ReduceSumSquare: x^2)
        else:
            axes = list(range(rank))
        dy, y = ctx.dy(), ctx.y(0)
        if axes and not ctx.attr("keepdims", 1):
            dy, y = b.unsqueeze(dy, axes), b.unsqueeze(y, axes)
        return cls(b, axes, dy, y)

    def over_axes(self, op_type: str, tensor: str) -> str:
        """`op_type` (ReduceSum, ReduceProd) of `tensor` over the reduced axes, kept."""
        if not self.axes:
            return tensor
        return self.b.reduce(op_type, tensor, self.axes, keepdims=True)

    def scaled(self, slope: str) -> Gradients:
        """dx = dy * slope, slope at x's shape."""
        return [self.b.op("Mul", [self.dy, slope]), None]


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(ctx: RuleContext) -> Gradients:
    """dx = dy broadcast back over the reduced axes (over their size for ReduceMean). Axes
    read at run time (`GraphBuilder.sum_to_shape`'s, which a second reverse pass meets) are
    taken only with keepdims: dy then broadcasts against x whichever axes they are."""
    b, x = ctx.b, ctx.x(0)
    if (ctx.attr("keepdims", 1) and axes_are_input(ctx.node.op_type, b.opset)
            and ctx.x(1) and ctx.const_input(1) is None):
        dy = ctx.dy()
    else:
        dy = _Reduction.of(ctx).dy
    grad = b.op("Expand", [dy, b.shape(x)])
    if ctx.node.op_type == "ReduceMean":
        grad = b.op("Mul", [grad, _size_ratio(b, ctx.y(0), x)])
    return [grad, None]


@rule("ReduceMax", "ReduceMin")
def _reduce_max_min(ctx: RuleContext) -> Gradients:
    """dx = dy [x == y] / (number of x equal to y): tied extremes share the gradient evenly,
    as torch.amax / torch.amin."""
    b, x = ctx.b, ctx.x(0)
    reduction = _Reduction.of(ctx)
    mask = b.op("Cast", [b.op("Equal", [x, reduction.y])], to=b.elem_type(x))
    return reduction.scaled(b.op("Div", [mask, reduction.over_axes("ReduceSum", mask)]))


@rule("ReduceSumSquare")
def _reduce_sum_square(ctx: RuleContext) -> Gradients:
    """slope 2 x."""
    return _Reduction.of(ctx).scaled(ctx.b.op("Mul", [ctx.x(0), ctx.b.const(2.0)]))


@rule("ReduceL1", "ReduceL2")
def _reduce_norm(ctx: RuleContext) -> Gradients:
    """slope sign(x) (L1) or x / y (L2)."""
    reduction = _Reduction.of(ctx)
    p = 1 if ctx.node.op_type == "ReduceL1" else 2
    return reduction.scaled(_norm_slope(ctx.b, ctx.x(0), reduction.y, p))


def _norm_slope(b: GraphBuilder, x: str, norm: str, p: int) -> str:
    """d ||x||_p / dx for p = 1 (sign(x)) or 2 (x / ||x||, 0 where the norm is 0, as torch)."""
    if p == 1:
        return b.op("Sign", [x])
    return b.op("Div", [x, _nonzero(b, norm)])


def _nonzero(b: GraphBuilder, divisor: str) -> str:
    """`divisor` with its zeros replaced by 1 (where the numerator is 0 too)."""
    return b.op("Where", [b.op("Equal", [divisor, b.const(0.0)]), b.const(1.0), divisor])


@rule("ReduceLogSum")
def _reduce_log_sum(ctx: RuleContext) -> Gradients:
    """y = log(sum x): dx = dy / sum x = dy exp(-y), the same for every reduced element."""
    b = ctx.b
    reduction = _Reduction.of(ctx)
    grad = b.op("Mul", [reduction.dy, b.op("Exp", [b.op("Neg", [reduction.y])])])
    return [b.op("Expand", [grad, b.shape(ctx.x(0))]), None]


@rule("ReduceLogSumExp")
def _reduce_log_sum_exp(ctx: RuleContext) -> Gradients:
    """slope exp(x - y), the softmax over the reduced axes."""
    reduction = _Reduction.of(ctx)
    return reduction.scaled(ctx.b.op("Exp", [ctx.b.op("Sub", [ctx.x(0), reduction.y])]))


@rule("ReduceProd")
def _reduce_prod(ctx: RuleContext) -> Gradients:
    """slope = product of the other elements: y / x where x != 0; at a zero, the product of
    the non-zeros if it is the only zero, else 0 (as torch.prod)."""
    b, x = ctx.b, ctx.x(0)
    reduction = _Reduction.of(ctx)
    is_zero = b.op("Equal", [x, b.const(0.0)])
    nonzero = b.op("Where", [is_zero, b.const(1.0), x])
    zeros = reduction.over_axes("ReduceSum", b.op("Cast", [is_zero], to=b.elem_type(x)))
    others = b.op(
        "Where",
        [b.op("Equal", [zeros, b.const(1.0)]), reduction.over_axes("ReduceProd", nonzero),
         b.const(0.0)],
    )
    return reduction.scaled(b.op("Where", [is_zero, others, b.op("Div", [reduction.y, nonzero])]))


def _size_ratio(b: GraphBuilder, small: str, large: str) -> str:
    """size(small) / size(large) as a float scalar, static where both are known."""
    small_shape, large_shape = b.static_shape(small), b.static_shape(large)
    if small_shape is not None and large_shape is not None:
        known = [isinstance(d, int) for d in (*small_shape, *large_shape)]
        if all(known):
            return b.const(math.prod(small_shape) / math.prod(large_shape))
    sizes = [b.op("Cast", [b.op("Size", [t])], to=b.elem_type(large)) for t in (small, large)]
    return b.op("Div", sizes)


@rule("GlobalAveragePool")
def _global_average_pool(ctx: RuleContext) -> Gradients:
    """dy / (H*W) at every position: the [N, C, 1, ...] gradient scaled, then broadcast by a
    Mul with ones [1, 1, H, ...] (onnxruntime writes a broadcast Mul about twice as fast as an
    Expand followed by a full-size Mul)."""
    b, x = ctx.b, ctx.x(0)
    scaled = b.op("Mul", [ctx.dy(), _size_ratio(b, ctx.y(0), x)])
    shape = b.static_shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        ones = b.const(np.ones((1, 1, *shape[2:])))  # float32, as _size_ratio's static ratio
    else:
        spatial = b.op("Slice", [b.shape(x), b.ints([2]), b.ints([2**62])])
        ones = b.op("ConstantOfShape", [b.op("Concat", [b.ints([1, 1]), spatial], axis=0)],
                    value=helper.make_tensor("one", b.elem_type(x), [1], [1]))
    return [b.op("Mul", [scaled, ones])]


@rule("GlobalMaxPool")
def _global_max_pool(ctx: RuleContext) -> Gradients:
    """dy goes to one element per plane, the first maximum in row-major order, as torch's
    adaptive_max_pool2d(x, 1) (ArgMax picks the first of tied maxima)."""
    b, x = ctx.b, ctx.x(0)
    planes = b.op("Reshape", [x, b.ints([0, 0, -1])])
    first = b.op("ArgMax", [planes], axis=2, keepdims=1)
    per_plane = b.op("Reshape", [ctx.dy(), b.ints([0, 0, 1])])
    zeros = b.op("Reshape", [b.zeros_like(x), b.ints([0, 0, -1])])
    grad = b.op("ScatterElements", [zeros, first, per_plane], axis=2)
    return [b.op("Reshape", [grad, b.shape(x)])]


@rule("MaxPool")
def _max_pool(ctx: RuleContext) -> Gradients:
    """Route each output gradient to one element of its window, the first maximum in row-major
    order, as torch's max_pool does. The graph makes that choice itself: one strided Slice per
    kernel tap of x padded with -inf, stacked tap-major, and ArgMax (the first maximum, by the
    spec) over the taps. A runtime's Indices output would not do: onnxruntime's CUDA kernel
    scans windows column-major, so it breaks ties unlike its CPU kernel and torch."""
    b, x, y = ctx.b, ctx.x(0), ctx.y(0)
    kernel = list(ctx.attr("kernel_shape"))
    window = _Window.of(ctx, kernel)
    spatial = len(kernel)
    spans = [(k - 1) * d for k, d in zip(kernel, window.dilations)]
    begin, end = _pool_pads(ctx, window)
    end = b.op("Add", [end, b.ints(spans)])  # room for ceil_mode's last windows
    pads = b.op("Concat", [b.ints([0, 0]), begin, b.ints([0, 0]), end], axis=0)
    padded = b.op("Pad", [x, pads, b.const(-np.inf)])
    axes, strides = b.ints(list(range(2, 2 + spatial))), b.ints(window.strides)
    outputs = b.shape_slice(y, 2)
    extent = b.op("Add", [b.op("Mul", [b.op("Sub", [outputs, b.ints([1])]), strides]),
                          b.ints([1])])
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        start = b.ints([t * d for t, d in zip(tap, window.dilations)])
        strided = b.op("Slice", [padded, start, b.op("Add", [start, extent]), axes, strides])
        taps.append(b.unsqueeze(strided, [2]))
    first = b.op("ArgMax", [b.op("Concat", taps, axis=2)], axis=2, keepdims=0)  # [N, C, *out]
    position = _chosen_position(b, first, y, padded, window)
    planes = b.op("Reshape", [padded, b.ints([0, 0, -1])])
    grad = _scatter_add(
        ctx, "ScatterElements", b.zeros_like(planes),
        b.op("Reshape", [position, b.ints([0, 0, -1])]),
        b.op("Reshape", [ctx.dy(), b.ints([0, 0, -1])]), axis=2,
    )
    grad = b.op("Reshape", [grad, b.shape(padded)])
    inside = b.op("Add", [begin, b.shape_slice(x, 2)])
    return [b.op("Slice", [grad, begin, inside, axes])]


def _chosen_position(b: GraphBuilder, first: str, y: str, padded: str, window: _Window) -> str:
    """The flat position in a padded plane of each window's tap `first` (row-major over the
    kernel): per axis, window start (output index * stride) + tap index * dilation."""
    kernel, spatial = window.kernel, len(window.kernel)
    sizes = b.shape_slice(padded, 2)
    position, rest = b.ints([0]), first
    for axis in range(spatial):
        if axis < spatial - 1:
            taps_after = b.ints([math.prod(kernel[axis + 1:])])
            tap = b.op("Div", [rest, taps_after])
            rest = b.op("Sub", [rest, b.op("Mul", [tap, taps_after])])
        else:
            tap = rest
        count = b.squeeze(b.shape_slice(y, 2 + axis, 3 + axis), [0])
        index = b.op("Range", [b.const(0, np.int64), count, b.const(1, np.int64)])
        view = [1] * spatial
        view[axis] = -1
        window_start = b.op("Reshape", [b.op("Mul", [index, b.ints([window.strides[axis]])]),
                                        b.ints(view)])
        offset = b.op("Mul", [tap, b.ints([window.dilations[axis]])])
        step = b.reduce("ReduceProd", b.op("Slice", [sizes, b.ints([axis + 1]),
                                                     b.ints([spatial])]), [0], keepdims=True)
        coordinate = b.op("Add", [window_start, offset])
        position = b.op("Add", [position, b.op("Mul", [coordinate, step])])
    return position


def _pool_pads(ctx: RuleContext, window: _Window) -> tuple[str, str]:
    """A pool's begin and end pads per spatial axis, as INT64 tensors; auto_pad SAME_* ones
    are computed at run time from the input and output sizes."""
    b, spatial = ctx.b, len(window.kernel)
    if window.auto_pad == "VALID":
        return b.ints([0] * spatial), b.ints([0] * spatial)
    if window.auto_pad == "NOTSET":
        return b.ints(window.pads[:spatial]), b.ints(window.pads[spatial:])
    if any(d != 1 for d in window.dilations):
        raise ctx.unsupported("auto_pad SAME_* with dilations is not supported (onnxruntime "
                              "pads it for the undilated kernel, unlike the ONNX spec)")
    strides = b.ints(window.strides)
    outputs = b.op("Mul", [b.op("Sub", [b.shape_slice(ctx.y(0), 2), b.ints([1])]), strides])
    total = b.op("Sub", [b.op("Add", [outputs, b.ints(window.kernel)]), b.shape_slice(ctx.x(0), 2)])
    total = b.op("Max", [total, b.ints([0])])
    half = b.op("Div", [total, b.ints([2])])
    begin = half if window.auto_pad == "SAME_UPPER" else b.op("Sub", [total, half])
    return begin, b.op("Sub", [total, begin])


@rule("AveragePool")
def _average_pool(ctx: RuleContext) -> Gradients:
    """Spread dy / (window count) back over each window: a ones-kernel ConvTranspose on a
    [N*C, 1, ...] view, so the channel count never needs to be known."""
    b, x, dy = ctx.b, ctx.x(0), ctx.dy()
    kernel = list(ctx.attr("kernel_shape"))
    window = _Window.of(ctx, kernel)
    if ctx.attr("count_include_pad", 0) or not any(window.pads):
        divisor = b.const(float(math.prod(kernel)))
    else:  # windows overlapping the padding average over their valid elements only
        ones = b.op(
            "ConstantOfShape",
            [b.shape(x)],
            value=helper.make_tensor("one", b.elem_type(x), [1], [1]),
        )
        fraction = b.op(
            "AveragePool",
            [ones],
            **{a.name: helper.get_attribute_value(a) for a in ctx.node.attribute
               if a.name != "count_include_pad"},
            count_include_pad=1,
        )
        divisor = b.op("Mul", [fraction, b.const(float(math.prod(kernel)))])
    per_element = b.op("Div", [dy, divisor])
    planes = b.op("Concat", [b.ints([-1, 1]), b.shape_slice(dy, 2)], axis=0)
    weight = b.const(np.ones([1, 1, *kernel], dtype=np.float32))
    spread = _conv_transpose_to_input(
        b, b.op("Reshape", [per_element, planes]), weight, x, ctx.y(0), window, group=1
    )
    return [b.op("Reshape", [spread, b.shape(x)])]


@rule("Resize")
def _resize(ctx: RuleContext) -> Gradients:
    """Spatial resizing of [N, C, H, W] ("linear" or "nearest") is Y = R_h X R_w^T with
    interpolation matrices built at run time from ONNX's coordinate mapping, so
    dX = R_h^T dY R_w."""
    b, x = ctx.b, ctx.x(0)
    mode = ctx.attr("mode", "nearest")
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if b.rank(x) != 4 or mode not in ("linear", "nearest") or ctx.attr("antialias", 0):
        raise ctx.unsupported("only 4-D linear or nearest resizing without antialias is supported")
    if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"):
        raise ctx.unsupported(f"coordinate_transformation_mode {transform!r} is not supported")
    if ctx.attr("axes") not in (None, [2, 3]):
        raise ctx.unsupported("only resizing of the two spatial axes is supported")
    scales = ctx.x(2) if ctx.x(2) and b.static_shape(ctx.x(2)) != (0,) else None
    if scales is not None and b.rank(scales) == 1 and ctx.const_input(2) is not None:
        if np.any(ctx.const_input(2)[:2] != 1):
            raise ctx.unsupported("only resizing of the two spatial axes is supported")
    matrices = [
        _interpolation_matrix(ctx, axis, mode, transform, scales) for axis in (2, 3)
    ]  # [out, in] each
    along_height = b.op("MatMul", [b.op("Transpose", [matrices[0]], perm=[1, 0]), ctx.dy()])
    return [b.op("MatMul", [along_height, matrices[1]]), None, None, None]


def _interpolation_matrix(
    ctx: RuleContext, axis: int, mode: str, transform: str, scales: str | None
) -> str:
    """R [out, in] for one axis: row o holds the weights output o takes from each input."""
    b, x, y = ctx.b, ctx.x(0), ctx.y(0)
    as_float = dict(to=onnx.TensorProto.FLOAT)
    size_in = b.op("Cast", [b.shape_slice(x, axis, axis + 1)], **as_float)
    size_out = b.op("Cast", [b.shape_slice(y, axis, axis + 1)], **as_float)
    if scales is not None:
        scale = b.op("Gather", [scales, b.ints([axis])], axis=0)
    else:
        scale = b.op("Div", [size_out, size_in])
    count = b.squeeze(b.shape_slice(y, axis, axis + 1), [0])
    out_index = b.op("Cast", [b.op("Range", [b.const(0, np.int64), count, b.const(1, np.int64)])],
                     **as_float)
    half = b.const(0.5)
    if transform == "align_corners":
        span = b.op("Div", [b.op("Sub", [size_in, b.const(1.0)]),
                            b.op("Max", [b.op("Sub", [size_out, b.const(1.0)]), b.const(1.0)])])
        source = b.op("Mul", [out_index, span])
    elif transform == "asymmetric":
        source = b.op("Div", [out_index, scale])
    else:
        source = b.op("Sub", [b.op("Div", [b.op("Add", [out_index, half]), scale]), half])
        if transform == "pytorch_half_pixel":
            single = b.op("Equal", [size_out, b.const(1.0)])
            source = b.op("Where", [single, b.const(0.0), source])
    last = b.op("Sub", [size_in, b.const(1.0)])
    depth = b.op("Cast", [size_in], to=onnx.TensorProto.INT64)
    one_zero = b.const([0.0, 1.0])

    def one_hot(index: str) -> str:
        integer = b.op("Cast", [index], to=onnx.TensorProto.INT64)
        return b.op("OneHot", [integer, depth, one_zero], axis=-1)

    if mode == "nearest":
        nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor")
        rounded = {
            "round_prefer_floor": lambda v: b.op("Ceil", [b.op("Sub", [v, half])]),
            "round_prefer_ceil": lambda v: b.op("Floor", [b.op("Add", [v, half])]),
            "floor": lambda v: b.op("Floor", [v]),
            "ceil": lambda v: b.op("Ceil", [v]),
        }[nearest_mode](source)
        return one_hot(b.op("Min", [b.op("Max", [rounded, b.const(0.0)]), last]))
    clamped = b.op("Min", [b.op("Max", [source, b.const(0.0)]), last])
    low = b.op("Floor", [clamped])
    high = b.op("Min", [b.op("Add", [low, b.const(1.0)]), last])
    weight = b.unsqueeze(b.op("Sub", [clamped, low]), [1])
    keep = b.op("Sub", [b.const(1.0), weight])
    return b.op("Add", [b.op("Mul", [one_hot(low), keep]), b.op("Mul", [one_hot(high), weight])])


# ---------------------------------------------------------------------------------------------
# Region pooling (two-stage detectors)
# ---------------------------------------------------------------------------------------------


# Inputs torch detaches: the rois of region pooling, a two-stage detector's proposals (its RPN
# decodes them from detached outputs). The walker treats them, and every tensor computed only to
# produce them, as constants (`backward.detached_tensors`), so that a score reading the decoded
# boxes (proposal + predicted offset) is not differentiated through the RPN either.
DETACHED_INPUTS = {"RoiAlign": (1, 2), "MaxRoiPool": (1,)}


@dataclass(frozen=True)
class _RoiSamples:
    """One spatial axis of RoiAlign's sample grid, every tensor [R, bins, G] (G: the most
    samples per bin of any roi): each sample's two bilinear taps `low`/`high` (INT64 rows or
    columns) and their weights (zero where the sample lies beyond [-1, size], as the runtime
    skips it), `in_grid` (a roi's own grid may be smaller than G under adaptive sampling) and
    `grid` (that roi's sample count per bin, at least 1)."""

    low: str
    high: str
    weight_low: str
    weight_high: str
    in_grid: str
    grid: str


@rule("RoiAlign")
def _roi_align(ctx: RuleContext) -> Gradients:
    """Y[r, c, i, j] pools X[batch_indices[r], c] over bin (i, j) of roi r at a grid of bilinear
    samples (onnxruntime's and torchvision's roi_align geometry: roi = rois * spatial_scale, less
    0.5 under half_pixel; under output_half_pixel a roi is at least 1 x 1; sampling_ratio samples
    per bin and axis, or ceil(roi size / bins) per roi when it is 0; samples beyond [-1, size] add
    nothing). Only X gets a gradient: rois and batch_indices get none, as torch detaches
    proposals.

    avg: the samples are separable, Y[r, c] = A_h[r] X[n_r, c] A_w[r]^T with A [R, bins, size]
    the per-roi sample matrices, so dX[n, c] = sum over the rois of image n of
    A_h[r]^T dY[r, c] A_w[r]: two MatMuls, the second summing over rois through a one-hot of
    batch_indices (no scatter). max (the runtime's: the largest weighted tap w_k X[p_k] over all
    samples and their four taps): dY times w_k goes to the chosen tap, the first of ties as the
    runtime picks, by ArgMax and a ScatterElements add."""
    b, x, dy = ctx.b, ctx.x(0), ctx.dy()
    mode = ctx.attr("mode", "avg")
    default_transform = "half_pixel" if b.opset >= 16 else "output_half_pixel"
    transform = ctx.attr("coordinate_transformation_mode", default_transform)
    if mode not in ("avg", "max"):
        raise ctx.unsupported(f"mode {mode!r} is not supported, only 'avg' and 'max'")
    if transform not in ("half_pixel", "output_half_pixel"):
        raise ctx.unsupported(f"coordinate_transformation_mode {transform!r} is not supported")
    boxes = b.op("Mul", [b.op("Cast", [ctx.x(1)], to=onnx.TensorProto.FLOAT),
                         b.const(float(ctx.attr("spatial_scale", 1.0)))])
    if transform == "half_pixel":
        boxes = b.op("Sub", [boxes, b.const(0.5)])
    bins = {2: ctx.attr("output_height", 1), 3: ctx.attr("output_width", 1)}
    first_corner = {2: 1, 3: 0}  # rois are [x1, y1, x2, y2]
    samples = {
        axis: _roi_samples(ctx, boxes, first_corner[axis], bins[axis], axis,
                           min_size=1.0 if transform == "output_half_pixel" else None)
        for axis in (2, 3)
    }
    images = b.op("Cast", [ctx.x(2)], to=onnx.TensorProto.INT64)
    if mode == "avg":
        grad = _roi_average_grad(b, x, dy, images, samples[2], samples[3], bins[2],
                                 bins[3])
    else:
        grad = _roi_max_grad(ctx, x, dy, images, samples[2], samples[3], bins)
    return [grad, None, None]


def _roi_column(b: GraphBuilder, boxes: str, index: int) -> str:
    """Column `index` of the boxes [R, k], as [R, 1, 1]."""
    return b.unsqueeze(b.op("Slice", [boxes, b.ints([index]), b.ints([index + 1]),
                                      b.ints([1])]), [2])


def _counting(b: GraphBuilder, counts: str) -> str:
    """0, 1, ..., K - 1 as FLOAT [1, 1, K], K the largest of the whole-number FLOAT `counts`
    (one per roi and bin; at least 1, also where there are no rois): the positions a count
    masks with ``offset < count``."""
    with_one = b.op("Concat", [b.op("Reshape", [counts, b.ints([-1])]), b.const([1.0])], axis=0)
    most = b.op("Cast", [b.reduce("ReduceMax", with_one, [0], keepdims=False)],
                to=onnx.TensorProto.INT64)
    counting = b.op("Cast", [b.op("Range", [b.const(0, np.int64), most, b.const(1, np.int64)])],
                    to=onnx.TensorProto.FLOAT)
    return b.op("Reshape", [counting, b.ints([1, 1, -1])])


def _roi_samples(
    ctx: RuleContext, boxes: str, corner: int, bins: int, axis: int, min_size: float | None
) -> _RoiSamples:
    """The sample grid of spatial `axis` of X, from box columns `corner` and `corner` + 2."""
    b, x = ctx.b, ctx.x(0)
    start = _roi_column(b, boxes, corner)
    size = b.op("Sub", [_roi_column(b, boxes, corner + 2), start])
    if min_size is not None:
        size = b.op("Max", [size, b.const(min_size)])
    bin_size = b.op("Div", [size, b.const(float(bins))])
    ratio = ctx.attr("sampling_ratio", 0)
    if ratio > 0:
        grid = b.const(float(ratio))
        sample = b.const(np.arange(ratio, dtype=np.float32).reshape(1, 1, ratio))
    else:  # adaptive: ceil(roi size / bins) samples per bin, per roi
        grid = b.op("Ceil", [bin_size])
        sample = _counting(b, grid)
    in_grid = b.op("Less", [sample, grid])
    grid = b.op("Max", [grid, b.const(1.0)])
    bin_index = b.const(np.arange(bins, dtype=np.float32).reshape(1, bins, 1))
    offset = b.op("Div", [b.op("Mul", [b.op("Add", [sample, b.const(0.5)]), bin_size]), grid])
    position = b.op("Add", [b.op("Add", [start, b.op("Mul", [bin_index, bin_size])]), offset])
    extent = b.op("Cast", [b.shape_slice(x, axis, axis + 1)], to=onnx.TensorProto.FLOAT)
    last = b.op("Sub", [extent, b.const(1.0)])
    outside = b.op("Or", [b.op("Less", [position, b.const(-1.0)]),
                          b.op("Greater", [position, extent])])
    inside = b.op("Cast", [b.op("Not", [outside])], to=onnx.TensorProto.FLOAT)
    clamped = b.op("Min", [b.op("Max", [position, b.const(0.0)]), last])
    low = b.op("Floor", [clamped])
    high = b.op("Min", [b.op("Add", [low, b.const(1.0)]), last])
    fraction = b.op("Sub", [clamped, low])
    as_int = dict(to=onnx.TensorProto.INT64)
    return _RoiSamples(
        low=b.op("Cast", [low], **as_int),
        high=b.op("Cast", [high], **as_int),
        weight_low=b.op("Mul", [b.op("Sub", [b.const(1.0), fraction]), inside]),
        weight_high=b.op("Mul", [fraction, inside]),
        in_grid=in_grid,
        grid=grid,
    )


def _roi_sample_matrix(b: GraphBuilder, samples: _RoiSamples, extent: str) -> str:
    """A [R, bins, size]: row (r, i) holds the weight each row (column) of X gets in bin i of
    roi r, averaged over the bin's samples."""
    one_zero = b.const([0.0, 1.0])
    share = b.op("Div", [b.op("Cast", [samples.in_grid], to=onnx.TensorProto.FLOAT),
                         samples.grid])
    taps = []
    for index, weight in ((samples.low, samples.weight_low), (samples.high, samples.weight_high)):
        one_hot = b.op("OneHot", [index, extent, one_zero], axis=-1)  # [R, bins, G, size]
        taps.append(b.op("Mul", [one_hot, b.unsqueeze(b.op("Mul", [weight, share]), [3])]))
    return b.reduce("ReduceSum", b.op("Add", taps), [2], keepdims=False)


def _roi_average_grad(
    b: GraphBuilder, x: str, dy: str, images: str, rows: _RoiSamples, columns: _RoiSamples,
    bins_h: int, bins_w: int,
) -> str:
    """dX = sum over rois r of image n of A_h[r]^T dY[r, c] A_w[r]."""
    dims = b.shape(x)

    def dim(axis: int) -> str:
        return b.op("Slice", [dims, b.ints([axis]), b.ints([axis + 1])])

    def like_dy(tensor: str) -> str:  # the matrices are built in float32
        if b.elem_type(x) == onnx.TensorProto.FLOAT:
            return tensor
        return b.op("CastLike", [tensor, dy])

    row_matrix, column_matrix = (_roi_sample_matrix(b, s, dim(axis))
                                 for axis, s in ((2, rows), (3, columns)))
    # One [C * bins_h, bins_w] x [bins_w, W] product per roi (batching per roi and channel
    # measured ~10x slower in onnxruntime). Reshapes spell every size out: onnxruntime cannot
    # infer a -1 beside a 0 (no rois).
    channels_by_bin = b.op("Mul", [dim(1), b.ints([bins_h])])
    by_roi = b.op("Reshape", [dy, b.op("Concat", [b.ints([0]), channels_by_bin,
                                                  b.ints([bins_w])], axis=0)])
    along_width = b.op("MatMul", [by_roi, like_dy(column_matrix)])  # [R, C * bins_h, W]
    along_width = b.op("Reshape", [along_width, b.op("Concat", [
        b.ints([0]), dim(1), b.ints([bins_h]), dim(3)], axis=0)])  # [R, C, bins_h, W]
    by_bin = b.op("Transpose", [along_width], perm=[0, 2, 1, 3])  # [R, bins_h, C, W]
    by_bin = b.op("Reshape", [by_bin, b.op("Concat", [b.ints([-1]),
                                                      b.op("Mul", [dim(1), dim(3)])], axis=0)])
    of_image = b.op("OneHot", [images, dim(0), b.const([0.0, 1.0])], axis=0)  # [N, R]
    rows_of_image = b.op("Mul", [
        b.op("Reshape", [of_image, b.ints([0, 1, -1, 1])]),
        b.unsqueeze(b.op("Transpose", [row_matrix], perm=[2, 0, 1]), [0]),
    ])  # [N, H, R, bins_h]
    rows_of_image = like_dy(b.op("Reshape", [rows_of_image, b.ints([0, 0, -1])]))
    grad = b.op("MatMul", [rows_of_image, by_bin])  # [N, H, C * W]
    grad = b.op("Reshape", [grad, b.op("Concat", [dim(0), dim(2), dim(1), dim(3)], axis=0)])
    return b.op("Transpose", [grad], perm=[0, 2, 1, 3])


def _roi_max_grad(
    ctx: RuleContext, x: str, dy: str, images: str, rows: _RoiSamples, columns: _RoiSamples,
    bins: dict[int, int],
) -> str:
    """dY[r, c, i, j] times the weight of the chosen tap, added at that tap of X[n_r, c]."""
    b = ctx.b
    # Each axis' two taps, laid out [R, bins_h, bins_w, G_h, G_w, tap_h, tap_w] so that the
    # flattened order is the runtime's: samples row-major, then taps (low, low) ... (high, high).
    # (Unsqueeze, not Reshape: onnxruntime cannot infer a -1 beside a 0, as when no rois.)
    y_view, x_view = [2, 4, 6], [1, 3, 5]

    def taps(view: list[int], pair: tuple[str, str]) -> str:
        return b.unsqueeze(b.op("Concat", [b.unsqueeze(t, [3]) for t in pair], axis=3), view)

    flat_index = _flat_positions(b, x, images, taps(y_view, (rows.low, rows.high)),
                                 taps(x_view, (columns.low, columns.high)), rank=7)
    in_grid = b.op("And", [b.unsqueeze(rows.in_grid, [2, 4, 5, 6]),
                           b.unsqueeze(columns.in_grid, [2, 3, 5, 6])])
    weight = b.op("Mul", [taps(y_view, (rows.weight_low, rows.weight_high)),
                          taps(x_view, (columns.weight_low, columns.weight_high))])
    weight = b.op("Mul", [weight, b.op("Cast", [in_grid], to=onnx.TensorProto.FLOAT)])
    return _chosen_tap_grad(ctx, x, dy, flat_index, weight, in_grid, bins[2] * bins[3])


def _flat_positions(
    b: GraphBuilder, x: str, images: str, row: str, column: str, rank: int
) -> str:
    """Positions in X viewed as [N * H * W, C] of rows `row` and columns `column` (INT64, both
    [R, ...] of `rank`, broadcast together) of each roi's image `images` [R]."""
    dims = b.shape(x)
    width = b.op("Slice", [dims, b.ints([3]), b.ints([4])])
    plane = b.op("Mul", [b.op("Slice", [dims, b.ints([2]), b.ints([3])]), width])
    image_start = b.op("Reshape", [b.op("Mul", [images, plane]), b.ints([-1] + [1] * (rank - 1))])
    return b.op("Add", [image_start, b.op("Add", [b.op("Mul", [row, width]), column])])


def _chosen_tap_grad(
    ctx: RuleContext, x: str, dy: str, flat_index: str, weight: str, candidate: str, cells: int
) -> str:
    """The gradient of a max over candidate taps per output cell (the first maximum of
    weight * X at `flat_index` among the taps where `candidate` holds, in row-major order):
    dY times the chosen tap's weight, added at that tap. `flat_index` (from `_flat_positions`),
    `weight` and `candidate` are [R, bins_h, bins_w, ...taps...], broadcast to the shape of
    `flat_index`, which must be the full one; a cell without any candidate gets no gradient
    (its weights must be 0 there)."""
    b = ctx.b
    dims = b.shape(x)
    if b.elem_type(x) != onnx.TensorProto.FLOAT:
        weight = b.op("CastLike", [weight, dy])
    full = b.shape(flat_index)
    taps = b.reduce("ReduceProd", b.shape_slice(flat_index, 3), [0], keepdims=True)
    by_cell = b.op("Concat", [b.ints([-1, cells]), taps], axis=0)  # [R, cells, K]
    flat_index, weight, candidate = (b.op("Reshape", [b.op("Expand", [t, full]), by_cell])
                                     for t in (flat_index, weight, candidate))
    channels = b.op("Slice", [dims, b.ints([1]), b.ints([2])])
    by_channel = b.op("Concat", [b.ints([-1]), channels], axis=0)
    pixels = b.op("Reshape", [b.op("Transpose", [x], perm=[0, 2, 3, 1]), by_channel])
    values = b.op("Gather", [pixels, flat_index], axis=0)  # [R, cells, K, C]
    values = b.op("Mul", [values, b.unsqueeze(weight, [3])])
    values = b.op("Where", [b.unsqueeze(candidate, [3]), values,
                            b.op("CastLike", [b.const(-np.inf), dy])])
    chosen = b.op("Transpose", [b.op("ArgMax", [values], axis=2, keepdims=1)],
                  perm=[0, 1, 3, 2])  # [R, cells, C, 1]
    chosen_index = b.op("GatherND", [flat_index, chosen], batch_dims=2)  # [R, cells, C]
    chosen_weight = b.op("GatherND", [weight, chosen], batch_dims=2)
    per_cell = b.op("Reshape", [b.op("Transpose", [dy], perm=[0, 2, 3, 1]),
                                b.op("Concat", [b.ints([-1, cells]), channels], axis=0)])
    updates = b.op("Mul", [per_cell, chosen_weight])
    zeros = b.op("Reshape", [b.zeros_like(x), by_channel])  # of x's type, as pixels
    grad = _scatter_add(ctx, "ScatterElements", zeros,
                        b.op("Reshape", [chosen_index, by_channel]),
                        b.op("Reshape", [updates, by_channel]), axis=0)
    grad = b.op("Reshape", [grad, b.op("Concat", [
        b.op("Slice", [dims, b.ints([0]), b.ints([1])]),
        b.op("Slice", [dims, b.ints([2]), b.ints([4])]), channels], axis=0)])
    return b.op("Transpose", [grad], perm=[0, 3, 1, 2])


@rule("MaxRoiPool")
def _max_roi_pool(ctx: RuleContext) -> Gradients:
    """Y[r, c, i, j] = the maximum of X[n_r, c] over bin (i, j) of roi r = [n_r, x1, y1, x2, y2]
    (onnxruntime's and torchvision's roi_pool: corners scaled by spatial_scale and rounded half
    away from zero, the roi at least 1 x 1 cells with its end included, bin i spanning rows
    floor(i * size / bins) to ceil((i + 1) * size / bins) - 1 from its start, clipped to X; an
    empty bin is 0). dY goes to the first maximum of each bin in row-major order, as both pick
    it; rois get no gradient."""
    b, x = ctx.b, ctx.x(0)
    bins = list(ctx.attr("pooled_shape"))
    rois = b.op("Mul", [b.op("Cast", [ctx.x(1)], to=onnx.TensorProto.FLOAT),
                        b.const([1.0] + [float(ctx.attr("spatial_scale", 1.0))] * 4)])
    rounded = b.op("Mul", [b.op("Sign", [rois]),
                           b.op("Floor", [b.op("Add", [b.op("Abs", [rois]), b.const(0.5)])])])
    rows = _roi_pool_window(b, x, rounded, 2, bins[0], axis=2)
    columns = _roi_pool_window(b, x, rounded, 1, bins[1], axis=3)
    images = b.op("Cast", [b.op("Reshape", [b.op("Slice", [rois, b.ints([0]), b.ints([1]),
                                                         b.ints([1])]), b.ints([-1])])],
                  to=onnx.TensorProto.INT64)
    flat_index = _flat_positions(b, x, images, b.unsqueeze(rows[0], [2, 4]),
                                 b.unsqueeze(columns[0], [1, 3]), rank=5)
    candidate = b.op("And", [b.unsqueeze(rows[1], [2, 4]), b.unsqueeze(columns[1], [1, 3])])
    weight = b.op("Cast", [candidate], to=onnx.TensorProto.FLOAT)
    return [_chosen_tap_grad(ctx, x, ctx.dy(), flat_index, weight, candidate,
                             bins[0] * bins[1]), None]


def _roi_pool_window(
    b: GraphBuilder, x: str, rounded: str, corner: int, bins: int, axis: int
) -> tuple[str, str]:
    """One axis of MaxRoiPool's bins, [R, bins, K] each (K: the widest bin of any roi): the
    rows (columns) of X each bin reads, clamped into X, and whether each lies in the bin."""
    start = _roi_column(b, rounded, corner)
    size = b.op("Max", [b.op("Add", [b.op("Sub", [_roi_column(b, rounded, corner + 2), start]),
                                     b.const(1.0)]), b.const(1.0)])
    bin_size = b.op("Div", [size, b.const(float(bins))])
    bin_index = b.const(np.arange(bins, dtype=np.float32).reshape(1, bins, 1))
    extent = b.op("Cast", [b.shape_slice(x, axis, axis + 1)], to=onnx.TensorProto.FLOAT)

    def clipped(edge: str) -> str:
        return b.op("Min", [b.op("Max", [b.op("Add", [edge, start]), b.const(0.0)]), extent])

    low = clipped(b.op("Floor", [b.op("Mul", [bin_index, bin_size])]))
    high = clipped(b.op("Ceil", [b.op("Mul", [b.op("Add", [bin_index, b.const(1.0)]),
                                              bin_size])]))
    span = b.op("Sub", [high, low])
    offset = _counting(b, span)
    inside = b.op("Less", [offset, span])
    last = b.op("Max", [b.op("Sub", [extent, b.const(1.0)]), b.const(0.0)])
    index = b.op("Min", [b.op("Add", [low, offset]), last])
    return b.op("Cast", [index], to=onnx.TensorProto.INT64), inside


# ---------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------


@rule("Conv")
def _conv(ctx: RuleContext) -> Gradients:
    """dx = ConvTranspose(dy, W) with the conv's strides, dilations and groups, sized back to x.
    Weight and bias gradients are never built."""
    b, x, weight = ctx.b, ctx.x(0), ctx.x(1)
    window = _Window.of_conv(ctx)
    grad = _conv_transpose_to_input(
        b, ctx.dy(), weight, x, ctx.y(0), window, group=ctx.attr("group", 1)
    )
    return [grad, None, None]


@dataclass
class _Window:
    """Sliding-window geometry shared by Conv and the pools."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pads: list[int]  # begin..., end...
    auto_pad: str

    @classmethod
    def of(cls, ctx: RuleContext, kernel: list[int]) -> "_Window":
        spatial = len(kernel)
        return cls(
            kernel=kernel,
            strides=list(ctx.attr("strides") or [1] * spatial),
            dilations=list(ctx.attr("dilations") or [1] * spatial),
            pads=list(ctx.attr("pads") or [0] * (2 * spatial)),
            auto_pad=ctx.attr("auto_pad", "NOTSET"),
        )

    @classmethod
    def of_conv(cls, ctx: RuleContext) -> "_Window":
        """The window of a Conv or ConvTranspose, whose weight and bias get no gradient."""
        if ctx.needs(1) or ctx.needs(2):
            raise ctx.unsupported("gradients for weights or bias are not supported")
        weight_shape = ctx.b.static_shape(ctx.x(1))
        kernel = ctx.attr("kernel_shape") or (weight_shape[2:] if weight_shape else None)
        if kernel is None or not all(isinstance(k, int) for k in kernel):
            raise ctx.unsupported("its kernel shape is unknown")
        return cls.of(ctx, list(kernel))


def _conv_transpose_to_input(
    b: GraphBuilder, dy: str, weight: str, x: str, y: str, window: _Window, group: int
) -> str:
    """ConvTranspose of `dy` whose spatial size comes back exactly to `x`'s.

    With static spatial sizes the exact output_padding is computed; otherwise the full transpose
    is taken with output_padding = stride - 1 (long enough for any input size) and cropped to
    ``x`` at run time, starting at the begin pads."""
    spatial = len(window.kernel)
    x_shape, y_shape = b.static_shape(x), b.static_shape(y)
    in_sizes = list(x_shape[2:]) if x_shape else [None] * spatial
    out_sizes = list(y_shape[2:]) if y_shape else [None] * spatial
    static = all(isinstance(d, int) for d in in_sizes + out_sizes)
    pads = list(window.pads)
    if window.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if not static:
            raise AugmentError("auto_pad SAME_* needs static spatial sizes to be differentiated")
        for i in range(spatial):
            total = max(
                (out_sizes[i] - 1) * window.strides[i]
                + (window.kernel[i] - 1) * window.dilations[i] + 1 - in_sizes[i],
                0,
            )
            pads[i], pads[i + spatial] = _split_padding(total, window.auto_pad)
    elif window.auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    attrs = dict(strides=window.strides, dilations=window.dilations, group=group)
    if static:
        output_padding = [
            in_sizes[i] + pads[i] + pads[i + spatial]
            - ((out_sizes[i] - 1) * window.strides[i]
               + (window.kernel[i] - 1) * window.dilations[i] + 1)
            for i in range(spatial)
        ]
        if all(0 <= p < max(s, d) for p, s, d in
               zip(output_padding, window.strides, window.dilations)):
            return b.op(
                "ConvTranspose", [dy, weight], pads=pads, output_padding=output_padding, **attrs
            )
    full = b.op(
        "ConvTranspose",
        [dy, weight],
        pads=[0] * (2 * spatial),
        output_padding=[s - 1 for s in window.strides],
        **attrs,
    )
    starts = b.ints(pads[:spatial])
    ends = b.op("Add", [starts, b.shape_slice(x, 2)])
    return b.op("Slice", [full, starts, ends, b.ints(list(range(2, 2 + spatial)))])


def _split_padding(total: int, auto_pad: str) -> tuple[int, int]:
    """(begin, end) padding: SAME_UPPER puts the odd one at the end, anything else at the
    begin (SAME_LOWER, and ConvTranspose's output_shape without auto_pad)."""
    begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
    return begin, total - begin


@rule("ConvTranspose")
def _conv_transpose(ctx: RuleContext) -> Gradients:
    """dx = Conv(dy, W) with the same weight, strides, dilations, group and (effective) pads:
    a ConvTranspose is the adjoint of that Conv. Weight and bias gradients are never built."""
    b, weight = ctx.b, ctx.x(1)
    window = _Window.of_conv(ctx)
    spatial = len(window.kernel)
    output_padding = list(ctx.attr("output_padding") or [0] * spatial)
    if any(p >= s for p, s in zip(output_padding, window.strides)):
        raise ctx.unsupported("output_padding at or above the stride is not supported")
    pads = window.pads
    output_shape = ctx.attr("output_shape")
    if window.auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    elif window.auto_pad != "NOTSET" or output_shape:
        pads = _conv_transpose_pads(ctx, window, output_padding, output_shape)
    grad = b.op(
        "Conv", [ctx.dy(), weight], pads=pads, strides=window.strides,
        dilations=window.dilations, group=ctx.attr("group", 1),
    )
    return [grad, None, None]


def _conv_transpose_pads(
    ctx: RuleContext, window: _Window, output_padding: list[int], output_shape: list[int] | None
) -> list[int]:
    """The pads a ConvTranspose with auto_pad SAME_* or an output_shape takes: total =
    stride (in - 1) + output_padding + dilated kernel - out, with out = output_shape or
    in * stride, split as `_split_padding` says. Needs static input sizes."""
    spatial = len(window.kernel)
    x_shape = ctx.b.static_shape(ctx.x(0))
    in_sizes = list(x_shape[2:]) if x_shape else [None]
    if not all(isinstance(d, int) for d in in_sizes):
        raise ctx.unsupported("auto_pad or output_shape needs static spatial sizes")
    if output_shape:
        out_sizes = list(output_shape[-spatial:])
    else:
        out_sizes = [d * s for d, s in zip(in_sizes, window.strides)]
    begins, ends = [], []
    for i in range(spatial):
        total = (
            window.strides[i] * (in_sizes[i] - 1) + output_padding[i]
            + (window.kernel[i] - 1) * window.dilations[i] + 1 - out_sizes[i]
        )
        if total < 0:
            raise ctx.unsupported("an output larger than the full transposed convolution "
                                  "is not supported")
        begin, end = _split_padding(total, window.auto_pad)
        begins.append(begin)
        ends.append(end)
    return begins + ends


@rule("Einsum")
def _einsum(ctx: RuleContext) -> Gradients:
    """d operand i = einsum(dy, the other operands -> operand i's subscripts). Letters only
    operand i has were summed away: they come back by Expand; '...' dims broadcast from size
    1 are summed back."""
    b = ctx.b
    terms, output, broadcast = _einsum_subscripts(ctx)
    with_ellipsis = [bool(set(broadcast) & set(term)) for term in terms]
    grads: list[str | None] = []
    for i, (x, term) in enumerate(zip(ctx.node.input, terms)):
        if not ctx.needs(i):
            grads.append(None)
            continue
        others = terms[:i] + terms[i + 1:]
        elsewhere = set(output).union(*others)
        kept = "".join(c for c in term if c in elsewhere)
        equation = ",".join([output, *others]) + "->" + kept
        operands = [ctx.dy(), *(ctx.x(j) for j in range(len(terms)) if j != i)]
        grad = ctx.dy() if equation == f"{kept}->{kept}" else b.op(
            "Einsum", operands, equation=equation
        )
        if kept != term:
            lonely = [k for k, c in enumerate(term) if c not in elsewhere]
            grad = b.op("Expand", [b.unsqueeze(grad, lonely), b.shape(x)])
        if with_ellipsis[i] and sum(with_ellipsis) > 1:
            grad = b.sum_to_shape(grad, x)
        grads.append(grad)
    return grads


def _einsum_subscripts(ctx: RuleContext) -> tuple[list[str], str, str]:
    """The equation's operand and output subscripts with '...' written out as letters the
    equation does not use (right-aligned across operands, as numpy broadcasts them) and an
    implicit output made explicit (the '...' dims, then the letters used once, sorted); and
    the letters standing for '...'."""
    equation = ctx.attr("equation").replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    free = [c for c in string.ascii_lowercase + string.ascii_uppercase if c not in equation]
    widths = [
        ctx.b.rank(x) - (len(term) - 3) if "..." in term else 0
        for x, term in zip(ctx.node.input, terms)
    ]
    broadcast = "".join(free[:max(widths)])
    terms = [
        term.replace("...", broadcast[len(broadcast) - width:])
        for term, width in zip(terms, widths)
    ]
    if arrow:
        output = output.replace("...", broadcast)
    else:
        letters = "".join(terms)
        once = sorted(c for c in set(letters) - set(broadcast) if letters.count(c) == 1)
        if any(c.isupper() for c in once) and any(c.islower() for c in once):
            raise ctx.unsupported("an implicit output mixing upper- and lower-case letters is "
                                  "ordered differently by runtimes; write the output explicitly")
        output = broadcast + "".join(once)
    for term in terms:
        if len(set(term)) < len(term):
            raise ctx.unsupported(
                f"a letter repeated within one operand ({term!r}: a diagonal) is not supported"
            )
    return terms, output, broadcast


@rule("Gemm")
def _gemm(ctx: RuleContext) -> Gradients:
    """y = alpha op(A) op(B) + beta C."""
    b, dy, a_in, b_in = ctx.b, ctx.dy(), ctx.x(0), ctx.x(1)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    trans_a, trans_b = ctx.attr("transA", 0), ctx.attr("transB", 0)
    grad_a = grad_b = grad_c = None
    rows = b.one_hot_rows.get(dy)
    if ctx.needs(0) and rows is not None and not trans_a and alpha == 1.0:
        # a one-hot seed (a class score on a classifier's last layer): dy op(B)^T is the
        # chosen rows of op(B)^T, gathered instead of multiplied ([N, K] from K x classes)
        grad_a = (b.op("Gather", [b_in, rows], axis=0) if trans_b else
                  b.op("Transpose", [b.op("Gather", [b_in, rows], axis=1)], perm=[1, 0]))
    elif ctx.needs(0):
        if trans_a:
            grad_a = b.op("Gemm", [b_in, dy], alpha=alpha, transA=trans_b, transB=1)
        else:
            grad_a = b.op("Gemm", [dy, b_in], alpha=alpha, transB=1 - trans_b)
    if ctx.needs(1):
        if trans_b:
            grad_b = b.op("Gemm", [dy, a_in], alpha=alpha, transA=1, transB=trans_a)
        else:
            grad_b = b.op("Gemm", [a_in, dy], alpha=alpha, transA=1 - trans_a)
    if ctx.needs(2):
        grad_c = b.sum_to_shape(b.op("Mul", [dy, b.const(beta)]), ctx.x(2), ctx.y(0))
    return [grad_a, grad_b, grad_c]


@rule("MatMul")
def _matmul(ctx: RuleContext) -> Gradients:
    """dA = dy B^T, dB = A^T dy over the last two axes; broadcast batch axes are summed."""
    b, dy, a_in, b_in = ctx.b, ctx.dy(), ctx.x(0), ctx.x(1)
    rank_a, rank_b = b.rank(a_in), b.rank(b_in)
    if rank_a < 2 or rank_b < 2:
        raise ctx.unsupported("1-D operands are not supported")

    def swap_last(tensor: str, rank: int) -> str:
        return b.op("Transpose", [tensor], perm=[*range(rank - 2), rank - 1, rank - 2])

    def batch_reduced(grad: str, operand: str) -> str:
        if rank_a == rank_b == 2:
            return grad
        return b.sum_to_shape(grad, operand)

    grad_a = grad_b = None
    if ctx.needs(0):
        grad_a = batch_reduced(b.op("MatMul", [dy, swap_last(b_in, rank_b)]), a_in)
    if ctx.needs(1):
        grad_b = batch_reduced(b.op("MatMul", [swap_last(a_in, rank_a), dy]), b_in)
    return [grad_a, grad_b]


# ---------------------------------------------------------------------------------------------
# Quantization: straight-through, keeping the clipping mask
# ---------------------------------------------------------------------------------------------
#
# The gradient of an integer tensor of the quantized chain (`backward.quantized_tensors`) is
# d score / d its integer value, a float tensor of its shape. So DequantizeLinear, y = (q - zp)
# scale, multiplies by the scale, and QuantizeLinear, q = saturate(round(x / scale) + zp),
# divides by it: any pairing of scales is exact. Rounding is passed straight through, but the
# saturation is not: d q / d x is 0 where round(x / scale) + zp falls outside the output type's
# range, as torch's fake-quantize backward has it. The quantizer removes the ReLUs in front of
# a Q/DQ pair (the range of the uint8 or int8 type stands in for them), so that mask is the
# ReLU's. Scales and zero points get no gradient, also where they are computed from the input
# (DynamicQuantizeLinear): in the continuous relaxation, round dropped, they cancel. Guided
# backprop treats a QuantizeLinear that stands for a removed ReLU as that ReLU.

_INTEGER_RANGES = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT16: (0, 65535),
    onnx.TensorProto.INT16: (-32768, 32767),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
    onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT4: (-8, 7),
}


def _per_axis(ctx: RuleContext, parameter: str, like: str) -> str:
    """A Q/DQ scale or zero point shaped to broadcast against `like`: a scalar as it is, a 1-D
    tensor along the node's `axis` (per-channel); blocked quantization is refused."""
    b = ctx.b
    if ctx.attr("block_size", 0):
        raise ctx.unsupported("blocked quantization (block_size) is not supported; augment the "
                              "float model, or quantize per tensor or per channel")
    shape = b.static_shape(parameter)
    if shape is None:
        raise ctx.unsupported(f"the rank of its scale or zero point {parameter!r} is unknown")
    if len(shape) == 0:
        return parameter
    if len(shape) > 1:
        raise ctx.unsupported("scales of rank above 1 (blocked quantization) are not supported")
    rank = b.rank(like)
    axis = ctx.attr("axis", 1) % rank
    others = [a for a in range(rank) if a != axis]
    return b.unsqueeze(parameter, others) if others else parameter


def _quantizer_grad(ctx: RuleContext, x: str, scale: str, zero_point: str | None,
                    integer_type: int) -> str:
    """d score / d x of q = saturate(round(x / scale) + zero_point): dq / scale where the
    rounded value lies in the integer type's range, 0 where it saturates."""
    b = ctx.b
    if integer_type not in _INTEGER_RANGES:
        raise ctx.unsupported(
            f"quantization to {onnx.TensorProto.DataType.Name(integer_type)} is not supported, "
            "only to integer types; augment the float model"
        )
    low, high = _INTEGER_RANGES[integer_type]
    dtype = b.elem_type(scale)
    scale = _per_axis(ctx, scale, x)
    value = b.op("Round", [b.op("Div", [x, scale])])
    if zero_point:
        offset = b.op("Cast", [_per_axis(ctx, zero_point, x)], to=dtype)
        value = b.op("Add", [value, offset])
    bounds = [b.op("Cast", [b.const(bound)], to=dtype) for bound in (low, high)]
    inside = b.op("And", [b.op("GreaterOrEqual", [value, bounds[0]]),
                          b.op("LessOrEqual", [value, bounds[1]])])
    if ctx.guided and _stands_for_relu(ctx, zero_point, low, high):
        inside = b.op("And", [inside, b.op("Greater", [ctx.dy(), b.const(0.0)])])
    return _kept(b, inside, b.op("Div", [ctx.dy(), scale]))


# Ops whose output is non-negative where their input is: a Q/DQ pair after one of them clips
# values that were never negative, where the float model has no ReLU.
_SIGN_PRESERVING = {
    "GlobalAveragePool", "AveragePool", "GlobalMaxPool", "MaxPool", "ReduceMean", "ReduceMax",
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Concat", "Resize",
    "Pad", "Relu", "Clip", "DequantizeLinear",
}
_RELU6_TOP = 6.0


def _stands_for_relu(ctx: RuleContext, zero_point: str | None, low: int, high: int) -> bool:
    """Whether a QuantizeLinear stands for a ReLU the quantizer removed: it saturates at 0
    below (a constant zero point equal to the type's minimum), its input comes from an op that
    can make negative values (not a pooling, padding or reshape of clipped values), and it
    does not also saturate at exactly 6 (a removed ReLU6, a Clip, which guided backprop leaves
    alone as pytorch-grad-cam's guided model and the Clip rule do). Guided backprop drops
    negative incoming gradients there, as at a ReLU."""
    if ctx.node.op_type != "QuantizeLinear":
        return False
    zero = ctx.const_input(2) if zero_point else np.zeros((), np.int64)
    scale = ctx.const_input(1)
    if zero is None or scale is None or not np.all(zero == low):
        return False
    if np.allclose((high - zero.astype(np.float64)) * scale, _RELU6_TOP, rtol=1e-6):
        return False
    source = ctx.input_name(0)  # the forward tensor, not its float32 cast (half precision)
    producer = next((n for n in ctx.b.graph.node if source in n.output), None)
    return producer is None or producer.op_type not in _SIGN_PRESERVING


@rule("QuantizeLinear")
def _quantize_linear(ctx: RuleContext) -> Gradients:
    """q = saturate(round(x / scale) + zp), per tensor or per `axis`: dx = dq / scale inside
    the output type's range, 0 where it saturates."""
    grad = _quantizer_grad(ctx, ctx.x(0), ctx.x(1), ctx.x(2), ctx.b.elem_type(ctx.y(0)))
    return [grad, None, None]


@rule("DequantizeLinear")
def _dequantize_linear(ctx: RuleContext) -> Gradients:
    """y = (q - zp) scale, per tensor or per `axis`: dq = dy scale (d score / d the integer)."""
    b, q = ctx.b, ctx.x(0)
    # An input of unknown type reads as FLOAT (a contributed op's output): the op before it
    # decides whether the gradient can pass.
    if b.elem_type(q) not in _INTEGER_RANGES and b.elem_type(q) != onnx.TensorProto.FLOAT:
        raise ctx.unsupported(
            f"dequantization of {onnx.TensorProto.DataType.Name(b.elem_type(q))} is not "
            "supported, only of integer types; augment the float model"
        )
    return [b.op("Mul", [ctx.dy(), _per_axis(ctx, ctx.x(1), q)]), None, None]


@rule("DynamicQuantizeLinear")
def _dynamic_quantize_linear(ctx: RuleContext) -> Gradients:
    """(q, scale, zp) with the scale and zero point fitted to x's range (uint8): dx = dq /
    scale, 0 where the rounding saturates; the scale's and zero point's own gradients are
    dropped (they cancel in the relaxation: DequantizeLinear or the integer op's zero point
    and output scale undo them)."""
    if ctx.dy(0) is None:
        return [None]
    return [_quantizer_grad(ctx, ctx.x(0), ctx.y(1), ctx.y(2), onnx.TensorProto.UINT8)]


def _centered(ctx: RuleContext, index: int, zero_point_index: int, axis: int,
              dtype: int) -> str:
    """Integer input `index` minus its zero point (scalar, or 1-D along `axis`), as `dtype`."""
    b = ctx.b
    value = b.op("Cast", [ctx.x(index)], to=dtype)
    zero_point = ctx.x(zero_point_index)
    if not zero_point:
        return value
    offset = b.op("Cast", [zero_point], to=dtype)
    shape = b.static_shape(zero_point)
    if shape is not None and len(shape) == 1:
        rank = b.rank(ctx.x(index))
        offset = b.unsqueeze(offset, [a for a in range(rank) if a != axis % rank])
    return b.op("Sub", [value, offset])


@rule("ConvInteger")
def _conv_integer(ctx: RuleContext) -> Gradients:
    """y = conv(x - x_zp, w - w_zp), int32: dx = ConvTranspose(dy, w - w_zp) as for Conv
    (`_conv`), with the weights minus their zero point (per output channel where 1-D)."""
    b = ctx.b
    if ctx.needs(1):
        raise ctx.unsupported("gradients for weights are not supported")
    window = _Window.of_conv(ctx)
    weight = _centered(ctx, 1, 3, 0, onnx.TensorProto.FLOAT)
    dy = b.op("Cast", [ctx.dy()], to=onnx.TensorProto.FLOAT)
    grad = _conv_transpose_to_input(
        b, dy, weight, ctx.x(0), ctx.y(0), window, group=ctx.attr("group", 1)
    )
    return [grad, None, None, None]


@rule("MatMulInteger")
def _matmul_integer(ctx: RuleContext) -> Gradients:
    """y = (A - a_zp)(B - b_zp), int32: dA = dy (B - b_zp)^T (b_zp per column where 1-D),
    batch axes broadcast from B summed back."""
    b = ctx.b
    if ctx.needs(1):
        raise ctx.unsupported("gradients for the second operand are not supported")
    a_in, rank_b = ctx.x(0), b.rank(ctx.x(1))
    if b.rank(a_in) < 2 or rank_b < 2:
        raise ctx.unsupported("1-D operands are not supported")
    centered = _centered(ctx, 1, 3, -1, onnx.TensorProto.FLOAT)
    swapped = b.op("Transpose", [centered], perm=[*range(rank_b - 2), rank_b - 1, rank_b - 2])
    dy = b.op("Cast", [ctx.dy()], to=onnx.TensorProto.FLOAT)
    grad = b.op("MatMul", [dy, swapped])
    if rank_b > 2 or b.rank(a_in) > 2:
        grad = b.sum_to_shape(grad, a_in)
    return [grad, None, None, None]


def _integer_cast(ctx: RuleContext) -> Gradients:
    """Cast of an integer tensor of the quantized chain (ConvInteger's int32 to float): the
    values are unchanged, and so is the gradient, which stays float."""
    return [ctx.dy()]


# Rules for nodes whose input 0 is an integer tensor of the quantized chain, in place of RULES.
INTEGER_RULES: dict[str, Rule] = {"Cast": Rule(_integer_cast, False)}
