"""kernels/replay.py: a few-token call's launches recorded once per signature and replayed with the next call's
addresses. CPU tests with stand-in kernels (which calls are recorded, what a replayed launch gets); on a GPU, replayed
calls give ``run_checked``'s bits."""
import dataclasses
import threading

import pytest
import torch

from launch_fakes import FakeCFunction, FakeCudaLauncher, FakeDesc, FakeKernel, fake_expand
from wan_w4a4.kernels import launch, replay
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.kernels import triton_w4a4 as tw


def _layer(k=256, n=128, rank=16, unsigned=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    p = nm.from_float(w, torch.randn(n, generator=g), smooth=torch.rand(k, generator=g) + 0.5,
                      lr_down=torch.randn(k, rank, generator=g) * 0.02, lr_up=torch.randn(rank, n, generator=g) * 0.02,
                      clip=torch.tensor([1.0, 0.9, 0.8, 0.7]), num_bins=4, act_unsigned=unsigned)
    return p.to(device)


# --- slot_map ------------------------------------------------------------------------------------

def test_slot_map_turns_own_tensors_into_slots_and_workspace_tensors_into_addresses():
    ws = torch.empty(4096, dtype=torch.uint8)
    x, y = torch.zeros(8, 16), torch.zeros(8, 4)
    own = (x, y, None)
    region = ws[1024:2048].view(torch.int8)
    desc = type("Desc", (), {"base": ws[256:512], "block_shape": [16, 16]})()
    values, slots = replay.slot_map([x, region, 37, 0.5, y, desc, 64, None], own, ws)
    assert slots == ((0, 0, 0), (4, 1, 0))
    assert values == (None, ws.data_ptr() + 1024, 37, 0.5, None, desc, 64, None)


def test_slot_map_turns_a_passs_rows_of_the_input_or_output_into_slots_with_their_byte_offset():
    """``triton_w4a4.call_into`` hands each pass its rows of x and y as views: slots of x and y with the view's
    offset in bytes, which a later call of the signature (the same shape and row stride) adds to its own address."""
    ws = torch.empty(4096, dtype=torch.uint8)
    x = torch.zeros(12, 16)[:, :8]  # rows of a wider buffer: row stride 16
    y = torch.zeros(12, 4, dtype=torch.bfloat16)
    w = torch.zeros(12, 8)
    own = (x, y, None, w)
    values, slots = replay.slot_map([x[4:8], y[8:], x[:4], y], own, ws)
    assert slots == ((0, 0, 4 * 16 * 4), (1, 1, 8 * 4 * 2), (2, 0, 0), (3, 1, 0)) and values == (None,) * 4
    assert replay.slot_map([w[4:]], own, ws) is None  # the layer's tensors are taken whole, never as views
    assert replay.slot_map([x.contiguous()[4:]], own, ws) is None  # another tensor of the same values
    assert replay.slot_map([x[4:].t()], own, ws) is None  # another row stride
    assert replay.slot_map([x[4:].view(torch.int32)], own, ws) is None  # another dtype
    assert replay.slot_map([torch.zeros(12, 16)[:, 8:]], own, ws) is None
    wider = torch.zeros(12, 16)
    assert replay.slot_map([wider[4:, :8]], (wider[:8, :8], y), ws) is None  # past the call's own rows


def test_slot_map_refuses_a_tensor_neither_own_nor_in_the_workspace():
    ws = torch.empty(4096, dtype=torch.uint8)
    x = torch.zeros(8, 16)
    assert replay.slot_map([x, torch.zeros(3)], (x,), ws) is None
    assert replay.slot_map([x.clone()], (x,), ws) is None  # equal values, another tensor: not the call's own
    outside = type("Desc", (), {"base": torch.zeros(64), "block_shape": [8]})()
    assert replay.slot_map([x, outside], (x,), ws) is None  # a TMA descriptor of a tensor outside the workspace


# --- run: which calls are recorded and replayed (stand-in kernels) ---------------------------------

@pytest.fixture
def stand_ins(fake_driver, monkeypatch):
    """``replay.run`` on the CPU: the ordinary path is a recorder, the replayed path launches one stand-in kernel
    with the call's tensors and a workspace region, as ``call_into`` launches its kernels."""
    replay.release()
    monkeypatch.delenv(replay.ENV, raising=False)
    monkeypatch.delenv(tw.GEMM_ENV, raising=False)
    monkeypatch.setattr(tw, "_index", lambda device: 0)
    monkeypatch.setattr(tw, "_capability", lambda index: (9, 0))
    kernel = FakeKernel(names=("x_ptr", "y_ptr", "bin_ptr", "w_ptr", "s_ptr", "xq_ptr", "m"))
    calls = {"run_checked": 0, "call_into": 0}

    def run_checked(x, p, bin_index=0, **kwargs):
        calls["run_checked"] += 1
        return torch.zeros(*x.shape[:-1], p.out_features, dtype=x.dtype)

    def call_into(c, p, arena, y):
        calls["call_into"] += 1
        xq = arena.get("xq")
        launch.launcher(kernel)[(c.x2d.shape[0], 2)](c.x2d, y, c.bin_index, p.qweight, p.smooth, xq,
                                                     c.x2d.shape[0], BLOCK=16, num_warps=4)

    monkeypatch.setattr(tw, "run_checked", run_checked)
    monkeypatch.setattr(tw, "call_into", call_into)
    yield kernel, calls
    replay.release()


def test_a_signed_few_token_call_is_recorded_once_then_replayed_with_the_new_addresses(stand_ins):
    kernel, calls = stand_ins
    p1, p2 = _layer(seed=1), _layer(seed=2)  # two layers of one signature
    x1, x2 = torch.randn(2, 32, 256), torch.randn(64, 256)
    y1 = replay.run(x1, p1, 1)
    assert calls == {"run_checked": 0, "call_into": 1} and y1.shape == (2, 32, 128)
    assert [r[0] for r in kernel.record] == ["triton"]
    b2 = torch.tensor(3)
    y2 = replay.run(x2, p2, b2)
    assert calls == {"run_checked": 0, "call_into": 1}  # nothing of the ordinary path ran
    (sig, rec), = replay._recordings.items()
    ws = rec.workspace
    xq_offset = tw.Arena(ws.device, tw.call_plan(x2, p2).regions, buf=ws).get("xq").data_ptr()
    kind, grid, stream, args = kernel.record[-1]
    assert kind == "direct" and grid == (64, 2, 1) and stream == 1234
    # the second call's own tensors by address (its rows, its output, its bin, its layer), the workspace fixed
    assert args[:6] == (x2.data_ptr(), y2.data_ptr(), b2.data_ptr(), p2.qweight.data_ptr(), p2.smooth.data_ptr(),
                        xq_offset)
    assert args[6:] == (64, 16)
    replay.run(x2, p2, torch.tensor(3))
    assert [r[0] for r in kernel.record] == ["triton", "direct", "direct"]


def test_a_launch_bound_to_its_c_launcher_is_replayed_with_the_arguments_kernel_run_would_give(stand_ins,
                                                                                                    monkeypatch):
    """Where the compiled kernel's launcher is Triton's (``launch.bind``), the recording holds the C launcher and its
    argument list, the workspace's TMA descriptor encoded once; a replayed call gives the C launcher exactly what
    ``kernel.run`` gives it for the same call's addresses."""
    _, calls = stand_ins
    monkeypatch.setattr(launch, "_triton_nvidia", lambda: (FakeCudaLauncher, fake_expand))
    kernel = FakeKernel(names=("x_ptr", "y_ptr", "desc", "w_ptr", "m"), c_launcher=(2,))

    def with_desc(c, p, arena, y):
        calls["call_into"] += 1
        desc = FakeDesc(arena.get("xq"), [16, 64])
        launch.launcher(kernel)[(3, 2)](c.x2d, y, desc, p.qweight, c.x2d.shape[0], BLOCK=16, num_warps=4)

    monkeypatch.setattr(tw, "call_into", with_desc)
    p1, p2 = _layer(seed=1), _layer(seed=2)
    replay.run(torch.randn(64, 256), p1)
    (rec,) = replay._recordings.values()
    (step,) = rec.steps
    assert isinstance(step.fn, FakeCFunction)  # the C launcher, not the compiled kernel's run
    x2 = torch.randn(64, 256)
    kernel.record.clear()
    y2 = replay.run(x2, p2)
    (got,) = kernel.record
    compiled = FakeKernel(c_launcher=(2,))[(1,)]()  # a launcher of the same kind, fed by kernel.run
    compiled.record.clear()
    xq = tw.Arena(rec.workspace.device, tw.call_plan(x2, p2).regions, buf=rec.workspace).get("xq")
    compiled.run(3, 2, 1, 1234, "fn", "meta", None, None, None, x2.data_ptr(), y2.data_ptr(), FakeDesc(xq, [16, 64]),
                 p2.qweight.data_ptr(), 64, 16)
    assert got == compiled.record[0] and calls == {"run_checked": 0, "call_into": 1}


def test_larger_calls_and_the_switch_take_run_checked(stand_ins, monkeypatch):
    kernel, calls = stand_ins
    many = tw.REPLAY_MAX_ROWS + 1
    for _ in range(2):
        replay.run(torch.randn(many, 256), _layer())
    assert calls == {"run_checked": 2, "call_into": 0} and kernel.record == []
    assert list(replay._recordings.values()) == [None]
    monkeypatch.setenv(replay.ENV, "0")
    replay.run(torch.randn(16, 256), _layer())
    monkeypatch.setenv(launch.ENV, "0")  # no fast launcher, nothing to record with
    monkeypatch.delenv(replay.ENV)
    replay.run(torch.randn(16, 256), _layer())
    assert calls == {"run_checked": 4, "call_into": 0}


def test_calls_in_passes_and_calls_up_to_replay_max_rows_are_recorded_and_replayed(stand_ins):
    kernel, calls = stand_ins
    wide = _layer(k=8192 * 8, n=128, rank=0)  # 4096 rows of K = 65 536 do not fit one pass
    assert tw.pass_rows(4096, wide.in_features, 0) < 4096
    for layer, m in [(wide, 4096), (_layer(), tw.REPLAY_MAX_ROWS)]:
        for _ in range(2):
            replay.run(torch.randn(m, layer.in_features), layer)
    assert calls == {"run_checked": 0, "call_into": 2} and [r[0] for r in kernel.record] == ["triton"] + ["direct"] * 3
    assert None not in replay._recordings.values()


def test_a_call_in_passes_replays_each_passs_rows_at_their_offset(stand_ins, monkeypatch):
    """A call in passes hands each pass its rows of x and y as views (``triton_w4a4.call_into``): the replay gives
    each launch the new call's addresses plus that pass's byte offset."""
    kernel, calls = stand_ins

    def in_passes(c, p, arena, y):
        calls["call_into"] += 1
        m = c.x2d.shape[0]
        for start in range(0, m, 96):
            launch.launcher(kernel)[(1,)](c.x2d[start:start + 96], y[start:start + 96], c.bin_index, p.qweight,
                                          p.smooth, arena.get("xq"), min(96, m - start), BLOCK=16, num_warps=4)

    monkeypatch.setattr(tw, "call_into", in_passes)
    p1, p2 = _layer(seed=1), _layer(seed=2)
    replay.run(torch.randn(200, 256), p1)
    kernel.record.clear()
    x2 = torch.randn(200, 256)
    y2 = replay.run(x2, p2)
    assert calls == {"run_checked": 0, "call_into": 1}
    got = [(args[0], args[1], args[3], args[6]) for _, _, _, args in kernel.record]
    assert got == [(x2.data_ptr() + s * 256 * 4, y2.data_ptr() + s * 128 * 4, p2.qweight.data_ptr(), min(96, 200 - s))
                   for s in (0, 96, 192)]


def test_a_computed_workspace_region_is_computed_again_from_the_calls_own_layer(stand_ins, monkeypatch):
    """Above ``DIVIDE_MAX_ROWS`` rows the quantizer reads a 1/s made by a torch call (``launch.compute_``): the replay
    makes it again, from the replayed call's own s, into the same region, before the launch that reads it."""
    kernel, calls = stand_ins

    def with_inv_s(c, p, arena, y):
        calls["call_into"] += 1
        inv_s = launch.compute_(nm.reciprocal_smooth, arena.get("inv_s"), p.smooth)
        launch.launcher(kernel)[(1,)](c.x2d, y, c.bin_index, p.qweight, inv_s, arena.get("xq"), 1,
                                      BLOCK=16, num_warps=4)

    monkeypatch.setattr(tw, "call_into", with_inv_s)
    m = tw.DIVIDE_MAX_ROWS + 1
    p1, p2 = _layer(seed=1), _layer(seed=2)
    replay.run(torch.randn(m, 256), p1)
    (rec,) = replay._recordings.values()
    computed, launched = rec.steps
    assert type(computed) is replay.Compute and computed.sources == (replay.SOURCES.index("smooth"),)
    assert torch.equal(computed.out, p1.inv_smooth()) and type(launched) is replay.Call
    assert not torch.equal(p1.smooth, p2.smooth)
    kernel.record.clear()
    replay.run(torch.randn(m, 256), p2)
    assert torch.equal(computed.out, p2.inv_smooth()) and calls["call_into"] == 1
    assert kernel.record[0][3][4] == computed.out.data_ptr() and kernel.record[0][3][3] == p2.qweight.data_ptr()


def test_a_computation_from_a_tensor_not_the_calls_own_is_not_replayed(stand_ins, monkeypatch):
    kernel, calls = stand_ins

    def from_a_copy(c, p, arena, y):  # 1/s of a tensor made during the call: its replay could not find it
        calls["call_into"] += 1
        launch.compute_(nm.reciprocal_smooth, arena.get("inv_s"), p.smooth.clone())

    monkeypatch.setattr(tw, "call_into", from_a_copy)
    for _ in range(2):
        replay.run(torch.randn(tw.DIVIDE_MAX_ROWS + 1, 256), _layer())
    assert calls == {"run_checked": 1, "call_into": 1} and list(replay._recordings.values()) == [None]


def test_a_zeroed_workspace_region_is_zeroed_again_in_its_place_among_the_launches(stand_ins, monkeypatch):
    """Unsigned layers zero their weight row sums (``launch.zero_``) before the expansion's atomics fill them: the
    replay zeroes the same region at the same point."""
    kernel, calls = stand_ins
    order = []

    def with_sums(c, p, arena, y):
        calls["call_into"] += 1
        launch.zero_(arena.get("wsum"))
        launch.launcher(kernel)[(1,)](c.x2d, y, c.bin_index, p.qweight, p.smooth, arena.get("wsum"), 1,
                                      BLOCK=16, num_warps=4)

    monkeypatch.setattr(tw, "call_into", with_sums)
    p = _layer(unsigned=True)
    replay.run(torch.randn(16, 256), p)
    (rec,) = replay._recordings.values()
    zeroed, launched = rec.steps
    assert isinstance(zeroed, torch.Tensor) and zeroed.dtype == torch.int32 and type(launched) is replay.Call
    zeroed.fill_(7)
    real_zero = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda t: order.append("zero") or real_zero(t))
    kernel.record.clear()
    replay.run(torch.randn(16, 256), p)
    assert (zeroed == 0).all() and order == ["zero"] and [r[0] for r in kernel.record] == ["direct"]
    assert kernel.record[0][3][5] == zeroed.data_ptr() and calls["call_into"] == 1
    assert replay.slot_map([zeroed], (), rec.workspace) is not None


def test_a_call_it_does_not_replay_allocates_nothing_beside_run_checked(stand_ins, monkeypatch):
    """The first call of a signature that is not replayed allocates no output of its own: at 480p x 81 an output
    made and dropped there rose the step's peak (kernels/README.md, session 26)."""
    kernel, calls = stand_ins
    made = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(a) or real_empty(*a, **k))
    for _ in range(2):
        replay.run(torch.randn(tw.REPLAY_MAX_ROWS + 1, 256), _layer())
    assert calls["run_checked"] == 2 and made == []


def test_release_in_a_thread_that_holds_the_recording_lock_does_not_wait_on_itself(monkeypatch):
    """A model the garbage collector drops while this thread makes a recording can reach ``release`` (through
    ComfyUI's unload callbacks): the lock is re-entrant, so that call returns."""
    done = []

    def body():
        with replay._lock:
            replay.release()
            done.append(True)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(10)
    if not done:  # the thread waits on itself and holds the lock: give the other tests a new one
        monkeypatch.setattr(replay, "_lock", threading.RLock())
    assert done


def test_a_profilers_hook_takes_run_checked(stand_ins):
    kernel, calls = stand_ins
    assert replay.capturable(tw.REPLAY_MAX_ROWS)
    assert not replay.capturable(tw.REPLAY_MAX_ROWS + 1)  # not replayed
    launch.knobs.runtime.launch_enter_hook = print
    replay.run(torch.randn(16, 256), _layer())
    assert calls == {"run_checked": 1, "call_into": 0}
    assert not replay.capturable(16)  # Triton's launcher with tensors: not inside a capture (nodes/graphs.py)


def test_a_call_with_a_foreign_tensor_or_a_misaligned_input_is_not_replayed(stand_ins, monkeypatch):
    kernel, calls = stand_ins
    p = _layer()

    def foreign(c, p, arena, y):  # hands the kernel a tensor made during the call (as p.smooth.float() would be)
        calls["call_into"] += 1
        launch.launcher(kernel)[(1,)](c.x2d, y, c.bin_index, p.qweight, p.smooth.clone(), arena.get("xq"), 1,
                                      BLOCK=16, num_warps=4)

    aligned = tw.call_into
    monkeypatch.setattr(tw, "call_into", foreign)
    for _ in range(2):
        replay.run(torch.randn(16, 256), p)
    assert calls == {"run_checked": 1, "call_into": 1}  # the first call ran (and was not recorded)
    monkeypatch.setattr(tw, "call_into", aligned)
    base = torch.randn(32 * 256 + 1)
    misaligned = base[1:].view(32, 256)  # 4 bytes past a 16-byte boundary: compiled for another alignment
    assert misaligned.data_ptr() % 16
    for _ in range(2):
        replay.run(misaligned, p)
    assert calls == {"run_checked": 2, "call_into": 2}
    assert list(replay._recordings.values()) == [None, None]


def test_a_misaligned_or_host_layer_tensor_takes_run_checked_for_that_call(stand_ins):
    """The kernels were compiled for 16-byte-aligned tensors on the recording's device: a call whose layer tensor is
    not (a view one byte into a buffer, or a tensor of another device kind) runs the ordinary path, nothing issued."""
    kernel, calls = stand_ins
    p = _layer()
    replay.run(torch.randn(16, 256), p)  # recorded
    launched = len(kernel.record)
    buf = torch.empty(p.qweight.numel() + 1, dtype=torch.uint8)
    odd = dataclasses.replace(p, qweight=buf[1:].view(p.qweight.shape).copy_(p.qweight))
    assert odd.qweight.data_ptr() % 16 and replay.signature(torch.randn(16, 256), odd, torch.tensor(0), (0, 1234, 0)) \
        == replay.signature(torch.randn(16, 256), p, torch.tensor(0), (0, 1234, 0))  # same signature
    replay.run(torch.randn(16, 256), odd)
    assert calls == {"run_checked": 1, "call_into": 1} and len(kernel.record) == launched
    (rec,) = replay._recordings.values()
    replay._recordings[next(iter(replay._recordings))] = rec._replace(cuda=True)  # as if recorded on a GPU
    replay.run(torch.randn(16, 256), p)
    assert calls == {"run_checked": 2, "call_into": 1} and len(kernel.record) == launched


def test_a_misaligned_layer_tensor_is_left_to_run_checked_and_not_recorded(stand_ins):
    """Layer tensors are not in the signature: a misaligned one sends that call to ``run_checked`` and leaves the
    signature unrecorded, so the next aligned call records it."""
    kernel, calls = stand_ins
    p = _layer()
    buf = torch.empty(p.smooth.numel() * 4 + 4, dtype=torch.uint8)
    odd = dataclasses.replace(p, smooth=buf[4:].view(torch.float32).copy_(p.smooth))
    replay.run(torch.randn(16, 256), odd)
    assert replay._recordings == {} and calls == {"run_checked": 1, "call_into": 0}
    replay.run(torch.randn(16, 256), p)
    assert calls == {"run_checked": 1, "call_into": 1} and list(replay._recordings.values())[0] is not None


def test_the_workspace_is_the_launchers_current_devices_and_a_larger_one_replaces_it_after_freeing_it(
        stand_ins, monkeypatch):
    """The stream (and the workspace's key) is the launcher's current device's, as ``launch.Launcher`` launches
    there; a larger workspace is made after the old one is freed, so the two are never held at once."""
    import weakref
    kernel, calls = stand_ins
    monkeypatch.setattr(launch.driver.active, "get_current_device", lambda: 3)
    seen = []
    monkeypatch.setattr(launch.driver.active, "get_current_stream", lambda device: seen.append(device) or 1234)
    p = _layer()
    replay.run(torch.randn(16, 256), p)
    (key,) = replay._workspaces
    assert key[:2] == (3, 1234) and seen and set(seen) == {3}
    old = weakref.ref(replay._workspaces[key])
    alive_at_allocation = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: (k.get("dtype") == torch.uint8  # the workspace's
                                                         and alive_at_allocation.append(old() is not None))
                        or real_empty(*a, **k))
    replay.run(torch.randn(2048, 256), p)  # needs a larger workspace
    assert old() is None and alive_at_allocation == [False]


def test_bin_tensors_of_another_dtype_and_threads_get_their_own_recordings(stand_ins):
    """The bin index's dtype is a kernel argument's type; a host thread has its own workspace (two threads issuing
    on one stream would interleave their calls' launches)."""
    kernel, calls = stand_ins
    p = _layer()
    replay.run(torch.randn(16, 256), p, torch.tensor(1))
    replay.run(torch.randn(16, 256), p, torch.tensor(1, dtype=torch.int32))
    other = threading.Thread(target=lambda: replay.run(torch.randn(16, 256), p, torch.tensor(1)))
    other.start()
    other.join()
    assert calls["call_into"] == 3 and len(replay._recordings) == 3 and len(replay._workspaces) == 2


def test_a_larger_workspace_forgets_the_recordings_that_point_into_the_old_one(stand_ins):
    kernel, calls = stand_ins
    p = _layer()
    replay.run(torch.randn(16, 256), p)
    small = dict(replay._recordings)
    dropped = replay.dropped()
    replay.run(torch.randn(2048, 256), p)  # more rows: a larger workspace
    assert calls["call_into"] == 2
    assert not set(small) & set(replay._recordings)
    assert replay.dropped() == dropped + 1  # counted: nodes/graphs.py runs eagerly until nothing is forgotten
    assert replay.workspaces() == tuple(replay._workspaces.values()) and len(replay.workspaces()) == 1
    replay.run(torch.randn(16, 256), p)  # recorded again, into the new workspace
    assert calls["call_into"] == 3 and len(replay._recordings) == 2
    assert len({id(r.workspace) for r in replay._recordings.values()}) == 1


def test_at_most_max_workspaces_streams_keep_a_workspace(stand_ins, monkeypatch):
    kernel, calls = stand_ins
    p = _layer()
    current = [0]
    monkeypatch.setattr(launch.driver.active, "get_current_stream", lambda device: current[0])
    for stream in range(1, replay.MAX_WORKSPACES + 3):
        current[0] = stream
        replay.run(torch.randn(16, 256), p)
    assert [key[1] for key in replay._workspaces] == [3, 4, 5, 6]  # the first two gave way, with their recordings
    assert len(replay._recordings) == replay.MAX_WORKSPACES
    assert {id(r.workspace) for r in replay._recordings.values()} == {id(w) for w in replay._workspaces.values()}
    assert replay.workspaces(5) == (replay._workspaces[next(k for k in replay._workspaces if k[1] == 5)],)
    dropped = replay.dropped()
    replay.release()
    assert replay.dropped() == dropped + replay.MAX_WORKSPACES and replay.workspaces() == ()


@pytest.mark.parametrize("m,k,n,rank,unsigned,bias", [
    (1, 256, 384, 0, False, False), (37, 512, 256, 32, True, True), (3000, 5120, 1024, 32, False, True),
    (100, 13824, 512, 0, True, False), (3000, 13824, 512, 32, True, True), (4096, 13824, 512, 32, False, True),
    (7200, 5120, 512, 32, False, True), (8192, 13824, 512, 32, True, True),
    # a 1/s made by a torch call: more rows than DIVIDE_MAX_ROWS (480p x 9 frames: 9360), or passes
    (9360, 5120, 512, 32, False, True), (8192, 13824, 512, 1279, True, True), (14400, 13824, 512, 32, True, True),
    (16384, 13824, 512, 32, False, False)])
def test_the_real_call_paths_take_only_own_tensors_their_rows_and_workspace_regions(monkeypatch, m, k, n, rank,
                                                                                    unsigned, bias):
    """``triton_w4a4.call_into`` on the CPU with Triton installed (its host code: plans, regions, arguments, the
    GEMM's TMA descriptors; the launches noted, not run): every tensor a launch gets is one of the call's own, a
    pass's rows of x or y, or a workspace region; only workspace regions are zeroed; 1/s is computed into a workspace
    region from the layer's s, where the quantizer does not divide (``CallPlan.replayable``)."""
    pytest.importorskip("triton", reason="Triton is not installed (GPU machines, or a CPU wheel for this test)")
    monkeypatch.setattr(tw, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(tw, "_index", lambda device: 0)
    monkeypatch.setattr(tw, "_num_sms", lambda index: 132)

    class Noting:  # a launcher that notes the launch in the kernel's argument order and runs nothing
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def go(*args, **kwargs):
                names = self.fn.arg_names
                launch._note(self.fn, grid, [*args, *(kwargs[name] for name in names[len(args):])])
            return go

    monkeypatch.setattr(tw, "launcher", Noting)
    p = _layer(k, n, rank, unsigned)
    p.bias = p.bias if bias else None
    x = torch.randn(m, k, dtype=torch.bfloat16)
    c = tw.call_plan(x, p, 1)
    starts = range(0, m, c.rows)
    divides = len(starts) == 1 and m <= tw.DIVIDE_MAX_ROWS
    assert c.replayable and ("inv_s" in c.regions) == (not divides) and (len(starts) > 1) == (m >= 14400 or rank > 1278)
    replay.release()
    ws = replay._workspace(x.device, (0, 0, 0), tw.Arena.bytes_for(c.regions))
    if rank == 32:  # one pass's operands (PASS_BYTES at most, its rows rounded to whole tiles) beside the weights
        assert ws.numel() <= tw.PASS_BYTES + n * k + (8 << 20)
    y = torch.empty(m, n, dtype=x.dtype)
    noted = launch.record(lambda: tw.call_into(c, p, tw.Arena(x.device, c.regions, buf=ws), y))
    own = replay.sources(c.x2d, y, c.bin_index, p)
    zeroed = [r for r in noted if isinstance(r, launch.Zeroed)]
    assert len(zeroed) == int(unsigned) and all(replay.slot_map([r.tensor], (), ws) for r in zeroed)
    computed = [r for r in noted if isinstance(r, launch.Computed)]
    assert len(computed) == int(not divides)
    for r in computed:
        assert r.fn is nm.reciprocal_smooth and len(r.sources) == 1 and r.sources[0] is p.smooth
        assert replay.slot_map([r.tensor], (), ws) is not None and r.tensor.shape == (k,)
    launches = [r for r in noted if isinstance(r, launch.Recorded)]
    assert len(launches) == ((2 if c.prologue else 4) if len(starts) == 1 else 1 + 3 * len(starts))
    used, offsets = set(), {"x": set(), "y": set()}
    for r in launches:
        mapped = replay.slot_map(r.values, own, ws)
        assert mapped is not None, r.kernel
        for _, j, offset in mapped[1]:
            name = replay.SOURCES[j]
            used.add(name)
            assert offset == 0 or name in offsets
            if name in offsets:
                offsets[name].add(offset)
    assert {"x", "y", "bin", "qweight", "wscale", "wfactor", "clip"} <= used
    assert ("smooth" in used) == divides  # else the kernels read 1/s
    assert ("lr_down" in used) == bool(rank) and ("bias" in used) == bias
    assert offsets == {"x": {s * k * 2 for s in starts}, "y": {s * n * 2 for s in starts}}  # each pass's rows
    replay.release()


def test_the_dispatcher_runs_triton_calls_through_replay():
    from wan_w4a4 import kernels
    if kernels._lazy("replay")[0] is None:
        pytest.skip(kernels._lazy("replay")[1])
    assert kernels._triton_fn() is replay.run


# --- GPU: replayed calls give run_checked's bits ---------------------------------------------------

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or tw.triton is None, reason="needs a CUDA GPU and Triton")


def _cuda_layers(k, n, rank, bias, unsigned=False):
    layers = [_layer(k, n, rank, unsigned=unsigned, device="cuda", seed=s) for s in (1, 2)]
    for p in layers:
        p.bias = p.bias if bias else None
    return layers


def _calls(layers):
    """Four calls over two layers of one signature, bins as ints and as a device tensor."""
    return [(layers[0], 0), (layers[1], 1), (layers[0], 3), (layers[1], torch.tensor(2, device="cuda"))]


def _input(m, k, dtype, unsigned, scale=1.0):
    x = torch.randn(m, k, device="cuda", dtype=dtype) * scale
    return torch.nn.functional.gelu(x, approximate="tanh") if unsigned else x


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("m,k,n,rank,bias,dtype,unsigned,steps", [
    (1, 256, 384, 0, False, torch.bfloat16, False, 2), (37, 512, 256, 32, True, torch.float16, False, 2),
    (1024, 5120, 5120, 32, True, torch.bfloat16, False, 2), (3120, 5120, 5120, 32, True, torch.bfloat16, False, 2),
    (4096, 1024, 2048, 16, False, torch.float32, False, 2), (3120, 5120, 13824, 32, True, torch.bfloat16, False, 2),
    # two quantizer launches (K > ONE_LAUNCH_MAX_K); unsigned: the row sums zeroed first
    (3120, 13824, 5120, 32, True, torch.bfloat16, True, 5), (512, 13824, 1024, 0, False, torch.float16, False, 4),
    (300, 1024, 512, 32, True, torch.bfloat16, True, 3), (4096, 13824, 5120, 32, True, torch.bfloat16, True, 5),
    # more rows than ONE_LAUNCH_MAX_ROWS: expansion, two quantizer launches, the GEMM (one 720p frame's 7200 rows)
    (7200, 5120, 5120, 32, True, torch.bfloat16, False, 4), (7200, 13824, 5120, 32, True, torch.bfloat16, True, 5),
    (8192, 5120, 13824, 32, False, torch.float16, False, 4),
    # more rows than DIVIDE_MAX_ROWS or several passes: 1/s computed first (480p x 9 frames: 9360 rows)
    (9360, 5120, 5120, 32, True, torch.bfloat16, False, 5), (14400, 13824, 5120, 32, True, torch.bfloat16, True, 9),
    (16384, 5120, 13824, 32, False, torch.float16, False, 5), (8192, 27648, 1024, 32, True, torch.bfloat16, True, 9)])
def test_replayed_calls_give_run_checked_bits(m, k, n, rank, bias, dtype, unsigned, steps):
    replay.release()
    for i, (p, b) in enumerate(_calls(_cuda_layers(k, n, rank, bias, unsigned))):
        x = _input(m, k, dtype, unsigned, 1 + i)
        got, want = replay.run(x, p, b), tw.run_checked(x, p, b)
        assert torch.equal(got, want), (i, (got.float() - want.float()).abs().max())
    (rec,) = replay._recordings.values()
    # one launch for the quantizer and expansion, or zeroing + expansion + two quantizer launches; then the GEMM;
    # where the quantizer does not divide, 1/s before the quantizer; in passes, the quantizer and the GEMM per pass
    assert rec is not None and len(rec.steps) == steps
    # every launch bound to Triton's C launcher (launch.bind), not to the compiled kernel's run
    cuda_launcher = launch._triton_nvidia()[0]
    assert all(isinstance(s, torch.Tensor) or not isinstance(s.fn, cuda_launcher) for s in rec.steps), rec.steps
    replay.release()


@pytest.mark.gpu
@needs_gpu
def test_calls_it_does_not_replay_give_run_checked_bits_too():
    """More rows than REPLAY_MAX_ROWS, a misaligned input; calls on a side stream through the dispatcher."""
    from wan_w4a4 import kernels
    replay.release()
    side = torch.cuda.Stream()
    for layers, m, unsigned in [(_cuda_layers(5120, 1024, 32, True), tw.REPLAY_MAX_ROWS + 808, False),
                                (_cuda_layers(1024, 512, 32, True, unsigned=True), 300, True)]:
        for p, b in _calls(layers):
            x = _input(m, p.in_features, torch.bfloat16, unsigned)
            assert torch.equal(replay.run(x, p, b), tw.run_checked(x, p, b))
            base = _input(m * p.in_features + 1, 1, torch.bfloat16, unsigned)
            misaligned = base[1:].view(m, p.in_features)
            assert misaligned.data_ptr() % 16
            assert torch.equal(replay.run(misaligned, p, b), tw.run_checked(misaligned, p, b))
            with torch.cuda.stream(side):
                assert torch.equal(kernels.w4a4_linear(x, p, b), tw.run_checked(x, p, b))
            side.synchronize()
    recorded = [r is not None for r in replay._recordings.values()]
    assert recorded.count(True) == 2  # the 300-row calls, on both streams; not 17 192 rows, nor a misaligned input
    replay.release()


def test_the_dispatchers_entry_points_read_the_replay_state(stand_ins, monkeypatch):
    """``kernels.capture_ready``, ``held_workspaces`` and ``recordings_dropped``: what nodes/graphs.py reads."""
    import wan_w4a4.kernels as kernels

    assert kernels._lazy("replay")[0] is replay
    assert not kernels.capture_ready(torch.device("cpu"), 16)
    monkeypatch.setattr(kernels, "_triton_device_reason", lambda device: None)  # as on a GPU with Triton
    cuda = torch.device("cuda")
    assert kernels.capture_ready(cuda, tw.REPLAY_MAX_ROWS) and not kernels.capture_ready(cuda, tw.REPLAY_MAX_ROWS + 1)
    replay.run(torch.randn(16, 256), _layer())
    assert kernels.held_workspaces() == replay.workspaces() != ()
    dropped = kernels.recordings_dropped()
    replay.release()
    assert kernels.recordings_dropped() == dropped + 1 and kernels.held_workspaces() == ()
