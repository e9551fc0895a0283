"""`gradcam-server`: assembles the gRPC server and runs it until SIGTERM.

    gradcam-server --model-repository models [--host 127.0.0.1] [--port 8001]

One port serves the KServe v2 protocol, the typed explain API, ``grpc.health.v1`` (NOT_SERVING
until every model folder has been loaded, and again while shutting down) and server reflection;
Prometheus metrics are on their own HTTP port (``--metrics-port``, 8002 whatever ``--port`` is;
0 picks a free one, -1 turns it off), bound to loopback unless ``--metrics-host`` says otherwise:
the metrics endpoint has no authentication. Models load in the background after the port is
bound, so liveness answers at once. SIGTERM (or SIGINT) stops new work, lets in-flight requests
finish within the grace period, then exits.

A busy port is refused (gRPC's SO_REUSEPORT is turned off, so a second server cannot share it);
every start-up failure (busy port, bad TLS material, missing repository or token file) is one
line on stderr and exit status 2. The bearer token comes from ``--token-file`` or the
environment variable ``GRADCAM_TOKEN`` (``--token`` too, though the command line is visible to
every user of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import errno
import logging
import os
import signal
import socket
import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2
from threadpoolctl import threadpool_limits

from gradcam_proto import gradcam_pb2, grpc_service_pb2

from .allocator import freeze_startup_objects, reuse_freed_memory
from .auth import BearerTokenInterceptor
from .engine import ServiceLimits
from .explain_api import GradCamServicer
from .kserve import KServeServicer
from .metrics import Metrics
from .model import DEFAULT_MAX_VARIANTS
from .postprocess import MAX_MESSAGE_BYTES
from .preprocess import DEFAULT_MAX_PIXELS
from .repository import ModelRepository
from .runtime import RuntimeOptions, parse_device
from .service import GradCamService
from .transport import add_servicer

log = logging.getLogger("gradcam_server")

SERVICE_NAMES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    gradcam_pb2.DESCRIPTOR.services_by_name["GradCam"].full_name,
)
TOKEN_VARIABLE = "GRADCAM_TOKEN"
DEFAULT_MAX_CONCURRENT_RPCS = 1024  # beyond it gRPC answers RESOURCE_EXHAUSTED itself
DEFAULT_CPU_THREADS = os.cpu_count() or 1
DEFAULT_COMPUTE_NICE = 3  # the runs yield to the event loop (docs/RELIABILITY.md, "Overload")


class StartupError(Exception):
    """The server cannot start; the message is the one line the user sees."""


@dataclass
class ServerOptions:
    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    metrics_port: int | None = 8002  # None: no metrics endpoint
    metrics_host: str = "127.0.0.1"
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed
    device: str = "auto"
    threads: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_variants: int = DEFAULT_MAX_VARIANTS
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    cpu_threads: int = DEFAULT_CPU_THREADS
    grace_seconds: float = 30.0
    return_freed_memory: bool = False  # True: glibc's default allocator behaviour (`allocator`)
    compute_nice: int = DEFAULT_COMPUTE_NICE  # the model runs' threads, below the event loop


class GradCamServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = Metrics(MAX_MESSAGE_BYTES)
        self.repository = ModelRepository(
            options.model_repository,
            RuntimeOptions(options.device, options.threads, nice=options.compute_nice),
            max_variants=options.max_variants,
        )
        self.service = GradCamService(
            self.repository, ServiceLimits(max_pixels=options.max_pixels),
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.track(
            "gradcam_explain_graphs", "Augmented graph variants (sessions) held in memory, by "
            "model; bounded by --max-variants plus the default.", self._held)
        self.metrics.track(
            "gradcam_requests_in_progress", "Requests admitted and not yet answered, by model; "
            "bounded by its max_queue_size plus the batches it runs at once, past which "
            "requests are refused with RESOURCE_EXHAUSTED.", self.service.engine.in_progress)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loading: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and start serving; model loading goes on in the background. Returns the port.

        The event loop's CPU work (decoding, validation, resizing, building responses) runs in
        a pool of ``cpu_threads``: more would only contend with the runtime's threads for the
        cores (under overload, 6 such threads cut served requests by a tenth and tripled the
        time to refuse one)."""
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(self.options.cpu_threads, "cpu")
        )
        interceptors = [BearerTokenInterceptor(self.options.token)] if self.options.token else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=self.options.max_concurrent_rpcs,
        )
        add_servicer(server, KServeServicer(self.service, self.metrics),
                     grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
        add_servicer(server, GradCamServicer(self.service, self.metrics),
                     gradcam_pb2.DESCRIPTOR.services_by_name["GradCam"])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server,
            pool=_reflection_pool(),
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        host, port = self.options.host, self.options.port
        credentials = self._credentials()
        _check_port_free(host, port, "gRPC")
        try:
            if credentials is None:
                self.port = server.add_insecure_port(f"{host}:{port}")
            else:
                self.port = server.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError as error:  # gRPC could not bind
            raise StartupError(f"cannot listen on {host}:{port} (gRPC): {error}") from None
        if self.options.metrics_port is not None:
            metrics_host, metrics_port = self.options.metrics_host, self.options.metrics_port
            try:
                self.metrics_port = self.metrics.serve(metrics_port, metrics_host)
            except OSError as error:
                raise StartupError(
                    f"cannot listen on {metrics_host}:{metrics_port} (metrics): "
                    f"{error.strerror or error}"
                ) from None
        await server.start()
        self._server = server
        self._loading = asyncio.create_task(self._load_models())
        return self.port

    def _held(self) -> list[tuple[str, int]]:
        """Augmented graph variants held per model, for the metrics."""
        return [(model.name, model.variants) for model in self.repository.models()]

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
        key = _read_pem(options.tls_key, "PRIVATE KEY")
        cert = _read_pem(options.tls_cert, "CERTIFICATE")
        root = _read_pem(options.tls_client_ca, "CERTIFICATE") if options.tls_client_ca else None
        _check_key_pair(key, cert, options)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=root, require_client_auth=root is not None
        )


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Every served .proto file in one pool, for reflection: the KServe file lives in a pool
    of its own (see proto/generate.py), the others in protobuf's default one."""
    pool = descriptor_pool.DescriptorPool()
    for module in (grpc_service_pb2, gradcam_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _read_pem(path: Path, kind: str) -> bytes:
    """The PEM file's bytes; StartupError unless it holds a block of `kind`."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StartupError(f"cannot read {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data or kind.encode() not in data:
        raise StartupError(f"{path} is not a PEM file holding a {kind.lower()}")
    return data


def _check_key_pair(key: bytes, cert: bytes, options: ServerOptions) -> None:
    """StartupError when the key or certificate cannot be loaded, or do not belong together
    (gRPC would only fail at the first handshake)."""
    with tempfile.TemporaryDirectory() as folder:
        key_path, cert_path = Path(folder) / "key.pem", Path(folder) / "cert.pem"
        key_path.write_bytes(key)
        cert_path.write_bytes(cert)
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)
        except ssl.SSLError as error:
            raise StartupError(
                f"TLS certificate {options.tls_cert} and key {options.tls_key} cannot be used "
                f"together: {error.reason or error}"
            ) from None


def _check_port_free(host: str, port: int, what: str) -> None:
    """StartupError when something listens on host:port already (0 is always free)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise StartupError(f"cannot listen on {host}:{port} ({what}): {error.strerror}") from None
    family, kind, _, _, address = infos[0]
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"port {port} on {host} is already in use ({what}); stop the other server "
                    "or choose another port"
                ) from None
            raise StartupError(
                f"cannot listen on {host}:{port} ({what}): {error.strerror or error}"
            ) from None


async def _freeze_once_loaded(server: GradCamServer) -> None:
    """What start-up made (imports, models, sessions) lives as long as the process: once the
    models are loaded, the cyclic collector stops walking it (`allocator.py`)."""
    await server.wait_until_loaded()
    log.info("%d objects made at start-up left out of garbage collection",
             freeze_startup_objects())


async def serve(options: ServerOptions) -> None:
    # numpy's own products (`upsample.py`) run on one thread: the cores are the runtime's,
    # and a BLAS pool spinning between products would take them from its runs
    threadpool_limits(1, user_api="blas")
    if not options.return_freed_memory:
        reuse_freed_memory()
    server = GradCamServer(options)
    port = await server.start()
    scheme = "tls" if options.tls_cert else "plaintext"
    print(f"gradcam-server listening on {options.host}:{port} ({scheme})", flush=True)
    if server.metrics_port is not None:
        print(f"metrics on http://{options.metrics_host}:{server.metrics_port}/metrics",
              flush=True)
    freezing = asyncio.create_task(_freeze_once_loaded(server))
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    freezing.cancel()
    log.info("shutting down: draining in-flight requests")
    await server.stop()
    log.info("stopped")


def _device(text: str) -> str:
    try:
        parse_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The `gradcam-server` command line (the deployment manifests' tests parse with it)."""
    parser = argparse.ArgumentParser(
        prog="gradcam-server", description="Serve Grad-CAM for ONNX models over gRPC."
    )
    parser.add_argument("--model-repository", type=Path, required=True,
                        help="folder of <name>/model.onnx model folders")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="gRPC port (0: any free port)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus HTTP port, independent of --port (default 8002; "
                             "0: any free port, printed at start; -1: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics endpoint binds (default 127.0.0.1: it has "
                             "no authentication)")
    parser.add_argument("--token-file", type=Path,
                        help="require 'authorization: Bearer TOKEN', TOKEN being this file's "
                             f"first line (health stays open); or set ${TOKEN_VARIABLE}")
    parser.add_argument("--token", help="the token itself (visible in the process list: prefer "
                                        f"--token-file or ${TOKEN_VARIABLE})")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="CA (PEM) that client certificates must chain to (mutual TLS)")
    parser.add_argument("--device", type=_device, default="auto", metavar="DEVICE",
                        help="auto (CUDA where it works, else CPU), cpu, cuda or cuda:N "
                        "(GPU N; run one server per GPU)")
    parser.add_argument("--threads", type=int, default=0,
                        help="onnxruntime intra-op threads per session (0: one per core)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels (default 50 megapixels)")
    parser.add_argument("--max-variants", type=int, default=DEFAULT_MAX_VARIANTS,
                        help="augmented graphs (method, layer and option combinations) kept "
                             "per model beside the default one, least recently used dropped "
                             f"(default {DEFAULT_MAX_VARIANTS})")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=DEFAULT_MAX_CONCURRENT_RPCS,
                        help="calls handled at once; beyond, RESOURCE_EXHAUSTED "
                             f"(default {DEFAULT_MAX_CONCURRENT_RPCS})")
    parser.add_argument("--cpu-threads", type=int, default=DEFAULT_CPU_THREADS,
                        help="threads that decode images and build responses "
                             f"(default: one per core, {DEFAULT_CPU_THREADS} here)")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="how long shutdown waits for in-flight requests")
    parser.add_argument("--compute-nice", type=int, default=DEFAULT_COMPUTE_NICE,
                        help="niceness added to the threads that run the models (Linux), so "
                             "that admission, refusals and health checks get a core at once "
                             f"when the runs keep every core busy (default "
                             f"{DEFAULT_COMPUTE_NICE}; 0: the same priority)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="give freed memory back to the system at once (glibc's default); "
                             "without it, large blocks are kept and reused, so large answers "
                             "cost no page faults but the resident set stays near its peak")
    return parser


def parse_args(argv: list[str] | None) -> ServerOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_variants", "max_concurrent_rpcs", "max_pixels", "cpu_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.compute_nice <= 19:
        parser.error("--compute-nice must be between 0 and 19")
    return ServerOptions(
        model_repository=args.model_repository,
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        token=_token(args),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        device=args.device,
        threads=args.threads,
        max_pixels=args.max_pixels,
        max_variants=args.max_variants,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        cpu_threads=args.cpu_threads,
        grace_seconds=args.grace_seconds,
        return_freed_memory=args.return_freed_memory,
        compute_nice=args.compute_nice,
    )


def _token(args: argparse.Namespace) -> str | None:
    """The bearer token from --token, --token-file or $GRADCAM_TOKEN, in that order."""
    if args.token:
        return args.token
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text().splitlines()
        except OSError as error:
            raise StartupError(
                f"cannot read the token file {args.token_file}: {error.strerror or error}"
            ) from None
        if not lines or not lines[0].strip():
            raise StartupError(f"the token file {args.token_file} is empty")
        return lines[0].strip()
    return os.environ.get(TOKEN_VARIABLE) or None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = parse_args(argv)
        asyncio.run(serve(options))
    except (StartupError, FileNotFoundError, ValueError) as error:
        print(f"gradcam-server: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
