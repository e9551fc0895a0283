"""The execution-provider probe: one log line with the provider chosen, nothing else on stderr."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gradcam_server import runtime


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
