"""One server against two replicas on the same cores, and what a failing replica costs.

    python benchmarks/replicas.py [--seconds 20] [--clients 8]

On the shipped model (models/efficientnet_lite0, JPEG requests of the bundled photo through
the SDK, `clients` concurrent callers), it measures in one run, interleaved:

1. explained images/s of one replica with --threads 2, and of two replicas with --threads 1
   each behind one client (round-robin over health-checked subchannels): the same two cores;
2. with two replicas under load, one killed (SIGKILL, no drain) halfway through: calls that
   failed (none should: a call the dead replica dropped is retried on the other) and the
   throughput before and after.

It prints one table; docs/DEPLOY.md records the figures and the sizing rule drawn from them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradcam_client import GradCamClient

ROOT = Path(__file__).resolve().parents[1]
REPOSITORY = ROOT / "models"
MODEL = "efficientnet_lite0"
PHOTO = (ROOT / "samples" / "chelsea.jpg").read_bytes()


def start_replica(threads: int) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "gradcam_server", "--model-repository", str(REPOSITORY),
         "--port", "0", "--metrics-port", "-1", "--threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    address = server.stdout.readline().split("listening on ")[1].split()[0]
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return server, address


class Load:
    """`clients` threads explaining the photo through one client until stopped; answered
    calls are timestamped, failures kept."""

    def __init__(self, client: GradCamClient, clients: int) -> None:
        self.client, self.done, self.failures = client, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.explain(PHOTO, model=MODEL, heatmap_size="model")
                self.done.append(time.perf_counter())
            except Exception as error:  # noqa: BLE001 - every failure is counted
                self.failures.append(error)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def rate(self, start: float, end: float) -> float:
        return sum(start <= t < end for t in self.done) / (end - start)


def measure(addresses: list[str], clients: int, seconds: float) -> float:
    with GradCamClient(addresses, retries=8, backoff=0.05) as client:
        client.explain(PHOTO, model=MODEL)  # connect and warm every replica outside the window
        with Load(client, clients) as load:
            time.sleep(2.0)
            start = time.perf_counter()
            time.sleep(seconds)
            return load.rate(start, time.perf_counter())


def failover(clients: int, seconds: float) -> dict:
    servers = [start_replica(threads=1) for _ in range(2)]
    try:
        with GradCamClient([a for _, a in servers], retries=8, backoff=0.05) as client:
            client.explain(PHOTO, model=MODEL)
            with Load(client, clients) as load:
                time.sleep(2.0)
                start = time.perf_counter()
                time.sleep(seconds / 2)
                killed = time.perf_counter()
                servers[0][0].send_signal(signal.SIGKILL)
                time.sleep(seconds / 2)
                end = time.perf_counter()
            return {
                "calls": len(load.done), "failed": len(load.failures),
                "before": load.rate(start, killed), "after": load.rate(killed + 1.0, end),
            }
    finally:
        for server, _ in servers:
            server.kill()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.clients} clients, {args.seconds:.0f} s windows")
    one, two = [], []
    for _ in range(args.rounds):  # interleaved: noise hits both alike
        for threads, replicas, results in ((2, 1, one), (1, 2, two)):
            servers = [start_replica(threads) for _ in range(replicas)]
            try:
                results.append(measure([a for _, a in servers], args.clients, args.seconds))
            finally:
                for server, _ in servers:
                    server.send_signal(signal.SIGTERM)
                    server.wait()
    print(f"1 replica  x 2 threads: {max(one):6.1f} images/s (rounds: {one})")
    print(f"2 replicas x 1 thread : {max(two):6.1f} images/s (rounds: {two})")
    print(f"2 replicas / 1 replica: {max(two) / max(one):.2f}")
    result = failover(args.clients, args.seconds)
    print(f"one of 2 replicas killed halfway: {result['calls']} calls answered, "
          f"{result['failed']} failed; {result['before']:.1f} images/s before, "
          f"{result['after']:.1f} after")


if __name__ == "__main__":
    main()
