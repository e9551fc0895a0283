"""The explanation methods as classes: one `CamMethod` subclass per entry of
`gradcam_common.methods.METHODS`, one instance of each registered by name in `CAM_METHODS`.

A class declares its entry, from which its name and traits come (never repeated here), refuses
what it cannot be combined with (`CamMethod.check`, an AugmentError naming the conflict), and
builds its map from the target layers' features (`CamMethod.heatmap`), the math delegated to
cam.py (channel weights, principal projection, the shared tail), ablation.py, score.py and
group.py (the perturbation methods' Loops), smoothing.py (a path method's copies of the image),
sess.py (SESS's patches and fusion) and factorization.py (Deep Feature Factorization).
The pipeline (passes.py) asks a method object its traits and hooks, never its name.

The families: a `ChannelMethod` weighs the layer's channels (the contributions [N, C, h, w] are
summed, or projected on their first principal component, then the shared tail); a
`LayerMethod` makes any other map per target layer; a `PixelMethod` makes an input-gradient
image. The maps of several target layers are fused (`LayerMethod.fuse`: their mean,
`cam.mean_of_maps`, or RefineCAM's product).

Adding a method: its entry in gradcam_common.methods.METHODS and its value in the typed API's
``Method`` enum (gradcam.proto), one class here, and a reference test listed in
tests/test_methods.py's ``REFERENCE_TESTS``; tests/test_registry.py checks that they agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import onnx
from onnx import TensorProto
from gradcam_common.methods import METHODS, Method, method

from .ablation import ablation_weights
from .cam import (
    cam_heatmap,
    channel_sum,
    eigen_cam,
    eigen_grad_cam,
    fem,
    grad_cam,
    grad_cam_element_wise,
    grad_cam_plus_plus,
    hires_cam,
    kernel_principal_projection,
    layer_cam,
    mean_of_maps,
    pixel_heatmap,
    principal_projection,
    product_of_maps,
    random_cam,
    seg_eigen_cam,
    shapley_cam,
    x_grad_cam,
)
from .errors import AugmentError
from .factorization import CONCEPTS, deep_feature_factorization
from .fullgrad import biased_layers, full_grad
from .graph import GraphBuilder
from .group import group_cam
from .hessian import hessian_vector_product
from .layout import TargetView
from .names import NAMES
from .score import score_cam
from .scores import Detection, FinerDifference, Logit, ScoreTarget
from .sess import input_size, sess_fusion
from .sess import patches as sess_patches
from .smoothing import Transform, integration_transforms
from .sobel import IMAGENET_PIXELS, PixelNormalisation, sobel_heatmap
from .targets import append_backward, spatial_axes

INTEGRATION_STEPS = 20  # Integrated Grad-CAM's scaled copies of the image


@dataclass(frozen=True)
class Features:
    """A target layer's view and its values and gradients seen as [N, C, h, w], and its
    gradient as the layer is laid out (`layer_gradient`: d score / d view.tensor)."""

    view: TargetView
    activations: str
    gradients: str
    layer_gradient: str


@dataclass(frozen=True)
class MapInputs:
    """What a method's map is built from: the target layers' `features` (the first is the
    layer exposed as ``activations``), the `image` input (the heatmap takes its H x W), the
    image and the explained output as the network computes them (`network_image`,
    `score_output`: the copies' rows under aug_smooth or a path method), the backward pass's
    `seeds` (d score / d output, or a detection's heads), each row's `resolved_class` (None
    for a score without a class), `eigen_smooth`, and how the image was made from 8-bit
    `pixels`."""

    b: GraphBuilder
    features: Sequence[Features]
    image: onnx.ValueInfoProto
    network_image: str
    score_output: str
    seeds: dict[str, str]
    resolved_class: str | None
    eigen_smooth: bool
    pixels: PixelNormalisation = IMAGENET_PIXELS


class CamMethod(ABC):
    """One explanation method: its `gradcam_common` entry, its refusals and its map."""

    entry: ClassVar[Method]
    # Why the method explains the class logit only, not negated (None: any score; a method
    # re-running the network always does, `check`).
    logit_only: ClassVar[str | None] = None

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def reruns_network(self) -> bool:
        return self.entry.reruns_network

    @property
    def path(self) -> bool:
        return self.entry.path

    @property
    def pixel_level(self) -> bool:
        return self.entry.pixel_level

    @property
    def runs_on_copies(self) -> bool:
        """Whether the network runs again inside the graph, on perturbed or scaled copies (a
        perturbation or a path method): the model's other inputs cannot follow the copies."""
        return self.reruns_network or self.path

    def check(
        self, score: ScoreTarget, *, counterfactual: bool, aug_smooth: bool,
        input_gradients: bool,
    ) -> None:
        """Refuse, with an AugmentError, a score or option this method cannot be combined
        with. The traits decide: a detection is explained from one run on the image itself (no
        copies: no perturbation or path method, no aug_smooth); a method re-running the network
        (or with a `logit_only` reason) explains the class logit, not negated; copies of the image (aug_smooth, a path) carry
        no pixel-level gradients; a path is not smoothed."""
        if isinstance(score, Detection) and (self.runs_on_copies or aug_smooth):
            explaining = ", ".join(m.name for m in CAM_METHODS.values() if not m.runs_on_copies)
            raise AugmentError(
                f"score 'detection' is explained by gradient methods ({explaining}), without "
                f"aug_smooth; not {self.name}" + (" with aug_smooth" if aug_smooth else "")
            )
        if (self.reruns_network or self.logit_only) and (
            not isinstance(score, Logit) or counterfactual
        ):
            why = self.logit_only or "explains the class logit"
            raise AugmentError(f"{self.name} {why}: no score or counterfactual option")
        if (aug_smooth or self.path) and (self.pixel_level or input_gradients):
            raise AugmentError("aug_smooth is not available with pixel-level gradients")
        if aug_smooth and self.path:
            raise AugmentError(f"{self.name} cannot be combined with aug_smooth")

    def explained_score(self, score: ScoreTarget) -> ScoreTarget:
        """The score whose gradient seeds the backward pass, given the request's (already
        `check`ed): the request's own, unless the method defines its score (Finer-CAM)."""
        return score

    def image_transforms(self, image: onnx.ValueInfoProto) -> tuple[Transform, ...]:
        """The transformed copies of the `image` input the network runs on, identity included
        (`smoothing.tile_transforms`); none: the image alone."""
        return ()

    @abstractmethod
    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        """The heatmap [N, H, W] in [0, 1], and the pixel map [N, C, H, W] of a pixel-level
        method (None for the others)."""


class LayerMethod(CamMethod):
    """A map per target layer, the maps of several layers fused (`fuse`)."""

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        maps = [self.layer_map(inputs, feature) for feature in inputs.features]
        return (maps[0] if len(maps) == 1 else self.fuse(inputs.b, maps)), None

    def fuse(self, b: GraphBuilder, maps: list[str]) -> str:
        """Several layers' heatmaps [N, H, W] as one: their mean, normalised again."""
        return mean_of_maps(b, maps)

    @abstractmethod
    def layer_map(self, inputs: MapInputs, feature: Features) -> str:
        """One target layer's heatmap [N, H, W]."""


class ChannelMethod(LayerMethod):
    """Per-channel contributions [N, C, h, w], summed over channels (or, with eigen_smooth
    and always for the Eigen methods, projected on their first principal component), then
    the shared tail (`contributions_heatmap`)."""

    projected: ClassVar[bool] = False

    def layer_map(self, inputs: MapInputs, feature: Features) -> str:
        contributions = self.contributions(inputs, feature)
        return contributions_heatmap(inputs, contributions, inputs.eigen_smooth or self.projected)

    @abstractmethod
    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        """The layer's per-channel contributions [N, C, h, w]."""


class GradCam(ChannelMethod):
    entry = method("gradcam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return grad_cam(inputs.b, feature.activations, feature.gradients)


class GradCamPlusPlus(ChannelMethod):
    entry = method("gradcam++")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return grad_cam_plus_plus(inputs.b, feature.activations, feature.gradients)


class RefineCam(GradCamPlusPlus):
    """RefineCAM (pytorch-grad-cam's `RefineCAM`, with its default base method, Grad-CAM++):
    the Grad-CAM++ maps of several target layers multiplied, then normalised, which keeps the
    fine detail of an early layer only where the later layers agree. With one target layer
    (the model's default) the product is that layer's map: Grad-CAM++, as the reference gives."""

    entry = method("refinecam")

    def fuse(self, b: GraphBuilder, maps: list[str]) -> str:
        return product_of_maps(b, maps)


class XGradCam(ChannelMethod):
    entry = method("xgradcam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return x_grad_cam(inputs.b, feature.activations, feature.gradients)


class HiResCam(ChannelMethod):
    entry = method("hirescam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return hires_cam(inputs.b, feature.activations, feature.gradients)


class GradCamElementWise(ChannelMethod):
    entry = method("gradcam-elementwise")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return grad_cam_element_wise(inputs.b, feature.activations, feature.gradients)


class LayerCam(ChannelMethod):
    entry = method("layercam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return layer_cam(inputs.b, feature.activations, feature.gradients)


class FinerCam(GradCam):
    """Finer-CAM (Zhang et al., CVPR 2025; pytorch-grad-cam's `FinerCAM` with its default base
    method, Grad-CAM): Grad-CAM of the class logit's weighted difference with its three most
    similar classes' logits (`scores.FinerDifference`), which keeps what tells the class from
    its neighbours. The comparison classes are ranked in the same run, on each row's logits."""

    entry = method("finercam")

    def check(
        self, score: ScoreTarget, *, counterfactual: bool, aug_smooth: bool,
        input_gradients: bool,
    ) -> None:
        if not isinstance(score, Logit):
            raise AugmentError(
                f"{self.name} compares the class logit with its nearest classes' logits: no "
                f"score option (got {score.name!r})"
            )
        super().check(score, counterfactual=counterfactual, aug_smooth=aug_smooth,
                      input_gradients=input_gradients)

    def explained_score(self, score: ScoreTarget) -> ScoreTarget:
        return FINER_DIFFERENCE


FINER_DIFFERENCE = FinerDifference()


class EigenCam(ChannelMethod):
    entry = method("eigencam")
    projected = True

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return eigen_cam(inputs.b, feature.activations, feature.gradients)


class KpcaCam(LayerMethod):
    entry = method("kpcacam")

    def layer_map(self, inputs: MapInputs, feature: Features) -> str:
        raw = kernel_principal_projection(inputs.b, feature.activations)
        return cam_heatmap(inputs.b, raw, inputs.image.name, spatial_axes(inputs.image))


class Fem(ChannelMethod):
    entry = method("fem")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return fem(inputs.b, feature.activations, feature.gradients)


class EigenGradCam(ChannelMethod):
    entry = method("eigengradcam")
    projected = True

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return eigen_grad_cam(inputs.b, feature.activations, feature.gradients)


class SegEigenCam(ChannelMethod):
    entry = method("seg-eigencam")
    projected = True

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return seg_eigen_cam(inputs.b, feature.activations, feature.gradients)


class RandomCam(ChannelMethod):
    entry = method("randomcam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        return random_cam(inputs.b, feature.activations, feature.gradients)
class ShapleyCam(ChannelMethod):
    """ShapleyCAM: the gradient minus half the Hessian-vector product with the activations,
    spatially averaged, as channel weights. H A by reverse-over-reverse differentiation of the
    backward pass already built (`hessian.py`), in the layer's own layout, then viewed."""

    entry = method("shapleycam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        b, layer = inputs.b, feature.view.tensor
        hessian_a = hessian_vector_product(b, layer, feature.layer_gradient, b.computed(layer))
        if hessian_a is not None:
            hessian_a = feature.view.apply(b, hessian_a, inputs.network_image)
        return shapley_cam(b, feature.activations, feature.gradients, hessian_a)


class AblationCam(ChannelMethod):
    """The channel weights of the score drop when each channel of the raw layer is ablated
    (`ablation.py`)."""

    entry = method("ablationcam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        b, view = inputs.b, feature.view
        weights = ablation_weights(b, view.tensor, view.channel_axis, inputs.score_output,
                                   onehot=inputs.seeds[inputs.score_output])
        return b.op("Mul", [b.unsqueeze(weights, [2, 3]), feature.activations])


class ScoreCam(ChannelMethod):
    """The softmax of the class logits of the image masked by each channel (`score.py`)."""

    entry = method("scorecam")

    def contributions(self, inputs: MapInputs, feature: Features) -> str:
        _refuse_without_nchw_class(self, inputs)
        return score_cam(inputs.b, feature.activations, inputs.network_image,
                         inputs.score_output, inputs.resolved_class)


class GroupCam(LayerMethod):
    """Channel groups as masks over a blurred copy of the image (`group.py`), its raw map
    already at the input's size."""

    entry = method("groupcam")

    def layer_map(self, inputs: MapInputs, feature: Features) -> str:
        _refuse_without_nchw_class(self, inputs)
        raw = group_cam(inputs.b, feature.activations, feature.gradients, inputs.network_image,
                        inputs.score_output, inputs.resolved_class)
        return cam_heatmap(inputs.b, raw, inputs.image.name, spatial_axes(inputs.image))


class IntegratedGradCam(LayerMethod):
    """Integrated Grad-CAM (Sattarzadeh et al., ICASSP 2021), as the authors' released code
    computes it: the ReLU'd Grad-CAM maps of x * i / m, i = 0 .. m - 1 (a black baseline),
    summed; the copies are tiled along the batch after the image itself (`smoothing.py`)."""

    entry = method("integrated-gradcam")

    def image_transforms(self, image: onnx.ValueInfoProto) -> tuple[Transform, ...]:
        return integration_transforms(INTEGRATION_STEPS)

    def layer_map(self, inputs: MapInputs, feature: Features) -> str:
        """From the tiled rows [(1 + m) N, ...], identity first: the scaled copies' ReLU'd
        Grad-CAM maps summed, then the shared tail."""
        b, image = inputs.b, inputs.image
        per_row = b.op("Relu", [channel_sum(b, grad_cam(b, feature.activations,
                                                        feature.gradients))])
        steps = len(self.image_transforms(image))
        grouped = b.op("Reshape", [per_row, b.op(
            "Concat",
            [b.ints([steps]), b.shape_slice(image.name, 0, 1), b.shape_slice(per_row, 1)],
            axis=0,
        )])
        path = b.op("Slice", [grouped, b.ints([1]), b.ints([steps]), b.ints([0])])
        summed = b.reduce("ReduceSum", path, [0], keepdims=False)
        return cam_heatmap(b, summed, image.name, spatial_axes(image))


class Sess(CamMethod):
    """SESS (`sess.py`): the Grad-CAM maps of patches slid over the image at several scales,
    tiled along the batch after the image itself (`smoothing.py`), weighted by their class
    probability, pasted back and fused. Several target layers are fused per patch first, as
    pytorch-grad-cam's base method does."""

    entry = method("sess")
    logit_only = "weighs its patches by the class probability of the class logit only"

    def image_transforms(self, image: onnx.ValueInfoProto) -> tuple[Transform, ...]:
        return sess_patches(*input_size(image))

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        b = inputs.b
        maps = [contributions_heatmap(inputs, grad_cam(b, f.activations, f.gradients),
                                      inputs.eigen_smooth) for f in inputs.features]
        per_patch = maps[0] if len(maps) == 1 else mean_of_maps(b, maps)
        onehot = inputs.seeds[inputs.score_output]
        probabilities = b.reduce("ReduceSum", b.op("Mul", [
            b.op("Softmax", [b.computed(inputs.score_output)], axis=1), onehot]), [1],
            keepdims=False)
        return sess_fusion(b, per_patch, probabilities, inputs.image,
                           self.image_transforms(inputs.image)), None


class DeepFeatureFactorization(CamMethod):
    """The target layer factorised into non-negative concepts scored by the classifier head;
    the map of the concept scoring highest for the class (`factorization.py`). One target
    layer (the feature map the classifier pools); each concept's score for the class is the
    output ``concept_scores`` [N, k]."""

    entry = method("dff")
    logit_only = "scores its concepts with the classifier's class logit only"

    def check(
        self, score: ScoreTarget, *, counterfactual: bool, aug_smooth: bool,
        input_gradients: bool,
    ) -> None:
        super().check(score, counterfactual=counterfactual, aug_smooth=aug_smooth,
                      input_gradients=input_gradients)
        if aug_smooth:
            raise AugmentError(f"{self.name} factorises the image's own layer: no aug_smooth")

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        b, feature = inputs.b, inputs.features[0]
        if len(inputs.features) > 1:
            raise AugmentError(f"{self.name} factorises one target layer, not several")
        if feature.view.layout != "nchw":
            raise AugmentError(f"{self.name} needs an NCHW target layer (the feature map the "
                               f"classifier pools); {feature.view.tensor!r} is "
                               f"{feature.view.describe()}")
        raw, scores = deep_feature_factorization(
            b, feature.activations, feature.view.tensor, inputs.score_output,
            inputs.seeds[inputs.score_output],
        )
        batch = inputs.image.type.tensor_type.shape.dim[0]
        b.add_output(scores, NAMES.concept_scores, TensorProto.FLOAT,
                     [batch.dim_value or batch.dim_param or None, CONCEPTS])
        return cam_heatmap(b, raw, inputs.image.name, spatial_axes(inputs.image)), None


class Sobel(CamMethod):
    """The Sobel baseline (pytorch-grad-cam's `sobel_cam`): the edges of the photo, recovered
    from the normalised input with the model's preprocessing (`sobel.py`). It reads neither the
    target layer nor a gradient; the layer's ``activations`` and ``gradients`` are still the
    outputs every method has (a request's channel importances)."""

    entry = method("sobel")

    def check(
        self, score: ScoreTarget, *, counterfactual: bool, aug_smooth: bool,
        input_gradients: bool,
    ) -> None:
        if aug_smooth:
            raise AugmentError(f"{self.name} maps the image's own edges: no aug_smooth")
        super().check(score, counterfactual=counterfactual, aug_smooth=aug_smooth,
                      input_gradients=input_gradients)

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        return sobel_heatmap(inputs.b, inputs.image, spatial_axes(inputs.image),
                             inputs.pixels), None
class FullGrad(CamMethod):
    """FullGrad (Srinivas and Fleuret, NeurIPS 2019), as pytorch-grad-cam's `FullGrad`
    (`fullgrad.py`): the input gradient times the input, and the bias times the gradient at
    every biased Conv and BatchNormalization between the image and the score, from one
    backward pass that reaches the image (no weight gradients).

    The map involves no target layer (pytorch-grad-cam ignores its ``target_layers`` too): the
    layer option, default or named, only chooses what the ``activations`` and ``gradients``
    outputs hold, as for every method. eigen_smooth projects the per-layer maps on their first
    principal component instead of summing them, as pytorch-grad-cam does."""

    entry = method("fullgrad")

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        b, image = inputs.b, inputs.network_image
        layers = biased_layers(b, image, list(inputs.seeds))
        gradients = append_backward(b, inputs.seeds, [image, *(l.output for l in layers)])
        return full_grad(b, image, gradients[image], layers, gradients, inputs.image.name,
                         spatial_axes(inputs.image), inputs.eigen_smooth), None


class PixelMethod(CamMethod):
    """Gradients all the way to the input through guided ReLUs (Springenberg et al., ICLR 2015
    workshop: a ReLU passes a gradient only where both its input and the incoming gradient are
    positive), in a second backward pass. The heatmap is the pixel map's largest magnitude
    over the channels (`cam.pixel_heatmap`)."""

    def heatmap(self, inputs: MapInputs) -> tuple[str, str | None]:
        image = inputs.image.name
        guided = append_backward(inputs.b, inputs.seeds, [image], guided=True)[image]
        pixel_map = self.pixel_map(inputs, guided)
        return pixel_heatmap(inputs.b, pixel_map), pixel_map

    @abstractmethod
    def pixel_map(self, inputs: MapInputs, guided: str) -> str:
        """The pixel map [N, C, H, W] from the guided gradients at the image."""


class GuidedBackprop(PixelMethod):
    entry = method("guided-backprop")

    def pixel_map(self, inputs: MapInputs, guided: str) -> str:
        return guided


class GuidedGradCam(PixelMethod):
    """Guided backprop (x) the first target layer's Grad-CAM map (Selvaraju et al.)."""

    entry = method("guided-gradcam")

    def pixel_map(self, inputs: MapInputs, guided: str) -> str:
        b, first = inputs.b, inputs.features[0]
        grad_cam_map = contributions_heatmap(
            inputs, grad_cam(b, first.activations, first.gradients)
        )
        height, width = spatial_axes(inputs.image)
        channel_axis = ({0, 1, 2, 3} - {0, height, width}).pop()
        return b.op("Mul", [guided, b.unsqueeze(grad_cam_map, [channel_axis])])


def contributions_heatmap(inputs: MapInputs, contributions: str, project: bool = False) -> str:
    """The heatmap from per-channel contributions: summed (or projected) and the shared
    tail (`cam.cam_heatmap`)."""
    b = inputs.b
    raw = principal_projection(b, contributions) if project else channel_sum(b, contributions)
    return cam_heatmap(b, raw, inputs.image.name, spatial_axes(inputs.image))


def _refuse_without_nchw_class(cam_method: CamMethod, inputs: MapInputs) -> None:
    """The masked copies of Score-CAM and Group-CAM need an NCHW image and a class score."""
    if spatial_axes(inputs.image) != (2, 3) or inputs.resolved_class is None:
        raise AugmentError(f"{cam_method.name} needs an NCHW image input and a class score")


def _registered() -> dict[str, CamMethod]:
    """One instance of each class that declares an entry, keyed by name, in the order of
    gradcam_common's METHODS; an entry without a class is not served (and fails
    tests/test_registry.py)."""
    classes: dict[str, type[CamMethod]] = {}
    pending: list[type[CamMethod]] = [CamMethod]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "entry" in vars(cls):
            classes[cls.entry.name] = cls
    return {entry.name: classes[entry.name]() for entry in METHODS if entry.name in classes}


CAM_METHODS: dict[str, CamMethod] = _registered()
