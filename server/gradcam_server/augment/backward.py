"""The reverse-mode walker: from seeded gradients back to the tensors asked for.

Only nodes on a path from a `wrt` tensor to a seeded tensor are visited, in reverse topological
order, so no gradient is ever built for weights or for the part of the network in front of the
target layer. The walker owns the two pieces of bookkeeping every rule would otherwise repeat:
fan-out (contributions to one tensor are summed once) and broadcast reduction (for rules
registered with ``broadcasting=True``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from onnx import TensorProto

from .errors import AugmentError, MissingRuleError
from .graph import GraphBuilder
from .rules import RULES, RuleContext

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def build_backward(
    b: GraphBuilder,
    seeds: Mapping[str, str],
    wrt: Sequence[str],
    guided: bool = False,
) -> dict[str, str]:
    """Append the backward graph; return d score / d tensor for each tensor in `wrt`.

    `seeds` maps forward tensors to the names of their incoming gradients (d score / d tensor,
    same shape). Raises `AugmentError` if the score does not depend on a `wrt` tensor, and
    `MissingRuleError` if a gradient reaches an op without a rule.
    """
    nodes = list(b.graph.node)  # rules may append nodes; walk the forward graph only
    depends_on_wrt = descendants(nodes, set(wrt))
    on_path = path_nodes(nodes, set(wrt), set(seeds))

    contributions: dict[str, list[str]] = {t: [g] for t, g in seeds.items()}
    summed: dict[str, str | None] = {}

    def gradient_of(tensor: str) -> str | None:
        if tensor not in summed:
            parts = contributions.get(tensor, [])
            if not parts:
                summed[tensor] = None
            elif len(parts) == 1:
                summed[tensor] = parts[0]
            else:
                summed[tensor] = b.op("Sum", parts)
        return summed[tensor]

    for node in reversed(on_path):
        grad_outputs = [gradient_of(t) if t else None for t in node.output]
        if all(g is None for g in grad_outputs):
            continue
        needs = [
            bool(t) and t in depends_on_wrt and b.elem_type(t) in _FLOAT_TYPES for t in node.input
        ]
        if not any(needs):
            continue
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            raise MissingRuleError(
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}",
                node.name,
                b.opset,
            )
        outputs_before = list(node.output)
        grads = rule.fn(RuleContext(node, b, grad_outputs, needs, guided))
        for i, tensor in enumerate(node.input):
            grad = grads[i] if i < len(grads) else None
            if not needs[i] or grad is None:
                continue
            if rule.broadcasting:
                grad = b.sum_to_shape(grad, tensor, outputs_before[0])
            contributions.setdefault(tensor, []).append(grad)

    result = {}
    for tensor in wrt:
        grad = gradient_of(tensor)
        if grad is None:
            raise AugmentError(f"the score does not depend on tensor {tensor!r}")
        result[tensor] = grad
    return result


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
