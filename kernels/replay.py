"""Few-token W4A4 calls replayed: a call's launches noted once per call signature, then re-issued with the new
addresses (CUDA, Triton 3.6, the fast launcher on).

Why: at one 480p frame a layer call has less GPU work than the host needs to issue it. With the fast launcher
(``launch.py``) the host still spent 207 us per call of 3120 x 5120 x 5120 (``benchmarks/host_ab.py``,
kernels/README.md, session 25): the dispatcher's plan, one allocation carved into five views, two launches keyed
argument by argument (``launch.args_key``, about 35 arguments each), the GEMM's two TMA descriptors, and Triton's
launcher reading each tensor's address and asking the driver about it. All of it but the addresses is the same for
every call of a signature.

How:
- A call's signature is what its launches' arguments depend on besides addresses: the input's rows, row stride,
  dtype, device and 16-byte alignment, the bin index's dtype and device, the layer's shapes, dtypes and activation
  grid, the two Triton settings the launcher keys on, what picks the GEMM (``WAN_W4A4_GEMM``, the device's compute
  capability, whether the Gluon kernel failed to build), and where it runs: the current device, stream and host
  thread, whose workspace the recording points into.
- The first call of a signature runs ``triton_w4a4.call_into``, the ordinary path of a call, into the workspace of
  its (device, stream, thread), while ``launch.record`` notes each launch (the compiled kernel, its grid, its
  arguments), each zeroing of a region (``launch.zero_``: the weight row sums of unsigned layers, which the
  expansion's atomics fill) and each region a torch call computes from the layer's tensors (``launch.compute_``: 1/s,
  where the quantizer does not divide by s itself). Each tensor argument must be one of the call's own tensors (input
  rows, output, bin index, the layer's tensors: a slot, filled per call with its address), a pass's rows of the input
  or output (a slot with a byte offset: the signature fixes the input's shape and row stride, so a pass starts at the
  same offset in every call), or lie in the workspace (a fixed address; the GEMM's TMA descriptors describe workspace
  regions, so they are kept as they are). Anything else, or a launch through Triton's own path, and the signature is
  served by ``run_checked`` from then on.
- Later calls of the signature allocate the output, read the addresses of the slots, zero what was zeroed, compute
  what was computed from their own layer tensors, and call each compiled kernel's launcher with the addresses
  (Triton's launcher takes an integer as a device pointer, and then skips its per-pointer driver query). Where the
  launcher is Triton 3.6's as read, the recording holds its C function and whole argument list (``launch.bind``:
  stream and workspace addresses fixed, the GEMM's TMA descriptors encoded once), so a replayed launch runs no Python
  of Triton's.

The same compiled kernels get the same arguments, in the same order with the same zeroing and torch calls, so the
bits are ``run_checked``'s (tests/kernels/test_replay_calls.py: on a GPU, and on the CPU the slot map, with stand-in
kernels and with the real launch paths where Triton is installed). Replayed (``CallPlan.replayable``): calls of up to
``REPLAY_MAX_ROWS`` rows (16 384). Up to ``ONE_LAUNCH_MAX_ROWS`` (4096) rows of K <= ``ONE_LAUNCH_MAX_K``, the
quantizer and the weight expansion in one launch; else (more rows, or Wan's ffn.2, K = 13 824) the expansion and two
quantizer launches, which divide by s themselves in a call of up to ``DIVIDE_MAX_ROWS`` rows (8192) in one pass and
else read a 1/s made first; then the GEMM, per pass where the operands of all rows would not fit ``PASS_BYTES``.
Larger calls take ``run_checked``: the GPU sets their step.

The workspace holds the transients of the largest replayed call of its stream (Wan2.2-A14B's ffn.2 at rank 32: 117
MB at one 480p frame's 3120 rows, 174 MB at one 720p frame's 7200, 188 MB at 8192, 203 MB at 480p x 9 frames' 9360,
at most 208 MB at 9661 rows, the most one pass of ``PASS_BYTES`` holds beside the 70.8 MB of expanded weights; in two
passes above) and stays allocated between calls, so that its addresses, and the recorded launches that point into
it, stay valid; a call that needs more replaces it and forgets the recordings of the old one. ``release()`` frees
it. Workspace and recordings are per (device, stream, host thread): calls that one thread issues on one stream run
in order, so they can share it. At most ``MAX_WORKSPACES`` keep one (ComfyUI samples on one stream from one
thread); a fifth takes the place of the one that recorded least recently, so a host that starts a thread per request
holds at most four workspaces of threads that have ended.
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import torch

from . import launch
from . import numerics as nm
from . import triton_w4a4 as tw

ENV = "WAN_W4A4_REPLAY"  # "0" turns replay off (run_checked serves every call)
FIELDS = ("qweight", "wscale", "wfactor", "smooth", "lr_down", "lr_up", "clip", "bias")  # the layer's tensors
SOURCES = ("x", "y", "bin", *FIELDS)  # a call's own tensors, in the order of ``sources``


class Call(NamedTuple):
    """One recorded launch as a call ``fn(*args)``: the kernel's C launcher with its whole argument list where
    ``launch.bind`` binds it (stream and workspace addresses fixed, TMA descriptors encoded once), else the compiled
    kernel's ``run`` with what ``launch.Launcher`` passes it. ``slots``: the (place in ``args``, index in SOURCES,
    byte offset) to fill per call with that tensor's address plus the offset."""
    fn: object
    args: tuple
    slots: tuple


class Compute(NamedTuple):
    """A recorded ``launch.compute_``: ``fn(*(the call's SOURCES at ``sources``), out=out)``, ``out`` a workspace
    region."""
    fn: object
    out: torch.Tensor
    sources: tuple


class Replay(NamedTuple):
    steps: tuple  # Call, Compute, or a workspace tensor to zero
    used: tuple  # indices in SOURCES of the tensors the launches and the computed regions take
    workspace: torch.Tensor  # kept alive with the recording that points into it
    cuda: bool  # whether it was recorded on a GPU (the CPU tests record stand-in kernels)


_recordings: dict = {}  # signature -> Replay, or None: run_checked serves it
_workspaces: dict = {}  # (device, stream, host thread) -> uint8 tensor
_dropped = 0  # recordings forgotten so far (``dropped``)
# Held while a recording is made and stored (replays only read the dict). Re-entrant: an unload may run in the same
# thread while a recording is made (a model dropped by the garbage collector), and release() must not wait on itself.
_lock = threading.RLock()


def enabled() -> bool:
    return (os.environ.get(ENV, "1").strip() not in ("0", "false", "no", "off") and launch.enabled()
            and launch.triton is not None and launch.triton_matches(launch.triton.__version__))


def release() -> None:
    """Forget every recording and free the workspaces (the next call of each signature records again)."""
    global _dropped
    with _lock:
        _dropped += sum(r is not None for r in _recordings.values())
        _recordings.clear()
        _workspaces.clear()


def dropped() -> int:
    """How many recordings have been forgotten so far: a stream's first calls outgrow its workspace (each larger one
    forgets the recordings in the smaller), one stream gives way to another, or ``release``. A recording forgotten
    is made again on its signature's next call, which Triton launches with tensors."""
    return _dropped


def workspaces(stream: int | None = None) -> tuple[torch.Tensor, ...]:
    """The workspaces that recordings point into now, or only the one of ``stream`` (a raw CUDA stream). A CUDA graph
    that captured replayed calls holds its stream's, so that memory is not given to anything else while the graph may
    replay (``nodes/graphs.py``)."""
    with _lock:
        return tuple(ws for where, ws in _workspaces.items() if stream is None or where[1] == stream)


def capturable(rows: int) -> bool:
    """Whether calls of up to ``rows`` rows replayed now launch from integer addresses only: replay is on, no profiler's
    launch hooks are set, and such calls are replayed (``CallPlan.replayable``: up to ``triton_w4a4.REPLAY_MAX_ROWS``;
    their torch calls, the row sums' zeroing and 1/s, write workspace regions). Triton's launcher checks each tensor
    argument's pointer with the driver, which fails for memory that cudaMallocAsync hands out inside a CUDA graph
    capture (``kernels/README.md``, session 24); an integer is passed as it is."""
    return enabled() and launch.hooks_idle() and tw.replayed(rows)


def layer_tensors(p: nm.W4A4Params) -> tuple:
    """The layer's tensors, in ``FIELDS``' order (the bias may be None)."""
    return (p.qweight, p.wscale, p.wfactor, p.smooth, p.lr_down, p.lr_up, p.clip, p.bias)


def sources(x2d: torch.Tensor, y: torch.Tensor, bin_index: torch.Tensor, p: nm.W4A4Params) -> tuple:
    """The call's own tensors, in ``SOURCES``' order."""
    return (x2d, y, bin_index, *layer_tensors(p))


def signature(x2d: torch.Tensor, p: nm.W4A4Params, bin_index: torch.Tensor, where: tuple) -> tuple:
    """What a call's launch arguments depend on besides addresses (see the module doc). ``where``: (device index,
    stream, host thread): the workspace the call's recording points into."""
    b = p.bias
    knobs = launch.knobs
    device = x2d.device
    return (x2d.shape, x2d.stride(0), x2d.dtype, device, x2d.data_ptr() % launch.ALIGN == 0, where,
            bin_index.dtype, bin_index.device,
            p.qweight.shape, p.lr_down.shape, p.qweight.dtype, p.wscale.dtype, p.wfactor.dtype, p.smooth.dtype,
            p.lr_down.dtype, p.lr_up.dtype, p.clip.dtype, None if b is None else b.dtype, p.act_unsigned,
            p.act_shift, knobs.runtime.debug, knobs.compilation.instrumentation_mode, tw.gemm_choice(),
            tw._capability(tw._index(device)), bool(tw._gluon_failure))


VIEWED = (0, 1)  # indices in SOURCES whose rows a pass takes as a view: x, y


def _own(v: torch.Tensor, own: tuple) -> int | None:
    """The index in SOURCES of the call's own tensor ``v`` (the object itself), else None."""
    return next((j for j, t in enumerate(own) if t is v), None)


def _extent(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to the end of its last."""
    return (sum((d - 1) * s for d, s in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0


def _view_of(v: torch.Tensor, own: tuple) -> tuple[int, int] | None:
    """(index in SOURCES, byte offset) where ``v`` is a view within the input's or the output's bytes, with their
    dtype and row stride (a pass's rows), else None."""
    for j in VIEWED:
        t = own[j] if j < len(own) else None
        if not isinstance(t, torch.Tensor) or v.dtype != t.dtype or v.stride() != t.stride() or v.device != t.device:
            continue
        offset = v.data_ptr() - t.data_ptr()
        if 0 <= offset and offset + _extent(v) <= _extent(t):
            return j, offset
    return None


def slot_map(values, own: tuple, workspace: torch.Tensor) -> tuple[tuple, tuple] | None:
    """(argument values with workspace tensors as addresses, slots) of one recorded launch, or None when an
    argument is a tensor that is neither one of the call's own (``own``, SOURCES' order), nor a pass's view of the
    input or output (``_view_of``), nor in ``workspace``."""
    lo = workspace.data_ptr()
    hi = lo + workspace.numel()
    out, slots = [], []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            where = _own(v, own)
            view = (where, 0) if where is not None else _view_of(v, own)
            if view is not None:
                slots.append((i, *view))
                out.append(None)
                continue
            if not lo <= v.data_ptr() < hi:
                return None
            out.append(v.data_ptr())
            continue
        base = getattr(v, "base", None)  # a TMA descriptor: only of a workspace region
        if isinstance(base, torch.Tensor) and not lo <= base.data_ptr() < hi:
            return None
        out.append(v)
    return tuple(out), tuple(slots)


MAX_WORKSPACES = 4  # (stream, thread)s with a workspace at once; the least recently recorded one gives way


def _forget(ws: torch.Tensor) -> None:
    """Drop the recordings that point into workspace ``ws``."""
    global _dropped
    gone = [s for s, r in _recordings.items() if r is not None and r.workspace is ws]
    for sig in gone:
        del _recordings[sig]
    _dropped += len(gone)


def _workspace(device: torch.device, where: tuple, nbytes: int) -> torch.Tensor:
    ws = _workspaces.pop(where, None)  # re-inserted last: the dict's order is the recording order
    if ws is None and len(_workspaces) >= MAX_WORKSPACES:
        _forget(_workspaces.pop(next(iter(_workspaces))))
    if ws is None or ws.numel() < nbytes:
        if ws is not None:
            _forget(ws)
            ws = None  # freed before the larger one is made
        raw = torch.empty((nbytes + tw.ARENA_ALIGN,), dtype=torch.uint8, device=device)
        start = -raw.data_ptr() % tw.ARENA_ALIGN  # 0 on CUDA, whose allocations are 512-byte aligned
        ws = raw[start:start + nbytes]
    _workspaces[where] = ws
    return ws


def _record(c: tw.CallPlan, p: nm.W4A4Params, y: torch.Tensor, where: tuple) -> Replay | None:
    """Run the call (into the workspace) and return its recording, or None if its signature cannot be replayed."""
    ws = _workspace(c.x2d.device, where, tw.Arena.bytes_for(c.regions))
    own = sources(c.x2d, y, c.bin_index, p)
    noted = launch.record(lambda: tw.call_into(c, p, tw.Arena(c.x2d.device, c.regions, buf=ws), y))
    if not noted:
        return None
    steps = []
    for r in noted:
        if isinstance(r, launch.Zeroed):  # the weight row sums' zeroing: a workspace region, zeroed again per call
            if slot_map([r.tensor], (), ws) is None:
                return None
            steps.append(r.tensor)
            continue
        if isinstance(r, launch.Computed):  # 1/s: a workspace region, computed again from the call's own layer
            found = [_own(s, own) for s in r.sources]
            if slot_map([r.tensor], (), ws) is None or None in found:
                return None
            steps.append(Compute(r.fn, r.tensor, tuple(found)))
            continue
        mapped = slot_map(r.values, own, ws)
        if mapped is None:
            return None
        values, slots = mapped
        grid = (*r.grid, 1, 1)[:3]
        bound = launch.bind(r.kernel, grid, values, where[1])
        if bound is None:
            k = r.kernel  # its run, as launch.Launcher calls it with no hooks set (run() checks launch.hooks_idle)
            head = (*grid, where[1], k.function, k.packed_metadata, None, None, None)
            steps.append(Call(k.run, (*head, *values), tuple((len(head) + i, j, o) for i, j, o in slots)))
        else:
            fn, args, places = bound
            steps.append(Call(fn, args, tuple((places[i], j, o) for i, j, o in slots)))
    used = tuple(sorted({j for r in steps if type(r) is Call for _, j, _ in r.slots}
                        | {j for r in steps if type(r) is Compute for j in r.sources}))
    if any(own[j].data_ptr() % launch.ALIGN for j in used):  # compiled for a misaligned input: not what _replay
        return None  # issues (the input's alignment is in the signature; run() sends other tensors' elsewhere)
    return Replay(tuple(steps), used, ws, ws.is_cuda)


def _replay(rec: Replay, own: tuple) -> bool:
    """Issue the recorded launches with the addresses of ``own``; False (nothing issued) if one is misaligned or not
    on a GPU (``run_checked`` then runs the call, and Triton's launcher reports a host tensor)."""
    addresses = [0] * len(SOURCES)
    for j in rec.used:
        t = own[j]
        a = addresses[j] = t.data_ptr()
        if a % launch.ALIGN or t.is_cuda != rec.cuda:  # the kernels were compiled for aligned tensors
            return False
    for step in rec.steps:
        if isinstance(step, torch.Tensor):
            step.zero_()
            continue
        if type(step) is Compute:
            step.fn(*(own[j] for j in step.sources), out=step.out)
            continue
        args = list(step.args)
        for i, j, offset in step.slots:
            args[i] = addresses[j] + offset
        step.fn(*args)
    return True


def run(x: torch.Tensor, p: nm.W4A4Params, bin_index=0) -> torch.Tensor:
    """``triton_w4a4.run_checked(x, p, bin_index)`` (a call ``unsupported_reason`` accepted), replayed where its
    signature has been recorded (module doc)."""
    if not enabled() or not launch.hooks_idle():  # a profiler's hooks want Triton's launch metadata
        return tw.run_checked(x, p, bin_index)
    k, n = p.in_features, p.out_features
    x2d = x.reshape(-1, k) if x.shape[-1] == k else None
    if x2d is None or x2d.stride(-1) != 1:
        return tw.run_checked(x, p, bin_index)  # run_checked raises, or copies the input first
    device = x.device
    if not isinstance(bin_index, torch.Tensor):
        bin_index = tw._bin_tensor(int(bin_index), device)
    index = launch.driver.active.get_current_device()  # where the launcher launches, as launch.Launcher does
    stream = launch.driver.active.get_current_stream(index)
    where = (index, stream, threading.get_ident())
    sig = signature(x2d, p, bin_index, where)
    rec = _recordings.get(sig, False)
    if rec is None:
        return tw.run_checked(x, p, bin_index)
    if rec is False:
        c = tw.call_plan(x, p, bin_index)
        if not c.replayable:
            with _lock:  # _forget walks the dict under the lock
                _recordings[sig] = None
            return tw.run_checked(x, p, bin_index)
        if any(t is not None and t.data_ptr() % launch.ALIGN for t in (bin_index, *layer_tensors(p))):
            return tw.run_checked(x, p, bin_index)  # misaligned: this call only (these are not in the signature)
        y = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=device)
        with _lock:
            _recordings[sig] = _record(c, p, y, where)
        return y.reshape(*x.shape[:-1], n)
    y = torch.empty((x2d.shape[0], n), dtype=x.dtype, device=device)
    if not _replay(rec, sources(x2d, y, bin_index, p)):
        return tw.run_checked(x, p, bin_index)
    return y.reshape(*x.shape[:-1], n)
