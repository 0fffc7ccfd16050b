"""runtime._run, which runs ComfyUI's coroutines (loading its nodes) in tests, the CLI and benchmarks."""
from __future__ import annotations

import asyncio

from wan_w4a4.apps import runtime


async def _caught_import_error():
    # What ComfyUI does for an optional node whose import fails: catch the error and log its traceback.
    try:
        raise ImportError("an optional dependency is missing")
    except ImportError as e:
        return e


def test_errors_caught_inside_the_coroutine_carry_no_event_loop_probe():
    # A traceback logged there must start at the import, not at "no running event loop".
    error = runtime._run(_caught_import_error())
    assert isinstance(error, ImportError)
    assert error.__context__ is None, f"chained to {error.__context__!r}"


def test_run_from_inside_a_running_loop():
    async def outer():
        return runtime._run(asyncio.sleep(0, result=7))

    assert asyncio.run(outer()) == 7
