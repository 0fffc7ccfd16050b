"""calibration/progress.py: units, phase text and the per-kind ETA."""
from __future__ import annotations

from wan_w4a4.calibration.progress import LAYER, SAMPLE, Tracker, format_eta


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_is_per_kind_and_skips_reused_units():
    clock, calls = Clock(), []
    tr = Tracker(lambda *a: calls.append(a), clock)
    tr.set_total(SAMPLE, 10)
    tr.set_total(LAYER, 20)
    clock.t += 4.0
    tr.advance(SAMPLE, 1, "high expert, pass 1/2: sampling")
    assert tr.eta() is None and calls[-1] == (1, 30, "high expert, pass 1/2: sampling | ETA ?")  # layers untimed
    tr.advance(LAYER, 5, "high expert, pass 1/2: blocks.0 (saved)", reused=True)  # no time, not a rate
    assert tr.eta() is None
    clock.t += 0.5
    tr.advance(LAYER, 1, "high expert, pass 1/2: quantized blocks.1.ffn.0")
    # 9 sampling steps x 4 s + 14 layers x 0.5 s
    assert tr.eta() == 9 * 4.0 + 14 * 0.5
    assert calls[-1] == (7, 30, "high expert, pass 1/2: quantized blocks.1.ffn.0 | ETA 0:00:43")
    clock.t += 8.0
    tr.advance(SAMPLE, 2, "sampling")  # two steps in 8 s: still 4 s each
    assert tr.eta() == 7 * 4.0 + 14 * 0.5


def test_totals_never_below_done_and_eta_zero_at_the_end():
    clock = Clock()
    tr = Tracker(None, clock)
    tr.set_total(SAMPLE, 1)
    clock.t += 1.0
    tr.advance(SAMPLE, 3)
    assert tr.total[SAMPLE] == 3 and tr.eta() == 0.0
    tr.set_total(SAMPLE, 1)  # an estimate lowered later never hides work done
    assert tr.total[SAMPLE] == 3


def test_format_eta():
    assert format_eta(None) == "ETA ?"
    assert format_eta(3725.4) == "ETA 1:02:05"
    assert format_eta(-3) == "ETA 0:00:00"
