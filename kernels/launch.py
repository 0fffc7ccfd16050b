"""Launching compiled Triton kernels again without Triton's per-call binder (CUDA, Triton only).

At one video frame a W4A4 layer call has less GPU work than the host needs to launch it, and with Triton 3.6
most of that host time is ``JITFunction.run``: for each launch it specializes every argument (a native call
each), builds and looks up a cache key, checks the kernel's globals, then calls the compiled kernel's launcher
(benchmarks/RESULTS.md, twenty-seventh part: 1520 launches of a one-frame model call). ``launcher(fn)[grid](...)``
does the first launch of each specialization through Triton and keeps the compiled kernel under a key of its
own; later launches with the same key call that kernel's launcher directly, with the arguments in the kernel's
order, as ``JITFunction.run`` does.

The key holds what decides the compiled code, as Triton 3.6 specializes it (``native_specialize_impl``, read on
its outputs): a constexpr parameter's value; a tensor's dtype and whether its address is a multiple of 16; an
integer's 32/64-bit class, whether it is 1 (made a constant) and whether it is a multiple of 16; a TMA
descriptor's type, dtype, block shape and layout; the launch options (``num_warps`` ...), the device, and the
two settings ``JITFunction.run`` adds to them (``knobs.runtime.debug``, ``knobs.compilation.instrumentation_mode``).
A kernel with a typed or unspecialized parameter, and a launch with an argument of another kind, keep Triton's
path. A direct launch skips two things ``JITFunction.run`` also does on every launch: its ``pre_run_hooks`` (the
pack sets none) and the check that the globals a kernel read at compile time still hold their values (the pack does
not change them). The bits cannot differ: the same compiled kernel runs with the same arguments
(tests/kernels/test_launch.py compares both paths on a GPU). The key was checked against Triton 3.6's source and
``native_specialize_impl`` on about 2700 sample values by a second reader (kernels/README.md, session 24). Only with
Triton 3.6 (``TRITON_VERSION``); ``WAN_W4A4_FAST_LAUNCH=0`` turns it off.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import NamedTuple

import torch

try:  # GPU machines only; kernels/triton_w4a4.py imports this module where Triton is
    import triton
    from triton import knobs
    from triton.runtime.driver import driver
except ImportError:  # pragma: no cover - machines without Triton (``arg_key`` is tested there)
    triton = knobs = driver = None

ENV = "WAN_W4A4_FAST_LAUNCH"
ALIGN = 16  # Triton 3.6 specializes a tensor argument on whether its address is a multiple of this
_I32 = (-(1 << 31), (1 << 31) - 1)
# The Triton whose specialization and launcher this module follows (read in its source, measured on the H200).
# Another version keeps Triton's own path: its ``CompiledKernel.run`` or its keys may differ.
TRITON_VERSION = (3, 6)


@functools.lru_cache(maxsize=8)
def triton_matches(version: str) -> bool:  # cached: replay.enabled() asks on every layer call
    try:
        return tuple(int(v) for v in version.split(".")[:2]) == TRITON_VERSION
    except ValueError:
        return False


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off")


def arg_key(value, constexpr: bool):
    """What of one argument decides the kernel Triton 3.6 compiles for it (see the module doc)."""
    if constexpr:
        return value
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() % ALIGN == 0
    if isinstance(value, bool):
        return bool, value
    if isinstance(value, int):
        if value == 1:
            return 1
        kind = "i32" if _I32[0] <= value <= _I32[1] else ("u64" if value >= 1 << 63 else "i64")
        return kind, value % 16 == 0
    if isinstance(value, float):
        return float
    if value is None:
        return None
    base = getattr(value, "base", None)  # a host-side TMA descriptor (Triton's or Gluon's)
    if isinstance(base, torch.Tensor) and hasattr(value, "block_shape"):
        return type(value), base.dtype, tuple(value.block_shape), getattr(value, "layout", None)
    raise TypeError(f"no launch key for an argument of type {type(value).__name__}")


def args_key(values, constexpr) -> tuple:
    """``arg_key`` of each argument: inline for constexprs and plain tensors (most of a launch's arguments),
    whose per-argument function call was a fifth of the launcher's host time (kernels/README.md, session 25)."""
    key = []
    for v, c in zip(values, constexpr):
        if c:
            key.append(v)
        elif type(v) is torch.Tensor:
            key.append((v.dtype, v.data_ptr() % ALIGN == 0))
        else:
            key.append(arg_key(v, False))
    return tuple(key)


def supported(fn) -> bool:
    """Whether ``fn`` is a Triton kernel whose parameters this module keys as Triton specializes them."""
    params = getattr(fn, "params", None)
    if params is None or not hasattr(fn, "device_caches") or triton is None or not triton_matches(triton.__version__):
        return False
    return all(p.is_constexpr or (not p.annotation and not p.do_not_specialize and not p.do_not_specialize_on_alignment)
               for p in params)


def hooks_idle() -> bool:
    """Whether no launch hook is set. Triton 3.6 holds them in ``knobs.runtime`` as ``HookChain``s, empty unless a
    profiler adds one; with none, a launch is the same without them, and without the launch metadata a hook would
    read (which ``CompiledKernel.launch_metadata`` builds for every launch once the hook is not None)."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


class Recorded(NamedTuple):
    """One launch noted by ``record``: the compiled kernel, its grid and its argument values in the kernel's order."""
    kernel: object
    grid: tuple
    values: list


class Zeroed(NamedTuple):
    """A tensor zeroed by ``zero_`` while ``record`` ran: a step of the call as much as a launch is."""
    tensor: torch.Tensor


class Computed(NamedTuple):
    """A tensor written by ``compute_`` while ``record`` ran: ``fn(*sources, out=tensor)``, a torch call of the
    kernels from the layer's tensors into a region they read (1/s, where the quantizer does not divide)."""
    tensor: torch.Tensor
    fn: object
    sources: tuple


class _State(threading.local):
    """Per host thread: ``recorded``, where ``record`` notes launches while it runs (None otherwise). A class
    attribute, so that reading it in a thread that never recorded costs no caught AttributeError (about 1 us per
    launch, measured by a second reader, against 0.1-0.2 us)."""
    recorded = None


_state = _State()


def zero_(t: torch.Tensor) -> torch.Tensor:
    """``t.zero_()``, noted by ``record`` (the kernels' one torch call between launches: the weight row sums'
    zeroing before the atomics that fill them)."""
    t.zero_()
    recorded = _state.recorded
    if recorded is not None:
        recorded.append(Zeroed(t))
    return t


def compute_(fn, out: torch.Tensor, *sources: torch.Tensor) -> torch.Tensor:
    """``fn(*sources, out=out)``, noted by ``record``: the kernels' other torch call between launches, the same call
    made again on a replay with that call's own ``sources``."""
    fn(*sources, out=out)
    recorded = _state.recorded
    if recorded is not None:
        recorded.append(Computed(out, fn, sources))
    return out


def record(fn) -> list | None:
    """Run ``fn()`` and return the launches it made (``Recorded``) and the tensors it zeroed (``Zeroed``) or
    computed (``Computed``) in their order, or None when a launch went through Triton's own path (then what it
    launched is not known here: ``kernels/replay.py`` must not replay it)."""
    if _state.recorded is not None:
        raise RuntimeError("launch.record does not nest")
    _state.recorded = got = []
    try:
        fn()
    finally:
        _state.recorded = None
    return None if None in got else got


def _note(kernel, grid, values) -> None:
    """While ``record`` runs: note a launch (``kernel`` None: one this module cannot replay)."""
    recorded = _state.recorded
    if recorded is not None:
        recorded.append(None if kernel is None else Recorded(kernel, tuple(grid), values))


# What Triton 3.6's C launcher takes before the kernel's arguments (driver.py's _BASE_ARGS_FORMAT): grid, stream,
# function, cooperative and PDL flags, two scratch buffers, packed and launch metadata, two hooks.
_BASE_FORMAT = "iiiKKppOOOOOO"
BASE_ARGS = len(_BASE_FORMAT)


@functools.lru_cache(maxsize=1)
def _triton_nvidia() -> tuple | None:
    """(Triton 3.6's ``CudaLauncher`` class, its ``make_tensordesc_arg``), or None where Triton's NVIDIA driver module
    is absent or its launcher's leading arguments are not as read (``bind`` then binds nothing)."""
    try:
        from triton.backends.nvidia import driver as nvidia
    except ImportError:
        return None
    if getattr(nvidia, "_BASE_ARGS_FORMAT", None) != _BASE_FORMAT:
        return None
    cls, expand = getattr(nvidia, "CudaLauncher", None), getattr(nvidia, "make_tensordesc_arg", None)
    return None if cls is None or expand is None else (cls, expand)


def bind(kernel, grid, values, stream) -> tuple | None:
    """A launch of compiled ``kernel`` as a call of its C launcher: (the launcher, its whole argument list, where
    each of ``values`` lands in that list: None for a TMA descriptor, which is encoded here, once). None where the
    compiled kernel's launcher is not Triton 3.6's ``CudaLauncher`` as read, or needs scratch memory per launch
    (then ``kernel.run`` must launch it).

    Why: ``CudaLauncher.__call__`` and the wrapper Triton puts around a launcher with TMA descriptor parameters
    (``wrap_handle_tensordesc``) are Python run per launch, and the wrapper encodes each descriptor anew. On the
    H200 a replayed GEMM launch took 11.7 us of host time that way and the prologue's 6.1 us; bound, 4.5 and 4.6 us
    (benchmarks/results/hostparts_h200_2026-12-01_s27.log, kernels/README.md session 27). For a launch whose
    descriptors describe memory that stays where it is (the replay workspace, ``replay.py``) the encoded descriptor
    is the same every time. The arguments are those ``CudaLauncher.__call__`` gives the launcher with no hooks
    (``hooks_idle``) and no scratch memory, so the same compiled kernel gets the same arguments."""
    nvidia = _triton_nvidia()
    run = getattr(kernel, "run", None)
    if nvidia is None or not isinstance(run, nvidia[0]):
        return None
    fn = getattr(run, "launch", None)
    flags = [getattr(run, name, None) for name in ("launch_cooperative_grid", "launch_pdl")]
    if (fn is None or None in flags or getattr(run, "global_scratch_size", 1)
            or getattr(run, "profile_scratch_size", 1)):
        return None
    descs, meta = frozenset(), ()
    code = getattr(fn, "__code__", None)
    if code is not None:  # Triton's Python wrapper ``inner``, closing over the C launcher and the descriptors' places
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
        fn, descs, meta = cells.get("launcher"), cells.get("tensordesc_indices"), cells.get("tensordesc_meta")
        if fn is None or getattr(fn, "__code__", None) is not None or descs is None or meta is None:
            return None
    expand = nvidia[1]
    g = (*grid, 1, 1)
    args = [g[0], g[1], g[2], stream, kernel.function, *flags, None, None, kernel.packed_metadata, None, None, None]
    places = []
    for i, v in enumerate(values):
        if i in descs:  # meta holds the descriptors' encodings in argument order
            args.extend(expand(v, meta[places.count(None)]))
            places.append(None)
        elif hasattr(v, "block_shape"):  # a descriptor the launcher does not expand: not as read
            return None
        else:
            places.append(len(args))
            args.append(v)
    if len(descs) != places.count(None):  # a descriptor index past the arguments: not as read
        return None
    return fn, tuple(args), tuple(places)


class Launcher:
    """``Launcher(fn)[grid](*args, **kwargs)`` launches like ``fn[grid](*args, **kwargs)``."""

    def __init__(self, fn):
        self.fn = fn
        self.names = [p.name for p in fn.params]
        self.constexpr = [p.is_constexpr for p in fn.params]
        self.kernels: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        names = self.names
        try:
            values = [*args, *(kwargs[n] for n in names[len(args):])]
        except KeyError:  # a parameter left to its default: Triton's binder fills it in
            _note(None, grid, None)
            return self.fn[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        try:
            key_of_args = args_key(values, self.constexpr)
        except TypeError:  # an argument kind this module does not key: Triton's own path
            _note(None, grid, None)
            return self.fn[grid](*args, **kwargs)
        # JITFunction.run adds these two process-wide settings to every launch's options (Triton 3.6's jit.py)
        key = (device, key_of_args, tuple((k, v) for k, v in kwargs.items() if k not in names),
               knobs.runtime.debug, knobs.compilation.instrumentation_mode)
        kernel = self.kernels.get(key)
        if kernel is None:  # compiles if needed, and launches; its compiled kernel serves the key from now on
            kernel = self.fn[grid](*args, **kwargs)
            self.kernels[key] = kernel
            _note(kernel, grid, values)
            return kernel
        stream = driver.active.get_current_stream(device)
        g = (*grid, 1, 1)
        if hooks_idle():
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None, *values)
        else:
            kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata,
                       kernel.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
                       knobs.runtime.launch_exit_hook, *values)
        _note(kernel, grid, values)
        return kernel


_launchers: dict[int, object] = {}  # id(kernel) -> its Launcher, or the kernel itself where unsupported


def launcher(fn):
    """The fast launcher of kernel ``fn``, or ``fn`` itself where it is off or unsupported (stand-ins included)."""
    if not enabled():
        _note(None, (), None)
        return fn
    got = _launchers.get(id(fn))
    if got is None or getattr(got, "fn", got) is not fn:  # new, or another object under a reused id
        got = _launchers[id(fn)] = Launcher(fn) if supported(fn) else fn
    if got is fn:  # Triton's own launch path: not noted
        _note(None, (), None)
    return got
