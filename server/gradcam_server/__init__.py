"""Grad-CAM served over gRPC on exported ONNX graphs, run by onnxruntime."""

__version__ = "0.1.0"
