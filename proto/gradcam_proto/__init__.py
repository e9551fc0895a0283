"""Generated gRPC stubs: the KServe v2 protocol (`grpc_service_pb2`) and the typed explain API
(`gradcam_pb2`). Regenerate with ``python proto/generate.py``."""
