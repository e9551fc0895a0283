"""Score-CAM inside the graph: the network re-run on the image masked by each channel of the
target layer, in an ONNX Loop over chunks of channels.

Score-CAM (Wang et al., CVPR-W 2020), as pytorch-grad-cam 1.5.7 computes it: each channel A^k,
upsampled bilinearly to the input (corner-aligned) and min-max normalised, masks the input
(x * M^k); the class logit of every masked input is s_k, and w = softmax_k(s_k); the map is
ReLU(sum_k w_k A^k).

The Loop runs `chunks` iterations per image, each one forward pass of the cloned network on a
batch of CHUNK masked copies of one image, so memory holds one chunk of masked images, never all
C of them.

Half precision: the masked images are computed in float32 (from the layer's float32 view and
the image's float32 cast) and cast to the image's type where they enter the cloned network;
the masked images' scores are compared in float32.
"""

from __future__ import annotations

from .backward import path_nodes
from .cam import normalize
from .graph import GraphBuilder, LoopBody

MAX_CHUNK = 32  # masked images per forward pass
MASK_EPSILON = 1e-8  # the masks' min-max normalisation, as pytorch-grad-cam's ScoreCAM


def score_cam(
    b: GraphBuilder, activations: str, image: str, score_output: str, resolved_class: str
) -> str:
    """Score-CAM's per-channel contributions w_k A^k [N, C, h, w]. The channel count is read at
    run time (a chunk is its largest divisor up to MAX_CHUNK), so it need not be static."""
    channels = b.shape_slice(activations, 1, 2)  # [1]
    divisors = b.ints(range(1, MAX_CHUNK + 1))
    divides = b.op("Equal", [b.op("Mod", [channels, divisors]), b.ints([0])])
    chunk = b.reduce("ReduceMax", b.op("Where", [divides, divisors, b.ints([0])]), [0],
                     keepdims=True)  # [1]
    per_image = b.op("Div", [channels, chunk])
    batch = b.shape_slice(activations, 0, 1)
    iterations = b.squeeze(b.op("Mul", [batch, per_image]), [0])
    scores = _loop(b, iterations, activations, image, score_output, resolved_class, chunk,
                   per_image)  # [N * per_image, chunk]
    logits = b.op("Reshape", [scores, b.op("Concat", [batch, channels], axis=0)])
    weights = b.unsqueeze(b.op("Softmax", [logits], axis=1), [2, 3])
    return b.op("Mul", [weights, activations])


def _loop(
    b: GraphBuilder,
    iterations: str,
    activations: str,
    image: str,
    score_output: str,
    resolved_class: str,
    chunk: str,
    per_image: str,
) -> str:
    """Iteration i: the class logits of image i // per_image masked by its channels
    chunk * (i % per_image) ... + chunk (`chunk` and `per_image` INT64 [1])."""
    forward = path_nodes(list(b.graph.node), image, score_output)
    body = LoopBody(b, "score")
    step = body.op("Reshape", [body.step, b.ints([1])])
    item = body.op("Div", [step, per_image])
    first = body.op("Mul", [body.op("Mod", [step, per_image]), chunk])
    starts = body.op("Concat", [item, first], axis=0)
    ends = body.op("Add", [starts, body.op("Concat", [b.ints([1]), chunk], axis=0)])
    maps = body.op("Slice", [activations, starts, ends, b.ints([0, 1])])  # [1, chunk, h, w]
    maps = body.op("Transpose", [maps], perm=[1, 0, 2, 3])  # [chunk, 1, h, w]
    pixels = body.op("Slice", [b.computed(image), item, body.op("Add", [item, b.ints([1])]),
                               b.ints([0])])
    size = body.op("Concat", [chunk, b.ints([1]), b.shape_slice(image, 2)], axis=0)
    masks = body.op("Resize", [maps, "", "", size], mode="linear",
                    coordinate_transformation_mode="align_corners")
    masks = normalize(body, masks, MASK_EPSILON)
    masked = body.op("Mul", [pixels, masks])  # [chunk, C_in, H, W]

    renamed = {image: body.cast_like(masked, image)}
    body.clone(forward, renamed)
    category = body.op("Gather", [resolved_class, item], axis=0)  # [1]
    logits = body.computed(renamed[score_output], score_output)
    scores = body.op("Gather", [logits, category], axis=1)  # [chunk, 1]
    scores = body.op("Reshape", [scores, b.ints([-1])])
    return body.loop(iterations, scores, b.compute_type(score_output), [None])
