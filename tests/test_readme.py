"""Every command and Python snippet of README.md and client/README.md, run as written.

The server is started as the READMEs' ``gradcam-server`` line says, on the shipped model
repository (`servers.ServerProcess`, on free ports instead of 8001 and 8002). Each README then
runs from a folder of its own that holds ``samples`` and ``models`` (links to the repository's),
so that relative paths resolve as from the repository root and what the commands write lands in
that folder's ``out/``. The tools are the installed ``gradcam`` and ``gradcam-augment``, beside
the Python running the tests (``.venv/bin/``). Only the set-up commands (``make ...``) are left
out: they are what runs these tests.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from gradcam_common.overlay import PANEL_GAP
from servers import serving

ROOT = Path(__file__).resolve().parents[1]
README, CLIENT_README = "README.md", "client/README.md"
ADDRESS = "127.0.0.1:8001"  # the READMEs' server, replaced by the test server's address
SERVER_COMMAND = "gradcam-server --model-repository models --port 8001"
SET_UP = "make "
WIDTH, HEIGHT = 451, 300


def _blocks(readme: str, language: str) -> list[str]:
    text = (ROOT / readme).read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(readme: str) -> list[str]:
    """The shell lines of a README, without comments and blank lines."""
    lines = [line.split(" #")[0].strip() for block in _blocks(readme, "sh")
             for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} is not installed beside {sys.executable}"
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for readme in (README, CLIENT_README):
        started = [c for c in _commands(readme) if c.startswith("gradcam-server")]
        assert started == [SERVER_COMMAND], (readme, started)
    with serving(ROOT / "models", tmp_path_factory.mktemp("server") / "server.log") as process:
        yield process.address


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder standing in for the repository root, made the working folder."""
    for name in ("samples", "models"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run_commands(readme: str, server: str, workdir: Path) -> list[tuple[str, str]]:
    """Every command of the README but the server's and the set-up ones: (command, stdout)."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("GRADCAM_SERVER", "GRADCAM_TOKEN")}
    ran = []
    for command in _commands(readme):
        if command.startswith(SET_UP) or command.startswith("gradcam-server"):
            continue
        words = [server if word == ADDRESS else word for word in shlex.split(command)]
        assert words[0] in ("gradcam", "gradcam-augment"), command
        done = subprocess.run([_tool(words[0]), *words[1:]], cwd=workdir, env=environment,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (command, done.stderr)
        ran.append((command, done.stdout))
    return ran


def _run_snippets(readme: str, server: str) -> str:
    printed = io.StringIO()
    with redirect_stdout(printed):
        for block in _blocks(readme, "python"):
            code = block.replace(ADDRESS, server)
            exec(compile(code, readme, "exec"), {"__name__": "__main__"})
    return printed.getvalue()


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as opened:
        return opened.size


def _is_gray(path: Path) -> bool:
    with Image.open(path) as opened:
        pixels = np.asarray(opened.convert("RGB")).astype(int)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


# --- README.md ------------------------------------------------------------------------------


def test_set_up_is_two_make_commands() -> None:
    set_up = [c for c in _commands(README) if c.startswith(SET_UP)]
    assert set_up == ["make demo", "make test"]
    text = (ROOT / README).read_text(encoding="utf-8")
    assert ".venv/bin/gradcam" in text and "source .venv/bin/activate" in text


def test_root_readme_commands(server: str, workdir: Path) -> None:
    ran = dict(_run_commands(README, server, workdir))
    assert len(ran) == 5
    first = next(c for c in ran if c.endswith("-o out/chelsea-gradcam.png"))
    printed = "samples/chelsea.jpg: Egyptian cat (0.81) -> out/chelsea-gradcam.png"
    assert ran[first] == printed + "\n"
    assert f"`{printed}`" in " ".join((ROOT / README).read_text(encoding="utf-8").split())

    out = workdir / "out"
    assert _size(out / "chelsea-gradcam.png") == (WIDTH, HEIGHT)
    width, height = _size(out / "chelsea-top3.png")  # the photo and three maps, captioned
    assert width == 4 * WIDTH + 3 * PANEL_GAP and height > HEIGHT
    assert _size(out / "chelsea-guided.png") == (WIDTH, HEIGHT)
    assert not _is_gray(out / "chelsea-guided.png")  # the signed gradient image, in colour
    with (out / "summary.csv").open(newline="") as file:
        (row,) = csv.DictReader(file)
    assert (row["image"], row["label"]) == ("samples/chelsea.jpg", "Egyptian cat")
    augmented = onnx.load(str(out / "efficientnet_lite0.gradcam.onnx"), load_external_data=False)
    assert "heatmap" in [o.name for o in augmented.graph.output]
    assert sorted(p.name for p in workdir.iterdir()) == ["models", "out", "samples"]


def test_root_readme_snippet(server: str, workdir: Path) -> None:
    printed = _run_snippets(README, server)
    assert printed == "Egyptian cat 0.81\n(300, 451)\n"
    assert _size(workdir / "out" / "chelsea-overlay.png") == (WIDTH, HEIGHT)
    assert sorted(p.name for p in workdir.iterdir()) == ["models", "out", "samples"]


# --- client/README.md -----------------------------------------------------------------------


def test_client_readme_commands(server: str, workdir: Path) -> None:
    ran = _run_commands(CLIENT_README, server, workdir)
    assert len(ran) == 7
    assert ran[0][1] == "SERVING\n"
    assert ran[1][1].startswith("efficientnet_lite0  ready")
    out = workdir / "out"
    assert np.load(out / "chelsea-heatmap.npy").shape == (HEIGHT, WIDTH)
    assert _size(out / "chelsea-top3.png")[0] == 4 * WIDTH + 3 * PANEL_GAP
    assert _size(out / "chelsea-guided-backprop.png")[0] == 2 * WIDTH + PANEL_GAP
    assert np.load(out / "chelsea-guided.npy").shape == (HEIGHT, WIDTH)
    assert np.load(out / "chelsea-guided.gradients.npy").shape == (3, 224, 224)
    assert np.load(out / "chelsea-heatmap-224.npy").shape == (224, 224)  # --heatmap-size model
    assert [p.name for p in (out / "overlays").iterdir()] == ["chelsea.png"]
    (record,) = json.loads((out / "summary.json").read_text())["images"]
    assert record["image"] == "samples/chelsea.jpg" and record["error"] is None
    assert sorted(p.name for p in workdir.iterdir()) == ["models", "out", "samples"]


def test_client_readme_snippets(server: str, workdir: Path) -> None:
    assert len(_blocks(CLIENT_README, "python")) == 3
    printed = _run_snippets(CLIENT_README, server)
    assert "Egyptian cat 0.81" in printed and "(300, 451) float32" in printed
    assert "tabby gradcam++ /_blocks.15/" in printed and "(224, 224) ''" in printed
    assert "(224, 224)\n(48, 64)\n" in printed  # heatmap_size "model", then (64, 48)
    assert "['Egyptian cat', 'Egyptian cat', 'Egyptian cat']" in printed
    assert "(3, 224, 224) float32" in printed  # pixel_gradients
    assert "['Egyptian cat', 'tabby']\n3\nimages[1]\n" in printed  # ExplainOptions, violations
    out = workdir / "out"
    assert _size(out / "chelsea-turbo.png") == (WIDTH, HEIGHT)
    assert _size(out / "chelsea-224.png") == (224, 224)
    assert _size(out / "chelsea-from-224.png") == (WIDTH, HEIGHT)
    assert _size(out / "chelsea-side-by-side.png")[0] == 2 * WIDTH + PANEL_GAP
    assert _size(out / "chelsea-top3-sdk.png")[0] == 4 * WIDTH + 3 * PANEL_GAP
    assert _size(out / "chelsea-guided-sdk.png") == (WIDTH, HEIGHT)
    assert not _is_gray(out / "chelsea-guided-sdk.png")  # the signed gradients, in colour
    assert _is_gray(out / "chelsea-guided-gray.png")
    assert sorted(p.name for p in workdir.iterdir()) == ["models", "out", "samples"]
