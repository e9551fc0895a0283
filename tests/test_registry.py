"""The registries agree: each entry of gradcam_common's METHODS has its augmenter class, its
typed API enum value and a reference test that runs it; each score target has its class and is
documented for requests; the README names every method."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from pathlib import Path

from gradcam_common.methods import METHODS
from gradcam_proto import gradcam_pb2
from gradcam_server.augment.methods import CAM_METHODS, CamMethod
from gradcam_server.augment.scores import SCORE_TARGETS, SCORES, ScoreTarget

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = [entry.name for entry in METHODS]


def exercised_methods(test: Callable) -> set[str]:
    """The methods a test function runs: the values of its parametrized ``method`` argument,
    and the methods its body names as ``method="..."``."""
    methods = set(re.findall(r'method="([^"]+)"', inspect.getsource(test)))
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "method" not in names:
            continue
        for values in mark.args[1]:
            values = getattr(values, "values", values)  # a pytest.param's values
            if len(names) == 1:
                methods.add(values[0] if isinstance(values, tuple) else values)
            else:
                methods.add(values[names.index("method")])
    return methods


def test_every_method_has_its_class() -> None:
    assert list(CAM_METHODS) == METHOD_NAMES  # an entry without a class is not served
    for entry in METHODS:
        cam_method = CAM_METHODS[entry.name]
        assert isinstance(cam_method, CamMethod) and cam_method.entry is entry
    assert len({type(m) for m in CAM_METHODS.values()}) == len(METHODS)


def test_every_method_has_its_enum_value_and_every_value_a_method() -> None:
    declared = set(gradcam_pb2.Method.keys()) - {"METHOD_UNSPECIFIED"}
    assert sorted(entry.enum for entry in METHODS) == sorted(declared)


def test_every_method_has_a_reference_test_that_runs_it() -> None:
    import test_methods

    assert sorted(test_methods.REFERENCE_TESTS) == sorted(METHOD_NAMES)
    for name, test in test_methods.REFERENCE_TESTS.items():
        assert inspect.getmodule(test) is test_methods and test.__name__.startswith("test_")
        assert name in exercised_methods(test), f"{test.__name__} does not run {name}"


def test_every_method_explains_the_shipped_model() -> None:
    import test_every_method

    test = test_every_method.test_method_explains_the_cat_on_the_shipped_model
    assert exercised_methods(test) == set(METHOD_NAMES)


def test_every_score_has_its_class() -> None:
    assert SCORES == tuple(SCORE_TARGETS)
    for name, target in SCORE_TARGETS.items():
        assert isinstance(target, ScoreTarget) and target.name == name
    assert len({type(t) for t in SCORE_TARGETS.values()}) == len(SCORES)


def test_every_score_is_documented_for_requests() -> None:
    """In the typed API's protocol, which the server and the client share, and in the model
    folder's config.json keys (the server's config.py)."""
    proto = (ROOT / "proto" / "gradcam_proto" / "gradcam.proto").read_text()
    comments = " ".join(line.split("//", 1)[1] for line in proto.splitlines() if "//" in line)
    config = (ROOT / "server" / "gradcam_server" / "config.py").read_text()
    score_row = re.search(r"^``score``.*?(?=^``)", config, re.MULTILINE | re.DOTALL).group(0)
    for name in SCORES:
        assert f'"{name}"' in comments, f"gradcam.proto does not document score {name!r}"
        assert f'"{name}"' in score_row, f"config.py's score row does not name {name!r}"


def test_readme_names_every_method_in_its_list_and_its_cost_table() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("Methods, chosen per request (`method`):")
    paragraph, table = readme[start:].split("\n\n", 2)[:2]
    listed = set(re.findall(r"`([^`\s]+)`", paragraph)) - {"method", "--grayscale"}
    assert listed == set(METHOD_NAMES)
    rows = [line for line in table.splitlines()[1:] if line.startswith("| `")]
    costed = [name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])]
    assert sorted(costed) == sorted(METHOD_NAMES)
