"""The end-to-end benchmark behind benchmarks/bench_wan_e2e.py (its docstring says what it measures).

An app of the pack: it imports wan_w4a4 (kernels, calibration, nodes); nothing in the pack imports it.
"""
