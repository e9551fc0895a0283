"""The reverse-mode walker: from seeded gradients back to the tensors asked for.

Only nodes on a path from a `wrt` tensor to a seeded tensor are visited, in reverse topological
order, so no gradient is ever built for weights or for the part of the network in front of the
target layer. The walker owns the two pieces of bookkeeping every rule would otherwise repeat:
fan-out (contributions to one tensor are summed once) and broadcast reduction (for rules
registered with ``broadcasting=True``). Region proposals are constants, as in torch: no gradient
flows into the rois of RoiAlign / MaxRoiPool nor into what is computed only to produce them
(`detached_tensors`).

Gradients flow through float tensors, and through the integer tensors of a quantized chain
(`quantized_tensors`: what QuantizeLinear, DynamicQuantizeLinear, ConvInteger and MatMulInteger
compute, and reshapes of it), whose gradient is d score / d the integer value (rules.py's
quantization section), into the ops that read them (`_QUANTIZED_CONSUMERS`) and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from onnx import helper

from .errors import AugmentError, MissingRuleError
from .graph import FLOAT_TYPES, GraphBuilder
from .rules import DETACHED_INPUTS, INTEGER_RULES, RULES, RuleContext

# Ops whose output 0 is an integer tensor with a gradient, and the ops that may read one.
_QUANTIZERS = {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}
_INTEGER_RESHAPES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"}
_QUANTIZED_CONSUMERS = {"DequantizeLinear", "ConvInteger", "MatMulInteger", "Cast",
                        *_INTEGER_RESHAPES}


def build_backward(
    b: GraphBuilder,
    seeds: Mapping[str, str],
    wrt: Sequence[str],
    guided: bool = False,
    allow_unused: bool = False,
) -> dict[str, str | None]:
    """Append the backward graph; return d score / d tensor for each tensor in `wrt`.

    `seeds` maps forward tensors to the names of their incoming gradients (d score / d tensor,
    same shape). Raises `AugmentError` if the score does not depend on a `wrt` tensor (with
    `allow_unused`, its gradient is None instead: zero, as torch's ``allow_unused``), and
    `MissingRuleError` if a gradient reaches an op without a rule.

    Row-restricted gradients: where the score reads a few rows of a tensor (a ViT head's class
    token, ``x[:, 0]``), the gradient is zero on every other row. The walker keeps such a
    gradient as its nonzero rows (`Rows`) and runs each row-wise op's rule on those rows of its
    forward tensors (`_row_wise_inputs`), so the per-token MLPs and norms of the head's path are
    differentiated for one token, not all of them; the rows are padded back to the full tensor
    at the first op that mixes rows.
    """
    nodes = list(b.graph.node)  # rules may append nodes; walk the forward graph only
    detached = detached_tensors(nodes)
    depends_on_wrt = descendants(nodes, set(wrt)) - detached
    on_path = path_nodes(nodes, set(wrt), set(seeds))
    rows = _RowSlicer(b)
    quantized = quantized_tensors(b, nodes)

    contributions: dict[str, list[Gradient]] = {t: [Gradient(g)] for t, g in seeds.items()}
    summed: dict[str, Gradient | None] = {}

    def gradient_of(tensor: str) -> Gradient | None:
        if tensor not in summed:
            summed[tensor] = rows.total(tensor, contributions.get(tensor, []))
        return summed[tensor]

    for node in reversed(on_path):
        grad_outputs = [gradient_of(t) if t else None for t in node.output]
        if all(g is None for g in grad_outputs):
            continue
        needs = [
            bool(t) and t in depends_on_wrt
            and (b.elem_type(t) in FLOAT_TYPES or t in quantized)
            for t in node.input
        ]
        if not any(needs):
            continue
        integers = [t for need, t in zip(needs, node.input) if need and t in quantized]
        if integers:
            _check_quantized_consumer(node, integers[0], b.opset)
        origin = rows.origin(node, grad_outputs)
        if origin is not None:
            contributions.setdefault(node.input[0], []).append(origin)
            continue
        table = INTEGER_RULES if needs[0] and node.input[0] in quantized else {}
        rule = table.get(node.op_type) or RULES.get(node.op_type)
        rule = rule if node.domain in ("", "ai.onnx") else None
        if rule is None and _is_quantized_kernel(node):
            raise AugmentError(
                f"cannot differentiate {node.domain}.{node.op_type} node {node.name!r}: a "
                "runtime's own quantized kernel has no gradient rule. Augment the float "
                "model instead, or quantize it in the QDQ format (quantize_static with "
                "QuantFormat.QDQ) or with quantize_dynamic's standard ops (DynamicQuantizeLinear, "
                "ConvInteger, MatMulInteger), which are differentiated"
            )
        if rule is None:
            raise MissingRuleError(
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}",
                node.name,
                b.opset,
            )
        restricted = rows.restrict(node, grad_outputs)
        if restricted is None:
            forward, rowed = node, [False] * len(node.input)
            names = [rows.dense(t, g) if g else None for t, g in zip(node.output, grad_outputs)]
            kept = None
        else:
            forward, rowed, kept = restricted
            names = [g.name if g else None for g in grad_outputs]
        outputs_before = list(forward.output)
        grads = rule.fn(RuleContext(forward, b, names, needs, guided))
        for i, tensor in enumerate(node.input):
            grad = grads[i] if i < len(grads) else None
            if not needs[i] or grad is None:
                continue
            if rule.broadcasting:
                grad = b.sum_to_shape(grad, forward.input[i], outputs_before[0])
            contributions.setdefault(tensor, []).append(
                Gradient(grad, kept if rowed[i] else None)
            )

    result = {}
    for tensor in wrt:
        grad = gradient_of(tensor)
        if grad is None and tensor in detached:
            raise AugmentError(
                f"tensor {tensor!r} is computed only to produce the rois of region pooling "
                "(a two-stage detector's proposals), which are constants, as torch detaches "
                "them: choose a layer the pooled features are computed from"
            )
        if grad is None and allow_unused:
            result[tensor] = None
            continue
        if grad is None:
            raise AugmentError(f"the score does not depend on tensor {tensor!r}")
        result[tensor] = rows.dense(tensor, grad)
    return result


def quantized_tensors(b: GraphBuilder, nodes: Sequence) -> set[str]:
    """The integer tensors of quantized chains: output 0 of QuantizeLinear,
    DynamicQuantizeLinear, ConvInteger and MatMulInteger, and the integer outputs of any op
    reading one (but Shape and Size), so that a gradient reaching an op that cannot pass it
    (`_QUANTIZED_CONSUMERS`) is refused there rather than lost."""
    found: set[str] = set()
    for node in nodes:
        if node.domain in ("", "ai.onnx") and node.op_type in _QUANTIZERS:
            found.add(node.output[0])
        elif node.op_type not in ("Shape", "Size") and any(t in found for t in node.input):
            found.update(t for t in node.output if t and b.elem_type(t) not in FLOAT_TYPES)
    return found


def _is_quantized_kernel(node) -> bool:
    """A contributed quantized op (com.microsoft's DynamicQuantizeMatMul,
    MatMulIntegerToFloat, QLinearConv, QAttention, ...)."""
    name = node.op_type
    return node.domain not in ("", "ai.onnx") and (
        "Quantize" in name or "Integer" in name or name.startswith(("QLinear", "QAttention",
                                                                    "QOrdered", "QGemm"))
    )


def _check_quantized_consumer(node, tensor: str, opset: int) -> None:
    """Refuse an op reading a quantized integer tensor on the gradient path unless it is one
    whose rule knows the integer convention (`_QUANTIZED_CONSUMERS`)."""
    if node.domain in ("", "ai.onnx") and node.op_type in _QUANTIZED_CONSUMERS:
        return
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    raise AugmentError(
        f"cannot differentiate {op} node {node.name!r} (opset {opset}): it computes on the "
        f"quantized integer tensor {tensor!r}; gradients pass quantized tensors only "
        "into DequantizeLinear, ConvInteger, MatMulInteger, Cast and reshapes. Quantize in "
        "the QDQ format (quantize_static with QuantFormat.QDQ), or augment the float model"
    )


@dataclass(frozen=True)
class Rows:
    """Rows [start, end) along `axis` (negative: counted from the last axis, so it names the
    same axis across broadcasting): the only rows where a gradient may be nonzero."""

    axis: int
    start: int
    end: int


@dataclass(frozen=True)
class Gradient:
    """A gradient tensor: the whole of d score / d tensor, or only its `rows`."""

    name: str
    rows: Rows | None = None


# Ops that treat each row of a [..., T, ...] tensor on its own, given where the rows lie
# (`_RowSlicer.restrict` checks each op's condition).
_ELEMENTWISE = {
    "Identity", "Dropout", "Cast", "Neg", "Abs", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu",
    "Celu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Exp", "Log", "Sqrt",
    "Reciprocal", "Erf", "Softplus", "Softsign", "Mish", "Clip", "Add", "Sub", "Mul", "Div",
    "Pow", "Max", "Min", "Sum", "Mean", "Where",
}


class _RowSlicer:
    """Row-restricted gradients (`build_backward`): where they start, which ops keep them, and
    padding them back to whole tensors."""

    def __init__(self, b: GraphBuilder) -> None:
        self.b = b
        self._slices: dict[tuple[str, Rows], str] = {}

    def origin(self, node, grad_outputs: list[Gradient | None]) -> Gradient | None:
        """d score / d x for ``y = Gather(x, i, axis)`` with a constant scalar i >= 0: dy
        itself, as row i of x (a class token; one of q, k, v split from a stacked tensor, whose
        three rows `total` then concatenates)."""
        b = self.b
        if node.op_type != "Gather" or grad_outputs[0] is None or grad_outputs[0].rows:
            return None
        index = b.initializer_value(node.input[1])
        rank = b.static_shape(node.input[0])
        if index is None or index.ndim != 0 or int(index) < 0 or rank is None:
            return None
        axis = _attr(node, "axis", 0) % len(rank)
        rows = Rows(axis - len(rank), int(index), int(index) + 1)
        return Gradient(b.unsqueeze(grad_outputs[0].name, [axis]), rows)

    def restrict(self, node, grad_outputs: list[Gradient | None]):
        """For a row-wise `node` whose only output gradient is row-restricted: a copy of the
        node reading those rows of its inputs and outputs, which inputs were sliced, and the
        rows; None where the node mixes rows (the caller pads the gradient back)."""
        b = self.b
        if len(node.output) != 1 or grad_outputs[0] is None or grad_outputs[0].rows is None:
            return None
        rows = grad_outputs[0].rows
        output_shape = b.static_shape(node.output[0])
        if output_shape is None or len(output_shape) < -rows.axis:
            return None
        length = output_shape[rows.axis]
        if not isinstance(length, int) or rows.end > length:
            return None
        rank = len(output_shape)
        axis = rows.axis % rank
        op = node.op_type
        if op in ("LayerNormalization",) and _attr(node, "axis", -1) % rank <= axis:
            return None
        if op in ("Softmax", "LogSoftmax") and _attr(node, "axis", -1) % rank == axis:
            return None
        if op == "MatMul" and rows.axis != -2:
            return None
        if op not in _ELEMENTWISE and op not in ("LayerNormalization", "Softmax", "LogSoftmax",
                                                  "MatMul"):
            return None
        rowed = []
        for i, tensor in enumerate(node.input):
            if not tensor or (op == "MatMul" and i == 1):
                rowed.append(False)
                continue
            shape = b.static_shape(tensor)
            if shape is None:
                return None
            if len(shape) < -rows.axis or shape[rows.axis] == 1:
                rowed.append(False)  # broadcast along the rows: read whole
            elif shape[rows.axis] == length:
                rowed.append(True)
            else:
                return None  # unknown: it may broadcast at run time
        if op == "MatMul" and not rowed[0]:
            return None
        copy = type(node)()
        copy.CopyFrom(node)
        for i, tensor in enumerate(node.input):
            if rowed[i]:
                copy.input[i] = self._rows_of(tensor, rows)
        copy.output[0] = self._rows_of(node.output[0], rows)
        return copy, rowed, rows

    def _rows_of(self, tensor: str, rows: Rows) -> str:
        """The forward tensor's `rows`, sliced once, with its type known to the builder."""
        key = (tensor, rows)
        if key not in self._slices:
            b = self.b
            sliced = b.op("Slice", [tensor, b.ints([rows.start]), b.ints([rows.end]),
                                    b.ints([rows.axis])])
            tensor_type = type(b.types[tensor])()
            tensor_type.CopyFrom(b.types[tensor])
            dims = tensor_type.tensor_type.shape.dim
            dims[rows.axis].Clear()
            dims[rows.axis].dim_value = rows.end - rows.start
            b.types[sliced] = tensor_type
            self._slices[key] = sliced
        return self._slices[key]

    def dense(self, tensor: str, gradient: Gradient) -> str:
        """The whole gradient of `tensor`: `gradient` padded with zero rows where restricted."""
        if gradient.rows is None:
            return gradient.name
        b, rows = self.b, gradient.rows
        rank = b.rank(tensor)
        axis = rows.axis % rank
        if rows.start == 0 and (b.static_shape(tensor) or [None] * rank)[axis] == rows.end:
            return gradient.name  # the rows are all of them
        length = b.shape_slice(tensor, axis, axis + 1)
        zeros = [0] * rank
        before = b.ints(zeros[:axis] + [rows.start] + zeros[axis + 1:])
        after_value = b.op("Sub", [length, b.ints([rows.end])])
        after = b.op("Concat", [b.ints(zeros[:axis]), after_value, b.ints(zeros[axis + 1:])],
                     axis=0) if rank > 1 else after_value
        return b.op("Pad", [gradient.name, b.op("Concat", [before, after], axis=0)])

    def total(self, tensor: str, parts: list[Gradient]) -> Gradient | None:
        """The sum of the contributions to one tensor's gradient: restricted to the rows they
        span where all are restricted along one axis (concatenated where they tile it), whole
        otherwise."""
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        b = self.b
        axes = {p.rows.axis if p.rows else None for p in parts}
        if None in axes or len(axes) != 1:
            return Gradient(b.op("Sum", [self.dense(tensor, p) for p in parts]))
        axis = axes.pop()
        span = Rows(axis, min(p.rows.start for p in parts), max(p.rows.end for p in parts))
        ordered = sorted(parts, key=lambda p: p.rows.start)
        if all(a.rows.end == z.rows.start for a, z in zip(ordered, ordered[1:])):
            return Gradient(b.op("Concat", [p.name for p in ordered], axis=axis), span)
        rank = b.rank(tensor)
        padded = []
        for part in parts:
            pads = [0] * (2 * rank)
            pads[axis % rank] = part.rows.start - span.start
            pads[rank + axis % rank] = span.end - part.rows.end
            padded.append(b.op("Pad", [part.name, b.ints(pads)]) if any(pads) else part.name)
        return Gradient(b.op("Sum", padded), span)


def _attr(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def detached_tensors(nodes: Sequence) -> set[str]:
    """Tensors no gradient flows into, as torch detaches them: the inputs named in
    `DETACHED_INPUTS` (region pooling's rois) and every tensor computed only to produce them,
    that is, not also for the pooled features (a two-stage detector's RPN outputs, proposal
    decoding and selection; its backbone and FPN stay differentiable)."""
    detached, pooled = set(), set()
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in DETACHED_INPUTS:
            continue
        for i, tensor in enumerate(node.input):
            if tensor:
                (detached if i in DETACHED_INPUTS[node.op_type] else pooled).add(tensor)
    if not detached:
        return set()
    return ancestors(nodes, detached) - ancestors(nodes, pooled)


def descendants(nodes: Sequence, start: set[str]) -> set[str]:
    """Tensors computed from any tensor in `start` (and `start` itself)."""
    reached = set(start)
    for node in nodes:
        if any(t in reached for t in node.input):
            reached.update(t for t in node.output if t)
    return reached


def ancestors(nodes: Sequence, start: set[str]) -> set[str]:
    """Tensors that any tensor in `start` is computed from (and `start` itself)."""
    reached = set(start)
    for node in reversed(nodes):
        if any(t in reached for t in node.output):
            reached.update(t for t in node.input if t)
    return reached


def path_nodes(nodes: Sequence, starts: str | set[str], ends: str | set[str]) -> list:
    """The nodes computing `ends` from `starts` (those that both depend on a start and feed
    an end), in graph order."""
    after = descendants(nodes, {starts} if isinstance(starts, str) else starts)
    before = ancestors(nodes, {ends} if isinstance(ends, str) else ends)
    return [
        node for node in nodes
        if any(t in after for t in node.input) and any(t in before for t in node.output)
    ]
