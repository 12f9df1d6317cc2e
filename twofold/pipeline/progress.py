"""What a foreground run shows (the progress bar's fields) and how it is stopped (SIGINT/SIGTERM)."""

from __future__ import annotations

import contextlib
import signal
import threading


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


def progress_postfix(row: dict) -> dict[str, str]:
    """What the progress bar shows of a step's metrics row (embedded bar and the Ray driver's)."""
    return {
        "success": f"{row['success/rate']:.2f}",
        "reward": f"{row['reward/mean']:.2f}",
        "active": f"{row.get('ppo/active_token_ratio', 0):.2f}",
        "s_step": f"{row['time/step']:.1f}",
    }
