"""Helpers for tests that talk to a real `gradcam-server` process over gRPC.

- Model folders for a repository: small torch CNNs exported with the TorchScript exporter (a
  classifier, a segmenter, a model with two inputs and two outputs), a slow model, a file of
  garbage bytes, and a graph whose gradient path holds an op with no backward rule.
- `ServerProcess`: ``python -m gradcam_server ... --port 0 --metrics-port 0`` as a subprocess,
  its bound ports read back from what it prints, readiness waited for through grpc.health.v1.
- `expect_error`: a call must fail with a status code and a message that names the problem
  and leaks nothing of the server's internals.
- Self-signed TLS material made with `cryptography`.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
LITE0_DIR = ROOT / "models" / "efficientnet_lite0"
SAMPLE = ROOT / "samples" / "chelsea.jpg"
TINY_SIZE = 32
TINY_CLASSES = 10
SEGMENT_CLASSES = 4
SLOW_SIZE = 256
START_TIMEOUT_S = 60.0


# -- model folders -------------------------------------------------------------------------------


class TinyCnn(torch.nn.Module):
    """conv-relu-conv-relu-global average pool-linear on 3 x 32 x 32 images, 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, TINY_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class StridedCnn(torch.nn.Module):
    """TinyCnn with a stride-4 second conv: its target layer is 8 x 8 on 3 x 32 x 32 images, a
    map the server resizes to an image's size from the graph's coarse heatmap."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 5, stride=4, padding=2)
        self.fc = torch.nn.Linear(16, TINY_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class SlowCnn(torch.nn.Module):
    """Many 3x3 convolutions at 256 x 256: slow enough on a CPU to keep a request in flight."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU()]
        for _ in range(depth):
            layers += [torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU()]
        self.features = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(width, TINY_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class TinySegmenter(torch.nn.Module):
    """Two stride-2 conv-relus, a 1x1 classifier over SEGMENT_CLASSES and a bilinear upsample
    back to the input: [N, 3, 32, 32] -> [N, SEGMENT_CLASSES, 32, 32]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.classifier = torch.nn.Conv2d(16, SEGMENT_CLASSES, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.classifier(self.features(x))
        return torch.nn.functional.interpolate(
            scores, size=x.shape[-2:], mode="bilinear", align_corners=False
        )


class TwoHeads(torch.nn.Module):
    """(meta [N, 1], image) -> (class logits, attribute logits scaled by meta): a model with
    two inputs, the image second, and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.cnn = TinyCnn()
        self.attributes = torch.nn.Linear(16, 4)

    def forward(self, meta: torch.Tensor, image: torch.Tensor):
        x = torch.relu(self.cnn.conv2(torch.relu(self.cnn.conv1(image))))
        pooled = x.mean(dim=(2, 3))
        return self.cnn.fc(pooled), self.attributes(pooled) * meta


def export_segmenter(path: Path, seed: int = 0) -> TinySegmenter:
    torch.manual_seed(seed)
    model = TinySegmenter().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 3, TINY_SIZE, TINY_SIZE),), str(path), dynamo=False,
        opset_version=17, input_names=["input"], output_names=["scores"],
        dynamic_axes={"input": {0: "N"}, "scores": {0: "N"}},
    )
    return model


def export_two_heads(path: Path, seed: int = 0) -> TwoHeads:
    torch.manual_seed(seed)
    model = TwoHeads().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.ones(1, 1), torch.zeros(1, 3, TINY_SIZE, TINY_SIZE)), str(path),
        dynamo=False, opset_version=17, input_names=["meta", "image"],
        output_names=["logits", "attributes"],
        dynamic_axes={name: {0: "N"} for name in ("meta", "image", "logits", "attributes")},
    )
    return model


def export_torch(
    module: torch.nn.Module, size: int, path: Path, *, dynamic_batch: bool
) -> Path:
    """TorchScript-exporter ONNX (opset 17) with input "input" and output "logits"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    torch.onnx.export(
        module,
        (torch.zeros(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}} if dynamic_batch else None,
    )
    return path


def tiny_cnn(seed: int = 0) -> TinyCnn:
    torch.manual_seed(seed)
    return TinyCnn()


def strided_cnn(seed: int = 0) -> StridedCnn:
    torch.manual_seed(seed)
    return StridedCnn()


def slow_cnn(seed: int = 0, depth: int = 24, width: int = 32) -> SlowCnn:
    """About a quarter of a second per image on two CPU cores."""
    torch.manual_seed(seed)
    return SlowCnn(depth, width)


def norule_model(path: Path) -> Path:
    """Conv -> Relu -> GlobalAveragePool -> Reshape -> Det -> Gemm: the gradient from the
    score to the detected target layer (the Relu output) has to pass through Det (the
    determinant of 2 x 2 blocks), which has no backward rule."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 3, 3, 3, generator=generator).numpy()
    fc = torch.randn(TINY_CLASSES, 2, generator=generator).numpy()
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["pooled", "blocks"], ["flat"], name="reshape"),
        helper.make_node("Det", ["flat"], ["mixed"], name="det"),
        helper.make_node("Gemm", ["mixed", "fc_w"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "norule",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TINY_CLASSES])],
        initializer=[
            numpy_helper.from_array(weight, "conv_w"), numpy_helper.from_array(fc, "fc_w"),
            numpy_helper.from_array(np.array([-1, 2, 2, 2], np.int64), "blocks"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_config(folder: Path, **config: object) -> None:
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def link_lite0(folder: Path) -> None:
    """The shipped EfficientNet-Lite0 folder, as symbolic links."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "config.json", "labels.txt"):
        (folder / name).symlink_to(LITE0_DIR / name)


# -- errors --------------------------------------------------------------------------------------

# A client must never see how the server is built: no traceback, no source file, no path.
LEAK = re.compile(r"Traceback|\.py\b|/(work|tmp)")


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """(code, message) of a tritonclient or grpc error."""
    if isinstance(error, InferenceServerException):
        return grpc.StatusCode[error.status().removeprefix("StatusCode.")], error.message() or ""
    assert isinstance(error, grpc.RpcError), error
    return error.code(), error.details() or ""


def expect_error(call: Callable[[], object], code: grpc.StatusCode, *fragments: str) -> str:
    """Run `call`: it must fail with `code` and a message holding every fragment, and leak
    nothing of the server's internals. Returns the message."""
    with pytest.raises((InferenceServerException, grpc.RpcError)) as raised:
        call()
    got, message = status_of(raised.value)
    assert got == code, f"{got.name}: {message}"
    for fragment in fragments:
        assert fragment in message, message
    assert not LEAK.search(message), message
    return message


# -- TLS material --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(subject: str, key, issuer: tuple[str, object] | None, *, ca: bool, server: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (
        (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]), issuer[1])
        if issuer else (name, key)
    )
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    from cryptography.hazmat.primitives import serialization

    certificate = builder.sign(issuer_key, hashes.SHA256())
    return certificate.public_bytes(serialization.Encoding.PEM)


def self_signed_server_cert() -> Pem:
    """A self-signed certificate for 127.0.0.1 and localhost (its own trust root)."""
    key = _key()
    return Pem(_certificate("127.0.0.1", key, None, ca=True, server=True), _pem_key(key))


def client_ca() -> tuple[Pem, object]:
    """A CA for client certificates: its PEM and its private key (to sign with)."""
    key = _key()
    return Pem(_certificate("test client CA", key, None, ca=True, server=False), _pem_key(key)), key


def client_cert(ca_key) -> Pem:
    key = _key()
    return Pem(
        _certificate("test client", key, ("test client CA", ca_key), ca=False, server=False),
        _pem_key(key),
    )


# -- the server process --------------------------------------------------------------------------

_LISTENING = re.compile(r"gradcam-server listening on (\S+):(\d+) \((\w+)\)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")


class ServerProcess:
    """``python -m gradcam_server`` on free ports; stdout and stderr go to a log file."""

    def __init__(self, repository: Path, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            sys.executable, "-m", "gradcam_server",
            "--model-repository", str(repository),
            "--port", "0", "--metrics-port", "0", *args,
        ]
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=environment
        )
        self.port, self.scheme, self.metrics_url = self._read_ports()
        self.address = f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def _read_ports(self) -> tuple[int, str, str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.log()
            listening, metrics = _LISTENING.search(text), _METRICS.search(text)
            if listening and metrics:
                return int(listening.group(2)), listening.group(3), metrics.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the server did not start; its output:\n{self.log()}")

    def wait_serving(self, channel: grpc.Channel, timeout: float = START_TIMEOUT_S) -> None:
        """Poll grpc.health.v1 until the server reports SERVING."""
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
            except grpc.RpcError:
                status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the server never became SERVING ({status}); output:\n{self.log()}")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics as {(name, frozenset(labels.items())): value}."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait (killing it after `timeout`); returns the exit code."""
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self._log.close()
        return code


@contextlib.contextmanager
def serving(repository: Path, log_path: Path, *args: str) -> Iterator[ServerProcess]:
    """A `ServerProcess` that reports SERVING, stopped when the block ends."""
    server = ServerProcess(repository, log_path, *args)
    try:
        with grpc.insecure_channel(server.address) as channel:
            server.wait_serving(channel)
        yield server
    finally:
        server.stop()


BROKEN_MODEL, INFERENCE_ONLY_MODEL = "broken", "norule"


def unservable_repository(root: Path) -> Path:
    """A repository of two folders that cannot explain: `BROKEN_MODEL`, whose model.onnx is
    garbage (it fails to load), and `INFERENCE_ONLY_MODEL`, a graph with no backward rule for
    one op on its gradient path (it serves inference only)."""
    (root / BROKEN_MODEL).mkdir(parents=True)
    (root / BROKEN_MODEL / "model.onnx").write_bytes(b"\x08\x07not a protobuf" * 8)
    norule_model(root / INFERENCE_ONLY_MODEL / "model.onnx")
    return root


def errors_counted(server: ServerProcess, code: str) -> float:
    """Failed requests the server has counted with the status `code`, over every model and
    API (its gradcam_request_errors_total)."""
    return sum(
        value for (name, labels), value in server.metrics().items()
        if name == "gradcam_request_errors_total" and dict(labels).get("code") == code
    )


def sample(metrics: dict, name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    return metrics.get((name, frozenset(labels.items())), 0.0)
