"""Triton model repositories, both ways.

- ``gradcam-augment --triton-repository`` writes a model Triton serves: its config.pbtxt parses
  with Triton's own schema (tritonclient's ``ModelConfig``, strict: a field Triton does not know
  fails), and its inputs and outputs, datatypes and dims equal what onnxruntime reads off the
  written graph. One KServe v2 request, built once with tritonclient, fits that model
  description and gives the same heatmap from the graph run as Triton's onnxruntime backend
  runs it (inputs reshaped as the config says) and from our server on the original model.
- ``gradcam-server`` serves a Triton-layout folder: the newest version, max_batch_size and
  our own settings from the config's parameters, fields of Triton's schema it does not use
  skipped; bad folders are refused with the reason.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton_grpc
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc
from gradcam_server.augment import AugmentError, augment_model, cli
from servers import TINY_CLASSES, TINY_SIZE, export_torch, export_two_heads, serving, tiny_cnn

pytestmark = pytest.mark.slow

ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
TRITON_TO_KSERVE = {"TYPE_FP32": "FP32", "TYPE_INT64": "INT64"}


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plain") / "tiny"
    export_torch(tiny_cnn(), TINY_SIZE, folder / "model.onnx", dynamic_batch=True)
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def written(plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    assert cli.main([str(plain_model), "--triton-repository", str(root),
                     "--method", "gradcam++", "--max-batch-size", "4"]) == 0
    return root / "tiny"  # named after the folder of a model.onnx


def _triton_config(folder: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


def test_written_config_is_a_triton_model_config_describing_the_graph(written: Path) -> None:
    config = _triton_config(written)
    assert (config.name, config.backend, config.max_batch_size) == ("tiny", "onnxruntime", 4)
    assert config.HasField("dynamic_batching")
    assert [group.kind for group in config.instance_group] == [
        model_config_pb2.ModelInstanceGroup.KIND_AUTO  # a GPU where Triton has one
    ]
    assert config.parameters["gradcam.method"].string_value == "gradcam++"

    session = ort.InferenceSession(str(written / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    for declared, actual in ((config.input, session.get_inputs()),
                             (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for tensor, value in zip(declared, actual):
            assert model_config_pb2.DataType.Name(tensor.data_type) == ORT_TO_TRITON[value.type]
            shape = [d if isinstance(d, int) else -1 for d in value.shape]
            assert shape[0] == -1  # the batch, left out of Triton's dims
            if len(shape) == 1:  # a per-image scalar: declared [1], reshaped to []
                assert list(tensor.dims) == [1]
                assert tensor.HasField("reshape") and list(tensor.reshape.shape) == []
            else:
                assert list(tensor.dims) == shape[1:]
                assert not tensor.HasField("reshape")
    names = {t.name for t in config.input} | {t.name for t in config.output}
    assert {"input", "target_class", "logits", "heatmap", "activations", "gradients"} <= names


def _request_inputs(x: np.ndarray, classes: np.ndarray) -> list[triton_grpc.InferInput]:
    image = triton_grpc.InferInput("input", list(x.shape), "FP32")
    image.set_data_from_numpy(x)
    target = triton_grpc.InferInput("target_class", list(classes.shape), "INT64")
    target.set_data_from_numpy(classes)
    return [image, target]


def _fits(config: model_config_pb2.ModelConfig, tensor: triton_grpc.InferInput) -> bool:
    """Whether a request tensor fits the config's declaration as Triton checks it: datatype,
    and shape = [batch <= max_batch_size] + dims (-1 matching any size)."""
    declared = next(t for t in config.input if t.name == tensor.name())
    shape = tensor.shape()
    return (
        TRITON_TO_KSERVE[model_config_pb2.DataType.Name(declared.data_type)]
        == tensor.datatype()
        and 1 <= shape[0] <= config.max_batch_size
        and len(shape) == len(declared.dims) + 1
        and all(d == -1 or d == s for d, s in zip(declared.dims, shape[1:]))
    )


def test_one_kserve_request_serves_both_ways(
    plain_model: Path, written: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    classes = np.array([[3], [-1]], dtype=np.int64)  # [N, 1], as Triton declares it
    inputs = _request_inputs(x, classes)
    config = _triton_config(written)
    assert all(_fits(config, tensor) for tensor in inputs)

    # As Triton's onnxruntime backend runs it: each input reshaped to the config's reshape.
    reshapes = {t.name: list(t.reshape.shape) for t in config.input if t.HasField("reshape")}
    feeds = {"input": x, "target_class": classes}
    feeds = {name: value.reshape([len(value), *reshapes[name]]) if name in reshapes else value
             for name, value in feeds.items()}
    session = ort.InferenceSession(str(written / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (as_triton_runs_it,) = session.run(["heatmap"], feeds)

    repository = tmp_path / "repository"
    (repository / "tiny").mkdir(parents=True)
    (repository / "tiny" / "model.onnx").symlink_to(plain_model)
    (repository / "tiny" / "config.json").write_text('{"method": "gradcam++"}')
    with serving(repository, tmp_path / "server.log") as server:
        client = triton_grpc.InferenceServerClient(server.address)
        result = client.infer("tiny", inputs,
                              outputs=[triton_grpc.InferRequestedOutput("heatmap")])
        served = result.as_numpy("heatmap")
    assert served.shape == as_triton_runs_it.shape == (2, TINY_SIZE, TINY_SIZE)
    np.testing.assert_allclose(served, as_triton_runs_it, atol=1e-5)


TRITON_CONFIG = """
name: "tiny"
platform: "onnxruntime_onnx"
max_batch_size: 3
input [{ name: "input", data_type: TYPE_FP32, dims: [3, 32, 32] }]
output [{ name: "logits", data_type: TYPE_FP32, dims: [10] }]
dynamic_batching { max_queue_delay_microseconds: 250 }
instance_group [{ kind: KIND_CPU, count: 2 }]
optimization {
  graph { level: 1 }
  execution_accelerators { gpu_execution_accelerator: [{ name: "tensorrt" }] }
}
model_warmup []
parameters [
  { key: "method", value: { string_value: "layercam" } },
  { key: "labels", value: { string_value: "[\\"zero\\", \\"one\\", \\"two\\", \\"three\\", \\"four\\", \\"five\\", \\"six\\", \\"seven\\", \\"eight\\", \\"nine\\"]" } },
  { key: "max_queue_size", value: { string_value: "16" } }
]
"""


def test_server_serves_the_newest_version_of_a_triton_layout_folder(tmp_path: Path) -> None:
    """Versions 1 and 2 are different networks, 10 a folder without a model: version 2 is
    served, with the config's batching, method and labels; Triton's other fields are skipped.
    A model with two declared inputs serves with the image-shaped one as its image. Beside
    them, a folder whose config names another backend and one whose parameters our config
    check refuses are not served, each with the reason."""
    text_format.Parse(TRITON_CONFIG, model_config_pb2.ModelConfig())  # Triton would take it
    repository = tmp_path / "repository"
    folder = repository / "tiny"
    export_torch(tiny_cnn(seed=1), TINY_SIZE, folder / "1" / "model.onnx", dynamic_batch=True)
    newest = tiny_cnn(seed=2)
    export_torch(newest, TINY_SIZE, folder / "2" / "model.onnx", dynamic_batch=True)
    (folder / "10").mkdir()
    (folder / "config.pbtxt").write_text(TRITON_CONFIG)
    other = repository / "tensorrt"
    export_torch(tiny_cnn(), TINY_SIZE, other / "1" / "model.onnx", dynamic_batch=True)
    (other / "config.pbtxt").write_text('name: "tensorrt"\nbackend: "tensorrt"\n')
    two_inputs = repository / "two_inputs"  # the image input read from the declared inputs
    export_two_heads(two_inputs / "1" / "model.onnx")
    (two_inputs / "config.pbtxt").write_text(
        'max_batch_size: 4\n'
        'input [{ name: "meta", data_type: TYPE_FP32, dims: [1] },\n'
        '       { name: "image", data_type: TYPE_FP32, dims: [3, 32, 32] }]\n'
    )
    misconfigured = repository / "misconfigured"
    export_torch(tiny_cnn(), TINY_SIZE, misconfigured / "1" / "model.onnx", dynamic_batch=True)
    (misconfigured / "config.pbtxt").write_text(
        'parameters { key: "resize" value { string_value: "sideways" } }'
    )

    x = np.random.default_rng(1).normal(size=(1, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    with serving(repository, tmp_path / "server.log") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = gradcam_pb2_grpc.GradCamStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny"), timeout=30)
            listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
        client = triton_grpc.InferenceServerClient(server.address)
        image = triton_grpc.InferInput("input", list(x.shape), "FP32")
        image.set_data_from_numpy(x)
        result = client.infer("tiny", [image], outputs=[
            triton_grpc.InferRequestedOutput("logits"), triton_grpc.InferRequestedOutput("heatmap")
        ])
    with torch.no_grad():
        expected = newest(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
    layercam = ort.InferenceSession(
        augment_model(folder / "2" / "model.onnx", method="layercam").SerializeToString(),
        providers=["CPUExecutionProvider"],
    ).run(["heatmap"], {"input": x, "target_class": np.array([-1])})[0]
    np.testing.assert_allclose(result.as_numpy("heatmap"), layercam, atol=1e-5)
    assert info.max_batch_size == 3 and info.has_labels and info.num_classes == TINY_CLASSES
    statuses = {m.name: m for m in listed.models}
    assert statuses["two_inputs"].ready, statuses["two_inputs"].reason
    assert not statuses["tensorrt"].ready and "backend 'tensorrt'" in statuses["tensorrt"].reason
    assert not statuses["misconfigured"].ready
    assert statuses["misconfigured"].reason.startswith("config.pbtxt parameters: ")
    assert "sideways" in statuses["misconfigured"].reason


def test_an_augmented_graph_is_refused_with_the_reason(written: Path) -> None:
    """A Triton repository written by gradcam-augment holds augmented graphs: augmenting one
    again is refused by name, not with a confusing second image input."""
    with pytest.raises(AugmentError, match="already augmented"):
        augment_model(written / "1" / "model.onnx")
