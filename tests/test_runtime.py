"""The execution-provider probe (one log line with the provider chosen, nothing else on stderr),
and how sessions are created and run: options, precision, the runs' threads' priority."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gradcam_server import runtime
from gradcam_server.engine import Engine
from gradcam_server.server import DEFAULT_COMPUTE_NICE, parse_args


def test_probe_logs_one_line_and_prints_nothing_else() -> None:
    code = (
        "import logging; logging.basicConfig(level=logging.INFO, format='%(message)s')\n"
        "from gradcam_server.runtime import RuntimeOptions; RuntimeOptions().providers()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("execution provider: ")


def test_what_libraries_print_during_the_probe_is_kept_off_stderr(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def noisy_probe() -> bool:  # as the dynamic loader does: straight to file descriptor 2
        os.write(2, b"Failed to load libcublasLt.so.13: cannot open shared object file\n")
        return False

    monkeypatch.setattr(runtime, "_cuda_session_runs", noisy_probe)
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [runtime.CUDA])
    runtime.cuda_usable.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger=runtime.__name__):
            assert runtime.cuda_usable() is False
    finally:
        runtime.cuda_usable.cache_clear()
    assert "libcublasLt" not in capfd.readouterr().err
    messages = [r.getMessage() for r in caplog.records]
    assert any("libcublasLt" in m for m in messages if m.startswith("CUDA probe printed"))
    assert [m for m in messages if m.startswith("execution provider")] == [
        "execution provider: CPU (CUDA libraries or device not available)"
    ]


# -- devices, IO binding and float16 precision ------------------------------------------------


def test_devices_parse_and_an_unusable_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.parse_device("cuda:3") == ("cuda", 3)
    assert runtime.parse_device("cpu") == ("cpu", 0)
    for bad in ("gpu", "cuda:", "cuda:-1", "cpu:1", "cuda:1x"):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            runtime.RuntimeOptions(device=bad)
    monkeypatch.setattr(runtime, "cuda_usable", lambda: False)
    assert runtime.RuntimeOptions("auto").providers() == [runtime.CPU]
    with pytest.raises(RuntimeError, match=r"asked for \(cuda:1\)"):
        runtime.RuntimeOptions("cuda:1").providers()
    monkeypatch.setattr(runtime, "cuda_usable", lambda: True)
    assert runtime.RuntimeOptions("cuda:1").providers() == [
        (runtime.CUDA, {"device_id": 1}), runtime.CPU
    ]


def test_the_server_refuses_a_bad_device() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradcam_server", "--model-repository", ".", "--device", "gpu0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "device must be auto, cpu, cuda or cuda:N" in result.stderr


def test_io_binding_computes_what_run_computes(tmp_path) -> None:
    """`run_bound` (what a CUDA session runs through) on a CPU session: the outputs asked for,
    equal to `run`'s."""
    import numpy as np

    from gradcam_server.augment import augment_model
    from servers import TINY_SIZE, export_torch, tiny_cnn

    path = export_torch(tiny_cnn(), TINY_SIZE, tmp_path / "tiny.onnx", dynamic_batch=True)
    session = runtime.create_session(augment_model(path), runtime.RuntimeOptions("cpu", 1))
    x = np.random.default_rng(0).normal(size=(2, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    feeds = {"input": x[:, :, ::-1, :], "target_class": np.array([3, -1])}  # not contiguous
    names = ["heatmap", "logits"]
    options = runtime.ort.RunOptions()
    bound = runtime.run_bound(session, feeds, names, options)
    plain = session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()}, options)
    assert len(bound) == 2
    for ours, theirs in zip(bound, plain):
        np.testing.assert_array_equal(ours, theirs)


def test_float16_precision_converts_at_load(tmp_path) -> None:
    """config.json's "precision": "float16" serves a float32 graph converted to float16
    (inputs and outputs kept float32): its heatmaps match the float32 model's; a graph that is
    float16 already, or an unknown precision, is refused with the reason."""
    import numpy as np
    import onnx
    from onnxconverter_common import float16

    from gradcam_server.model import Explaining
    from gradcam_server.repository import ModelRepository
    from servers import TINY_SIZE, export_torch, tiny_cnn, write_config

    root = tmp_path / "repository"
    for name, config in (("float32", {}), ("half", {"precision": "float16"}),
                         ("twice", {"precision": "float16"}), ("typo", {"precision": "fp8"})):
        export_torch(tiny_cnn(), TINY_SIZE, root / name / "model.onnx", dynamic_batch=True)
        write_config(root / name, **config)
    onnx.save(float16.convert_float_to_float16(onnx.load(root / "twice" / "model.onnx")),
              root / "twice" / "model.onnx")
    repository = ModelRepository(root, runtime.RuntimeOptions("cpu", 1))
    repository.load_all()
    statuses = {s.name: s for s in repository.statuses()}
    assert "float16 already" in statuses["twice"].reason
    assert "'precision' must be one of float32, float16" in statuses["typo"].reason

    half, full = repository.get("half"), repository.get("float32")
    assert half.input.dtype == np.float32
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in half._proto.graph.initializer)
    x = np.random.default_rng(1).normal(size=(2, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    classes = np.array([2, -1])
    ours = half.explain(x, classes, half.resolve(Explaining()))["heatmap"]
    theirs = full.explain(x, classes, full.resolve(Explaining()))["heatmap"]
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.999


def _niceness(thread_id: str) -> int:
    """A thread's niceness, from /proc (field 19 of its stat line)."""
    stat = (Path("/proc/self/task") / thread_id / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness per thread: Linux")
def test_a_sessions_threads_run_nicer_and_its_caller_does_not() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(os.listdir("/proc/self/task"))
    session = runtime.create_session(
        runtime._probe_model(), runtime.RuntimeOptions("cpu", intra_op_threads=2, nice=3))
    spawned = set(os.listdir("/proc/self/task")) - before
    assert spawned, "onnxruntime spawned no intra-op thread"
    assert {_niceness(thread) for thread in spawned} == {min(base + 3, 19)}
    assert os.getpriority(os.PRIO_PROCESS, 0) == base
    x = np.array([-1.0], np.float32)
    assert session.run(None, {"x": x})[0].tolist() == [0.0]
    # without a niceness, nothing is spawned nicer
    before = set(os.listdir("/proc/self/task"))
    plain = runtime.create_session(
        runtime._probe_model(), runtime.RuntimeOptions("cpu", intra_op_threads=2))
    assert {_niceness(t) for t in set(os.listdir("/proc/self/task")) - before} == {base}
    del session, plain


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="niceness per thread: Linux")
def test_the_engines_runtime_threads_run_nicer() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    engine = Engine(nice=3)
    niceness = engine._runtime.submit(os.getpriority, os.PRIO_PROCESS, 0).result()
    assert niceness == min(base + 3, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base


def test_the_runs_niceness_is_a_server_option() -> None:
    assert parse_args(["--model-repository", "m"]).compute_nice == DEFAULT_COMPUTE_NICE > 0
    assert parse_args(["--model-repository", "m", "--compute-nice", "0"]).compute_nice == 0
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", "m", "--compute-nice", "20"])
