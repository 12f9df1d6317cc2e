"""What a step frees goes back to the system (glibc), so that a step's peak resident size is what it holds; what
the step's peak is made of (`memory/*`)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from twofold import metrics as M
from twofold.pipeline import os_memory
from twofold.pipeline.memory import memory_metrics

PROBE = textwrap.dedent(
    """
    import sys, torch
    from twofold.pipeline.os_memory import resident_bytes, return_freed_memory_to_os, trim_heap
    if sys.argv[1] == "fixed":
        assert return_freed_memory_to_os()
    big = torch.ones(8 << 18); del big  # an 8 MiB block freed: glibc's threshold rises past 4 MiB blocks
    before = resident_bytes()
    blocks, spacers = [], []
    block_bytes = int(sys.argv[2])
    for _ in range((256 << 20) // block_bytes):  # 256 MiB in blocks, each followed by a 64 KiB one that stays:
        blocks.append(torch.ones(block_bytes // 4))  # freed, the blocks are holes inside the heap, which it
        spacers.append(torch.ones(1 << 14))  # cannot hand back by shrinking
    del blocks
    if sys.argv[1] == "trimmed":
        assert trim_heap()
    print((resident_bytes() - before) / 2**20 - len(spacers) / 16)  # MiB kept beyond the spacers
    """
)


def kept_mib(mode: str, block_bytes: int = 4 << 20) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(block_bytes)], check=True, capture_output=True, text=True
    ).stdout
    return float(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_freed_blocks_leave_the_resident_size():
    """Unfixed, glibc keeps the 256 MiB of freed 4 MiB blocks in its heap; with the threshold fixed at 512 KiB
    each block was its own mapping and went back when freed: 4 MiB blocks, and 768 KiB ones (layer temporaries
    of SmolLM2's size), which a 1 MiB threshold would keep."""
    assert kept_mib("default") > 200
    assert kept_mib("fixed") < 16
    assert kept_mib("default", 768 << 10) > 200
    assert kept_mib("fixed", 768 << 10) < 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_trim_hands_back_the_holes_a_phase_left():
    """The same 256 MiB of holes, kept by the default threshold, go back at `trim_heap` (malloc_trim releases
    the free pages inside the heap, not only its top): what the pipeline does once before measuring its
    baseline, after a GGUF conversion or a warm start that ran in the process."""
    assert kept_mib("trimmed") < 16


BOUNDED = textwrap.dedent(
    """
    import torch
    from twofold.pipeline.os_memory import free_heap_bytes, resident_bytes, trim_heap
    big = torch.ones(8 << 18); del big  # as in PROBE: 4 MiB blocks then stay in the heap
    blocks, spacers = [], []
    for _ in range(64):
        blocks.append(torch.ones(1 << 20))
        spacers.append(torch.ones(1 << 14))
    del blocks
    free = free_heap_bytes()
    before = resident_bytes()
    print(free >= 256 << 20, trim_heap(1 << 40), (before - resident_bytes()) >> 20)  # more free than held: nothing
    print(trim_heap(128 << 20), (before - resident_bytes()) >> 20)  # 256 MiB free, over a 128 MiB bound: trimmed
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc")
def test_a_bounded_trim_runs_only_when_the_arenas_hold_that_much_free():
    """The 256 MiB of holes count as free (`mallinfo2`); a bound above them leaves them resident, one below
    hands them back."""
    out = subprocess.run([sys.executable, "-c", BOUNDED], check=True, capture_output=True, text=True).stdout
    (counted, above, kept), (below, released) = (line.split() for line in out.splitlines())
    assert (counted, above, below) == ("True", "False", "True")
    assert int(kept) < 16 and int(released) > 200


ARENAS = textwrap.dedent(
    """
    import ctypes, sys, threading
    from twofold.pipeline.os_memory import limit_malloc_arenas
    print(limit_malloc_arenas(int(sys.argv[1])))
    barrier = threading.Barrier(4)
    def work():  # four threads allocate while all four are alive: none can take over another's arena
        block = bytearray(100_000)
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ctypes.CDLL(None).malloc_stats()  # to stderr, one "Arena N:" block per arena
    """
)


def arenas(limit: int, env: dict | None = None) -> tuple[str, int]:
    run = subprocess.run(
        [sys.executable, "-c", ARENAS, str(limit)], check=True, capture_output=True, text=True, env=env
    )
    return run.stdout.strip(), sum(line.startswith("Arena ") for line in run.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_malloc_arenas_are_capped_unless_the_environment_says_otherwise():
    """glibc opens an arena for each thread's first allocation while it has fewer than 8 per core: the main
    thread's and one per worker thread, 1 + 4. Capped at 2, the four threads share the second."""
    assert arenas(0) == ("False", 5)  # 0: glibc's default
    assert arenas(2) == ("True", 2)
    assert arenas(2, env={**os.environ, "MALLOC_ARENA_MAX": "3"}) == ("False", 3)  # the user's setting stands


class GrowingStatus:
    """A /proc/self/status whose process grows by one 4 kB page between reads, with the kernel's rule that
    VmHWM is at least the VmRSS of the same read."""

    def __init__(self):
        self.reads = 0

    def read_text(self) -> str:
        self.reads += 1
        rss_kb = 1000 + 4 * self.reads
        return f"Name:\tpython\nVmHWM:\t{max(900, rss_kb)} kB\nVmRSS:\t{rss_kb} kB\nThreads:\t3\n"


def test_the_resident_size_and_its_peak_come_from_one_read(monkeypatch):
    """A thread that faults in a page between two reads would leave the first read's peak below the second's
    resident size (a suite run saw 2,355,068,928 < 2,355,073,024): both come from the first read."""
    status = GrowingStatus()
    monkeypatch.setattr(os_memory, "STATUS", status)
    assert os_memory.resident_and_peak_bytes() == (1004 * 1024, 1004 * 1024)
    assert status.reads == 1
    assert os_memory.peak_resident_bytes() == 1008 * 1024 < os_memory.resident_bytes() == 1012 * 1024  # two reads
    monkeypatch.setattr(os_memory, "STATUS", os_memory.Path("/nonexistent/status"))
    assert os_memory.resident_and_peak_bytes() == (None, None)


def test_the_engine_s_prefix_cache_is_a_named_part_of_the_step_peak():
    """What the engine keeps across calls is taken from the step's peak with the other named parts: 64 MiB more of
    it leaves 64 MiB less transient (to 1 MiB: the peak may grow between the two calls)."""
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    parts = dict(engine_bytes=0, oldlogit_bytes=0, peak_was_reset=True, baseline_bytes=2**20)
    without = memory_metrics(model, optimizer, engine_cache_bytes=0, **parts)
    cached = memory_metrics(model, optimizer, engine_cache_bytes=64 * 2**20, **parts)
    assert cached[M.MEMORY_ENGINE_PREFIX_CACHE] == 64 * 2**20 and without[M.MEMORY_ENGINE_PREFIX_CACHE] == 0
    gap = without[M.MEMORY_STEP_TRANSIENT] - cached[M.MEMORY_STEP_TRANSIENT]
    assert abs(gap - 64 * 2**20) <= 2**20
