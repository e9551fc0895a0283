"""A detector served end to end: torchvision's SSDlite exported with its raw head
(`detectors.RawDetector`), its config.json saying score "detection", explained through the typed
API (the SDK), KServe and the command line.

- Each requested detection (by box index, or by box and class) gets one map, equal to the
  augmented graph run directly on the same rows (the graph itself is checked against torch and
  pytorch-grad-cam in test_detection.py); boxes sent in an encoded image's pixels are scaled to
  the model's input and the explained box comes back in the image's pixels.
- Bad boxes and indices, and a box no anchor of the class overlaps, are INVALID_ARGUMENT with a
  message saying what was wrong; the server keeps serving.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from PIL import Image

import detectors
import servers
import zoo
from gradcam_client import DetectionTarget, GradCamClient, InvalidInputError
from gradcam_proto import gradcam_pb2 as pb
from gradcam_proto import gradcam_pb2_grpc
from gradcam_server.augment import augment_model
from gradcam_server.config import read_config
from gradcam_server.preprocess import to_tensor
from servers import expect_error

pytestmark = pytest.mark.slow

SIZE = detectors.SSD_SIZE
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BOX = (60.0, 80.0, 220.0, 240.0)  # model pixels
IMAGE_BOX = (120.0, 60.0, 300.0, 230.0)  # pixels of the sample photo (451 x 300)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ssdlite") / "model.onnx"
    return detectors.export_raw(detectors.ssdlite(), path, SIZE)


@pytest.fixture(scope="module")
def repository(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("detectors")
    (root / "ssdlite").mkdir()
    (root / "ssdlite" / "model.onnx").symlink_to(model_path)
    servers.write_config(root / "ssdlite", score="detection", size=[SIZE, SIZE],
                         iou_threshold=0.5, background_class=0)  # SSD's class 0: background
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    with servers.serving(repository, log) as process:
        yield process


@pytest.fixture(scope="module")
def sdk(server) -> GradCamClient:
    with GradCamClient(server.address, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def direct(model_path: Path):
    """The augmented graph, run on rows (image, class, index, box in model pixels)."""
    session = zoo.ort_session(augment_model(model_path, score="detection",
                                            background_class=0).SerializeToString())

    def run(x, classes, indices, boxes) -> dict[str, np.ndarray]:
        feeds = {"input": np.asarray(x, np.float32),
                 "target_class": np.asarray(classes, np.int64),
                 "detection_index": np.asarray(indices, np.int64),
                 "reference_box": np.asarray(boxes, np.float32)}
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    return run


def test_typed_api_explains_each_detection(sdk: GradCamClient, direct) -> None:
    """One tensor image, two detections: by box and class, and by index with a reference box
    (score plus IoU); each map is the direct graph's, with its detection reported."""
    x = zoo.sample_batch(1, SIZE)
    wanted = [DetectionTarget(box=BOX, class_index=5), DetectionTarget(index=1234, box=BOX)]
    explained = sdk.explain(x, model="ssdlite", detections=wanted, heatmap_size="model")[0]
    reference = direct(np.repeat(x, 2, axis=0), [5, -1], [-1, 1234], [BOX, BOX])
    assert len(explained.heatmaps) == 2
    for row, heatmap in enumerate(explained.heatmaps):
        np.testing.assert_allclose(heatmap.heatmap, reference["heatmap"][row], atol=1e-5)
        assert heatmap.class_index == reference["detection_class"][row]
        assert heatmap.detection.index == reference["explained_detection"][row]
        np.testing.assert_allclose(heatmap.detection.iou, reference["detection_iou"][row],
                                   rtol=1e-5)
        np.testing.assert_allclose(heatmap.detection.box, reference["detection_box"][row],
                                   rtol=1e-4)
    assert explained.heatmaps[1].detection.index == 1234
    assert explained.heatmaps[0].detection.iou >= 0.5


def test_encoded_image_boxes_are_in_its_pixels(sdk: GradCamClient, direct,
                                               tmp_path: Path) -> None:
    """The photo (451 x 300) is resized whole to 320 x 320: the box is scaled per axis on the
    way in and the explained box on the way out; the overlay outlines it."""
    width, height = Image.open(servers.SAMPLE).size
    explained = sdk.explain(servers.SAMPLE, model="ssdlite",
                            detections=[DetectionTarget(box=IMAGE_BOX)])
    config = read_config(servers.SAMPLE.parent / "none", lambda _: (SIZE, SIZE))
    x = to_tensor(Image.open(servers.SAMPLE).convert("RGB"), config.preprocessing)[None]
    sx, sy = SIZE / width, SIZE / height
    scaled = [IMAGE_BOX[0] * sx, IMAGE_BOX[1] * sy, IMAGE_BOX[2] * sx, IMAGE_BOX[3] * sy]
    reference = direct(x, [-1], [-1], [scaled])
    heatmap = explained.heatmaps[0]
    assert heatmap.heatmap.shape == (height, width)
    assert heatmap.detection.index == reference["explained_detection"][0] >= 0
    box = reference["detection_box"][0]
    np.testing.assert_allclose(heatmap.detection.box,
                               [box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy], rtol=1e-4)
    picture = np.asarray(explained.overlay())
    assert picture.shape == (height, width, 3)
    x1, y1, x2, y2 = heatmap.detection.box  # its outline is drawn in white where inside
    edges = [(round(x), round((y1 + y2) / 2)) for x in (x1, x2)] + [
        (round((x1 + x2) / 2), round(y)) for y in (y1, y2)]
    inside = [(x, y) for x, y in edges if 0 <= x < width and 0 <= y < height]
    assert inside and all((picture[y, x] == 255).all() for x, y in inside)

    out = tmp_path / "overlay.png"
    command = [sys.executable, "-m", "gradcam_client", "explain", str(servers.SAMPLE),
               "--server", sdk.target, "--model", "ssdlite",
               "--box", ",".join(f"{v:g}" for v in IMAGE_BOX), "--detection-index", "1234",
               "--class", "-1", "-o", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    drawn = Image.open(out)  # two maps (the box's, the index's) side by side
    assert drawn.width >= 2 * width and drawn.height >= height


def test_kserve_rows_explain_detections(server, direct) -> None:
    x = zoo.sample_batch(2, SIZE)
    with triton.InferenceServerClient(server.address) as client:
        inputs = [triton.InferInput("input", list(x.shape), "FP32"),
                  triton.InferInput("target_class", [2], "INT64"),
                  triton.InferInput("detection_index", [2], "INT64"),
                  triton.InferInput("reference_box", [2, 4], "FP32")]
        classes, indices = np.array([5, 7]), np.array([-1, 777])
        boxes = np.array([BOX, (0, 0, 0, 0)], np.float32)
        for tensor, value in zip(inputs, (x, classes, indices, boxes)):
            tensor.set_data_from_numpy(value)
        names = ["heatmap", "explained_detection", "detection_iou"]
        result = client.infer("ssdlite", inputs, parameters={"heatmap_size": "model"},
                              outputs=[triton.InferRequestedOutput(n) for n in names])
        reference = direct(x, classes, indices, boxes)
        for name in names:
            np.testing.assert_allclose(result.as_numpy(name), reference[name], atol=1e-5)

        metadata = client.get_model_metadata("ssdlite")
        assert {"detection_index", "reference_box"} <= {i.name for i in metadata.inputs}
        assert {"explained_detection", "detection_box"} <= {o.name for o in metadata.outputs}

        inputs[3].set_data_from_numpy(np.array([(100, 100, 102, 102), BOX], np.float32))
        expect_error(lambda: client.infer("ssdlite", inputs), INVALID,
                     "no detection of class 5 overlaps box [100, 100, 102, 102] with IoU >= 0.5")
        inputs[3].set_data_from_numpy(np.array([(100, 100, 90, 102), BOX], np.float32))
        expect_error(lambda: client.infer("ssdlite", inputs), INVALID, "x1 < x2")


@pytest.mark.parametrize("detection, fragments", [
    (DetectionTarget(box=(1, 2, 3)), ["a box is 4 numbers"]),
    (DetectionTarget(box=(50, 50, 40, 90)), ["x1 < x2 and y1 < y2"]),
    (DetectionTarget(box=(float("nan"), 0, 10, 10)), ["NaN"]),
    (DetectionTarget(box=(0, 0, 400, 100)), ["not inside the image", "320x320"]),
    (DetectionTarget(index=10**6), ["out of range", "3234 pre-NMS boxes"]),
    (DetectionTarget(), ["give a box index or a box"]),
    (DetectionTarget(box=(150, 150, 152, 152), class_index=3),
     ["no detection of class 3 overlaps box [150, 150, 152, 152] with IoU >= 0.5"]),
    (DetectionTarget(box=BOX, class_index=0), ["target_class 0 is the detector's background"]),
])
def test_bad_detections_are_invalid_argument(sdk: GradCamClient, detection, fragments) -> None:
    x = zoo.sample_batch(1, SIZE)
    with pytest.raises(InvalidInputError) as raised:
        sdk.explain(x, model="ssdlite", detections=[detection])
    for fragment in fragments:
        assert fragment in str(raised.value)
    info = sdk.model_info("ssdlite")  # still serving
    assert info.default_score == "detection"


def test_kserve_takes_triton_style_n_by_1_rows(server, direct) -> None:
    """target_class and detection_index as [N, 1] (how Triton declares a batched scalar, and
    its clients send it) explain what [N] does."""
    x = zoo.sample_batch(2, SIZE)
    classes, indices = np.array([5, 7]), np.array([-1, 777])
    boxes = np.array([BOX, (0, 0, 0, 0)], np.float32)
    with triton.InferenceServerClient(server.address) as client:
        inputs = [triton.InferInput("input", list(x.shape), "FP32"),
                  triton.InferInput("target_class", [2, 1], "INT64"),
                  triton.InferInput("detection_index", [2, 1], "INT64"),
                  triton.InferInput("reference_box", [2, 4], "FP32")]
        for tensor, value in zip(inputs, (x, classes[:, None], indices[:, None], boxes)):
            tensor.set_data_from_numpy(value)
        result = client.infer("ssdlite", inputs, parameters={"heatmap_size": "model"},
                              outputs=[triton.InferRequestedOutput("heatmap")])
    np.testing.assert_allclose(result.as_numpy("heatmap"),
                               direct(x, classes, indices, boxes)["heatmap"], atol=1e-5)


def test_oversized_detection_lists_are_refused_before_use(server) -> None:
    """More detection lists than images, too many detections, or a box of many numbers: refused
    before anything is built from them."""
    image = pb.Image(encoded=(servers.SAMPLE).read_bytes())
    with grpc.insecure_channel(server.address) as channel:
        stub = gradcam_pb2_grpc.GradCamStub(channel)
        for detections, fragment in (
            ([pb.ImageDetections()] * 3, "3 lists of detections for 1 images"),
            ([pb.ImageDetections(detections=[pb.DetectionTarget(index=1)] * 21)],
             "give 1..20 detections"),
            ([pb.ImageDetections(detections=[pb.DetectionTarget(box=[1.0] * 100000)])],
             "a box is 4 numbers x1, y1, x2, y2, got 100000"),
        ):
            expect_error(lambda: stub.Explain(pb.ExplainRequest(
                model="ssdlite", images=[image], detections=detections), timeout=30),
                INVALID, fragment)
