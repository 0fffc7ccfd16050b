"""Make ``import wan_w4a4`` work for a benchmark run straight from a checkout.

The pack's package is the repository root. Installed (``pip install -e .``), it imports as
``wan_w4a4``; a plain checkout (e.g. the copy the GPU machine receives) has another folder name,
so the root is registered under that name here. Benchmarks import this module first.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_wan_w4a4() -> None:
    sys.path.insert(0, str(ROOT.parent))
    try:
        import wan_w4a4  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location("wan_w4a4", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["wan_w4a4"] = mod
        spec.loader.exec_module(mod)


ensure_wan_w4a4()
