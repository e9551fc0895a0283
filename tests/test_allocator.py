"""The server's memory policy (`gradcam_server.allocator`): a large block freed and asked for
again is reused, so touching it costs no page faults (glibc's default maps it anew); and what
start-up made is left out of garbage collection, which still collects what comes after."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gradcam_server.server import parse_args
from servers import ROOT, serving

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

BLOCK_BYTES = 46 * 2**20  # one of the health scenario's answers
PAGES = BLOCK_BYTES // 4096

# A fresh interpreter (the policy is process-wide): fill a new block, free it, ten times; print
# the minor page faults each round took after the first. A bytes object, as gRPC's buffers and
# the serialized answers are (numpy asks the kernel for huge pages for its large arrays).
_ROUNDS = textwrap.dedent(f"""
    import json, resource, sys
    from gradcam_server.allocator import reuse_freed_memory
    applied = reuse_freed_memory() if sys.argv[1] == "reuse" else None
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = b"\\x01" * {BLOCK_BYTES}  # malloc, then every page written
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({{"applied": applied, "faults": faults[1:]}}))
""")


def _rounds(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True,
                          text=True, check=True, timeout=60)
    return json.loads(done.stdout)


@glibc_only
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    reused = _rounds("reuse")
    assert reused["applied"] is True
    assert max(reused["faults"]) < PAGES / 20, reused["faults"]


def _huge_pages_always() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@glibc_only
@pytest.mark.skipif(_huge_pages_always(), reason="new memory comes in 2 MiB pages here")
def test_without_the_policy_every_large_block_faults_anew() -> None:
    # What the policy saves: glibc maps each block above its mmap threshold afresh
    assert min(_rounds("default")["faults"]) > PAGES * 0.9


def test_the_policy_is_on_unless_the_command_line_turns_it_off() -> None:
    assert parse_args(["--model-repository", "models"]).return_freed_memory is False
    assert parse_args(["--model-repository", "models",
                       "--return-freed-memory"]).return_freed_memory is True


# A fresh interpreter (freezing is process-wide): long-lived objects made first, as the models'
# are; then frozen; then cycles made and dropped, as requests may leave them.
_FREEZE = textwrap.dedent("""
    import gc, json, weakref
    from gradcam_server.allocator import freeze_startup_objects
    kept = [[row] for row in range(200_000)]
    tracked_before = len(gc.get_objects())
    moved = freeze_startup_objects()
    tracked_after = len(gc.get_objects())

    class Node:
        pass

    dropped = []
    for _ in range(1_000):
        node = Node()
        node.self = node
        dropped.append(weakref.ref(node))
    del node
    gc.collect()
    print(json.dumps({"before": tracked_before, "moved": moved, "after": tracked_after,
                      "cycles_left": sum(ref() is not None for ref in dropped),
                      "kept": len(kept)}))
""")


def test_start_up_objects_are_left_out_and_later_cycles_still_collected() -> None:
    done = subprocess.run([sys.executable, "-c", _FREEZE], capture_output=True, text=True,
                          check=True, timeout=60)
    counts = json.loads(done.stdout)
    assert counts["before"] > 200_000 and counts["moved"] >= 200_000, counts
    assert counts["after"] < 0.01 * counts["before"], counts  # what a full collection walks
    assert counts["cycles_left"] == 0, counts


def test_the_server_freezes_what_it_loaded_once_the_models_are_loaded(tmp_path: Path) -> None:
    with serving(ROOT / "models", tmp_path / "server.log") as server:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            frozen = re.search(r"(\d+) objects made at start-up left out of garbage collection",
                               server.log())
            if frozen:
                break
            time.sleep(0.1)
        log = server.log()
    assert frozen, log
    assert int(frozen[1]) > 10_000  # the imports, the model and its sessions
    assert log.index("models ready") < log.index("left out of garbage collection")
