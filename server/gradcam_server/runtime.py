"""onnxruntime sessions: which execution provider, and the session options every model gets.

The CUDA execution provider is used when it actually works here (onnxruntime-gpu installed,
CUDA and cuDNN libraries loadable, a device present); otherwise the CPU provider. The probe runs
once per process with onnxruntime's logger silenced and the process's standard error (file
descriptor 2) captured, since the dynamic loader and the CUDA provider print library-loading
errors there directly: a CPU-only machine sees one info line with the provider chosen, and the
captured text goes to the debug log.

The threads that run sessions can be given a lower CPU priority (`RuntimeOptions.nice`): on a
machine whose cores the runs keep busy, the event loop then still gets a core at once to admit,
refuse and answer health checks (docs/RELIABILITY.md, "Overload"). On Linux niceness is per
thread: a session is built on a thread made nicer, so that onnxruntime's intra-op threads,
which it spawns, are as nice (`create_session`), and the engine's threads that call ``run``
are made nicer as they start (`lower_priority`). Elsewhere nothing changes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_FATAL_ONLY = 4
_WARNINGS = 2


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are created. `device` is "auto", "cpu", "cuda" or "cuda:N" (GPU N; one
    server process per GPU, each with its own sessions, is how several GPUs are used)."""

    device: str = "auto"
    intra_op_threads: int = 0  # 0: onnxruntime's default (one per core)
    nice: int = 0  # niceness added to the threads that run sessions (0: as the process)

    def __post_init__(self) -> None:
        parse_device(self.device)

    @property
    def device_id(self) -> int:
        return parse_device(self.device)[1]

    def providers(self) -> list:
        """Providers for `InferenceSession`: CUDA (on `device_id`) before CPU where it works."""
        if self.device == "cpu":
            return [CPU]
        if cuda_usable():
            return [(CUDA, {"device_id": self.device_id}), CPU]
        if self.device != "auto":
            raise RuntimeError(
                f"the CUDA execution provider was asked for ({self.device}) but is not usable"
            )
        return [CPU]


def parse_device(text: str) -> tuple[str, int]:
    """"auto", "cpu", "cuda" or "cuda:N" -> (kind, device id); ValueError otherwise."""
    kind, colon, index = text.partition(":")
    if kind in ("auto", "cpu", "cuda") and not colon:
        return kind, 0
    if kind == "cuda" and index.isdigit() and len(index) <= 4:
        return kind, int(index)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def run_bound(
    session: ort.InferenceSession, feeds: dict, names: list[str], options: ort.RunOptions
) -> list:
    """`session.run(names, feeds, options)` through an IOBinding, for a session on the CUDA
    provider: each input is copied to the device once, every intermediate tensor stays there,
    and only the outputs `names` are copied back to the host (as numpy arrays). On the CPU
    provider it computes the same as `run` (what the tests check here)."""
    on_cuda = session.get_providers()[0] == CUDA
    device = "cuda" if on_cuda else "cpu"
    device_id = 0
    if on_cuda:
        device_id = int(session.get_provider_options()[CUDA].get("device_id", 0))
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(
            name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device,
                                                   device_id)
        )
    for name in names:
        binding.bind_output(name, device, device_id)
    session.run_with_iobinding(binding, options)
    return binding.copy_outputs_to_cpu()


@functools.cache
def cuda_usable() -> bool:
    """Whether a session can really run on the CUDA provider; probed once, quietly."""
    if CUDA not in ort.get_available_providers():
        log.info("execution provider: CPU (this onnxruntime has no CUDA provider)")
        return False
    ort.set_default_logger_severity(_FATAL_ONLY)
    try:
        with _captured_stderr() as captured:
            usable = _cuda_session_runs()
    finally:
        ort.set_default_logger_severity(_WARNINGS)
    if captured.text:
        log.debug("CUDA probe printed: %s", captured.text.strip())
    if usable:
        log.info("execution provider: CUDA (onnxruntime %s)", ort.__version__)
    else:
        log.info("execution provider: CPU (CUDA libraries or device not available)")
    return usable


def _cuda_session_runs() -> bool:
    try:
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, if installed
            try:
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - absent libraries just mean "no CUDA"
                pass
        options = ort.SessionOptions()
        options.log_severity_level = _FATAL_ONLY
        session = ort.InferenceSession(
            _probe_model().SerializeToString(), options, providers=[CUDA, CPU]
        )
        return session.get_providers()[0] == CUDA
    except Exception:  # noqa: BLE001 - any failure means the CPU provider
        return False


@dataclass
class _Captured:
    text: str = ""


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Redirect file descriptor 2 (what C libraries write to) into a temporary file; the
    text is in the yielded object afterwards."""
    captured = _Captured()
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")


def create_session(
    model: onnx.ModelProto | bytes | str, options: RuntimeOptions
) -> ort.InferenceSession:
    """A session with the chosen provider. Idle intra-op threads do not spin: several sessions
    share the cores of one process, and spinning pools were seen to double batch-1 latency."""
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = options.intra_op_threads
    session_options.inter_op_num_threads = 1
    session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session_options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    providers = options.providers()

    def build() -> ort.InferenceSession:
        return ort.InferenceSession(source, session_options, providers=providers)

    if not options.nice or not sys.platform.startswith("linux"):
        return build()
    # built on a nicer thread, whose niceness onnxruntime's intra-op threads inherit
    with concurrent.futures.ThreadPoolExecutor(
        1, "session-build", initializer=lower_priority, initargs=(options.nice,)
    ) as builder:
        return builder.submit(build).result()


def lower_priority(nice: int) -> None:
    """Make the calling thread `nice` steps nicer (Linux: per thread; elsewhere nothing)."""
    if nice > 0 and sys.platform.startswith("linux"):
        os.nice(nice)


def _probe_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
