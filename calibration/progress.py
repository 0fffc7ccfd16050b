"""Progress of a calibration run: units done of the total, the phase, and an ETA.

A run has two kinds of work unit whose costs differ by orders of magnitude and by size: a sampling step
of the model (all items, with the capture hooks of a pass) and the quantization of one layer. One rate
over all units would swing between them, so the ETA is the sum over kinds of (units left x seconds per
unit measured for that kind in this run). Units taken from an earlier run's work folder (resume) cost
nothing and are not measured. No ETA until every kind with work left has been timed once.
"""
from __future__ import annotations

import time
from typing import Callable

SAMPLE, LAYER = "sampling step", "layer"
KINDS = (SAMPLE, LAYER)


def format_eta(seconds: float | None) -> str:
    """'ETA h:mm:ss' ('ETA ?' while unknown)."""
    if seconds is None:
        return "ETA ?"
    s = int(round(max(0.0, seconds)))
    return f"ETA {s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Tracker:
    """Calls ``callback(done, total, text)`` as work completes; ``text`` is ``what`` plus the ETA.

    ``clock`` is a monotonic time source in seconds (tests pass their own). The time since the previous
    call is charged to the kind of the unit that just finished."""

    def __init__(self, callback: Callable[[int, int, str], None] | None, clock: Callable[[], float] = time.monotonic):
        self.callback, self.clock = callback, clock
        self.total = dict.fromkeys(KINDS, 0)
        self.done = dict.fromkeys(KINDS, 0)
        self.timed = dict.fromkeys(KINDS, 0)
        self.spent = dict.fromkeys(KINDS, 0.0)
        self.last = clock()

    def set_total(self, kind: str, units: int) -> None:
        self.total[kind] = max(int(units), self.done[kind])

    def eta(self) -> float | None:
        left = 0.0
        for k in KINDS:
            n = self.total[k] - self.done[k]
            if n <= 0:
                continue
            if self.timed[k] == 0:
                return None
            left += n * self.spent[k] / self.timed[k]
        return left

    def advance(self, kind: str, units: int = 1, what: str = "", reused: bool = False) -> None:
        now = self.clock()
        if units > 0 and not reused:
            self.timed[kind] += units
            self.spent[kind] += now - self.last
        self.last = now
        self.done[kind] += units
        self.total[kind] = max(self.total[kind], self.done[kind])
        if self.callback is not None:
            done, total = sum(self.done.values()), sum(self.total.values())
            self.callback(done, total, f"{what} | {format_eta(self.eta())}" if what else format_eta(self.eta()))
