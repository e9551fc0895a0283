"""The names of the tensors an augmented model adds: its inputs and outputs (`NAMES`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AugmentedOutputs:
    """Names of the tensors an augmented model adds."""

    target_class: str = "target_class"
    activations: str = "activations"
    gradients: str = "gradients"
    heatmap: str = "heatmap"
    coarse_heatmap: str = "coarse_heatmap"  # the heatmap before its resize (`cam.coarse_heatmap`)
    input_gradients: str = "input_gradients"
    pixel_map: str = "pixel_map"
    concept_scores: str = "concept_scores"  # dff: each concept's score for the class
    reference_embedding: str = "reference_embedding"
    target_mask: str = "target_mask"
    detection_index: str = "detection_index"  # the "detection" score's inputs and outputs
    reference_box: str = "reference_box"
    explained_detection: str = "explained_detection"
    detection_class: str = "detection_class"
    detection_score: str = "detection_score"
    detection_box: str = "detection_box"
    detection_iou: str = "detection_iou"


NAMES = AugmentedOutputs()
