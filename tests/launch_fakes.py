"""Stand-ins for a Triton kernel, its compiled form and Triton's driver, for CPU tests of kernels/launch.py and
kernels/replay.py (no Triton or GPU needed)."""
import pytest

from wan_w4a4.kernels import launch


class FakeParam:
    def __init__(self, name, constexpr=False):
        self.name, self.is_constexpr = name, constexpr
        self.annotation = "constexpr" if constexpr else ""
        self.do_not_specialize = self.do_not_specialize_on_alignment = False


class FakeCFunction:
    """Triton's generated C launcher: a callable with no ``__code__``; records its whole argument list."""

    def __init__(self, record):
        self.record = record

    def __call__(self, *args):
        self.record.append(("c", args))


def fake_expand(desc, meta):
    """A stand-in for ``make_tensordesc_arg``: the 'encoded' descriptor, then shape and strides."""
    return [("tma", desc.base.data_ptr(), tuple(desc.block_shape), meta), *desc.shape, *desc.strides]


def _wrap(launcher, tensordesc_indices, tensordesc_meta):
    """As Triton 3.6's ``wrap_handle_tensordesc``: a Python ``inner`` that expands the descriptors per launch."""
    def inner(*args):
        final, k = list(args[:launch.BASE_ARGS]), 0
        for i, a in enumerate(args[launch.BASE_ARGS:]):
            if i in tensordesc_indices:
                final.extend(fake_expand(a, tensordesc_meta[k]))
                k += 1
            else:
                final.append(a)
        return launcher(*final)
    return inner


class FakeCudaLauncher:
    """Triton 3.6's ``CudaLauncher`` as ``launch.bind`` reads it: ``launch`` the C launcher, wrapped by ``inner``
    where ``descs`` (argument indices of TMA descriptors) are given; ``__call__`` as ``CudaLauncher.__call__``
    with no scratch memory."""

    def __init__(self, record, descs=(), scratch=0):
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True
        c = FakeCFunction(record)
        self.launch = _wrap(c, set(descs), [f"meta{i}" for i in range(len(descs))]) if descs else c

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None, *args)


class FakeDesc:
    """A host TMA descriptor: ``base`` tensor, block shape, shape and strides."""

    def __init__(self, base, block_shape):
        self.base, self.block_shape = base, list(block_shape)
        self.shape, self.strides = list(base.shape), list(base.stride())


class FakeCompiled:
    """A compiled kernel: records what its launcher gets (``c_launcher``: a ``FakeCudaLauncher`` with those descriptor
    indices, as Triton's compiled kernels have; else a method that records the launch)."""

    def __init__(self, record, c_launcher=None):
        self.record, self.function, self.packed_metadata = record, "fn", "meta"
        if c_launcher is not None:
            self.run = FakeCudaLauncher(record, c_launcher)

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, g0, g1, g2, stream, function, packed, launch_metadata, enter, exit_, *args):
        self.record.append(("direct", (g0, g1, g2), stream, args))


class FakeKernel:
    """A JITFunction's interface: params, device_caches, and ``[grid](...)`` that compiles (once per call here) and
    launches through Triton's binder."""

    def __init__(self, names=("x_ptr", "n", "scale"), constexprs=("BLOCK",), c_launcher=None):
        self.params = [*(FakeParam(n) for n in names), *(FakeParam(n, constexpr=True) for n in constexprs)]
        self.device_caches = {}
        self.record = []
        self.c_launcher = c_launcher

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.record.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.record, self.c_launcher)
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
