"""Shared fixtures for the end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import zoo


@pytest.fixture(scope="session")
def onnx_zoo(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``get(name, exporter) -> Path`` of the zoo model exported to ONNX.

    Exports happen lazily, at most once per model and exporter per test run, into one session
    temporary directory (the dynamo exporter may write ``<file>.data`` beside the file).
    """
    root = tmp_path_factory.mktemp("onnx_zoo")
    paths: dict[tuple[str, str], Path] = {}

    def get(name: str, exporter: str) -> Path:
        key = (name, exporter)
        if key not in paths:
            target = root / f"{name}-{exporter}.onnx"
            paths[key] = zoo.export_onnx(name, exporter, target, check=False)
        return paths[key]

    get.exported = paths  # which models this run has exported so far
    return get
