"""Exact old log-probs by interruption sync: capture the resident version's tokens before each update."""

from __future__ import annotations

from twofold.oldlogits.base import CapturingSource, capture


class InterruptSource(CapturingSource):
    """Before each weight update, pause rollouts and capture every pending token of the resident version
    with the trainer's still-unchanged weights; tokens finished since then are captured at the step start."""

    name = "interrupt"

    def needs_pause_before_update(self, version):
        return True

    def before_update(self, model, version, pending):
        self._timed(capture, self.ctx.scorer(model), self.captured, pending, version)

    def prepare(self, batch, model, version, pending):
        self._timed(capture, self.ctx.scorer(model), self.captured, batch.trajectories, version)
        self.captured.retain({t.uid for t in batch.trajectories} | {t.uid for t in pending})
