"""Fixtures of the mini-model tests."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def benchmark_module():
    """``benchmark_module("mini_motion")``: a script of ``benchmarks/``, imported as running it imports it
    (``benchmarks/`` on the path, so that it finds ``_checkout`` and its sibling scripts)."""
    def load(name: str):
        sys.path.insert(0, str(BENCHMARKS))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCHMARKS))
    return load
