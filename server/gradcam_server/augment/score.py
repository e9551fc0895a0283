"""Score-CAM inside the graph: the network re-run on the image masked by each distinct channel
of the target layer, in an ONNX Loop over chunks of channels.

Score-CAM (Wang et al., CVPR-W 2020), as pytorch-grad-cam 1.5.7 computes it: each channel A^k,
upsampled bilinearly to the input (corner-aligned) and min-max normalised, masks the input
(x * M^k); the class logit of every masked input is s_k, and w = softmax_k(s_k); the map is
ReLU(sum_k w_k A^k).

Fewer passes, the same result: the masked image depends on the channel only through its
activation map, so channels whose maps are equal (after a ReLU, above all the channels that are
zero everywhere, whose mask is zero and whose masked image is black) share one masked pass.
`Unique` gathers the distinct (image, map) pairs, the Loop scores those alone, and each channel
reads its pair's score back. ResNet-50's layer4 (2048 channels) with random weights has about
5% of its channels zero on a random image; a trained network's last layer has more.

The Loop runs over chunks of the distinct maps (of every image of the batch together), each one
forward pass of the cloned network on a batch of at most MAX_CHUNK masked copies: memory holds
one chunk of masked images, never all of them. The chunk is the smallest that covers the maps in
as many iterations as MAX_CHUNK would need, so the last chunk's padding (repeats of the last
map, scored and dropped) stays under one row per iteration.

A long request runs in steps (`ScoreCamSteps`): each Loop has two inputs with defaults, the
scores of the iterations already run (default none) and how many iterations to run now
(default all), and two outputs, the scores so far and the iterations needed. The server runs the
graph once per step, feeding back the scores, so between steps it reports progress and can stop;
the run whose scores are complete gives the map. Each step re-runs the forward pass up to the
target layer (the maps must be known to choose the masks): a step of a few seconds keeps that
under a few percent.

Half precision: the masked images are computed in float32 (from the layer's float32 view and
the image's float32 cast) and cast to the image's type where they enter the cloned network;
the masked images' scores are compared in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .backward import path_nodes
from .cam import normalize
from .errors import AugmentError
from .graph import GraphBuilder, LoopBody, tensor_names

MAX_CHUNK = 32  # masked images per forward pass
MASK_EPSILON = 1e-8  # the masks' min-max normalisation, as pytorch-grad-cam's ScoreCAM
ALL_STEPS = 2**62


@dataclass(frozen=True)
class ScoreCamSteps:
    """The inputs and outputs of Score-CAM Loop `index` (one per target layer): `known` FLOAT
    [K] the scores of its first K / chunk iterations, as `scores` gave them (default empty),
    `steps` INT64 [1] how many iterations to run after those (default all); `scores` FLOAT [*]
    the scores of every iteration run so far (known ones included), `iterations` INT64 [1] how
    many iterations the Loop needs in all and `passes` INT64 [1] how many masked passes (each
    iteration's chunk, the padding included). The heatmap is Score-CAM's once `scores` holds
    all `passes`."""

    index: int

    @property
    def known(self) -> str:
        return f"{STEPS_PREFIX}{self.index}_known"

    @property
    def steps(self) -> str:
        return f"{STEPS_PREFIX}{self.index}_steps"

    @property
    def scores(self) -> str:
        return f"{STEPS_PREFIX}{self.index}_scores"

    @property
    def iterations(self) -> str:
        return f"{STEPS_PREFIX}{self.index}_iterations"

    @property
    def passes(self) -> str:
        return f"{STEPS_PREFIX}{self.index}_passes"

    @property
    def outputs(self) -> tuple[str, str, str]:
        return self.scores, self.iterations, self.passes


STEPS_PREFIX = "score_cam_"


def score_cam_steps(input_names: Iterable[str]) -> list[ScoreCamSteps]:
    """The Score-CAM Loops of an augmented graph with inputs `input_names`, in order."""
    names = set(input_names)
    loops = []
    while ScoreCamSteps(len(loops)).steps in names:
        loops.append(ScoreCamSteps(len(loops)))
    return loops


def score_cam(
    b: GraphBuilder, activations: str, image: str, score_output: str, resolved_class: str
) -> str:
    """Score-CAM's per-channel contributions w_k A^k [N, C, h, w] (float32 activations). The
    shapes are read at run time, so they need not be static."""
    batch = b.shape_slice(activations, 0, 1)
    channels = b.shape_slice(activations, 1, 2)
    spatial = b.shape_slice(activations, 2)  # [h, w]
    maps = b.op("Flatten", [b.op("Reshape", [activations, b.op(
        "Concat", [b.ints([-1]), spatial], axis=0)])], axis=1)  # [N * C, h * w]
    rows = b.op("Range", [b.const(0, "int64"), b.squeeze(b.op("Mul", [batch, channels]), [0]),
                          b.const(1, "int64")])
    item = b.op("Cast", [b.unsqueeze(b.op("Div", [rows, channels]), [1])],
                to=TensorProto.FLOAT)  # [N * C, 1]
    keyed = b.op("Concat", [item, maps], axis=1)
    distinct, _, inverse, _ = b.op_multi("Unique", [keyed], 4, axis=0, sorted=0)
    count = b.shape_slice(distinct, 0, 1)  # [1], at least 1 when N * C is
    iterations = b.op("Div", [b.op("Add", [count, b.ints([MAX_CHUNK - 1])]), b.ints([MAX_CHUNK])])
    chunk = b.op("Div", [b.op("Sub", [b.op("Add", [count, iterations]), b.ints([1])]),
                         b.op("Max", [iterations, b.ints([1])])])

    names = _steps_io(b, len(score_cam_steps(i.name for i in b.graph.input)))
    known = names.known
    first = b.op("Div", [b.shape(known), b.op("Max", [chunk, b.ints([1])])])  # [1]
    run = b.op("Max", [b.op("Min", [names.steps, b.op("Sub", [iterations, first])]),
                       b.ints([0])])
    scores = _loop(b, b.squeeze(run, [0]), first, distinct, spatial, image, score_output,
                   resolved_class, chunk, count)  # [run, chunk]
    scores = b.op("Cast", [b.op("Reshape", [scores, b.ints([-1])])], to=TensorProto.FLOAT)
    scores = b.op("Concat", [known, scores], axis=0)
    b.add_output(scores, names.scores, TensorProto.FLOAT, [None])
    b.add_output(iterations, names.iterations, TensorProto.INT64, [1])
    passes = b.op("Mul", [iterations, chunk])
    b.add_output(passes, names.passes, TensorProto.INT64, [1])
    padded = b.op("Concat", [scores, b.op("ConstantOfShape", [passes], value=helper.make_tensor("zero", TensorProto.FLOAT,
                                                                    [1], [0.0]))], axis=0)
    scores = b.op("Gather", [padded, inverse], axis=0)  # the padding read only while incomplete
    logits = b.op("Reshape", [scores, b.op("Concat", [batch, channels], axis=0)])
    weights = b.unsqueeze(b.op("Softmax", [logits], axis=1), [2, 3])
    return b.op("Mul", [weights, activations])


def _steps_io(b: GraphBuilder, index: int) -> ScoreCamSteps:
    """Loop `index`'s step inputs, with their defaults (no scores known, every step)."""
    names = ScoreCamSteps(index)
    taken = tensor_names(b.graph)
    for name in (names.known, names.steps, *names.outputs):
        if name in taken:
            raise AugmentError(f"the model already has a tensor named {name!r}; it is reserved "
                               "for Score-CAM's steps")
    b.graph.input.extend([helper.make_tensor_value_info(names.known, TensorProto.FLOAT, [None]),
                          helper.make_tensor_value_info(names.steps, TensorProto.INT64, [1])])
    b.graph.initializer.extend([
        numpy_helper.from_array(np.zeros(0, np.float32), names.known),
        numpy_helper.from_array(np.array([ALL_STEPS], np.int64), names.steps),
    ])
    return names


def _loop(
    b: GraphBuilder,
    iterations: str,
    first_iteration: str,
    distinct: str,
    spatial: str,
    image: str,
    score_output: str,
    resolved_class: str,
    chunk: str,
    count: str,
) -> str:
    """Step s, iteration i = `first_iteration` + s: the class logits of the masked images of
    rows chunk * i ... + chunk of `distinct` ([count, 1 + h * w]: each row its image's index,
    then the map), the rows past `count` repeating the last one (`first_iteration`, `chunk`,
    `count` INT64 [1])."""
    forward = path_nodes(list(b.graph.node), image, score_output)
    body = LoopBody(b, "score")
    step = body.op("Add", [body.op("Reshape", [body.step, b.ints([1])]), first_iteration])
    first = body.op("Mul", [step, chunk])
    rows = body.op("Range", [body.op("Squeeze", [first]),
                             body.op("Squeeze", [body.op("Add", [first, chunk])]),
                             b.const(1, "int64")])
    rows = body.op("Min", [rows, body.op("Sub", [count, b.ints([1])])])
    picked = body.op("Gather", [distinct, rows], axis=0)  # [chunk, 1 + h * w]
    item = body.op("Cast", [body.op("Reshape", [
        body.op("Slice", [picked, b.ints([0]), b.ints([1]), b.ints([1])]), b.ints([-1])])],
        to=TensorProto.INT64)  # [chunk]
    maps = body.op("Reshape", [
        body.op("Slice", [picked, b.ints([1]), b.ints([2**62]), b.ints([1])]),
        body.op("Concat", [b.ints([-1, 1]), spatial], axis=0)])  # [chunk, 1, h, w]
    pixels = body.op("Gather", [b.computed(image), item], axis=0)  # [chunk, C_in, H, W]
    size = body.op("Concat", [chunk, b.ints([1]), b.shape_slice(image, 2)], axis=0)
    masks = body.op("Resize", [maps, "", "", size], mode="linear",
                    coordinate_transformation_mode="align_corners")
    masks = normalize(body, masks, MASK_EPSILON)
    masked = body.op("Mul", [pixels, masks])  # [chunk, C_in, H, W]

    renamed = {image: body.cast_like(masked, image)}
    body.clone(forward, renamed)
    category = body.op("Unsqueeze", [body.op("Gather", [resolved_class, item], axis=0),
                                     b.ints([1])])  # [chunk, 1]
    logits = body.computed(renamed[score_output], score_output)
    scores = body.op("GatherElements", [logits, category], axis=1)  # [chunk, 1]
    scores = body.op("Reshape", [scores, b.ints([-1])])
    return body.loop(iterations, scores, b.compute_type(score_output), [None])
