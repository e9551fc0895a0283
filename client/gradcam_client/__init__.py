"""Python client for the gradcam gRPC service."""
