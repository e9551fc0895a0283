"""A small model served at the speed of its session: figures side by side, in one run.

    python benchmarks/bench_core.py [--seconds 10] [--rounds 5] [--clients 8]

The shipped EfficientNet-Lite0 (models/), the bundled 451x300 JPEG, `--clients` concurrent
clients each sending one image per request through KServe v2 (BYTES image; the request bytes
are serialized once and the answers are not parsed, so that the clients cost the 2 cores as
little as a client can). It prints, per round and as medians:

* explained: images/s answered with the heatmap (at the image's size, the default) and logits;
* forward: images/s answered with the logits only;
* typed: images/s of the typed Explain API (one image per request, default options);
* in-process: this process decoding and preprocessing 8 images and running the same augmented
  session at batch 8, one batch after the other, on the same cores;
* the server's and the clients' CPU use in each phase (cores: CPU seconds over wall seconds);

and the ratios explained/forward and explained/in-process, of the medians, and explained/forward
round by round. Phases are interleaved round by round so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from bench_server import start_server
from gradcam_proto import gradcam_pb2, grpc_service_pb2
from gradcam_server.augment import augment_model, load_model
from gradcam_server.config import read_config
from gradcam_server.preprocess import decode_image, to_tensor
from gradcam_server.runtime import RuntimeOptions, create_session

ROOT = Path(__file__).resolve().parent.parent
MODEL = "efficientnet_lite0"
IMAGE = ROOT / "samples" / "chelsea.jpg"
INFER = "/inference.GRPCInferenceService/ModelInfer"
EXPLAIN = "/gradcam.v1.GradCam/Explain"


def infer_request(data: bytes, outputs: list[str]) -> bytes:
    request = grpc_service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(data)
    for name in outputs:
        request.outputs.add(name=name)
    return request.SerializeToString()


def explain_request(data: bytes) -> bytes:
    request = gradcam_pb2.ExplainRequest(model=MODEL)
    request.images.add(encoded=data)
    return request.SerializeToString()


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(address: str, pid: int, method: str, request: bytes, clients: int,
           seconds: float) -> tuple[float, float, float]:
    """(images/s, server cores used, client cores used) with `clients` threads sending
    `request` to `method`."""
    channels = [grpc.insecure_channel(address, options=[
        ("grpc.max_receive_message_length", 64 * 2**20)]) for _ in range(clients)]
    calls = [c.unary_unary(method, request_serializer=None, response_deserializer=None)
             for c in channels]
    for call in calls:
        call(request, timeout=60)  # connect and warm up outside the window
    counts = [0] * clients
    barrier = threading.Barrier(clients + 1)
    stop = [0.0]

    def worker(index: int) -> None:
        barrier.wait()
        while time.perf_counter() < stop[0]:
            calls[index](request, timeout=60)
            counts[index] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    cpu, client_cpu = cpu_seconds(pid), cpu_seconds(os.getpid())
    started = time.perf_counter()
    stop[0] = started + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    used, client_used = cpu_seconds(pid) - cpu, cpu_seconds(os.getpid()) - client_cpu
    for channel in channels:
        channel.close()
    return sum(counts) / wall, used / wall, client_used / wall


def served_async(address: str, pid: int, method: str, request: bytes, clients: int,
                 seconds: float) -> tuple[float, float, float]:
    """`served`, the clients being `clients` asyncio tasks on their own channels, in one
    thread (a load generator as perf_analyzer's: it costs the cores less than threads do)."""

    async def run() -> tuple[float, float, float]:
        channels = [grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 2**20)]) for _ in range(clients)]
        calls = [c.unary_unary(method, request_serializer=None, response_deserializer=None)
                 for c in channels]
        await asyncio.gather(*(call(request, timeout=60) for call in calls))  # warm up
        counts = [0] * clients
        cpu, client_cpu = cpu_seconds(pid), cpu_seconds(os.getpid())
        started = time.perf_counter()

        async def worker(index: int) -> None:
            while time.perf_counter() < started + seconds:
                await calls[index](request, timeout=60)
                counts[index] += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - started
        used, client_used = cpu_seconds(pid) - cpu, cpu_seconds(os.getpid()) - client_cpu
        await asyncio.gather(*(channel.close() for channel in channels))
        return sum(counts) / wall, used / wall, client_used / wall

    return asyncio.run(run())


def in_process(data: bytes, threads: int, seconds: float, batch: int = 8) -> float:
    """Images/s of decode + preprocess + the augmented session at `batch`, in this process."""
    folder = ROOT / "models" / MODEL
    proto = load_model(folder / "model.onnx")
    config = read_config(folder, lambda name: (224, 224))
    session = create_session(augment_model(proto, layer=config.target_layer),
                             RuntimeOptions("cpu", threads))
    names = [o.name for o in session.get_outputs()]

    def one_batch() -> None:
        x = np.stack([to_tensor(decode_image(data), config.preprocessing) for _ in range(batch)])
        session.run(names, {"input": x, "target_class": np.full(batch, -1, np.int64)})

    one_batch()
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        one_batch()
        images += batch
    return images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client", choices=("threads", "asyncio"), default="threads",
                        help="clients as threads with blocking stubs, or asyncio tasks")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime threads, server and in-process (0: one per core)")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count()
    data = IMAGE.read_bytes()
    server, address = start_server(ROOT / "models", args.threads)
    phases = {
        "explained": (INFER, infer_request(data, ["logits", "heatmap"])),
        "forward": (INFER, infer_request(data, ["logits"])),
        "typed": (EXPLAIN, explain_request(data)),
    }
    rates: dict[str, list[float]] = {name: [] for name in (*phases, "in-process")}
    cores: dict[str, list[float]] = {name: [] for name in phases}
    client_cores: dict[str, list[float]] = {name: [] for name in phases}
    print(f"{MODEL}, {IMAGE.name} ({len(data)} bytes), {args.clients} clients "
          f"({args.client}), {threads} runtime threads, {os.cpu_count()} cores")
    try:
        for round_number in range(args.rounds):
            for name, (method, request) in phases.items():
                load = served if args.client == "threads" else served_async
                rate, used, client_used = load(address, server.pid, method, request,
                                               args.clients, args.seconds)
                rates[name].append(rate)
                cores[name].append(used)
                client_cores[name].append(client_used)
            rates["in-process"].append(in_process(data, threads, args.seconds))
            print(f"round {round_number + 1}: " + ", ".join(
                f"{name} {values[-1]:.1f}/s" for name, values in rates.items()))
    finally:
        server.terminate()
        server.wait()
    median = {name: statistics.median(values) for name, values in rates.items()}
    print("\nmedians (images/s):")
    for name, value in median.items():
        used = (f" (server {statistics.median(cores[name]):.2f} cores, clients "
                f"{statistics.median(client_cores[name]):.2f})" if name in cores else "")
        print(f"  {name:<11} {value:7.1f}{used}")
    print(f"explained / forward     {median['explained'] / median['forward']:.3f} (>= 0.9)")
    print(f"explained / in-process  {median['explained'] / median['in-process']:.3f} (>= 0.7)")
    print(f"typed / in-process      {median['typed'] / median['in-process']:.3f}")
    paired = [e / f for e, f in zip(rates["explained"], rates["forward"])]
    print("explained / forward per round (phases side by side): "
          + ", ".join(f"{r:.3f}" for r in paired) + f"; median {statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
