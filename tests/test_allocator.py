"""The server's allocator policy (`gradcam_server.allocator`): a large block freed and asked
for again is reused, so touching it costs no page faults; glibc's default maps it anew."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradcam_server.server import parse_args

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

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


def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    reused = _rounds("reuse")
    assert reused["applied"] is True
    assert max(reused["faults"]) < PAGES / 20, reused["faults"]


def _huge_pages_always() -> bool:
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


@pytest.mark.skipif(_huge_pages_always(), reason="new memory comes in 2 MiB pages here")
def test_without_the_policy_every_large_block_faults_anew() -> None:
    # What the policy saves: glibc maps each block above its mmap threshold afresh
    assert min(_rounds("default")["faults"]) > PAGES * 0.9


def test_the_policy_is_on_unless_the_command_line_turns_it_off() -> None:
    assert parse_args(["--model-repository", "models"]).return_freed_memory is False
    assert parse_args(["--model-repository", "models",
                       "--return-freed-memory"]).return_freed_memory is True
