"""What a foreground run shows (the progress bar's fields) and how it is stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

from twofold import metrics as M


class RankLost(RuntimeError):
    """A trainer rank died (killed, or its process exited): the run stopped, and is resumable."""


@contextlib.contextmanager
def stop_signals(handler):
    """SIGTERM/SIGINT call `handler(signum, frame)` inside the block (main thread only; else a no-op)."""
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


PARENT_PID_VAR = "TWOFOLD_PARENT_PID"  # set by a launcher whose child `twofold train` must die with it


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGKILL when `parent_pid` dies, so `kill -9` of `twofold compare` leaves none of
    its cells behind writing into the run directories. (Local trainer ranks, whose parent is a fork server, exit
    with their launcher through `distributed._exit_with_launcher`.)

    The kernel only covers a parent that dies after this call; a child that finds itself already
    re-parented (the parent was killed while the child started) leaves at once."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: nothing to set
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)  # nobody waits for this exit code: the parent is gone


def progress_postfix(row: dict, no_signal: bool = False) -> dict[str, str]:
    """What the progress bar shows of a step's metrics row (embedded bar and the Ray driver's); `no_signal`
    flags a run that has stopped learning (`learning_signal.py`)."""
    fields = {
        "success": f"{row[M.SUCCESS_RATE]:.2f}",
        "reward": f"{row[M.REWARD_MEAN]:.2f}",
        "active": f"{row.get(M.ACTIVE_TOKEN_RATIO, 0):.2f}",
        "s_step": f"{row[M.STEP_SECONDS]:.1f}",
    }
    if no_signal:
        fields["signal"] = "NONE (see log)"
    return fields
