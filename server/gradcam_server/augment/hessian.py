"""Hessian-vector products of the score, by reverse-over-reverse differentiation through our
own rules (what ShapleyCAM weighs its channels with).

The first backward pass (`targets.append_backward`) wrote g = d score / d A as ONNX nodes that
read the forward tensors after A (Relu masks, Sigmoid and Tanh outputs, softmax
probabilities...). Those nodes are a differentiable function of A like any other: the same
reverse-mode walker (`backward.build_backward`), seeded at g with a vector v held constant and
asked for d / d A, walks both the backward nodes and the forward nodes they read, and returns
d (g . v) / d A = H v, H the Hessian of the score at A (symmetric, so H^T v = H v). This is
torch's ``autograd.grad(outputs=g, inputs=A, grad_outputs=v)`` on a graph built with
``create_graph=True``. Piecewise-linear ops have no curvature: their backward nodes read
forward tensors only through comparisons (Greater, Equal), whose boolean outputs pass no
gradient, so a ReLU network's logit has H = 0 after its last nonlinearity, as in torch.
"""

from __future__ import annotations

from .backward import build_backward, descendants
from .graph import GraphBuilder


def hessian_vector_product(b: GraphBuilder, layer: str, gradient: str, vector: str) -> str | None:
    """H v at `layer` (the tensor A), given `gradient` (d score / d A, or a view of it, as
    built by the first backward pass) and `vector` (laid out as `gradient`): d (gradient .
    vector) / d A, shaped as A. None where H = 0: the gradient does not depend on A (a linear
    head after it), or only through comparisons (ReLU masks, max pooling's choices)."""
    if gradient not in descendants(list(b.graph.node), {layer}):
        return None
    b.infer_new_types()  # the rules read the ranks and shapes of the first pass's tensors
    return build_backward(b, {gradient: vector}, [layer], allow_unused=True)[layer]
