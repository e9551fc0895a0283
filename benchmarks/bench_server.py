"""Served Grad-CAM against the alternatives, as ratios measured in one run.

    python benchmarks/bench_server.py [--model resnet50|vit_b_16] [--threads 2] [--seconds 15]

On the same weights (a torchvision model, random weights: speed does not depend on them) and the
same number of threads, it measures:

1. served Grad-CAM vs a served forward-only request (KServe v2, FP32 tensor), batch 1 and 8;
2. served Grad-CAM vs pytorch-grad-cam's GradCAM in this process, batch 1 and 8;
3. throughput of 8 concurrent batch-1 clients vs one client sending batch-8 requests;
4. the gRPC round trip vs the same augmented session run in-process, batch 1, with
   tritonclient and with the generated stub (`bench_round_trip.py`, its own process).

Variants are interleaved where they can be, so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench_augment import export, interleaved
from gradcam_server.augment import augment_model
from gradcam_server.runtime import RuntimeOptions, create_session

MODEL = "bench"


def vit_tokens_to_map(tokens):
    """pytorch-grad-cam's reshape_transform for ViT-B/16 at 224: drop the class token, 14 x 14."""
    return tokens[:, 1:].reshape(tokens.shape[0], 14, 14, tokens.shape[2]).permute(0, 3, 1, 2)


# pytorch-grad-cam's target layer (and reshape_transform) for each model, as its docs recommend;
# the served model explains the layer the augmenter detects, the same one.
RECIPES = {
    "resnet50": (lambda model: model.layer4, None),
    "vit_b_16": (lambda model: model.encoder.layers[-1].ln_1, vit_tokens_to_map),
}


def start_server(repository: Path, threads: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "gradcam_server", "--model-repository", str(repository),
         "--port", "0", "--metrics-port", "-1", "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = server.stdout.readline()
    address = line.split("listening on ")[1].split()[0]
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status != 1:
            time.sleep(0.2)
    return server, address


def infer(client: triton.InferenceServerClient, x: np.ndarray, explain: bool) -> None:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    names = ["logits", "heatmap"] if explain else ["logits"]
    client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput(n) for n in names])


def throughput(address: str, clients: int, batch: int, seconds: float) -> float:
    """Images per second answered with heatmaps, `clients` threads each sending `batch`."""
    x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def worker(index: int) -> None:
        client = triton.InferenceServerClient(address)
        infer(client, x, explain=True)  # connect and warm up outside the window
        barrier.wait()
        while time.perf_counter() < stop:
            infer(client, x, explain=True)
            counts[index] += batch

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    stop = started + seconds
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()

    import torch
    import torchvision
    from pytorch_grad_cam import GradCAM

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp, MODEL)
        folder.mkdir()
        export(args.model, folder / "model.onnx")
        server, address = start_server(Path(tmp), args.threads)
        try:
            client = triton.InferenceServerClient(address)
            rng = np.random.default_rng(0)
            print(f"{args.model}, CPU, {args.threads} threads; ratios of medians")

            print("\n1. served Grad-CAM / served forward-only")
            for batch in (1, 8):
                x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
                m = interleaved({
                    "forward": lambda: infer(client, x, explain=False),
                    "gradcam": lambda: infer(client, x, explain=True),
                }, args.seconds)
                print(f"   batch {batch}: {m['forward'] * 1e3:7.1f} ms vs {m['gradcam'] * 1e3:7.1f} ms"
                      f"  ratio {m['gradcam'] / m['forward']:.3f}")

            print("\n2. pytorch-grad-cam GradCAM / served Grad-CAM (speed-up)")
            torch.manual_seed(0)
            model = getattr(torchvision.models, args.model)(weights=None).eval()
            layer, reshape = RECIPES[args.model]
            with GradCAM(model=model, target_layers=[layer(model)],
                         reshape_transform=reshape) as cam:
                for batch in (1, 8):
                    x = rng.standard_normal((batch, 3, 224, 224)).astype(np.float32)
                    tensor = torch.from_numpy(x)
                    m = interleaved({
                        "pytorch-grad-cam": lambda: cam(tensor, targets=None),
                        "served": lambda: infer(client, x, explain=True),
                    }, args.seconds, minimum=4)
                    print(f"   batch {batch}: {m['pytorch-grad-cam'] * 1e3:7.1f} ms vs "
                          f"{m['served'] * 1e3:7.1f} ms  speed-up "
                          f"{m['pytorch-grad-cam'] / m['served']:.2f}x")

            print("\n3. throughput, 8 concurrent batch-1 clients / one batch-8 client")
            batched = throughput(address, clients=1, batch=8, seconds=args.seconds)
            concurrent = throughput(address, clients=8, batch=1, seconds=args.seconds)
            print(f"   {concurrent:.1f} vs {batched:.1f} images/s  ratio {concurrent / batched:.3f}")

            print("\n4. gRPC round trip / in-process session, batch 1")
            session = create_session(
                augment_model(folder / "model.onnx"), RuntimeOptions("cpu", args.threads)
            )
            x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
            feeds = {"input": x, "target_class": np.array([-1], dtype=np.int64)}
            m = interleaved({
                "in-process": lambda: session.run(None, feeds),
                "served": lambda: infer(client, x, explain=True),
            }, args.seconds)
            print(f"   tritonclient:   {m['in-process'] * 1e3:.1f} ms vs {m['served'] * 1e3:.1f} ms"
                  f"  ratio {m['served'] / m['in-process']:.3f}")
            session = None  # its memory is the stub measurement's to use
            subprocess.run(
                [sys.executable, str(Path(__file__).with_name("bench_round_trip.py")), address,
                 MODEL, str(folder / "model.onnx"), "--threads", str(args.threads),
                 "--seconds", str(args.seconds)],
                check=True,
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
