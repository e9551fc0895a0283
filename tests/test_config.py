"""A model folder's config.json: what `read_config` accepts and refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradcam_server.config import ConfigError, read_config


def write(folder: Path, **config: object) -> None:
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def test_labels_may_be_a_symbolic_link_to_a_file_elsewhere(tmp_path: Path) -> None:
    shared = tmp_path / "shared-labels.txt"
    shared.write_text("cat\ndog\n", encoding="utf-8")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "labels.txt").symlink_to(shared)
    write(folder, labels="labels.txt")
    assert read_config(folder, lambda image: (32, 32)).labels == ("cat", "dog")


@pytest.mark.parametrize("name", ["../labels.txt", "sub/../../labels.txt", "/etc/hostname", ""])
def test_labels_must_not_lead_out_of_the_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / "labels.txt").write_text("cat\n", encoding="utf-8")
    folder = tmp_path / "model"
    folder.mkdir()
    write(folder, labels=name)
    with pytest.raises(ConfigError, match="inside the model folder"):
        read_config(folder, lambda image: (32, 32))


def test_target_layout_prefix_tokens_and_grid(tmp_path: Path) -> None:
    write(tmp_path, target_layout="tokens", prefix_tokens=1, grid="14x14")
    config = read_config(tmp_path, lambda image: (224, 224))
    assert (config.target_layout, config.prefix_tokens, config.grid) == ("tokens", 1, (14, 14))
    write(tmp_path, grid=[7, 9])  # a list, and the layout left to detection
    config = read_config(tmp_path, lambda image: (224, 224))
    assert (config.target_layout, config.prefix_tokens, config.grid) == (None, None, (7, 9))
    write(tmp_path, target_layout="nhwc", layout="NHWC")  # the layer's and the image's
    config = read_config(tmp_path, lambda image: (224, 224))
    assert config.target_layout == "nhwc" and config.preprocessing.layout == "NHWC"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_layout": "NHWC"},
         "'target_layout' must be one of nchw, nhwc, tokens, got 'NHWC'"),
        ({"target_layout": ""}, "'target_layout' must be a non-empty string"),
        ({"prefix_tokens": -1}, "'prefix_tokens' must be an integer >= 0"),
        ({"prefix_tokens": 65}, "'prefix_tokens' must be an integer in 0..64"),
        ({"prefix_tokens": "1"}, "'prefix_tokens' must be an integer >= 0"),
        ({"grid": "14 by 14"}, "grid must be rows x columns"),
        ({"grid": [14]}, "got [14]"),
        ({"grid": [0, 14]}, "grid must be rows x columns"),
        ({"grid": [True, 14]}, "grid must be rows x columns"),
        ({"grid": "x" * 500}, "got 'xxxxxxxx"),
        ({"target_layout": "nhwc", "grid": [14, 14]},
         "'prefix_tokens' and 'grid' apply to the tokens layout, not nhwc"),
        ({"target_layout": "nchw", "prefix_tokens": 0},
         "'prefix_tokens' and 'grid' apply to the tokens layout, not nchw"),
    ],
)
def test_bad_target_layouts_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    write(tmp_path, **config)
    with pytest.raises(ConfigError, match="config.json") as raised:
        read_config(tmp_path, lambda image: (224, 224))
    assert message in str(raised.value)
    assert len(str(raised.value)) < 300  # a long value is echoed cut


def test_detector_keys(tmp_path: Path) -> None:
    write(tmp_path, score="detection", score_output="scores", boxes_output="boxes",
          detection_format="nca", box_format="cxcywh", iou_threshold=0.3)
    config = read_config(tmp_path, lambda image: (320, 320))
    assert (config.score, config.score_output, config.boxes_output, config.detection_format,
            config.box_format, config.iou_threshold) == (
        "detection", "scores", "boxes", "nca", "cxcywh", 0.3)
    write(tmp_path)
    assert read_config(tmp_path, lambda image: (320, 320)).iou_threshold == 0.5


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"score": "boxes"}, "'score' must be one of logit, probability"),
        ({"score": "detection", "detection_format": "xywh"},
         "'detection_format' must be one of nac, nca, yolo"),
        ({"score": "detection", "box_format": "yxyx"}, "'box_format' must be one of xyxy"),
        ({"score": "detection", "iou_threshold": 1.5}, "'iou_threshold' must be a number in"),
        ({"score": "detection", "iou_threshold": True}, "'iou_threshold' must be a number in"),
        ({"boxes_output": "boxes"}, "apply to detectors: set 'score' to \"detection\""),
        ({"score": "logit", "iou_threshold": 0.3}, "apply to detectors"),
    ],
)
def test_bad_detector_keys_are_refused(tmp_path: Path, config: dict, message: str) -> None:
    write(tmp_path, **config)
    with pytest.raises(ConfigError, match="config.json") as raised:
        read_config(tmp_path, lambda image: (224, 224))
    assert message in str(raised.value)


@pytest.mark.parametrize(("value", "expected"), [(None, 1), (1, 1), (2, 2), (8, 8)])
def test_instances_default_to_one(tmp_path: Path, value, expected: int) -> None:
    write(tmp_path, **({} if value is None else {"instances": value}))
    assert read_config(tmp_path, lambda image: (224, 224)).instances == expected


@pytest.mark.parametrize(("value", "message"), [
    (0, "'instances' must be an integer >= 1"), (True, "'instances' must be an integer >= 1"),
    (9, "'instances' must be an integer in 1..8"), ("2", "'instances' must be an integer >= 1"),
])
def test_bad_instances_are_refused(tmp_path: Path, value, message: str) -> None:
    write(tmp_path, instances=value)
    with pytest.raises(ConfigError, match="config.json") as raised:
        read_config(tmp_path, lambda image: (224, 224))
    assert message in str(raised.value)
