"""What the served path adds to one Grad-CAM run: the gRPC round trip against the same augmented
session run in this process, batch 1, interleaved.

    python benchmarks/bench_round_trip.py ADDRESS MODEL_NAME MODEL.onnx [--threads 2] [--seconds 15]

The request is built with the project's generated KServe v2 stub (raw little-endian tensor
contents), so the figure is the protocol and the server, not a client library's own request
building; `bench_server.py` runs it in a separate process beside its tritonclient figures (the
two define the same protobuf messages and cannot share a process).
"""

from __future__ import annotations

import argparse

import grpc
import numpy as np

from bench_augment import interleaved
from gradcam_proto import grpc_service_pb2 as pb
from gradcam_proto import grpc_service_pb2_grpc as pb_grpc
from gradcam_server.augment import augment_model
from gradcam_server.runtime import RuntimeOptions, create_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address")
    parser.add_argument("model_name")
    parser.add_argument("model", help="the model file the server serves")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()

    session = create_session(augment_model(args.model), RuntimeOptions("cpu", args.threads))
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {"input": x, "target_class": np.array([-1], dtype=np.int64)}
    request = pb.ModelInferRequest(
        model_name=args.model_name,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                      shape=list(x.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=n)
                 for n in ("logits", "heatmap")],
        raw_input_contents=[x.tobytes()],
    )
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def served() -> None:
            response = stub.ModelInfer(request, timeout=60)
            np.frombuffer(response.raw_output_contents[1], dtype="<f4")

        m = interleaved(
            {"in-process": lambda: session.run(None, feeds), "served": served}, args.seconds
        )
    print(f"   generated stub: {m['in-process'] * 1e3:.1f} ms vs {m['served'] * 1e3:.1f} ms"
          f"  ratio {m['served'] / m['in-process']:.3f}")


if __name__ == "__main__":
    main()
