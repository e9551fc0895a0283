"""`gradcam-server`: assembles the gRPC server and runs it until SIGTERM.

    gradcam-server --model-repository models [--host 127.0.0.1] [--port 8001]

One port serves the KServe v2 protocol, the typed explain API, ``grpc.health.v1`` (NOT_SERVING
until every model folder has been loaded, and again while shutting down) and server reflection;
Prometheus metrics are on an HTTP port. Models load in the background after the port is bound,
so liveness answers at once. SIGTERM (or SIGINT) stops new work, lets in-flight requests finish
within the grace period, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradcam_proto import gradcam_pb2, gradcam_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc

from .auth import BearerTokenInterceptor
from .explain_api import GradCamServicer
from .kserve import KServeServicer
from .metrics import Metrics
from .repository import ModelRepository
from .runtime import RuntimeOptions
from .service import DEFAULT_MAX_PIXELS, GradCamService

log = logging.getLogger("gradcam_server")

SERVICE_NAMES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    gradcam_pb2.DESCRIPTOR.services_by_name["GradCam"].full_name,
)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ServerOptions:
    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002  # None: no metrics endpoint
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed
    device: str = "auto"
    threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    grace_seconds: float = 30.0


class GradCamServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.repository = ModelRepository(
            options.model_repository, RuntimeOptions(options.device, options.threads)
        )
        self.service = GradCamService(
            self.repository, options.max_pixels, on_batch=self.metrics.observe_batch
        )
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loading: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and start serving; model loading goes on in the background. Returns the port."""
        interceptors = [BearerTokenInterceptor(self.options.token)] if self.options.token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.service, self.metrics), server
        )
        gradcam_pb2_grpc.add_GradCamServicer_to_server(
            GradCamServicer(self.service, self.metrics), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.options.host}:{self.options.port}"
        credentials = self._credentials()
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        await server.start()
        self._server = server
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.options.metrics_port, self.options.host)
        self._loading = asyncio.create_task(self._load_models())
        return self.port

    async def _load_models(self) -> None:
        await asyncio.to_thread(self.repository.load_all)
        statuses = self.repository.statuses()
        ready = [s.name for s in statuses if s.ready]
        failed = [s.name for s in statuses if not s.ready]
        log.info("models ready: %s%s", ", ".join(ready) or "none",
                 f"; failed: {', '.join(failed)}" if failed else "")
        if self.repository.ready():
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def wait_until_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish within `grace` seconds."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(self.options.grace_seconds if grace is None else grace)
        await self.service.close()
        self.metrics.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    def _credentials(self) -> grpc.ServerCredentials | None:
        options = self.options
        if options.tls_cert is None and options.tls_key is None:
            if options.tls_client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if options.tls_cert is None or options.tls_key is None:
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        root = options.tls_client_ca.read_bytes() if options.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(options.tls_key.read_bytes(), options.tls_cert.read_bytes())],
            root_certificates=root,
            require_client_auth=root is not None,
        )


async def serve(options: ServerOptions) -> None:
    server = GradCamServer(options)
    port = await server.start()
    scheme = "tls" if options.tls_cert else "plaintext"
    print(f"gradcam-server listening on {options.host}:{port} ({scheme})", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{options.host}:{server.metrics_port}/metrics", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("shutting down: draining in-flight requests")
    await server.stop()
    log.info("stopped")


def parse_args(argv: list[str] | None) -> ServerOptions:
    parser = argparse.ArgumentParser(
        prog="gradcam-server", description="Serve Grad-CAM for ONNX models over gRPC."
    )
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="folder of <name>/model.onnx model folders")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus HTTP port (0: any free port; -1: off)")
    parser.add_argument("--token", help="require 'authorization: Bearer TOKEN' (health stays open)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="CA (PEM) that client certificates must chain to (mutual TLS)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per session (0: one per core)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (default 50 megapixels)")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="how long shutdown waits for in-flight requests")
    args = parser.parse_args(argv)
    return ServerOptions(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        token=args.token,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        device=args.device,
        threads=args.threads,
        max_pixels=args.max_pixels,
        grace_seconds=args.grace_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse_args(argv)
        asyncio.run(serve(options))
    except (FileNotFoundError, ValueError) as error:
        print(f"gradcam-server: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
