"""Reliability of a served `gradcam-server`, probed from outside as users run it; prints figures.

    python benchmarks/reliability.py [--quick] [--only malformed,overload,health,faults,soak,fuzz]
                                     [--json figures.json]

Each section starts ``python -m gradcam_server --model-repository DIR --port 0 --metrics-port
0`` on a temporary repository: the shipped EfficientNet-Lite0 (symbolic links), small models
generated here with `onnx.helper` (no torch needed), and folders that can never load.

- malformed: 100+ malformed requests (images, tensors, targets, parameters, names, sizes, the
  typed API). Each must fail with its status code and a message that names the problem, leaks no
  path or traceback and stays under 1 KiB, answered in p99 < 100 ms; a good request must be
  served after each, and the server must log no traceback (bad input is not a server error).
- overload: capacity measured closed-loop (64 clients, 10 s), then 4x capacity offered
  open-loop for 60 s by 128 concurrent clients with a 2 s deadline: every request answered OK,
  RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, rejections p99 < 50 ms, goodput >= 90 % of capacity,
  RSS flat after warm-up.
- faults: models that can never load beside good ones, client cancel and a deadline shorter
  than the run (the server must stop the work), a queued request past its deadline, a second
  server on a busy port, SIGTERM with requests in flight (all answered), SIGKILL and restart on
  the same port.
- health: four clients asking for 48 MiB answers (3 maps of a 2000 x 2000 photo) while another
  process checks health every 20 ms: every check answered within 100 ms.
- soak: 10,000 mixed requests (good, malformed, cancelled, past their deadline, other
  methods and layers, tensors of many sizes) from 8 clients: RSS and thread count flat.
- fuzz: ``tests/test_fuzz.py`` and ``tests/test_random_requests.py`` (hypothesis,
  derandomized) with 10x their examples.

``--quick`` shortens every duration and count, to try the script out. It prints a table per
section and one PASS/FAIL line per criterion with the measured figure, and exits 1 if any
criterion fails. All traffic goes to 127.0.0.1; every loop is bounded in count and time, a
watchdog ends the run after ``--budget`` seconds, and every server started is killed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import io
import itertools
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from gradcam_proto import gradcam_pb2 as gpb
from gradcam_proto import gradcam_pb2_grpc as ggrpc
from gradcam_proto import grpc_service_pb2 as kpb
from gradcam_proto import grpc_service_pb2_grpc as kgrpc

ROOT = Path(__file__).resolve().parents[1]
LITE0_DIR = ROOT / "models" / "efficientnet_lite0"
CHELSEA = (ROOT / "samples" / "chelsea.jpg").read_bytes()
LITE0 = "efficientnet_lite0"
TINY_SIZE = 32
TINY_CLASSES = 10
SEGMENT_CLASSES = 4
SLOW_SIZE = 256
HEATMAP = "heatmap"
START_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 60.0  # only so that a hung server fails a check instead of the run
CHANNEL_OPTIONS = [  # the client takes whatever the server sends
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
CANCELLED = grpc.StatusCode.CANCELLED

# How the server is built must never reach a client: no traceback, no source file, no path of
# the server's machine. (Names the client itself sent may be echoed back.)
LEAK = re.compile(r"Traceback|File \"|\.py\b|site-packages|/tmp/|/usr/|/home/|/root/")
MAX_MESSAGE_CHARS = 1024


# -- the model repository ------------------------------------------------------------------------


def _conv(name: str, x: str, y: str, rng: np.random.Generator, channels: tuple[int, int],
          kernel: int = 3, stride: int = 1) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A convolution with He-initialised weights, 'same' padding."""
    out_channels, in_channels = channels
    scale = np.sqrt(2.0 / (in_channels * kernel * kernel))
    weight = (rng.standard_normal((out_channels, in_channels, kernel, kernel)) * scale)
    bias = rng.standard_normal(out_channels) * 0.01
    pad = kernel // 2
    node = helper.make_node("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name,
                            pads=[pad] * 4, strides=[stride, stride])
    return node, [numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"),
                  numpy_helper.from_array(bias.astype(np.float32), f"{name}_b")]


def _save(path: Path, nodes, inputs, outputs, initializers) -> None:
    graph = helper.make_graph(nodes, path.parent.name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def classifier(path: Path, size: int | None, depth: int, width: int, seed: int = 0) -> None:
    """(conv 3x3 + ReLU) x (depth + 1), global average pool, Gemm to TINY_CLASSES logits.
    Input "input" [N, 3, size, size]; size None leaves H and W free. Tensor names: convK and
    reluK for K = 1..depth + 1, "pooled", "logits"."""
    rng = np.random.default_rng(seed)
    nodes, weights, x, channels = [], [], "input", 3
    for k in range(1, depth + 2):
        conv, params = _conv(f"conv{k}", x, f"conv{k}", rng, (width, channels))
        nodes += [conv, helper.make_node("Relu", [f"conv{k}"], [f"relu{k}"], name=f"relu{k}")]
        weights += params
        x, channels = f"relu{k}", width
    fc = rng.standard_normal((TINY_CLASSES, width)) / np.sqrt(width)
    weights.append(numpy_helper.from_array(fc.astype(np.float32), "fc_w"))
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], transB=1, name="fc"),
    ]
    spatial = [size, size] if size else ["H", "W"]
    _save(path, nodes,
          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *spatial])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TINY_CLASSES])],
          weights)


def segmenter(path: Path, seed: int = 0) -> None:
    """Two stride-2 conv-ReLUs, a 1x1 classifier and a bilinear upsample back to the input:
    [N, 3, 32, 32] -> "scores" [N, SEGMENT_CLASSES, 32, 32]."""
    rng = np.random.default_rng(seed)
    conv1, w1 = _conv("conv1", "input", "conv1", rng, (8, 3), stride=2)
    conv2, w2 = _conv("conv2", "relu1", "conv2", rng, (16, 8), stride=2)
    head, w3 = _conv("head", "relu2", "coarse", rng, (SEGMENT_CLASSES, 16), kernel=1)
    scales = numpy_helper.from_array(np.array([1, 1, 4, 4], dtype=np.float32), "scales")
    nodes = [
        conv1, helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        conv2, helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        head,
        helper.make_node("Resize", ["coarse", "", "scales"], ["scores"], name="upsample",
                         mode="linear", coordinate_transformation_mode="half_pixel"),
    ]
    _save(path, nodes,
          [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                         ["N", 3, TINY_SIZE, TINY_SIZE])],
          [helper.make_tensor_value_info("scores", TensorProto.FLOAT,
                                         ["N", SEGMENT_CLASSES, TINY_SIZE, TINY_SIZE])],
          [*w1, *w2, *w3, scales])


def norule(path: Path, seed: int = 0) -> None:
    """Conv -> Relu -> GlobalAveragePool -> Reshape -> Det -> Gemm: the gradient path from the
    score to the detected layer passes Det (the determinants of 2 x 2 blocks), which has no
    backward rule."""
    rng = np.random.default_rng(seed)
    conv, weights = _conv("conv", "input", "conv", rng, (8, 3))
    fc = rng.standard_normal((TINY_CLASSES, 2)).astype(np.float32)
    nodes = [
        conv, helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"], name="pool"),
        helper.make_node("Reshape", ["pooled", "blocks"], ["flat"], name="reshape"),
        helper.make_node("Det", ["flat"], ["mixed"], name="det"),
        helper.make_node("Gemm", ["mixed", "fc_w"], ["logits"], transB=1, name="fc"),
    ]
    _save(path, nodes,
          [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                         ["N", 3, TINY_SIZE, TINY_SIZE])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", TINY_CLASSES])],
          [*weights, numpy_helper.from_array(fc, "fc_w"),
           numpy_helper.from_array(np.array([-1, 2, 2, 2], np.int64), "blocks")])


FAILED_MODELS = {  # folder -> a fragment the reason given to clients must hold
    "broken": "load",          # model.onnx of garbage bytes
    "badconfig": "max_batch_size",  # config.json with a bad value
    "nomodel": "model.onnx",   # a folder without a model
}
UNEXPLAINABLE = "norule"  # no backward rule on the gradient path: Det


def build_repository(root: Path) -> Path:
    """Every model folder the sections use, in `root`; sections serve subsets of it."""
    root.mkdir(parents=True, exist_ok=True)
    lite0 = root / LITE0
    lite0.mkdir()
    for name in ("model.onnx", "config.json", "labels.txt"):
        (lite0 / name).symlink_to(LITE0_DIR / name)
    classifier(root / "tiny" / "model.onnx", TINY_SIZE, depth=1, width=16)
    (root / "tiny" / "config.json").write_text(json.dumps({"max_batch_size": 8}))
    classifier(root / "anysize" / "model.onnx", None, depth=1, width=16)
    classifier(root / "slow" / "model.onnx", SLOW_SIZE, depth=24, width=32)
    segmenter(root / "segmenter" / "model.onnx")
    (root / "broken").mkdir()
    (root / "broken" / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf" * 8)
    norule(root / "norule" / "model.onnx")
    classifier(root / "badconfig" / "model.onnx", TINY_SIZE, depth=1, width=16)
    (root / "badconfig" / "config.json").write_text(json.dumps({"max_batch_size": "eight"}))
    (root / "nomodel").mkdir()
    return root


def subset(root: Path, name: str, models: Sequence[str]) -> Path:
    """A repository holding some of `root`'s folders, as symbolic links."""
    folder = root.parent / name
    folder.mkdir()
    for model in models:
        (folder / model).symlink_to(root / model, target_is_directory=True)
    return folder


# -- the server process --------------------------------------------------------------------------

_LISTENING = re.compile(r"gradcam-server listening on (\S+):(\d+) \((\w+)\)")
_METRICS = re.compile(r"metrics on (http://\S+/metrics)")
_STARTED: list[subprocess.Popen] = []


def _kill_all() -> None:
    for process in _STARTED:
        if process.poll() is None:
            process.kill()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                pass


atexit.register(_kill_all)


class Server:
    """``python -m gradcam_server`` as users start it; output goes to a log file."""

    def __init__(self, repository: Path, log_path: Path, *args: str, port: int = 0,
                 metrics_port: int = 0, wait: bool = True) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        command = [
            sys.executable, "-m", "gradcam_server", "--model-repository", str(repository),
            "--port", str(port), "--metrics-port", str(metrics_port), *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        _STARTED.append(self.process)
        self.pid = self.process.pid
        self.port = 0
        self.metrics_url = ""
        if wait:
            if not self.wait_listening(START_TIMEOUT_S):
                self.kill()
                raise RuntimeError(f"the server did not start; its output:\n{self.log()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, timeout: float) -> bool:
        """Whether the server printed its ports within `timeout` (False: it exited first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            listening, metrics = _LISTENING.search(text), _METRICS.search(text)
            if listening and metrics:
                self.port, self.metrics_url = int(listening.group(2)), metrics.group(1)
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.05)
        return False

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> float:
        """Poll grpc.health.v1 until SERVING; returns the seconds it took."""
        started = time.monotonic()
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() - started < timeout and self.process.poll() is None:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"the server never became SERVING; its output:\n{self.log()}")

    def status(self) -> tuple[float, int]:
        """(resident set in MiB, threads) from /proc."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        rss = int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024
        threads = int(re.search(r"Threads:\s+(\d+)", text).group(1))
        return rss, threads

    def cpu_seconds(self) -> float:
        """User and system CPU time the server has used."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)
        self._log.close()


def wait_idle(server: Server, since: float, limit: float = 20.0, window: float = 0.2,
              busy: float = 0.15) -> float | None:
    """Seconds from `since` (a perf_counter value) until the server used less than `busy` of a
    core over a `window`; None if it stayed busy for `limit` seconds."""
    cpu, at = server.cpu_seconds(), time.perf_counter()
    while at - since < limit:
        time.sleep(window)
        now_cpu, now = server.cpu_seconds(), time.perf_counter()
        if (now_cpu - cpu) / (now - at) < busy:
            return max(0.0, at - since)
        cpu, at = now_cpu, now
    return None


class Sampler:
    """The server's RSS and thread count, sampled in a thread every `interval` seconds."""

    def __init__(self, server: Server, interval: float = 0.5) -> None:
        self.server = server
        self.samples: list[tuple[float, float, int]] = []  # (seconds, MiB, threads)
        self._stop = threading.Event()
        self._interval = interval
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self.server.alive():
            try:
                rss, threads = self.server.status()
            except (OSError, AttributeError):  # the process ended between the checks
                return
            self.samples.append((time.perf_counter() - self._started, rss, threads))
            self._stop.wait(self._interval)


def growth(points: Sequence[tuple[float, float]]) -> float:
    """The rise over the span of `points` (x, y) of their least-squares line."""
    if len(points) < 3:
        return float("nan")
    x, y = np.array(points, dtype=np.float64).T
    slope = np.polyfit(x, y, 1)[0]
    return float(slope * (x[-1] - x[0]))


def logged_exceptions(log: str) -> list[str]:
    """The exception line closing each traceback in a server log."""
    found = []
    lines = log.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            closing = next((later for later in lines[index + 1:]
                            if later and not later.startswith((" ", "\t"))), "?")
            found.append(closing[:120])
    return found


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q, method="higher")) if len(values) else float("nan")


# -- the report ----------------------------------------------------------------------------------


@dataclass
class Criterion:
    section: str
    name: str
    passed: bool
    figure: str


@dataclass
class Report:
    criteria: list[Criterion] = field(default_factory=list)
    figures: dict[str, object] = field(default_factory=dict)

    def check(self, section: str, name: str, passed: bool, figure: str) -> None:
        self.criteria.append(Criterion(section, name, bool(passed), figure))
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {figure}", flush=True)

    def summary(self) -> bool:
        print("\n== summary", flush=True)
        for c in self.criteria:
            print(f"{'PASS' if c.passed else 'FAIL'}  [{c.section}] {c.name}: {c.figure}")
        failed = sum(not c.passed for c in self.criteria)
        print(f"\n{len(self.criteria) - failed} of {len(self.criteria)} criteria pass", flush=True)
        return failed == 0


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for index, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if index == 0:
            print("  " + "  ".join("-" * w for w in widths))
    sys.stdout.flush()


# -- requests ------------------------------------------------------------------------------------

_DATATYPE_OF = {
    np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.float16): "FP16",
    np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8", np.dtype(np.bool_): "BOOL",
}
InferInput = kpb.ModelInferRequest.InferInputTensor
Wire = tuple[InferInput, bytes]  # a KServe input and its raw_input_contents


def tensor(name: str, array: np.ndarray, datatype: str | None = None) -> Wire:
    """A numeric KServe input, little-endian raw contents."""
    array = np.asarray(array)
    datatype = datatype or _DATATYPE_OF[array.dtype]
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return InferInput(name=name, datatype=datatype, shape=list(array.shape)), raw


def encoded(*items: bytes, name: str = "image") -> Wire:
    """A BYTES input of encoded images, each with its 4-byte length prefix."""
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    return InferInput(name=name, datatype="BYTES", shape=[len(items)]), raw


def infer(model: str, *inputs: Wire, outputs: Sequence[str] = (HEATMAP,),
          **parameters: object) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    for wire, raw in inputs:
        request.inputs.append(wire)
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in parameters.items():
        parameter = request.parameters[key]
        if isinstance(value, bool):
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)
    return request


def tiny_x(rows: int = 1, seed: int = 0, size: int = TINY_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, size, size)).astype(np.float32)


def good_tiny() -> kpb.ModelInferRequest:
    """The good request sent after each malformed one."""
    return infer("tiny", tensor("input", tiny_x()), outputs=("logits", HEATMAP))


def explain(model: str = "tiny", *images: gpb.Image, **fields: object) -> gpb.ExplainRequest:
    return gpb.ExplainRequest(model=model, images=list(images), **fields)


def typed_image(data: bytes) -> gpb.Image:
    return gpb.Image(encoded=data)


class Stubs:
    """Generated stubs of both APIs over one channel."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.kserve = kgrpc.GRPCInferenceServiceStub(self.channel)
        self.typed = ggrpc.GradCamStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()


def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, float]:
    """(status, message, seconds) of one RPC."""
    started = time.perf_counter()
    try:
        call()
        code, message = OK, ""
    except grpc.RpcError as error:
        code, message = error.code(), error.details() or ""
    return code, message, time.perf_counter() - started


# -- images --------------------------------------------------------------------------------------


def picture(image_format: str, size: tuple[int, int] = (48, 40), seed: int = 0,
            **options: object) -> bytes:
    """Random pixels saved as `image_format`."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims `width` x `height` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def png_bad_zlib() -> bytes:
    """A valid PNG whose image data is not a zlib stream (its chunk CRC still right)."""
    data = picture("PNG")
    position = 8
    while position < len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"IDAT":
            body = b"\x00\x00" + data[position + 10:position + 8 + length]
            return data[:position] + _chunk(b"IDAT", body) + data[position + 12 + length:]
        position += 12 + length
    raise AssertionError("no IDAT chunk")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims `width` x `height`."""
    data = bytearray(picture("JPEG"))
    frame = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, height, width)
    return bytes(data)


def webp_claiming(width: int, height: int) -> bytes:
    """An extended-format WebP header (VP8X) claiming a `width` x `height` canvas."""
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"\x00\x00\x00\x00" + size
    chunk = b"VP8X" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def bmp_claiming(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming `width` x `height`, followed by a few pixel bytes."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    pixels = b"\x00" * 64
    header = struct.pack("<2sIHHI", b"BM", 14 + len(info) + len(pixels), 0, 0, 14 + len(info))
    return header + info + pixels


def progressive_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(CHELSEA)).save(buffer, format="JPEG", progressive=True, quality=90)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    """A large all-black PNG that compresses to little."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# -- 1. malformed requests -----------------------------------------------------------------------


_KSERVE = "/" + kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
_TYPED = "/" + gpb.DESCRIPTOR.services_by_name["GradCam"].full_name
Call = tuple[str, Callable[[], object]]  # an RPC's method path, and a maker of its request


@dataclass(frozen=True)
class Malformed:
    group: str
    name: str
    call: Call
    codes: tuple[grpc.StatusCode, ...]  # the right answers (most cases have one)
    fragments: tuple[str, ...]  # the message names the problem: it holds one of them


def _kserve(make: Callable[[], kpb.ModelInferRequest]) -> Call:
    return f"{_KSERVE}/ModelInfer", make


def _typed(make: Callable[[], gpb.ExplainRequest]) -> Call:
    return f"{_TYPED}/Explain", make


def send_serialized(channel: grpc.Channel, method: str, payload: bytes,
                    timeout: float = CALL_TIMEOUT_S) -> bytes:
    """One unary call with a request serialized beforehand, so that timing it measures the
    transport and the server, not the client building a large message."""
    return channel.unary_unary(method)(payload, timeout=timeout)


def _image_case(name: str, data: Callable[[], bytes], *fragments: str,
                codes: tuple[grpc.StatusCode, ...] = (INVALID,)) -> Malformed:
    return Malformed("images", name, _kserve(lambda: infer("tiny", encoded(data()))),
                     codes, fragments)


def _typed_contents(*inputs: InferInput, model: str = "tiny") -> kpb.ModelInferRequest:
    """A request whose inputs carry typed contents (no raw_input_contents)."""
    request = kpb.ModelInferRequest(model_name=model, inputs=list(inputs))
    request.outputs.add(name=HEATMAP)
    return request


def _fp32_contents(name: str, shape: Sequence[int], values: Sequence[float]) -> InferInput:
    return InferInput(name=name, datatype="FP32", shape=list(shape),
                      contents=kpb.InferTensorContents(fp32_contents=list(values)))


def _with(request: kpb.ModelInferRequest, change: Callable[[kpb.ModelInferRequest], None]):
    change(request)
    return request


def _float_tensor(shape: Sequence[int], value: float = 0.0) -> gpb.Tensor:
    return gpb.Tensor(shape=list(shape),
                      data=np.full(shape, value, dtype="<f4").tobytes())


def malformed_cases() -> list[Malformed]:
    """Every malformed request kind, with the status a client should get and what its message
    must name."""
    x = tiny_x()
    x_wire = tensor("input", x)
    png = picture("PNG")
    nan = np.full((1, 3, TINY_SIZE, TINY_SIZE), np.nan, dtype=np.float32)
    inf = np.full((1, 3, TINY_SIZE, TINY_SIZE), np.inf, dtype=np.float32)

    def target(*classes: int) -> Wire:
        return tensor("target_class", np.array(classes, dtype=np.int64))

    def mask(shape: tuple[int, ...], value: float = 1.0) -> Wire:
        return tensor("target_mask", np.full(shape, value, np.float32))

    kserve, typed = _kserve, _typed
    cases = [
        # images, as KServe BYTES "image"
        _image_case("empty image (0 bytes)", lambda: b"", "empty"),
        _image_case("garbage bytes", lambda: bytes(range(256)) * 4, "not an image", "format"),
        _image_case("GIF", lambda: picture("GIF"), "gif"),
        _image_case("TIFF", lambda: picture("TIFF"), "tiff"),
        _image_case("SVG text", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>",
                    "not an image", "format"),
        _image_case("PNG cut in half", lambda: png[: len(png) // 2], "truncated"),
        _image_case("PNG without its IEND chunk", lambda: png[:-12], "truncated"),
        _image_case("PNG whose image data is not zlib", png_bad_zlib, "corrupt"),
        _image_case("JPEG cut in half", lambda: CHELSEA[: len(CHELSEA) // 2], "truncated"),
        _image_case("JPEG without its end marker", lambda: CHELSEA[:-2], "truncated"),
        _image_case("progressive JPEG cut after its first scans",
                    lambda: (lambda p: p[: len(p) * 2 // 3])(progressive_jpeg()), "truncated"),
        _image_case("JPEG start marker only", lambda: b"\xff\xd8\xff", "truncated", "readable"),
        _image_case("WebP cut in half",
                    lambda: (lambda w: w[: len(w) // 2])(picture("WEBP", (64, 64))),
                    "truncated", "corrupt", "readable"),
        _image_case("BMP cut in half", lambda: (lambda b: b[: len(b) // 2])(picture("BMP")),
                    "truncated", "corrupt"),
        _image_case("PNG header claiming 20000 x 20000", lambda: png_claiming(20_000, 20_000),
                    "limit"),
        _image_case("JPEG header claiming 65000 x 65000", lambda: jpeg_claiming(65_000, 65_000),
                    "limit"),
        _image_case("WebP header claiming 16384 x 16384", lambda: webp_claiming(16_384, 16_384),
                    "limit"),
        _image_case("BMP header claiming 100000 x 100000",
                    lambda: bmp_claiming(100_000, 100_000), "limit"),
        _image_case("PNG of 0 x 0 pixels", lambda: png_claiming(0, 0), "positive", "0x0",
                    "empty", "zero", "not a readable"),
        Malformed("images", "two images of different sizes",
                  kserve(lambda: infer("tiny", encoded(png, picture("PNG", (40, 48))))),
                  (INVALID,), ("one pixel size",)),
        Malformed("images", "65 images (limit 64)",
                  kserve(lambda: infer("tiny", encoded(*[png] * 65))), (INVALID,), ("at most",)),
        Malformed("images", "BYTES image input with no element",
                  kserve(lambda: infer("tiny", encoded())), (INVALID,), ("at least one",)),
        Malformed("images", "image sent as FP32",
                  kserve(lambda: infer("tiny", tensor("image", x))), (INVALID,), ("bytes",)),
        # tensors
        Malformed("tensors", "FP64 instead of FP32",
                  kserve(lambda: infer("tiny", tensor("input", x.astype(np.float64)))),
                  (INVALID,), ("fp32", "float32")),
        Malformed("tensors", "INT64 instead of FP32",
                  kserve(lambda: infer("tiny", tensor("input", x.astype(np.int64)))),
                  (INVALID,), ("fp32", "float32")),
        Malformed("tensors", "rank 3 instead of 4",
                  kserve(lambda: infer("tiny", tensor("input", x[0]))), (INVALID,), ("rank",)),
        Malformed("tensors", "rank 65",
                  kserve(lambda: infer("tiny", (InferInput(name="input", datatype="FP32",
                                                           shape=[1] * 65), b"\x00" * 4))),
                  (INVALID,), ("rank", "dimensions")),
        Malformed("tensors", "wrong spatial size [1,3,31,32]",
                  kserve(lambda: infer("tiny", tensor("input", x[:, :, :31]))),
                  (INVALID,), ("expects",)),
        Malformed("tensors", "batch dimension 0",
                  kserve(lambda: infer("tiny", tensor("input", x[:0]))), (INVALID,),
                  ("no image", "batch")),
        Malformed("tensors", "65 rows (limit 64)",
                  kserve(lambda: infer("tiny", tensor("input", tiny_x(65)))), (INVALID,),
                  ("at most",)),
        Malformed("tensors", "negative dimension",
                  kserve(lambda: _with(infer("tiny", x_wire),
                                       lambda r: r.inputs[0].shape.__setitem__(0, -1))),
                  (INVALID,), ("negative",)),
        Malformed("tensors", "shape whose element count overflows int64",
                  kserve(lambda: infer("tiny", (InferInput(name="input", datatype="FP32",
                                                           shape=[2**32, 2**32, 1, 1]), b""))),
                  (INVALID,), ("overflow", "large", "limit", "too many")),
        Malformed("tensors", "shape claiming 7.5 G values, 12 bytes sent",
                  kserve(lambda: infer("tiny", (InferInput(name="input", datatype="FP32",
                                                           shape=[1, 3, 50_000, 50_000]),
                                                b"\x00" * 12))),
                  (INVALID,), ("bytes", "too many")),
        Malformed("tensors", "raw contents one byte short",
                  kserve(lambda: infer("tiny", (x_wire[0], x_wire[1][:-1]))), (INVALID,),
                  ("bytes",)),
        Malformed("tensors", "NaN values", kserve(lambda: infer("tiny", tensor("input", nan))),
                  (INVALID,), ("nan",)),
        Malformed("tensors", "Inf values", kserve(lambda: infer("tiny", tensor("input", inf))),
                  (INVALID,), ("inf",)),
        Malformed("tensors", "unknown datatype FP128",
                  kserve(lambda: infer("tiny", (InferInput(name="input", datatype="FP128",
                                                           shape=[1]), b"\x00" * 16))),
                  (INVALID,), ("datatype",)),
        Malformed("tensors", "FP16 in typed contents (it has no field)",
                  kserve(lambda: _typed_contents(InferInput(name="input", datatype="FP16",
                                                            shape=[1]))),
                  (INVALID,), ("raw_input_contents",)),
        Malformed("tensors", "typed contents: 5 values for 3072",
                  kserve(lambda: _typed_contents(_fp32_contents("input", x.shape, [0.0] * 5))),
                  (INVALID,), ("values for shape",)),
        Malformed("tensors", "typed contents: shape overflowing int64, no values",
                  kserve(lambda: _typed_contents(InferInput(name="input", datatype="FP32",
                                                            shape=[2**32, 2**32, 1, 1]))),
                  (INVALID,), ("overflow", "large", "limit", "too many")),
        Malformed("tensors", "BYTES: shape overflowing int64, no elements",
                  kserve(lambda: infer("tiny", (InferInput(name="image", datatype="BYTES",
                                                           shape=[2**32, 2**32]), b""))),
                  (INVALID,), ("overflow", "large", "limit", "too many")),
        Malformed("tensors", "BYTES length prefix cut off",
                  kserve(lambda: infer("tiny", (InferInput(name="image", datatype="BYTES",
                                                           shape=[1]), b"\x05\x00"))),
                  (INVALID,), ("cut off",)),
        Malformed("tensors", "BYTES element running past the end",
                  kserve(lambda: infer("tiny", (InferInput(name="image", datatype="BYTES",
                                                           shape=[1]),
                                                struct.pack("<I", 100) + b"abc"))),
                  (INVALID,), ("past the end",)),
        Malformed("tensors", "BYTES: 1 element for shape [2]",
                  kserve(lambda: _with(infer("tiny", encoded(png)),
                                       lambda r: r.inputs[0].shape.__setitem__(0, 2))),
                  (INVALID,), ("elements for shape",)),
        Malformed("tensors", "2 raw contents for 1 input",
                  kserve(lambda: _with(infer("tiny", x_wire),
                                       lambda r: r.raw_input_contents.append(b"\x00" * 4))),
                  (INVALID,), ("raw_input_contents",)),
        Malformed("tensors", "unknown input name",
                  kserve(lambda: infer("tiny", x_wire, tensor("pixels", x))), (INVALID,),
                  ("unknown input",)),
        Malformed("tensors", "10,000 unknown inputs",
                  kserve(lambda: infer("tiny", x_wire, *[
                      tensor(f"extra{i}", np.zeros(1, np.float32)) for i in range(10_000)])),
                  (INVALID,), ("unknown input",)),
        Malformed("tensors", "the same input twice", kserve(lambda: infer("tiny", x_wire, x_wire)),
                  (INVALID,), ("twice",)),
        Malformed("tensors", "both an image and a tensor",
                  kserve(lambda: infer("tiny", x_wire, encoded(png))), (INVALID,),
                  ("exactly one",)),
        Malformed("tensors", "no image input at all",
                  kserve(lambda: infer("tiny", target(-1))), (INVALID,), ("exactly one",)),
        Malformed("tensors", "the model's input as BYTES",
                  kserve(lambda: infer("tiny", encoded(png, name="input"))), (INVALID,),
                  ("fp32",)),
        # what is explained
        Malformed("targets", "target_class 10 of 10 classes",
                  kserve(lambda: infer("tiny", x_wire, target(10))), (INVALID,),
                  ("out of range",)),
        Malformed("targets", "target_class -11 of 10 classes",
                  kserve(lambda: infer("tiny", x_wire, target(-11))), (INVALID,),
                  ("out of range",)),
        Malformed("targets", "target_class as INT32",
                  kserve(lambda: infer("tiny", x_wire, tensor("target_class",
                                                              np.array([1], np.int32)))),
                  (INVALID,), ("int64",)),
        Malformed("targets", "two target classes for one image",
                  kserve(lambda: infer("tiny", x_wire, target(1, 2))), (INVALID,),
                  ("one per image",)),
        Malformed("targets", "target_class as BYTES",
                  kserve(lambda: infer("tiny", x_wire, encoded(b"1", name="target_class"))),
                  (INVALID,), ("numeric",)),
        Malformed("targets", "target_mask without the region score",
                  kserve(lambda: infer("tiny", x_wire, mask((TINY_SIZE, TINY_SIZE)))),
                  (INVALID,), ("region",)),
        Malformed("targets", "target_mask of NaN",
                  kserve(lambda: infer("segmenter", x_wire, mask((8, 8), np.nan))),
                  (INVALID,), ("nan",)),
        Malformed("targets", "target_mask of rank 4",
                  kserve(lambda: infer("segmenter", x_wire, mask((1, 1, 8, 8)))),
                  (INVALID,), ("target mask", "target_mask")),
        Malformed("targets", "target_mask with 3 rows for 1 image",
                  kserve(lambda: infer("segmenter", x_wire, mask((3, 8, 8)))),
                  (INVALID,), ("rows",)),
        Malformed("targets", "region score on a classifier",
                  kserve(lambda: infer("tiny", x_wire, score="region")), (INVALID,),
                  ("segmentation",)),
        Malformed("targets", "similarity score without a reference",
                  kserve(lambda: infer("tiny", x_wire, score="similarity")), (INVALID,),
                  ("reference",)),
        Malformed("targets", "reference embedding of the wrong width",
                  kserve(lambda: infer("tiny", x_wire, tensor("reference_embedding",
                                                              np.ones(4, np.float32)),
                                       score="similarity")),
                  (INVALID,), ("values per image",)),
        Malformed("targets", "reference embedding without the similarity score",
                  kserve(lambda: infer("tiny", x_wire, tensor("reference_embedding",
                                                              np.ones(10, np.float32)))),
                  (INVALID,), ("similarity",)),
        # parameters
        Malformed("parameters", "unknown method",
                  kserve(lambda: infer("tiny", x_wire, method="gradcam3000")), (INVALID,),
                  ("unknown method",)),
        Malformed("parameters", "unknown target_layer",
                  kserve(lambda: infer("tiny", x_wire, target_layer="no_such_tensor")),
                  (INVALID,), ("layer", "no_such_tensor")),
        Malformed("parameters", "target_layer of 1 MB",
                  kserve(lambda: infer("tiny", x_wire, target_layer="x" * 1_000_000)),
                  (INVALID,), ("layer",)),
        Malformed("parameters", "unknown score",
                  kserve(lambda: infer("tiny", x_wire, score="banana")), (INVALID,),
                  ("unknown score",)),
        Malformed("parameters", "unknown output parameter",
                  kserve(lambda: infer("tiny", x_wire, output="nope")), (INVALID,),
                  ("output",)),
        Malformed("parameters", "output index 5 of 1",
                  kserve(lambda: infer("tiny", x_wire, output=5)), (INVALID,), ("output",)),
        Malformed("parameters", "output as a double",
                  kserve(lambda: infer("tiny", x_wire, output=0.5)), (INVALID,), ("output",)),
        Malformed("parameters", "unknown requested output",
                  kserve(lambda: infer("tiny", x_wire, outputs=("nope",))), (INVALID,),
                  ("unknown output",)),
        Malformed("parameters", "method as an integer",
                  kserve(lambda: infer("tiny", x_wire, method=3)), (INVALID,), ("string",)),
        Malformed("parameters", "counterfactual as a string",
                  kserve(lambda: infer("tiny", x_wire, counterfactual="yes")), (INVALID,),
                  ("bool",)),
        Malformed("parameters", "aug_smooth as an integer",
                  kserve(lambda: infer("tiny", x_wire, aug_smooth=1)), (INVALID,), ("bool",)),
        # names
        Malformed("names", "unknown model",
                  kserve(lambda: infer("no_such_model", x_wire)), (NOT_FOUND,),
                  ("unknown model",)),
        Malformed("names", "path traversal '../tiny'",
                  kserve(lambda: infer("../tiny", x_wire)), (NOT_FOUND,), ("unknown model",)),
        Malformed("names", "absolute path '/etc/passwd'",
                  kserve(lambda: infer("/etc/passwd", x_wire)), (NOT_FOUND,),
                  ("unknown model",)),
        Malformed("names", "model name of 100,000 characters",
                  kserve(lambda: infer("m" * 100_000, x_wire)), (NOT_FOUND,),
                  ("unknown model",)),
        Malformed("names", "model name with a NUL character",
                  kserve(lambda: infer("tiny\x00", x_wire)), (NOT_FOUND,), ("unknown model",)),
        Malformed("names", "empty model name", kserve(lambda: infer("", x_wire)),
                  (INVALID, NOT_FOUND), ("model",)),
        Malformed("names", "ModelMetadata of an unknown model",
                  (f"{_KSERVE}/ModelMetadata", lambda: kpb.ModelMetadataRequest(name="nope")),
                  (NOT_FOUND,), ("unknown model",)),
        Malformed("names", "GetModelInfo of an unknown model",
                  (f"{_TYPED}/GetModelInfo", lambda: gpb.GetModelInfoRequest(model="nope")),
                  (NOT_FOUND,), ("unknown model",)),
        # the typed API
        Malformed("typed", "empty ExplainRequest", typed(gpb.ExplainRequest),
                  (INVALID, NOT_FOUND), ("model",)),
        Malformed("typed", "no image", typed(lambda: explain("tiny")), (INVALID,),
                  ("no image",)),
        Malformed("typed", "an image with neither bytes nor tensor",
                  typed(lambda: explain("tiny", gpb.Image())), (INVALID,), ("empty",)),
        Malformed("typed", "garbage image bytes",
                  typed(lambda: explain("tiny", typed_image(b"\x00" * 100))), (INVALID,),
                  ("not an image",)),
        Malformed("typed", "negative num_predictions",
                  typed(lambda: explain("tiny", typed_image(png),
                                        options=gpb.ExplainOptions(num_predictions=-1))),
                  (INVALID,), ("negative",)),
        Malformed("typed", "unknown colormap",
                  typed(lambda: explain("tiny", typed_image(png), options=gpb.ExplainOptions(
                      overlay=True, colormap="rainbow"))),
                  (INVALID,), ("colormap",)),
        Malformed("typed", "overlay_opacity 1.5",
                  typed(lambda: explain("tiny", typed_image(png), options=gpb.ExplainOptions(
                      overlay=True, overlay_opacity=1.5))),
                  (INVALID,), ("overlay_opacity",)),
        Malformed("typed", "overlay_opacity NaN",
                  typed(lambda: explain("tiny", typed_image(png), options=gpb.ExplainOptions(
                      overlay=True, overlay_opacity=float("nan")))),
                  (INVALID,), ("overlay_opacity",)),
        Malformed("typed", "top_k 0",
                  typed(lambda: explain("tiny", typed_image(png), target=gpb.Target(top_k=0))),
                  (INVALID,), ("top_k",)),
        Malformed("typed", "top_k 1000",
                  typed(lambda: explain("tiny", typed_image(png),
                                        target=gpb.Target(top_k=1000))),
                  (INVALID,), ("top_k",)),
        Malformed("typed", "class_index 10 of 10 classes",
                  typed(lambda: explain("tiny", typed_image(png),
                                        target=gpb.Target(class_index=10))),
                  (INVALID,), ("out of range",)),
        Malformed("typed", "unknown method enum 99",
                  typed(lambda: explain("tiny", typed_image(png), method=99)), (INVALID,),
                  ("method",)),
        Malformed("typed", "unknown layer among several",
                  typed(lambda: explain("tiny", typed_image(png), layers=["relu1", "nope"])),
                  (INVALID,), ("layer", "nope")),
        Malformed("typed", "tensor image with a wrong byte count",
                  typed(lambda: explain("tiny", gpb.Image(tensor=gpb.Tensor(
                      shape=[3, TINY_SIZE, TINY_SIZE], data=b"\x00" * 10)))),
                  (INVALID,), ("bytes",)),
        Malformed("typed", "tensor image of rank 2",
                  typed(lambda: explain("tiny", gpb.Image(tensor=_float_tensor([32, 32])))),
                  (INVALID,), ("[c, h, w]",)),
        Malformed("typed", "tensor image of NaN",
                  typed(lambda: explain("tiny", gpb.Image(
                      tensor=_float_tensor([3, TINY_SIZE, TINY_SIZE], np.nan)))),
                  (INVALID,), ("nan",)),
        Malformed("typed", "reference_embedding of rank 3",
                  typed(lambda: explain("tiny", typed_image(png), score="similarity",
                                        reference_embedding=_float_tensor([1, 1, 10]))),
                  (INVALID,), ("reference_embedding",)),
        Malformed("typed", "unknown other input",
                  typed(lambda: explain("tiny", typed_image(png), inputs={
                      "meta": gpb.TypedTensor(datatype="FP32", shape=[1, 1], data=b"\x00" * 4)})),
                  (INVALID,), ("unknown input",)),
        Malformed("typed", "other input of unknown datatype",
                  typed(lambda: explain("tiny", typed_image(png), inputs={
                      "meta": gpb.TypedTensor(datatype="STRING", shape=[1], data=b"ab")})),
                  (INVALID,), ("datatype",)),
        Malformed("typed", "other input whose element count overflows int64",
                  typed(lambda: explain("tiny", typed_image(png), inputs={
                      "meta": gpb.TypedTensor(datatype="FP32", shape=[2**32, 2**32], data=b"")})),
                  (INVALID,), ("overflow", "large", "limit", "too many")),
        Malformed("typed", "65 images (limit 64)",
                  typed(lambda: explain("tiny", *[typed_image(png)] * 65)), (INVALID,),
                  ("at most",)),
        # sizes
        Malformed("sizes", "request of 68 MB (limit 64 MiB)",
                  kserve(lambda: infer("tiny", tensor("input", np.zeros(
                      (1, 3, 2432, 2432), np.float32)))),
                  (EXHAUSTED,), ("larger than max",)),
        Malformed("sizes", "heatmap answer of 192 MB (8000 x 6000 image)",
                  kserve(lambda: infer("tiny", encoded(blank_png(8000, 6000)))),
                  (EXHAUSTED, INVALID), ("heatmap", "response", "answer", "larger than")),
        Malformed("sizes", "typed answer of 120 MB (top 10 maps of 2000 x 1500)",
                  typed(lambda: explain("tiny", typed_image(blank_png(2000, 1500)),
                                        target=gpb.Target(top_k=10))),
                  (EXHAUSTED, INVALID), ("heatmap", "response", "answer", "larger than")),
    ]
    return cases


@dataclass
class CaseResult:
    case: Malformed
    code: grpc.StatusCode
    message: str
    seconds: float
    good_after: bool

    @property
    def right_code(self) -> bool:
        return self.code in self.case.codes

    @property
    def named(self) -> bool:
        return any(f.lower() in self.message.lower() for f in self.case.fragments)

    @property
    def clean(self) -> bool:
        return not LEAK.search(self.message)

    @property
    def bounded(self) -> bool:
        return len(self.message) <= MAX_MESSAGE_CHARS


def section_malformed(ctx: Context) -> None:
    print("\n== malformed requests", flush=True)
    server = ctx.start("malformed", ("tiny", "segmenter"))
    stubs = Stubs(server.address)
    cases = malformed_cases()
    results: list[CaseResult] = []
    try:
        stubs.kserve.ModelInfer(good_tiny(), timeout=CALL_TIMEOUT_S)  # warm up; raises if bad
        for case in cases:
            ctx.check_time()
            method, make = case.call
            payload = make().SerializeToString()
            code, message, seconds = outcome(
                lambda: send_serialized(stubs.channel, method, payload))
            del payload
            after, _, _ = outcome(lambda: stubs.kserve.ModelInfer(good_tiny(), timeout=10))
            results.append(CaseResult(case, code, message, seconds, after == OK))
    finally:
        stubs.close()
        server.signal(signal.SIGTERM)
        server.wait(30)
        server.kill()
    rows = []
    for r in results:
        marks = "".join(mark if ok else "-" for mark, ok in (
            ("c", r.right_code), ("n", r.named), ("l", r.clean), ("b", r.bounded),
            ("g", r.good_after)))
        rows.append((r.case.group, r.case.name[:48], "/".join(c.name for c in r.case.codes),
                     r.code.name, f"{r.seconds * 1e3:.1f}", marks))
    table(("group", "kind", "expected", "answered", "ms", "checks"), rows)
    print("  checks: c right code, n message names the problem, l no leak, b message <= "
          f"{MAX_MESSAGE_CHARS} chars, g a good request served after it (- failed)")
    failures = [r for r in results
                if not (r.right_code and r.named and r.clean and r.bounded and r.good_after)]
    if failures:
        print("\n  what the server answered where a check failed:")
        for r in failures:
            shown = r.message
            if len(shown) > 160:
                shown = f"{shown[:160]}... ({len(r.message)} chars)"
            print(f"  - {r.case.name}: {r.code.name}: {shown!r}")
    ctx.report.figures["malformed"] = [
        {"group": r.case.group, "kind": r.case.name, "expected": [c.name for c in r.case.codes],
         "answered": r.code.name, "ms": round(r.seconds * 1e3, 2),
         "message": r.message[:300], "message_chars": len(r.message),
         "named": r.named, "clean": r.clean, "good_after": r.good_after}
        for r in results
    ]
    count = len(results)
    tracebacks = logged_exceptions(server.log())
    section = "malformed"

    def names(selected: list[CaseResult]) -> str:
        shown = ", ".join(r.case.name for r in selected[:6])
        return f"; failing: {shown}" + (" ..." if len(selected) > 6 else "") if selected else ""

    ctx.report.check(section, "40+ malformed kinds", count >= 40, f"{count} kinds")
    wrong = [r for r in results if not r.right_code]
    ctx.report.check(section, "the right status code", not wrong,
                     f"{count - len(wrong)}/{count}{names(wrong)}")
    unnamed = [r for r in results if not r.named]
    ctx.report.check(section, "message names the problem", not unnamed,
                     f"{count - len(unnamed)}/{count}{names(unnamed)}")
    leaking = [r for r in results if not r.clean]
    ctx.report.check(section, "no path or traceback in the message", not leaking,
                     f"{count - len(leaking)}/{count}{names(leaking)}")
    long = [r for r in results if not r.bounded]
    ctx.report.check(section, f"message <= {MAX_MESSAGE_CHARS} characters", not long,
                     f"{count - len(long)}/{count}{names(long)}")
    seconds = [r.seconds for r in results]
    p99 = percentile(seconds, 99)
    slowest = max(results, key=lambda r: r.seconds)
    ctx.report.check(section, "answer p99 < 100 ms", p99 < 0.100,
                     f"p50 {percentile(seconds, 50) * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms, "
                     f"max {slowest.seconds * 1e3:.0f} ms ({slowest.case.name})")
    lost = [r for r in results if not r.good_after]
    ctx.report.check(section, "a good request served after each", not lost,
                     f"{count - len(lost)}/{count}{names(lost)}")
    ctx.report.check(section, "no traceback in the server log", not tracebacks,
                     f"{len(tracebacks)} logged" + "".join(f"; {t}" for t in tracebacks[:5]))


# -- 2. overload ---------------------------------------------------------------------------------

OVERLOAD_FACTOR = 4
OVERLOAD_CLIENTS = 128
# Enough closed-loop clients to saturate the shipped model: with no queue delay a batch takes
# what is queued when the last one ends, so 16 clients (2 batches) leave batches part-empty
# while answers travel back; 64 (its max_queue_size) keep every batch full, none rejected.
CAPACITY_CLIENTS = 64
CAPACITY_DEADLINE_S = 10.0  # closed loop measures throughput; its queue waits are long
CLIENT_DEADLINE_S = 2.0


@dataclass(frozen=True)
class Answer:
    sent: float  # seconds from the start of the phase
    seconds: float  # until the answer came
    code: grpc.StatusCode
    late: float  # seconds behind its scheduled time (open loop)
    message: str = ""  # kept for unexpected codes only


async def drive(address: str, method: str, payload: bytes, *, seconds: float, clients: int,
                rate: float | None = None, deadline: float = CLIENT_DEADLINE_S,
                channels: int = 4) -> list[Answer]:
    """`clients` concurrent callers of `method` with the serialized `payload` for `seconds`:
    closed loop (each sends again when answered) when `rate` is None, else open loop (request i
    is due at i / rate seconds, sent by the first free caller)."""
    opened = [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
              for _ in range(channels)]
    calls = [channel.unary_unary(method) for channel in opened]
    answers: list[Answer] = []
    counter = itertools.count()
    start = time.perf_counter()
    end = start + seconds

    async def caller(index: int) -> None:
        call = calls[index % len(calls)]
        while True:
            now = time.perf_counter()
            due = now if rate is None else start + next(counter) / rate
            if due >= end:
                return
            if due > now:
                await asyncio.sleep(due - now)
            sent = time.perf_counter()
            try:
                await call(payload, timeout=deadline)
                code, message = OK, ""
            except grpc.aio.AioRpcError as error:
                code, message = error.code(), error.details() or ""
            if code in (OK, EXHAUSTED, DEADLINE):
                message = ""
            answers.append(Answer(sent - start, time.perf_counter() - sent, code, sent - due,
                                  message[:200]))

    try:
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(clients))),
                               seconds + deadline + 30)
    finally:
        for channel in opened:
            await channel.close()
    return answers


def _codes(answers: Sequence[Answer]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer.code.name] = counts.get(answer.code.name, 0) + 1
    return counts


def section_overload(ctx: Context) -> None:
    print("\n== overload", flush=True)
    capacity_s, overload_s, warm_up_s = (5.0, 15.0, 3.0) if ctx.quick else (10.0, 60.0, 5.0)
    server = ctx.start("overload", (LITE0,))
    payload = infer(LITE0, encoded(CHELSEA), outputs=("logits", HEATMAP)).SerializeToString()
    method = f"{_KSERVE}/ModelInfer"
    try:
        asyncio.run(drive(server.address, method, payload, seconds=warm_up_s,
                          clients=CAPACITY_CLIENTS, deadline=CAPACITY_DEADLINE_S))
        ctx.check_time()
        cpu, own_cpu = server.cpu_seconds(), time.process_time()
        measured = asyncio.run(drive(server.address, method, payload, seconds=capacity_s,
                                     clients=CAPACITY_CLIENTS, deadline=CAPACITY_DEADLINE_S))
        cpu_capacity = server.cpu_seconds() - cpu
        cores_capacity = (cpu_capacity / capacity_s, (time.process_time() - own_cpu) / capacity_s)
        ok = [a for a in measured if a.code == OK]
        capacity = len(ok) / capacity_s
        cpu_per_ok_capacity = cpu_capacity / max(len(ok), 1)
        print(f"  capacity: {capacity:.1f} requests/s answered OK by {CAPACITY_CLIENTS} "
              f"closed-loop clients in {capacity_s:.0f} s (latency p50 "
              f"{percentile([a.seconds for a in ok], 50) * 1e3:.0f} ms; answers "
              f"{_codes(measured)})", flush=True)
        ctx.check_time()
        rate = OVERLOAD_FACTOR * capacity
        cpu, own_cpu = server.cpu_seconds(), time.process_time()
        with Sampler(server) as sampler:
            answers = asyncio.run(drive(server.address, method, payload, seconds=overload_s,
                                        clients=OVERLOAD_CLIENTS, rate=rate))
        cpu_overload = server.cpu_seconds() - cpu
        cores_overload = (cpu_overload / overload_s, (time.process_time() - own_cpu) / overload_s)
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            after, after_message, after_s = outcome(
                lambda: send_serialized(channel, method, payload, timeout=30))
        ctx.check_time()
        # Measured again, to show how much the shared machine moved the figure meanwhile.
        remeasured = asyncio.run(drive(server.address, method, payload, seconds=capacity_s,
                                       clients=CAPACITY_CLIENTS, deadline=CAPACITY_DEADLINE_S))
        capacity_after = sum(a.code == OK for a in remeasured) / capacity_s
        print(f"  capacity measured again after the overload: {capacity_after:.1f} requests/s",
              flush=True)
    finally:
        server.signal(signal.SIGTERM)
        server.wait(60)
        server.kill()

    codes = _codes(answers)
    ok = [a for a in answers if a.code == OK]
    rejected = [a for a in answers if a.code == EXHAUSTED]
    expired = [a for a in answers if a.code == DEADLINE]
    other = [a for a in answers if a.code not in (OK, EXHAUSTED, DEADLINE)]
    offered = len(answers) / overload_s
    goodput = len(ok) / overload_s
    rows = []
    for name, group in (("OK", ok), ("RESOURCE_EXHAUSTED", rejected),
                        ("DEADLINE_EXCEEDED", expired), ("other", other)):
        latencies = [a.seconds for a in group]
        rows.append((name, len(group), f"{len(group) / overload_s:.1f}",
                     f"{percentile(latencies, 50) * 1e3:.0f}" if group else "-",
                     f"{percentile(latencies, 99) * 1e3:.0f}" if group else "-"))
    print(f"  overload: {rate:.1f} requests/s due ({OVERLOAD_FACTOR}x capacity) for "
          f"{overload_s:.0f} s, {OVERLOAD_CLIENTS} clients, {CLIENT_DEADLINE_S:.0f} s deadline; "
          f"sent {offered:.1f}/s (p99 {percentile([a.late for a in answers], 99) * 1e3:.0f} ms "
          "behind schedule)")
    table(("answer", "count", "per s", "p50 ms", "p99 ms"), rows)
    # The load generator (this process) shares the machine's cores with the server: what it
    # takes under overload, the server cannot spend on answers.
    print(f"  cores used (of {os.cpu_count()}), server / load generator: at capacity "
          f"{cores_capacity[0]:.2f} / {cores_capacity[1]:.2f}, under overload "
          f"{cores_overload[0]:.2f} / {cores_overload[1]:.2f}")
    for answer in other[:5]:
        print(f"  - unexpected {answer.code.name}: {answer.message!r}")

    warm = [(t, rss, threads) for t, rss, threads in sampler.samples if t >= overload_s / 4]
    rss_growth = growth([(t, rss) for t, rss, _ in warm])
    rss_start = warm[0][1] if warm else float("nan")
    rss_end = warm[-1][1] if warm else float("nan")
    rss_limit = max(0.05 * rss_start, 20.0)
    threads = [n for _, _, n in sampler.samples]
    print(f"  server after warm-up ({overload_s / 4:.0f} s): RSS {rss_start:.0f} -> {rss_end:.0f}"
          f" MiB (max {max(r for _, r, _ in warm):.0f}), threads {min(threads)}-{max(threads)}")
    ctx.report.figures["overload"] = {
        "capacity_per_s": capacity, "capacity_after_per_s": capacity_after,
        "cpu_ms_per_ok_capacity": cpu_per_ok_capacity * 1e3,
        "cpu_ms_per_ok_overload": cpu_overload / max(len(ok), 1) * 1e3,
        "cores_server_generator_capacity": cores_capacity,
        "cores_server_generator_overload": cores_overload,
        "rate_due_per_s": rate, "sent_per_s": offered,
        "seconds": overload_s, "codes": codes, "goodput_per_s": goodput,
        "ok_p50_ms": percentile([a.seconds for a in ok], 50) * 1e3,
        "rejection_p50_ms": percentile([a.seconds for a in rejected], 50) * 1e3,
        "rejection_p99_ms": percentile([a.seconds for a in rejected], 99) * 1e3,
        "rss_samples": [(round(t, 1), round(r, 1), n) for t, r, n in sampler.samples],
        "unexpected": [a.message for a in other[:20]],
    }
    section = "overload"
    ctx.report.check(section, f"offered load >= {OVERLOAD_FACTOR - 0.5:g}x capacity (the "
                     "measurement holds)", offered >= (OVERLOAD_FACTOR - 0.5) * capacity,
                     f"{offered:.1f}/s sent = {offered / capacity:.2f}x {capacity:.1f}/s")
    ctx.report.check(section, "every request answered OK, RESOURCE_EXHAUSTED or "
                     "DEADLINE_EXCEEDED", not other and answers,
                     f"{len(answers)} answers: {codes}")
    p99 = percentile([a.seconds for a in rejected], 99)
    ctx.report.check(section, "rejections p99 < 50 ms", bool(rejected) and p99 < 0.050,
                     f"p99 {p99 * 1e3:.1f} ms over {len(rejected)} RESOURCE_EXHAUSTED"
                     if rejected else "no RESOURCE_EXHAUSTED answer at all")
    ctx.report.check(section, "goodput >= 90 % of capacity", goodput >= 0.9 * capacity,
                     f"{goodput:.1f}/s OK = {goodput / capacity:.0%} of {capacity:.1f}/s "
                     f"(measured again after: {capacity_after:.1f}/s)")
    # Wall-clock rates move with whatever else the machine runs; the server's own CPU time per
    # answer does not, and shows what rejecting the excess costs.
    cpu_per_ok = cpu_overload / max(len(ok), 1)
    ctx.report.check(section, "server CPU per OK answer under overload <= 1.11x that at "
                     "capacity", cpu_per_ok <= 1.11 * cpu_per_ok_capacity,
                     f"{cpu_per_ok * 1e3:.1f} vs {cpu_per_ok_capacity * 1e3:.1f} ms "
                     f"({cpu_per_ok / cpu_per_ok_capacity:.2f}x)")
    ctx.report.check(section, "RSS flat after warm-up", rss_growth <= rss_limit,
                     f"fitted growth {rss_growth:+.1f} MiB over {overload_s * 3 / 4:.0f} s "
                     f"(limit {rss_limit:.0f} MiB); {rss_start:.0f} -> {rss_end:.0f} MiB")
    ctx.report.check(section, "a good request served after the overload", after == OK,
                     f"{after.name} in {after_s * 1e3:.0f} ms {after_message[:100]}".rstrip())


# -- 3. faults -----------------------------------------------------------------------------------

SLOW_ROWS = 8  # rows of a request that runs for about a second on 2 idle cores
MAX_SLOW_ROWS = 32
LONG_RUN_S = 4.0  # the cancel and deadline probes need a run at least this long
WORK_STOPS_S = 1.0  # cancelled or expired work must stop within this


def _stop(server: Server, timeout: float = 60.0) -> None:
    server.signal(signal.SIGTERM)
    server.wait(timeout)
    server.kill()


HEALTH_BOUND_S = 0.100
HEALTH_EVERY_S = 0.020
LARGE_ANSWER_CLIENTS = 4


def _poll_health(address: str, seconds: float, results) -> None:
    """In a process of its own: Check every HEALTH_EVERY_S for `seconds`; the answer times."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing
        times, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times.append((time.perf_counter() - started,
                          reply.status == health_pb2.HealthCheckResponse.SERVING))
            time.sleep(HEALTH_EVERY_S)
    results.put(times)


def section_health(ctx: Context) -> None:
    """Health while the server builds and sends the largest answers it allows."""
    import multiprocessing

    print("\n== health", flush=True)
    section, seconds = "health", 15.0 if ctx.quick else 60.0
    photo = Image.open(io.BytesIO(CHELSEA)).convert("RGB").resize((2000, 2000))
    data = io.BytesIO()
    photo.save(data, "JPEG", quality=90)
    request = gpb.ExplainRequest(model=LITE0, target=gpb.Target(top_k=3))
    request.images.add(encoded=data.getvalue())
    server = ctx.start("health", (LITE0,))
    stubs = Stubs(server.address)
    try:
        size = stubs.typed.Explain(request, timeout=60).ByteSize()
        results = multiprocessing.get_context("spawn").Queue()
        poller = multiprocessing.get_context("spawn").Process(
            target=_poll_health, args=(server.address, seconds, results))
        poller.start()
        answered, end = [0], time.monotonic() + seconds

        def client() -> None:
            while time.monotonic() < end:
                stubs.typed.Explain(request, timeout=60)
                answered[0] += 1

        clients = [threading.Thread(target=client) for _ in range(LARGE_ANSWER_CLIENTS)]
        with Sampler(server) as sampler:
            for thread in clients:
                thread.start()
            for thread in clients:
                thread.join()
        checks = results.get(timeout=seconds + 60)
        poller.join(timeout=10)
    finally:
        stubs.close()
        _stop(server)
    times = [t for t, _ in checks]
    late = sum(t > HEALTH_BOUND_S for t in times)
    print(f"  {answered[0]} answers of {size / 2**20:.1f} MiB by {LARGE_ANSWER_CLIENTS} clients "
          f"in {seconds:.0f} s; {len(times)} health checks: p50 {percentile(times, 50) * 1e3:.1f}"
          f" ms, p99 {percentile(times, 99) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms, "
          f"{late} over {HEALTH_BOUND_S * 1e3:.0f} ms")
    rss = [r for _, r, _ in sampler.samples]
    print(f"  server RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB (max {max(rss):.0f})")
    ctx.report.figures[section] = {
        "answers": answered[0], "answer_mib": size / 2**20, "checks": len(times),
        "rss_mib": [round(r, 1) for r in rss],
        "p50_ms": percentile(times, 50) * 1e3, "p99_ms": percentile(times, 99) * 1e3,
        "max_ms": max(times) * 1e3, "over_bound": late,
    }
    ctx.report.check(section, "every health check SERVING", all(ok for _, ok in checks),
                     f"{sum(ok for _, ok in checks)} of {len(checks)}")
    ctx.report.check(section, f"health answered within {HEALTH_BOUND_S * 1e3:.0f} ms while "
                     "answers of tens of MiB are made", late == 0,
                     f"max {max(times) * 1e3:.1f} ms, p99 {percentile(times, 99) * 1e3:.1f} ms "
                     f"over {len(times)} checks")


def section_faults(ctx: Context) -> None:
    print("\n== faults", flush=True)
    server = ctx.start("faults", ("slow", "tiny", UNEXPLAINABLE, *FAILED_MODELS))
    stubs = Stubs(server.address)
    try:
        _failed_models(ctx, server, stubs)
        ctx.check_time()
        _cancel_and_deadline(ctx, server, stubs)
        ctx.check_time()
        _busy_ports(ctx, server, stubs)
    finally:
        stubs.close()
        _stop(server)
    ctx.check_time()
    _sigterm_in_flight(ctx)
    ctx.check_time()
    _sigkill_and_restart(ctx)


def _failed_models(ctx: Context, server: Server, stubs: Stubs) -> None:
    """Folders that can never load, beside good models."""
    section = "faults"
    ready = stubs.kserve.ServerReady(kpb.ServerReadyRequest(), timeout=10).ready
    good, message, _ = outcome(lambda: stubs.kserve.ModelInfer(good_tiny(), timeout=30))
    ctx.report.check(section, "models that cannot load beside good ones: SERVING, ready, good "
                     "models answer", ready and good == OK,
                     f"health SERVING, ServerReady {ready}, tiny answers {good.name}")
    rows, wrong = [], []
    x = tensor("input", tiny_x())
    models = stubs.typed.ListModels(gpb.ListModelsRequest(), timeout=10).models
    listed = {m.name: m for m in models}
    for name, fragment in FAILED_MODELS.items():
        model_ready = stubs.kserve.ModelReady(kpb.ModelReadyRequest(name=name), timeout=10).ready
        calls = {
            "ModelInfer": lambda: stubs.kserve.ModelInfer(infer(name, x), timeout=30),
            "Explain": lambda: stubs.typed.Explain(explain(name, typed_image(picture("PNG"))),
                                                   timeout=30),
            "GetModelInfo": lambda: stubs.typed.GetModelInfo(
                gpb.GetModelInfoRequest(model=name), timeout=30),
        }
        reason = listed[name].reason if name in listed else ""
        for rpc, call in calls.items():
            code, message, _ = outcome(call)
            fine = (code == PRECONDITION and fragment.lower() in message.lower()
                    and not LEAK.search(message) and not model_ready)
            rows.append((name, rpc, code.name, message[:90]))
            if not fine:
                wrong.append(f"{name} {rpc}: {code.name}")
        if not reason or fragment.lower() not in reason.lower() or LEAK.search(reason):
            wrong.append(f"{name} ListModels reason {reason[:60]!r}")
    # A graph whose gradient path has no backward rule can still serve plain inference.
    explained = [
        ("ModelInfer", outcome(lambda: stubs.kserve.ModelInfer(infer(UNEXPLAINABLE, x),
                                                               timeout=30))),
        ("Explain", outcome(lambda: stubs.typed.Explain(
            explain(UNEXPLAINABLE, typed_image(picture("PNG"))), timeout=30))),
    ]
    forward = outcome(lambda: stubs.kserve.ModelInfer(
        infer(UNEXPLAINABLE, x, outputs=("logits",)), timeout=30))
    for rpc, (code, message, _) in explained:
        rows.append((UNEXPLAINABLE, rpc, code.name, message[:90]))
    rows.append((UNEXPLAINABLE, "ModelInfer, logits only", forward[0].name, forward[1][:90]))
    table(("model", "rpc", "answered", "message"), rows)
    ctx.report.figures["failed_models"] = rows
    checked = len(FAILED_MODELS) * 3
    right = checked - sum("ListModels" not in w for w in wrong)
    ctx.report.check(section, "a model that can never load: FAILED_PRECONDITION naming why, "
                     "not ready, reason listed", not wrong,
                     f"{right}/{checked} calls right"
                     + (f"; wrong: {', '.join(wrong[:4])} ..." if wrong else ""))
    refused = all(code == PRECONDITION and "'det'" in message.lower()
                  and not LEAK.search(message) for _, (code, message, _) in explained)
    ctx.report.check(section, "a model that cannot be explained (no backward rule): explaining "
                     "it FAILED_PRECONDITION naming the op", refused,
                     ", ".join(f"{rpc} {code.name}" for rpc, (code, _, _) in explained))
    ctx.report.check(section, "that model still serves plain inference", forward[0] == OK,
                     f"logits only: {forward[0].name} {forward[1][:80]}".rstrip())


def _slow_payload(rows: int = SLOW_ROWS) -> bytes:
    x = np.random.default_rng(0).standard_normal((rows, 3, SLOW_SIZE, SLOW_SIZE))
    return infer("slow", tensor("input", x.astype(np.float32)),
                 outputs=("logits", HEATMAP)).SerializeToString()


def _cancel_and_deadline(ctx: Context, server: Server, stubs: Stubs) -> None:
    """Work the client gave up on (cancelled, or past its deadline) must stop."""
    section = "faults"
    method = f"{_KSERVE}/ModelInfer"
    call = stubs.channel.unary_unary(method)
    send_serialized(stubs.channel, method, _slow_payload(1), timeout=60)  # warm up
    rows = SLOW_ROWS
    while True:  # a request long enough that work left running would show
        payload = _slow_payload(rows)
        wait_idle(server, time.perf_counter())
        started, cpu = time.perf_counter(), server.cpu_seconds()
        send_serialized(stubs.channel, method, payload, timeout=120)
        run_s, run_cpu = time.perf_counter() - started, server.cpu_seconds() - cpu
        if run_s >= LONG_RUN_S or rows >= MAX_SLOW_ROWS:
            break
        rows = min(MAX_SLOW_ROWS, int(np.ceil(rows * 1.25 * LONG_RUN_S / run_s)))
    print(f"  one request of {rows} rows on 'slow' runs {run_s:.1f} s "
          f"({run_cpu:.1f} CPU-s)", flush=True)
    rows = []

    # The client cancels a third of the way into the run.
    wait_idle(server, time.perf_counter())
    future = call.future(payload, timeout=120)
    time.sleep(max(0.3, run_s / 3) - 0.3)
    before_at, before_cpu = time.perf_counter(), server.cpu_seconds()
    time.sleep(0.3)
    cancel_at, cpu = time.perf_counter(), server.cpu_seconds()
    busy_before_cancel = (cpu - before_cpu) / (cancel_at - before_at)  # cores in use
    future.cancel()
    idle = wait_idle(server, cancel_at, limit=run_s + 10)
    spent = server.cpu_seconds() - cpu
    rows.append(("client cancel", "CANCELLED" if future.cancelled() else "?",
                 "never" if idle is None else f"{idle:.2f}", f"{spent:.2f}"))
    cancel_idle = idle

    # The deadline passes a third of the way into the run.
    wait_idle(server, time.perf_counter())
    timeout = max(0.3, run_s / 3)
    started, before_cpu = time.perf_counter(), server.cpu_seconds()
    code, _, seconds = outcome(lambda: call(payload, timeout=timeout))
    expired_at, cpu = time.perf_counter(), server.cpu_seconds()
    busy_before_deadline = (cpu - before_cpu) / (expired_at - started)
    idle = wait_idle(server, expired_at, limit=run_s + 10)
    spent = server.cpu_seconds() - cpu
    rows.append((f"deadline {timeout:.1f} s", code.name,
                 "never" if idle is None else f"{idle:.2f}", f"{spent:.2f}"))
    deadline_idle, deadline_code = idle, code

    # A second request, due to expire while it waits behind the first, must never run.
    wait_idle(server, time.perf_counter())
    first = call.future(payload, timeout=120)
    time.sleep(0.1)
    queued_code, _, _ = outcome(lambda: call(payload, timeout=max(0.5, run_s / 2)))
    first_code, _, _ = outcome(first.result)
    done_at, cpu = time.perf_counter(), server.cpu_seconds()
    idle = wait_idle(server, done_at, limit=run_s + 10)
    spent = server.cpu_seconds() - cpu
    rows.append(("expired while queued", queued_code.name,
                 "never" if idle is None else f"{idle:.2f}", f"{spent:.2f}"))
    table(("fault", "client got", "server idle after (s)", "CPU-s after"), rows)
    ctx.report.figures["cancel"] = {"run_s": run_s, "run_cpu_s": run_cpu, "rows": rows}
    after, _, _ = outcome(lambda: stubs.kserve.ModelInfer(good_tiny(), timeout=30))

    def stopped(idle_s: float | None) -> bool:  # and the run had time left to show it
        return (idle_s is not None and idle_s <= WORK_STOPS_S
                and run_s * 2 / 3 >= 2 * WORK_STOPS_S)

    def shown(idle_s: float | None) -> str:
        return "still busy after the whole run" if idle_s is None else f"{idle_s:.2f} s"

    # The probes hold only if the server was busy with the run when the client gave up: at
    # least half as busy as over a whole run (the machine may be shared).
    running = 0.5 * run_cpu / run_s
    ctx.report.check(section, f"client cancel stops the work within {WORK_STOPS_S:.0f} s",
                     stopped(cancel_idle) and busy_before_cancel >= running,
                     f"server idle {shown(cancel_idle)} after the cancel (busy "
                     f"{busy_before_cancel:.2f} cores before it; a whole run: {run_s:.1f} s, "
                     f"{run_cpu / run_s:.2f} cores)")
    ctx.report.check(section, f"a deadline shorter than the run: DEADLINE_EXCEEDED, work "
                     f"stopped within {WORK_STOPS_S:.0f} s",
                     deadline_code == DEADLINE and stopped(deadline_idle)
                     and busy_before_deadline >= running,
                     f"{deadline_code.name}; server idle {shown(deadline_idle)} after it (busy "
                     f"{busy_before_deadline:.2f} cores before it)")
    ctx.report.check(section, "a request that expires while queued never runs",
                     queued_code == DEADLINE and first_code == OK and idle is not None
                     and idle <= 0.5,
                     f"{queued_code.name} (the one ahead: {first_code.name}); server idle "
                     f"{shown(idle)} after the one ahead finished")
    ctx.report.check(section, "a good request served after these", after == OK, after.name)


def _busy_ports(ctx: Context, server: Server, stubs: Stubs) -> None:
    """A second server asked for ports in use must refuse to start, saying which."""
    section = "faults"
    metrics_port = int(server.metrics_url.rsplit(":", 1)[1].split("/")[0])
    repository = ctx.root.parent / "busy"
    repository.mkdir(exist_ok=True)
    if not (repository / "tiny").exists():
        (repository / "tiny").symlink_to(ctx.root / "tiny", target_is_directory=True)
    for what, port, metrics in (("gRPC", server.port, 0), ("metrics", 0, metrics_port)):
        busy = metrics if metrics else port
        second = Server(repository, ctx.work / f"busy-{what}.log", port=port,
                        metrics_port=metrics, wait=False)
        listening = second.wait_listening(30)
        exit_code = None if listening else second.wait(30)
        output = second.log()
        second.kill()
        lines = [line for line in output.splitlines() if line.strip()]
        last = next((line for line in reversed(lines)
                     if re.search(r"error|in use|port", line, re.IGNORECASE)),
                    lines[-1] if lines else "")
        refused = (not listening and exit_code not in (None, 0) and str(busy) in output
                   and "Traceback" not in output)
        if listening:
            figure = f"it started and listens on the busy port {busy} too"
        elif exit_code is None:
            figure = "it neither listened nor exited within 30 s"
        else:
            figure = (f"exit {exit_code}: {last[:120]!r}"
                      + ("; with a traceback" if "Traceback" in output else ""))
        ctx.report.check(section, f"a second server on a busy {what} port refuses to start, "
                         "naming the port", refused, figure)
    after, _, _ = outcome(lambda: stubs.kserve.ModelInfer(good_tiny(), timeout=30))
    ctx.report.check(section, "the first server still answers", after == OK, after.name)


def _sigterm_in_flight(ctx: Context) -> None:
    section = "faults"
    server = ctx.start("sigterm", ("slow", "tiny"))
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    call = channel.unary_unary(f"{_KSERVE}/ModelInfer")
    try:
        call(_slow_payload(1), timeout=60)  # warm up
        # 4 rows each: the first request runs alone (no queue delay) and must outlast the
        # 0.3 s before the signal.
        in_flight = [call.future(_slow_payload(4), timeout=120) for _ in range(8)]
        time.sleep(0.3)
        term_at = time.perf_counter()
        server.signal(signal.SIGTERM)
        running = sum(not f.done() for f in in_flight)
        time.sleep(0.3)
        late = [call.future(good_tiny().SerializeToString(), timeout=10) for _ in range(2)]
        codes = [outcome(f.result)[0] for f in in_flight]
        late_codes = [outcome(f.result) for f in late]
        exit_code = server.wait(60)
        drained_s = time.perf_counter() - term_at
    finally:
        channel.close()
        server.kill()
    answered_ok = sum(code == OK for code in codes)
    ctx.report.figures["sigterm"] = {"running_at_signal": running,
                                     "in_flight": [c.name for c in codes],
                                     "after": [c.name for c, _, _ in late_codes],
                                     "exit": exit_code, "drained_s": drained_s}
    ctx.report.check(section, "SIGTERM: every request in flight answered OK",
                     answered_ok == 8 and running == 8,
                     f"{running} of 8 in flight at the signal; {answered_ok}/8 OK: "
                     f"{[c.name for c in codes]}")
    refused = all(code == UNAVAILABLE and seconds < 5 for code, _, seconds in late_codes)
    ctx.report.check(section, "SIGTERM: requests sent while draining refused with UNAVAILABLE",
                     refused, ", ".join(f"{c.name} in {s * 1e3:.0f} ms" for c, _, s in late_codes))
    ctx.report.check(section, "SIGTERM: the server exits 0 once drained", exit_code == 0,
                     f"exit {exit_code} after {drained_s:.1f} s")


def _sigkill_and_restart(ctx: Context) -> None:
    section = "faults"
    server = ctx.start("sigkill", ("slow", "tiny"))
    port = server.port
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    call = channel.unary_unary(f"{_KSERVE}/ModelInfer")
    try:
        call(_slow_payload(1), timeout=60)
        in_flight = [call.future(_slow_payload(), timeout=120) for _ in range(4)]
        time.sleep(0.3)
        killed_at = time.perf_counter()
        server.signal(signal.SIGKILL)
        running = sum(not f.done() for f in in_flight)
        results = [outcome(f.result)[0] for f in in_flight]
        answered_s = time.perf_counter() - killed_at
    finally:
        channel.close()
        server.kill()
    ctx.report.check(section, "SIGKILL: requests in flight fail with UNAVAILABLE at once",
                     all(c == UNAVAILABLE for c in results) and answered_s < 5 and running == 4,
                     f"{running} of 4 in flight at the signal; {[c.name for c in results]} "
                     f"within {answered_s:.2f} s")
    started = time.perf_counter()
    try:
        restarted = ctx.start("sigkill-restart", ("slow", "tiny"), port=port)
    except RuntimeError as error:
        ctx.report.check(section, "restart on the same port serves", False,
                         str(error).splitlines()[0])
        return
    serving_s = time.perf_counter() - started
    stubs = Stubs(restarted.address)
    try:
        code, _, _ = outcome(lambda: stubs.kserve.ModelInfer(good_tiny(), timeout=30))
    finally:
        stubs.close()
        _stop(restarted)
    ctx.report.check(section, "restart on the same port serves", code == OK,
                     f"port {port}: SERVING {serving_s:.1f} s after the start, a request "
                     f"answered {code.name}")


# -- 4. soak -------------------------------------------------------------------------------------

SOAK_CLIENTS = 8
SOAK_LAYERS = ("conv1", "relu1", "conv2", "relu2")
SOAK_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "gradcam-elementwise",
                "layercam", "eigencam", "eigengradcam", "ablationcam", "scorecam", "groupcam",
                "integrated-gradcam", "guided-backprop", "guided-gradcam")
PERTURBATION_METHODS = ("ablationcam", "scorecam", "groupcam")  # they take no counterfactual
SOAK_MIX = {  # kind -> share of the requests
    "tensor": 40, "image": 15, "typed": 10, "sizes": 10, "malformed": 10, "cancel": 5,
    "deadline": 5, "method": 5,
}


def _soak_malformed() -> list[tuple[bytes, grpc.StatusCode]]:
    x = tensor("input", tiny_x())
    return [
        (infer("tiny", encoded(bytes(range(256)))).SerializeToString(), INVALID),
        (infer("tiny", tensor("input", np.full((1, 3, 32, 32), np.nan, np.float32)))
         .SerializeToString(), INVALID),
        (infer("no_such_model", x).SerializeToString(), NOT_FOUND),
        (infer("tiny", x, method="nope").SerializeToString(), INVALID),
        (infer("tiny", (InferInput(name="image", datatype="BYTES", shape=[1]), b"\x05"))
         .SerializeToString(), INVALID),
        (infer("tiny", encoded(png_claiming(20_000, 20_000))).SerializeToString(), INVALID),
        (infer("tiny", x, target_layer="nope").SerializeToString(), INVALID),
    ]


def section_soak(ctx: Context) -> None:
    print("\n== soak", flush=True)
    total, limit_s = (1_500, 300.0) if ctx.quick else (10_000, 1200.0)
    step = total // 40
    server = ctx.start("soak", ("tiny", "anysize"))
    channel = grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    infer_call = channel.unary_unary(f"{_KSERVE}/ModelInfer")
    explain_call = channel.unary_unary(f"{_TYPED}/Explain")
    tensors = [infer("tiny", tensor("input", tiny_x(seed=i)), outputs=("logits", HEATMAP))
               .SerializeToString() for i in range(32)]
    images = [infer("tiny", encoded(picture("PNG", (48 + i, 40), seed=i)))
              .SerializeToString() for i in range(8)]
    typed = [explain("tiny", typed_image(picture("JPEG", (64, 48), seed=i)),
                     target=gpb.Target(top_k=2)).SerializeToString() for i in range(8)]
    bad = _soak_malformed()
    kinds = [kind for kind, share in SOAK_MIX.items() for _ in range(share)]
    plan = random.Random(0)
    schedule = [(plan.choice(kinds), plan.randrange(1 << 30)) for _ in range(total)]

    def one(kind: str, seed: int) -> tuple[grpc.StatusCode, str, set[grpc.StatusCode]]:
        pick = random.Random(seed)
        if kind == "tensor":
            return *outcome(lambda: infer_call(pick.choice(tensors), timeout=30))[:2], {OK}
        if kind == "image":
            return *outcome(lambda: infer_call(pick.choice(images), timeout=30))[:2], {OK}
        if kind == "typed":
            return *outcome(lambda: explain_call(pick.choice(typed), timeout=30))[:2], {OK}
        if kind == "sizes":
            height, width = pick.randint(16, 64), pick.randint(16, 64)
            x = np.random.default_rng(seed).standard_normal((1, 3, height, width))
            payload = infer("anysize", tensor("input", x.astype(np.float32))).SerializeToString()
            return *outcome(lambda: infer_call(payload, timeout=30))[:2], {OK}
        if kind == "malformed":
            payload, code = pick.choice(bad)
            return *outcome(lambda: infer_call(payload, timeout=30))[:2], {code}
        if kind == "cancel":
            future = infer_call.future(pick.choice(tensors), timeout=30)
            time.sleep(pick.random() * 0.002)
            future.cancel()
            try:
                future.result()
                return OK, "", {CANCELLED, OK}
            except grpc.FutureCancelledError:
                return CANCELLED, "", {CANCELLED, OK}
            except grpc.RpcError as error:
                return error.code(), error.details() or "", {CANCELLED, OK}
        if kind == "deadline":
            payload = pick.choice(tensors)
            return *outcome(lambda: infer_call(payload, timeout=0.002))[:2], {DEADLINE, OK}
        method = pick.choice(SOAK_METHODS)
        counterfactual = method not in PERTURBATION_METHODS and pick.random() < 0.5
        payload = infer("tiny", tensor("input", tiny_x(seed=seed % 7)), method=method,
                        target_layer=pick.choice(SOAK_LAYERS),
                        counterfactual=counterfactual).SerializeToString()
        return *outcome(lambda: infer_call(payload, timeout=60))[:2], {OK}

    lock = threading.Lock()
    position = itertools.count()
    done = 0
    samples: list[tuple[int, float, int]] = [(0, *server.status())]
    unexpected: dict[tuple[str, str], int] = {}
    messages: dict[tuple[str, str], str] = {}
    counts: dict[str, int] = {}
    stop_at = time.monotonic() + limit_s

    def worker() -> None:
        nonlocal done
        while time.monotonic() < stop_at and server.alive():
            index = next(position)
            if index >= total:
                return
            kind, seed = schedule[index]
            try:
                code, message, expected = one(kind, seed)
            except Exception as error:  # noqa: BLE001 - counted, never fatal to the run
                code, message, expected = grpc.StatusCode.UNKNOWN, repr(error), {OK}
            with lock:
                done += 1
                counts[kind] = counts.get(kind, 0) + 1
                if code not in expected:
                    key = (kind, code.name)
                    unexpected[key] = unexpected.get(key, 0) + 1
                    messages.setdefault(key, message[:160])
                if done % step == 0:
                    samples.append((done, *server.status()))

    started = time.perf_counter()
    try:
        threads = [threading.Thread(target=worker) for _ in range(SOAK_CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
        _stop(server)
    print(f"  {done} requests in {elapsed:.0f} s ({done / elapsed:.0f}/s) from {SOAK_CLIENTS} "
          f"clients: {counts}")
    shown = samples[:: max(1, len(samples) // 10)]
    rows = [(n, f"{rss:.0f}", threads) for n, rss, threads in shown]
    if samples[-1][0] != rows[-1][0]:
        rows.append((samples[-1][0], f"{samples[-1][1]:.0f}", samples[-1][2]))
    table(("requests", "RSS MiB", "threads"), rows)
    for (kind, code), message in messages.items():
        print(f"  - {kind} answered {code}: {message!r}")
    warm_up = total // 5
    during = [s for s in samples if s[0] <= warm_up]
    after = [s for s in samples if s[0] >= warm_up]
    rss_growth = growth([(n, rss) for n, rss, _ in after])
    rss_base = after[0][1] if after else float("nan")
    rss_limit = max(0.05 * rss_base, 20.0)
    threads_warm = max(t for _, _, t in during)
    threads_after = max((t for _, _, t in after), default=0)
    ctx.report.figures["soak"] = {"requests": done, "seconds": elapsed, "counts": counts,
                                  "samples": samples,
                                  "unexpected": {f"{k} {c}": n for (k, c), n in unexpected.items()},
                                  "messages": {f"{k} {c}": m for (k, c), m in messages.items()}}
    section = "soak"
    ctx.report.check(section, f"{total:,} requests answered", done == total,
                     f"{done:,} in {elapsed:.0f} s")
    ctx.report.check(section, "each answered as expected (OK, its error, CANCELLED, "
                     "DEADLINE_EXCEEDED)", not unexpected,
                     "all" if not unexpected else
                     ", ".join(f"{n} {kind} answered {code}"
                               for (kind, code), n in unexpected.items()))
    ctx.report.check(section, "RSS flat after warm-up", rss_growth <= rss_limit,
                     f"fitted growth {rss_growth:+.1f} MiB over requests {warm_up:,}-{done:,} "
                     f"(limit {rss_limit:.0f} MiB); {rss_base:.0f} -> {samples[-1][1]:.0f} MiB")
    ctx.report.check(section, "thread count flat after warm-up", threads_after <= threads_warm,
                     f"max {threads_warm} during warm-up, {threads_after} after "
                     f"(end {samples[-1][2]})")


# -- 5. fuzzing ----------------------------------------------------------------------------------


def section_fuzz(ctx: Context) -> None:
    """tests/test_fuzz.py and tests/test_random_requests.py with more examples: the image
    decoders, KServe tensor parsing, and random requests against a live server."""
    print("\n== fuzz", flush=True)
    examples = 200 if ctx.quick else 2000
    limit_s = 600.0
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_fuzz.py"),
               str(ROOT / "tests" / "test_random_requests.py"), "-q",
               "-rf", "-p", "no:cacheprovider", "--hypothesis-show-statistics"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              timeout=limit_s,
                              env=dict(os.environ, GRADCAM_FUZZ_EXAMPLES=str(examples)))
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        output, code = "", None
    seconds = time.perf_counter() - started
    summary = next((line.strip("= ") for line in reversed(output.splitlines())
                    if re.search(r"\d+ (passed|failed|error)", line)), "no pytest summary")
    summary = re.sub(r" in [\d.]+s.*$", "", summary)
    failed = re.findall(r"^FAILED \S+::(\S+)", output, re.MULTILINE)
    errors = sorted(set(re.findall(r"^E +(\w+(?:Error|Exception)\b[^\n]{0,100})", output,
                                   re.MULTILINE)))
    for name in failed:
        print(f"  - failed: {name}")
    for line in errors[:8]:
        print(f"    {line}")
    ctx.report.figures["fuzz"] = {"examples": examples, "seconds": seconds, "summary": summary,
                                  "failed": failed, "errors": errors}
    ctx.report.check("fuzz", f"every property holds ({examples} examples each, derandomized)",
                     code == 0, f"{summary} in {seconds:.0f} s" if code is not None
                     else f"still running after {limit_s:.0f} s")


# -- running -------------------------------------------------------------------------------------


class OutOfTime(Exception):
    """The run's time budget is spent."""


@dataclass
class Context:
    root: Path  # the full repository (build_repository)
    work: Path  # a temporary folder for subsets and logs
    quick: bool
    report: Report
    deadline: float  # time.monotonic() value the run must end by
    _count: itertools.count = field(default_factory=itertools.count)

    def start(self, name: str, models: Sequence[str], *args: str, port: int = 0,
              serving: bool = True) -> Server:
        """A server on a repository of `models`, SERVING unless `serving` is False."""
        index = next(self._count)
        repository = subset(self.root, f"{name}-{index}", models)
        server = Server(repository, self.work / f"{name}-{index}.log", *args, port=port)
        if serving:
            seconds = server.wait_serving()
            print(f"  server pid {server.pid} on {server.address} ({', '.join(models)}), "
                  f"SERVING after {seconds:.1f} s", flush=True)
        return server

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime("the run's time budget is spent")


SECTIONS = {
    "malformed": section_malformed,
    "overload": section_overload,
    "health": section_health,
    "faults": section_faults,
    "soak": section_soak,
    "fuzz": section_fuzz,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--quick", action="store_true", help="shorter durations and counts")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds after which the run stops (default 2400; quick: 900)")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    budget = args.budget or (900.0 if args.quick else 2400.0)

    def watchdog() -> None:  # the last resort: every loop is bounded on its own
        time.sleep(budget + 120)
        print("reliability: the run overran its budget; killing its servers", flush=True)
        _kill_all()
        os._exit(2)

    threading.Thread(target=watchdog, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    report = Report()
    print(f"reliability of gradcam-server, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), "
          f"{'quick' if args.quick else 'full'} run; sections: {', '.join(chosen)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gradcam-reliability-") as tmp:
        work = Path(tmp)
        ctx = Context(build_repository(work / "models"), work, args.quick, report,
                      time.monotonic() + budget)
        for name in chosen:
            try:
                SECTIONS[name](ctx)
            except OutOfTime as error:
                report.check(name, "section finished", False, str(error))
                break
            except Exception as error:  # noqa: BLE001 - one broken section must not hide the rest
                report.check(name, "section finished", False,
                             f"{type(error).__name__}: {str(error)[:500]}")
            finally:
                _kill_all()
    passed = report.summary()
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "quick": args.quick,
            "criteria": [c.__dict__ for c in report.criteria], "figures": report.figures,
        }, indent=1, default=str))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
