"""Candidate searches on two CPU cores with the bits of one.

The smoothing search (``smoothing.search_alpha``) and the clip search (``clip.search_clip`` and the
pipeline's held-out evaluation) score each candidate of a grid independently. With one torch thread
(the demo's and the CLI's default on a CPU, which keeps results the same on any machine) each torch op
runs start to end on the thread that calls it, so two candidates computed at once on two Python threads
give exactly the numbers of the serial loop: the same ops on the same inputs, each single-threaded
(``tests/calibration/test_parallel.py``). torch releases the GIL inside its ops, so the two threads use
two cores. Each worker thread sets torch's thread count itself before its first candidate: a new thread
starts with OpenMP's and MKL's defaults (all cores), and a LAPACK call made before any op of torch's own
parallel loop (the SVD of ``lowrank.low_rank``) ran multi-threaded there, with other bits
(found by the test, which compares every candidate's error).

Elsewhere the loop stays serial: on a GPU (two candidates would double the transient memory that the
calibration's GPU budget accounts for, ``budget.py``), where torch already runs ops on several threads, and
in a distributed run (``distributed.py``: its ranks already share the cores).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

CPU_WORKERS = 2  # measured on the demo's 2-core CPU (calibration/README.md); more were not tried


def workers(device: torch.device | str) -> int:
    """How many candidates run at once on ``device``: ``CPU_WORKERS`` on a CPU with one torch thread and at
    least two cores, outside a distributed run; else 1."""
    if torch.device(device).type != "cpu" or torch.get_num_threads() != 1:
        return 1
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun's ranks (distributed.py)
        return 1
    return max(1, min(CPU_WORKERS, os.cpu_count() or 1))


def map_candidates(fn: Callable[[T], R], items: Iterable[T], device: torch.device | str) -> list[R]:
    """``[fn(item) for item in items]``, in order, with ``workers(device)`` items computed at once."""
    items = list(items)
    n = min(workers(device), len(items))
    if n <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="wan_w4a4-candidates",
                            initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
        return list(pool.map(fn, items))
