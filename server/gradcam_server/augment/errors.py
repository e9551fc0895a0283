"""Errors raised while augmenting a graph; each message names what was wrong."""


class AugmentError(ValueError):
    """The model cannot be augmented as asked (bad layer, unsupported graph, ...)."""


class MissingRuleError(AugmentError):
    """A gradient reached a node whose op type has no backward rule."""

    def __init__(self, op_type: str, node_name: str, opset: int) -> None:
        super().__init__(
            f"no gradient rule for op {op_type!r} (node {node_name!r}, opset {opset}); "
            "the gradient path from the score to the target layer goes through it"
        )
        self.op_type = op_type
        self.node_name = node_name
        self.opset = opset
