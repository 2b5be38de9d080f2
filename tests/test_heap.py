"""schemas.heap: the aggregator's and the agent's freed model-sized buffers are reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from schemas.heap import keep_heap

PROBE = """
import os, resource
from schemas.heap import keep_heap, return_big_buffers
keep_heap()
if os.environ.get("CHUNKED") == "1":
    return_big_buffers()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bufs = [bytearray(4 * 2**20) for _ in range(10)]  # ten 4 MiB payloads live at once, then freed
del bufs
f0 = faults()
for _ in range(5):  # five more rounds of the same
    bufs = [bytearray(4 * 2**20) for _ in range(10)]
    del bufs
print(faults() - f0)
"""


def _round_faults(keep: str, chunked: str = "0") -> int:
    env = {**os.environ, "FEDWB_KEEP_HEAP": keep, "CHUNKED": chunked}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_model_sized_buffers_are_reused_without_page_faults() -> None:
    """glibc's defaults trim the freed heap top and fault every page of the next round in again (5 x 40 MiB:
    ~51,000 faults measured); with keep_heap() the pages stay and the same rounds fault (almost) none."""
    default, kept = _round_faults("0"), _round_faults("1")
    assert default > 5 * 10 * 1024 // 2, default  # the default really refaults: this test can tell
    assert kept < default // 20, (kept, default)


def test_keep_heap_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDWB_KEEP_HEAP", "0")
    assert keep_heap() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_chunked_models_return_big_buffers_on_free() -> None:
    """For models that travel in chunks the aggregator and the agent call return_big_buffers() after keep_heap():
    blocks of 1 MiB or more are then unmapped when freed (so gigabytes of chunk buffers never pile up) and
    every round maps them afresh."""
    assert _round_faults("1", chunked="1") > 5 * 10 * 1024 // 2
