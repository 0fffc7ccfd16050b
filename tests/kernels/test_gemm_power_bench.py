"""benchmarks/gemm_power.py: its nvidia-smi parsing, the row it computes from timings and samples, and its
table (the measurement itself needs a GPU)."""
import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("gemm_power")


def test_parses_nvidia_smi_lines(bench):
    assert bench.parse_smi("1860, 692.41, 0x0000000000000004") == (1860.0, 692.41, "0x0000000000000004")
    with pytest.raises(ValueError, match="unexpected nvidia-smi line"):
        bench.parse_smi("1860, 692.41")


def test_row_uses_the_steady_half_and_the_clock(bench):
    flop = 2.0e12  # one block: 2 TFLOP
    times = [4.0, 3.0] + [2.0] * 4  # ms; the first half (warming up) is left out
    smi = [(1500.0, 690.0, "0x4"), (1400.0, 700.0, "0x4"), (1300.0, 695.0, "0x4")]
    row = bench.summarize("fp8", flop, times, smi, peak_tops=2000.0, max_clock_mhz=2000.0)
    assert row["tops"] == pytest.approx(1000.0)  # 2 TFLOP in 2 ms
    assert row["clock_mhz"] == 1400.0 and row["power_w"] == 695.0
    assert row["tops_per_joule"] == pytest.approx(1000.0 / 695.0)
    assert row["per_clock_share"] == pytest.approx((1000.0 / 1400.0) / (2000.0 / 2000.0))
    assert row["throttle"] == ["0x4"] and row["repetitions"] == 6
    table = bench.table([row])
    assert "| fp8 | 1000 | 1400 | 695 | 1.439 | 714 | 71.4 % | 0x4 |" in table
    with pytest.raises(ValueError, match="no timings or no nvidia-smi samples"):
        bench.summarize("fp8", flop, times, [], 2000.0, 2000.0)


def test_one_block_is_wans_linears(bench):
    assert bench.BLOCK.count((5120, 5120)) == 6 and (5120, 13824) in bench.BLOCK and (13824, 5120) in bench.BLOCK
    assert bench.TOKENS == 21 * 60 * 104 // 4
