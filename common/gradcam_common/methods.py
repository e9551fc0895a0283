"""The explanation methods as the wire and the people using them know them: one entry each.

`METHODS` is the one list. The typed API's ``Method`` enum value, the client's and the CLI's
choices, the server's method names and the README's method table all come from it; the
augmenter registers one `CamMethod` class per entry (``gradcam_server.augment.methods``), and a
test checks that every entry has its class, its enum value and its reference test.

A method's traits say how it is computed, which decides what a request may combine with it:

* ``reruns_network``: the network (or its part after the target layer) runs again on
  perturbed copies inside the session (Ablation-CAM, Score-CAM, Group-CAM); it explains the
  class logit only, and its cost grows with the layer's channels.
* ``path``: the network runs on copies of the image tiled along the batch, the class resolved
  on the image itself: Integrated Grad-CAM's scaled copies, SESS's patches.
* ``pixel_level``: the map is an input-gradient image at the model's input size (Guided
  Backpropagation, Guided Grad-CAM); the signed gradients come back beside the heatmap.
* ``uses_gradients``: False for the methods computed from the activations alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # what requests, the CLI and config.json say: "gradcam++"
    enum: str  # the typed API's gradcam.v1.Method value name: "METHOD_GRADCAM_PLUS_PLUS"
    title: str  # the paper's name of it: "Grad-CAM++"
    summary: str  # one line: how its map is made
    uses_gradients: bool = True
    reruns_network: bool = False
    path: bool = False
    pixel_level: bool = False


METHODS: tuple[Method, ...] = (
    Method("gradcam", "METHOD_GRADCAM", "Grad-CAM",
           "channel weights are the spatial mean of the gradients; ReLU of the weighted sum"),
    Method("gradcam++", "METHOD_GRADCAM_PLUS_PLUS", "Grad-CAM++",
           "weights from the positive gradients with second- and third-order terms"),
    Method("xgradcam", "METHOD_XGRADCAM", "XGrad-CAM",
           "weights are the activation-weighted gradient sums, over the activation sums"),
    Method("hirescam", "METHOD_HIRESCAM", "HiResCAM",
           "gradients times activations, element-wise, summed over channels"),
    Method("gradcam-elementwise", "METHOD_GRADCAM_ELEMENTWISE", "Grad-CAM element-wise",
           "ReLU of gradients times activations, summed over channels"),
    Method("layercam", "METHOD_LAYERCAM", "LayerCAM",
           "ReLU of the gradients times the activations, summed over channels"),
    Method("finercam", "METHOD_FINERCAM", "Finer-CAM",
           "Grad-CAM of the class logit minus those of its three most similar classes, "
           "weighted by their probabilities"),
    Method("refinecam", "METHOD_REFINECAM", "RefineCAM",
           "the product of the Grad-CAM++ maps of several target layers (one layer: its "
           "Grad-CAM++ map)"),
    Method("eigencam", "METHOD_EIGENCAM", "EigenCAM",
           "the activations projected on their first principal component", uses_gradients=False),
    Method("kpcacam", "METHOD_KPCACAM", "KPCA-CAM",
           "the activations projected on their first kernel principal component (sigmoid "
           "kernel)", uses_gradients=False),
    Method("fem", "METHOD_FEM", "FEM",
           "channel weights are the share of each channel's positions above its mean plus two "
           "standard deviations", uses_gradients=False),
    Method("eigengradcam", "METHOD_EIGENGRADCAM", "EigenGradCAM",
           "the first principal component of gradients times activations"),
    Method("seg-eigencam", "METHOD_SEG_EIGENCAM", "Seg-Eigen-CAM",
           "the first principal component of |gradients| times activations, its sign set so "
           "that the largest magnitude is positive"),
    Method("randomcam", "METHOD_RANDOMCAM", "RandomCAM",
           "a sanity baseline: channel weights drawn uniformly in [-1, 1] for each image and "
           "run", uses_gradients=False),
    Method("sobel", "METHOD_SOBEL", "Sobel",
           "a baseline from the image alone: the mean of the photo's absolute Sobel "
           "derivatives in x and y", uses_gradients=False),
    Method("shapleycam", "METHOD_SHAPLEYCAM", "ShapleyCAM",
           "channel weights are the spatial mean of the gradients minus half the "
           "Hessian-vector product with the activations"),
    Method("fullgrad", "METHOD_FULLGRAD", "FullGrad",
           "|input gradients x input| plus |bias x gradients| of every biased convolution and "
           "batch norm, each map normalised, summed; no target layer"),
    Method("ablationcam", "METHOD_ABLATIONCAM", "Ablation-CAM",
           "the relative score drop when each channel is ablated; the layers after the target "
           "layer re-run per channel", uses_gradients=False, reruns_network=True),
    Method("scorecam", "METHOD_SCORECAM", "Score-CAM",
           "softmax of the class scores of the image masked by each upsampled channel",
           uses_gradients=False, reruns_network=True),
    Method("groupcam", "METHOD_GROUPCAM", "Group-CAM",
           "groups of gradient-weighted channels as masks keeping the image sharp over a blurred "
           "copy, weighted by the gain in class probability", reruns_network=True),
    Method("integrated-gradcam", "METHOD_INTEGRATED_GRADCAM", "Integrated Grad-CAM",
           "Grad-CAM maps of copies of the image scaled from black to it, summed", path=True),
    Method("sess", "METHOD_SESS", "SESS",
           "Grad-CAM maps of patches slid over the image at 4 scales, weighted by their class "
           "probability, pasted back and averaged", path=True),
    Method("dff", "METHOD_DFF", "Deep Feature Factorization",
           "the layer factorised into 5 non-negative concepts (NMF), each scored by the "
           "classifier head; the map of the concept scoring highest for the class",
           uses_gradients=False),
    Method("guided-backprop", "METHOD_GUIDED_BACKPROP", "Guided Backpropagation",
           "input gradients through guided ReLUs; the heatmap is their largest magnitude over "
           "the colour channels", pixel_level=True),
    Method("guided-gradcam", "METHOD_GUIDED_GRADCAM", "Guided Grad-CAM",
           "guided backpropagation times the Grad-CAM map", pixel_level=True),
)

METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
PIXEL_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS if m.pixel_level)
_BY_NAME = {m.name: m for m in METHODS}


def method(name: str) -> Method:
    """The method called `name`; KeyError for an unknown one."""
    return _BY_NAME[name]


def enum_value(name: str) -> int:
    """The typed API's ``Method`` value of the method `name` (0, unspecified, for None)."""
    from gradcam_proto import gradcam_pb2

    return 0 if name is None else gradcam_pb2.Method.Value(_BY_NAME[name].enum)


def name_of(value: int) -> str | None:
    """The method name of a typed API ``Method`` value; None for METHOD_UNSPECIFIED (the
    model's default); KeyError for a value no method has."""
    from gradcam_proto import gradcam_pb2

    if value == gradcam_pb2.METHOD_UNSPECIFIED:
        return None
    enum = gradcam_pb2.Method.Name(value)  # ValueError for an unknown value
    return next(m.name for m in METHODS if m.enum == enum)
