"""The committed stubs match their .proto files, and the typed API names every method."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from gradcam_proto import gradcam_pb2
from gradcam_server.explain_api import METHOD_NAMES
from gradcam_server.model import METHODS

PROTO_DIR = Path(__file__).resolve().parents[1] / "proto"


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("generate", PROTO_DIR / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*"))
    assert fresh, "protoc produced nothing"
    for relative in fresh:
        committed = PROTO_DIR / relative
        assert committed.read_text() == (tmp_path / relative).read_text(), (
            f"{relative} is stale: run python proto/generate.py"
        )


def test_typed_api_names_every_served_method() -> None:
    assert sorted(METHOD_NAMES.values()) == sorted(METHODS)
    declared = set(gradcam_pb2.Method.values()) - {gradcam_pb2.METHOD_UNSPECIFIED}
    assert declared == set(METHOD_NAMES)
