"""The process's memory as the operating system sees it, and the glibc malloc settings that decide how much of
what a step frees goes back to it. Imports nothing heavy (no torch), so that a probe process starts at once.

glibc's malloc keeps what a step frees (activations, logits) in its arenas for reuse, and raises its mmap
threshold each time a large block is freed, so blocks up to 32 MiB end up in arenas that never shrink: on
SmolLM2-135M that held ~1 GiB resident between steps (docs/benchmarks.md). `return_freed_memory_to_os` fixes
the threshold, so every block of 512 KiB or more is its own mapping and goes back to the system when freed; each
such block is then page-faulted in afresh, which costs time, so it is opt-in (`run.return_freed_memory`). 512 KiB,
not 1 MiB: on SmolLM2-135M the blocks between the two were a quarter of what the step held beyond its named
parts (docs/benchmarks.md).
Fewer arenas (`limit_malloc_arenas`, `run.malloc_arenas`) leave fewer places for freed blocks to sit: glibc
opens up to 8 per core, one per thread that finds the others locked, and the pipeline's threads (engine,
rollout, env steps) each end up with one. `trim_heap` hands back the free pages inside every arena without
changing how blocks are served: the pipeline calls it at each step's start (in sync mode again after
generation) and before its first optimizer step (`run.trim_heap_each_step`), which costs a page fault per reused
page once per phase, not per allocation.

The peak is Linux's VmHWM, reset by writing 5 to /proc/self/clear_refs; where it is compared with the resident
size, both come from one read of /proc/self/status. Elsewhere (no /proc, no glibc) each function says so (None or
False) and changes nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Callable
from pathlib import Path

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 512 << 10


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, found once (`find_library` runs ldconfig); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def _glibc_call(name: str, *args: int) -> bool:
    """glibc's function `name` (mallopt, malloc_trim) on `args`, as a bool; False where there is no such
    function (musl, macOS) or it returned 0."""
    try:
        return bool(getattr(_libc(), name)(*args))
    except (AttributeError, TypeError):
        return False


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at `arenas` from now on (0: leave glibc's default), unless the user set
    MALLOC_ARENA_MAX themselves; True when glibc took it. Arenas already open stay; call it before the
    threads start. Elsewhere a no-op."""
    if arenas == 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return _glibc_call("mallopt", M_ARENA_MAX, arenas)


def return_freed_memory_to_os() -> bool:
    """Make glibc serve blocks of MMAP_THRESHOLD_BYTES or more from their own mappings (unmapped when freed),
    unless the user set MALLOC_MMAP_THRESHOLD_ themselves; True when glibc took it. Elsewhere a no-op."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    return _glibc_call("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [  # glibc's struct mallinfo2 (malloc.h, glibc >= 2.33), every field a size_t
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
        + ("keepcost",)
    ]


@functools.cache
def _mallinfo2() -> Callable[[], _Mallinfo2] | None:
    """glibc's `mallinfo2`, typed once; None without glibc 2.33 or later."""
    mallinfo2 = getattr(_libc(), "mallinfo2", None)
    if mallinfo2 is not None:
        mallinfo2.restype = _Mallinfo2
    return mallinfo2


def free_heap_bytes() -> int | None:
    """Bytes glibc's arenas hold free, summed over every arena (`mallinfo2().fordblks`); None without glibc
    2.33 or later. Walks the arenas' bins: ~0.1 ms on the tiny model, ~4 ms on SmolLM2-135M."""
    mallinfo2 = _mallinfo2()
    return None if mallinfo2 is None else int(mallinfo2().fordblks)


def trim_heap(min_free_bytes: int = 0) -> bool:
    """Hand back to the system the pages glibc's arenas hold free (`malloc_trim(0)`, every arena): what a
    one-off phase freed (a GGUF file dequantised and saved, a warm start trained in this process) or what a
    step's phases freed would otherwise stay resident under what comes next. With `min_free_bytes`, only when
    the arenas hold at least that much free (where glibc cannot say, always): a trim walks every free block and
    costs a page fault per page reused afterwards, ~4 ms a call on the tiny model, whose arenas hold 50-80 MiB
    free, against 66 ms on SmolLM2-135M, which hands back 0.5-0.9 GiB each time. True when glibc returned
    memory; elsewhere, or below the bound, a no-op."""
    if min_free_bytes > 0:
        free = free_heap_bytes()
        if free is not None and free < min_free_bytes:
            return False
    return _glibc_call("malloc_trim", 0)


def resident_bytes() -> int | None:
    """The process's resident size now (Linux), None elsewhere."""
    return _status_bytes("VmRSS")["VmRSS"]


def peak_resident_bytes() -> int | None:
    """The process's largest resident size since the last `reset_peak` (Linux's VmHWM), None elsewhere."""
    return _status_bytes("VmHWM")["VmHWM"]


def resident_and_peak_bytes() -> tuple[int | None, int | None]:
    """The resident size now and the peak since the last `reset_peak`, from one read of /proc/self/status, so
    that the peak is never below the resident size: the kernel reports VmHWM as the larger of its high-water
    mark and the same RSS count it reports as VmRSS (fs/proc/task_mmu.c, `task_mem`). Two reads let another
    thread fault in pages between them, leaving the earlier peak a page or more below the later size. (None,
    None) elsewhere."""
    fields = _status_bytes("VmRSS", "VmHWM")
    return fields["VmRSS"], fields["VmHWM"]


def _status_bytes(*names: str) -> dict[str, int | None]:
    """The /proc/self/status fields `names` in bytes, from one read; None for each where there is no such file
    or field."""
    fields: dict[str, int | None] = dict.fromkeys(names)
    with contextlib.suppress(OSError):
        for line in STATUS.read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                fields[name] = int(value.split()[0]) * 1024  # kB
    return fields


def reset_peak() -> bool:
    """Start a new peak resident size (VmHWM) from the current one; False where the kernel has no such reset."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True
