"""Augment an exported ONNX image model so one onnxruntime run also explains it.

    from gradcam_server.augment import augment_model
    augmented = augment_model("model.onnx")            # or an onnx.ModelProto
    onnx.save(augmented, "model.gradcam.onnx")

The augmented model keeps every original input and output and adds the input ``target_class``
(INT64 [N], -1 for the top-1 class) and the outputs ``activations``, ``gradients`` and ``heatmap``.
See `augment_model` for the contract.
"""

from .errors import AugmentError, MissingRuleError
from .layout import LAYOUTS
from .names import AugmentedOutputs
from .passes import augment_model, explained_target, load_model
from .sobel import PixelNormalisation

__all__ = [
    "AugmentError", "MissingRuleError", "AugmentedOutputs", "LAYOUTS", "augment_model",
    "explained_target", "load_model", "PixelNormalisation",
]
