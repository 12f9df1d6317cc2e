"""What a step frees goes back to the system (glibc), so that a step's peak resident size is what it holds."""

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import sys, torch
    from twofold.pipeline.memory import resident_bytes, return_freed_memory_to_os, trim_heap
    if sys.argv[1] == "fixed":
        assert return_freed_memory_to_os()
    big = torch.ones(8 << 18); del big  # an 8 MiB block freed: glibc's threshold rises past 4 MiB blocks
    before = resident_bytes()
    blocks, spacers = [], []
    for _ in range(64):  # 64 blocks of 4 MiB, each followed by a 64 KiB one that stays: freed, the blocks are
        blocks.append(torch.ones(1 << 20))  # holes inside the heap, which it cannot hand back by shrinking
        spacers.append(torch.ones(1 << 14))
    del blocks
    if sys.argv[1] == "trimmed":
        assert trim_heap()
    print((resident_bytes() - before) / 2**20)
    """
)


def kept_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True).stdout
    return float(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_freed_blocks_leave_the_resident_size():
    """Unfixed, glibc keeps the 256 MiB of freed 4 MiB blocks in its heap; with the threshold fixed at 1 MiB each
    block was its own mapping and went back when freed."""
    assert kept_mib("default") > 200
    assert kept_mib("fixed") < 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_trim_hands_back_the_holes_a_phase_left():
    """The same 256 MiB of holes, kept by the default threshold, go back at `trim_heap` (malloc_trim releases
    the free pages inside the heap, not only its top): what the pipeline does once before measuring its
    baseline, after a GGUF conversion or a warm start that ran in the process."""
    assert kept_mib("trimmed") < 16
