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
