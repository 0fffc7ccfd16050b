"""Stand-ins for a Triton kernel, its compiled form and Triton's driver, for CPU tests of kernels/launch.py and
kernels/replay.py (no Triton or GPU needed)."""
import pytest

from wan_w4a4.kernels import launch


class FakeParam:
    def __init__(self, name, constexpr=False):
        self.name, self.is_constexpr = name, constexpr
        self.annotation = "constexpr" if constexpr else ""
        self.do_not_specialize = self.do_not_specialize_on_alignment = False


class FakeCompiled:
    """A compiled kernel: records what its launcher gets."""

    def __init__(self, record):
        self.record, self.function, self.packed_metadata = record, "fn", "meta"

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        self.record.append(("direct", (g0, g1, g2), stream, args))


class FakeKernel:
    """A JITFunction's interface: params, device_caches, and ``[grid](...)`` that compiles (once per call here) and
    launches through Triton's binder."""

    def __init__(self, names=("x_ptr", "n", "scale"), constexprs=("BLOCK",)):
        self.params = [*(FakeParam(n) for n in names), *(FakeParam(n, constexpr=True) for n in constexprs)]
        self.device_caches = {}
        self.record = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.record.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.record)
        return run


@pytest.fixture
def fake_driver(monkeypatch):
    monkeypatch.setattr(launch, "triton", type("T", (), {"__version__": "3.6.0"})())
    class Active:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 1234

    monkeypatch.setattr(launch, "driver", type("D", (), {"active": Active()})())
    runtime = type("R", (), {"launch_enter_hook": None, "launch_exit_hook": None, "debug": False})()
    compilation = type("C", (), {"instrumentation_mode": ""})()
    monkeypatch.setattr(launch, "knobs", type("K", (), {"runtime": runtime, "compilation": compilation})())
    monkeypatch.delenv(launch.ENV, raising=False)
