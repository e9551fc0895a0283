"""grpc.health.v1 through a server's life, with `GradCamServer` run in this process:

    python tests/health_scenario.py MODEL_REPOSITORY

NOT_SERVING right after start() while the models load (loading is held until the first check
has been answered), SERVING once they are loaded, NOT_SERVING again after stop(). Exits non-zero
with the failed assertion on stderr.

It runs in its own interpreter because the server's KServe stubs (``gradcam_proto``) and
tritonclient's define the same ``inference.*`` protobuf symbols, and protobuf refuses to load
both into one process; the test process uses tritonclient.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradcam_server.server import SERVICE_NAMES, GradCamServer, ServerOptions

TIMEOUT_S = 60.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
EXPECTED_SERVICES = ("inference.GRPCInferenceService", "gradcam.v1.GradCam")


async def scenario(repository: Path) -> None:
    assert set(SERVICE_NAMES) == set(EXPECTED_SERVICES), SERVICE_NAMES
    server = GradCamServer(ServerOptions(repository, port=0, metrics_port=None))
    release = threading.Event()
    load_all = server.repository.load_all

    def held_load_all() -> None:
        release.wait(TIMEOUT_S)
        load_all()

    server.repository.load_all = held_load_all
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            async def statuses() -> list[int]:
                return [
                    (await health.Check(health_pb2.HealthCheckRequest(service=name),
                                        timeout=TIMEOUT_S)).status
                    for name in ("", *EXPECTED_SERVICES)
                ]

            assert await statuses() == [NOT_SERVING] * 3, "not NOT_SERVING while loading"
            release.set()
            await asyncio.wait_for(server.wait_until_loaded(), TIMEOUT_S)
            assert server.repository.ready()
            assert await statuses() == [SERVING] * 3, "not SERVING once loaded"
    finally:
        release.set()
        await server.stop(0)
    for name in ("", *EXPECTED_SERVICES):
        after = await server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
        assert after.status == NOT_SERVING, f"{name!r} not NOT_SERVING after stop()"


if __name__ == "__main__":
    asyncio.run(scenario(Path(sys.argv[1])))
    print("ok")
