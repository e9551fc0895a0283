"""The main job end to end: serve models/, explain samples/chelsea.jpg into an overlay PNG.

    python scripts/demo.py [--port 8001] [--out out]

Starts `gradcam-server` on the model repository, waits until it reports SERVING, runs the
`gradcam explain` command against it (overlay side by side with the top predictions), and stops
the server with SIGTERM, as an orchestrator would.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def wait_until_serving(address: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with code {server.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the server did not become ready within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--out", type=Path, default=Path("out"))
    args = parser.parse_args()
    address = f"127.0.0.1:{args.port}"
    args.out.mkdir(parents=True, exist_ok=True)
    overlay = args.out / "chelsea-gradcam.png"
    server = subprocess.Popen(
        [sys.executable, "-m", "gradcam_server", "--model-repository", str(ROOT / "models"),
         "--port", str(args.port), "--metrics-port", "-1"],
    )
    try:
        wait_until_serving(address, server)
        done = subprocess.run(
            [sys.executable, "-m", "gradcam_client", "explain", str(ROOT / "samples" / "chelsea.jpg"),
             "--server", address, "--model", "efficientnet_lite0", "--top-k", "1",
             "--side-by-side", "-o", str(overlay)],
        )
        if done.returncode != 0:
            return done.returncode
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(f"overlay written to {overlay}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
