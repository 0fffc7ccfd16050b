"""kernels/launch.py: the fast launcher keys a launch by what Triton specializes, and launches the same compiled
kernel with the same arguments. CPU tests with a stand-in kernel; on a GPU, both paths give the same bits."""
import pytest
import torch

from launch_fakes import FakeCompiled, FakeCudaLauncher, FakeDesc, FakeKernel, fake_expand
from wan_w4a4.kernels import launch
from wan_w4a4.kernels import numerics as nm


def test_a_key_is_launched_once_through_triton_then_directly_with_the_arguments_in_order(fake_driver):
    k = FakeKernel()
    fast = launch.launcher(k)
    assert isinstance(fast, launch.Launcher) and launch.launcher(k) is fast
    x = torch.zeros(64)
    fast[(4,)](x, 37, 0.5, BLOCK=16, num_warps=4)
    fast[(5, 2)](x, 53, 0.25, BLOCK=16, num_warps=4)  # same key: 37 and 53 are both i32, not multiples of 16
    assert [r[0] for r in k.record] == ["triton", "direct"]
    assert k.record[1][1:] == ((5, 2, 1), 1234, (x, 53, 0.25, 16))  # signature order, constexpr included
    # Each of these decides another compiled kernel in Triton 3.6, so each goes through Triton first.
    fast[(4,)](x, 48, 0.5, BLOCK=16, num_warps=4)  # a multiple of 16
    fast[(4,)](x, 1, 0.5, BLOCK=16, num_warps=4)  # 1 is made a constant
    fast[(4,)](x[1:], 37, 0.5, BLOCK=16, num_warps=4)  # an address that is not a multiple of 16
    fast[(4,)](x, 37, 0.5, BLOCK=32, num_warps=4)  # a constexpr's value
    fast[(4,)](x, 37, 0.5, BLOCK=16, num_warps=8)  # a launch option
    fast[(4,)](x.half(), 37, 0.5, BLOCK=16, num_warps=4)  # a dtype
    fast[(4,)](x, 1 << 40, 0.5, BLOCK=16, num_warps=4)  # a 64-bit integer
    assert [r[0] for r in k.record[2:]] == ["triton"] * 7
    fast[(4,)](x[4:], 21, 0.75, BLOCK=16, num_warps=4)  # 16-byte aligned again, i32: the first key
    assert k.record[-1][0] == "direct"
    launch.knobs.runtime.debug = True  # Triton compiles a debug kernel for the same arguments
    fast[(4,)](x, 37, 0.5, BLOCK=16, num_warps=4)
    assert k.record[-1][0] == "triton"
    fast[(4,)](x, (1, 2), 0.5, BLOCK=16, num_warps=4)  # a tuple: no key here, Triton's own path every time
    fast[(4,)](x, (1, 2), 0.5, BLOCK=16, num_warps=4)
    assert [r[0] for r in k.record[-2:]] == ["triton", "triton"]


def test_arguments_given_by_name_launch_in_the_signature_order(fake_driver):
    """``_fused_quant_args`` hands the quantizing launches their arguments by name: the same key as positional
    arguments, and the compiled kernel gets them in the signature's order."""
    k = FakeKernel()
    fast = launch.launcher(k)
    x = torch.zeros(64)
    fast[(4,)](x, 37, 0.5, BLOCK=16, num_warps=4)
    fast[(4,)](scale=0.25, BLOCK=16, n=53, x_ptr=x, num_warps=4)
    assert [r[0] for r in k.record] == ["triton", "direct"]
    assert k.record[1][3] == (x, 53, 0.25, 16)


def test_record_notes_each_launch_with_its_compiled_kernel_grid_and_arguments(fake_driver):
    k = FakeKernel()
    x = torch.zeros(64)

    def call():
        launch.launcher(k)[(4,)](x, 37, 0.5, BLOCK=16, num_warps=4)  # compiles: Triton's binder
        launch.launcher(k)[(5, 2)](scale=0.25, BLOCK=16, n=53, x_ptr=x, num_warps=4)  # direct

    got = launch.record(call)
    assert [r[0] for r in k.record] == ["triton", "direct"]
    assert [(r.grid, r.values) for r in got] == [((4,), [x, 37, 0.5, 16]), ((5, 2), [x, 53, 0.25, 16])]
    assert got[0].kernel is got[1].kernel  # the compiled kernel that serves the key
    assert launch.record(lambda: None) == [] and launch._state.recorded is None


def test_a_recording_holds_only_its_own_threads_launches(fake_driver):
    import threading
    k, x = FakeKernel(), torch.zeros(4)
    inner = []

    def call():
        launch.launcher(k)[(1,)](x, 3, 0.5, BLOCK=4)
        other = threading.Thread(target=lambda: inner.append(
            launch.record(lambda: launch.launcher(k)[(2,)](x, 5, 0.5, BLOCK=4))))  # records too: no nesting error
        other.start()
        other.join()

    got = launch.record(call)
    assert [r.grid for r in got] == [(1,)] and [[r.grid for r in g] for g in inner] == [[(2,)]]


def test_record_refuses_a_call_with_a_launch_it_cannot_note(fake_driver, monkeypatch):
    """A launch through Triton's own path (a default left out, an unkeyed argument, an unsupported kernel, the
    fast launcher off) makes the recording None: what it launched is not known."""
    x = torch.zeros(4)
    assert launch.record(lambda: launch.launcher(FakeKernel())[(1,)](x, 3, 0.5)) is None  # BLOCK left out
    assert launch.record(lambda: launch.launcher(FakeKernel())[(1,)](x, (1, 2), 0.5, BLOCK=4)) is None
    typed = FakeKernel()
    typed.params[1].annotation = "i32"
    assert launch.record(lambda: launch.launcher(typed)[(1,)](x, 3, 0.5, BLOCK=4)) is None
    monkeypatch.setenv(launch.ENV, "0")
    assert launch.record(lambda: launch.launcher(FakeKernel())[(1,)](x, 3, 0.5, BLOCK=4)) is None
    with pytest.raises(ZeroDivisionError):
        launch.record(lambda: 1 / 0)
    assert launch._state.recorded is None  # an exception does not leave recording on


def test_with_no_hooks_a_launch_passes_none_for_their_metadata(fake_driver):
    """Triton 3.6 keeps empty ``HookChain``s in ``knobs.runtime``: with none set the launcher gets None for the
    hooks and their metadata (the C launcher then calls nothing); with one set, both, as ``JITFunction.run`` does."""
    class Chain:
        def __init__(self, calls):
            self.calls = calls

    seen = []

    class Compiled(FakeCompiled):
        def launch_metadata(self, grid, stream, *args):
            return "metadata"

        def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit_, *args):
            seen.append((metadata, enter, exit_))

    class Kernel(FakeKernel):
        def __getitem__(self, grid):
            return lambda *args, **kwargs: Compiled(self.record)

    fast, x = launch.launcher(Kernel()), torch.zeros(4)
    fast[(1,)](x, 3, 0.5, BLOCK=4)  # compiles (the stand-in launches nothing)
    launch.knobs.runtime.launch_enter_hook, launch.knobs.runtime.launch_exit_hook = Chain([]), Chain([])
    assert launch.hooks_idle()
    fast[(1,)](x, 3, 0.5, BLOCK=4)
    hook = launch.knobs.runtime.launch_enter_hook = Chain([print])
    assert not launch.hooks_idle()
    fast[(1,)](x, 3, 0.5, BLOCK=4)
    assert seen == [(None, None, None), ("metadata", hook, launch.knobs.runtime.launch_exit_hook)]


@pytest.mark.parametrize("descs", [(), (1,), (0, 3)])
def test_bind_gives_the_c_launcher_what_kernel_run_gives_it(monkeypatch, descs):
    """``launch.bind``'s argument list is the one ``CudaLauncher.__call__`` (and the descriptor wrapper) passes the C
    launcher for the same launch with no hooks: the same values in the same places, descriptors expanded in place."""
    monkeypatch.setattr(launch, "_triton_nvidia", lambda: (FakeCudaLauncher, fake_expand))
    record = []
    kernel = FakeCompiled(record, c_launcher=descs)
    base = torch.zeros(64, 32)
    values = [7, torch.zeros(3), 0.5, 4096, None, "constexpr"]
    for i in descs:
        values[i] = FakeDesc(base[8 * i:], [8, 32])
    kernel.run(5, 2, 1, 1234, kernel.function, kernel.packed_metadata, None, None, None, *values)
    fn, args, places = launch.bind(kernel, (5, 2), values, 1234)
    fn(*args)
    assert record[0] == record[1] == ("c", args) and record[0][0] == "c"
    assert len(args) == launch.BASE_ARGS + len(values) + 4 * len(descs)  # a 2-d descriptor: map, shape, strides
    assert [p is None for p in places] == [i in descs for i in range(len(values))]
    assert all(args[p] is values[i] for i, p in enumerate(places) if p is not None)
    assert args[:launch.BASE_ARGS] == (5, 2, 1, 1234, "fn", False, True, None, None, "meta", None, None, None)


def test_bind_refuses_what_it_does_not_read_as_triton_36s_launcher(monkeypatch):
    monkeypatch.setattr(launch, "_triton_nvidia", lambda: (FakeCudaLauncher, fake_expand))
    values = [torch.zeros(3), FakeDesc(torch.zeros(8, 8), [8, 8])]
    assert launch.bind(FakeCompiled([]), (1,), values[:1], 0) is None  # a launcher with no C function to take
    assert launch.bind(FakeCompiled([], c_launcher=()), (1,), values, 0) is None  # a descriptor not expanded
    scratch = FakeCompiled([], c_launcher=(1,))
    scratch.run.global_scratch_size = 128  # scratch memory is allocated per launch
    assert launch.bind(scratch, (1,), values, 0) is None
    no_flags = FakeCompiled([], c_launcher=())
    del no_flags.run.launch_pdl  # a launcher of another shape than CudaLauncher
    assert launch.bind(no_flags, (1,), values[:1], 0) is None
    python_fn = FakeCompiled([], c_launcher=(1,))
    python_fn.run.launch = lambda *args: None  # a wrapper of another shape than Triton's ``inner``
    assert launch.bind(python_fn, (1,), values, 0) is None
    profile = FakeCompiled([], c_launcher=())
    profile.run.profile_scratch_size = 64
    assert launch.bind(profile, (1,), values[:1], 0) is None
    assert launch.bind(FakeCompiled([], c_launcher=()), (1,), values[:1], 0) is not None  # no descriptors to encode
    monkeypatch.setattr(launch, "_triton_nvidia", lambda: None)  # Triton's NVIDIA driver module is not as read
    assert launch.bind(FakeCompiled([], c_launcher=()), (1,), values[:1], 0) is None
    monkeypatch.setattr(launch, "_triton_nvidia", lambda: (type("OtherLauncher", (), {}), fake_expand))
    assert launch.bind(FakeCompiled([], c_launcher=()), (1,), values[:1], 0) is None  # another backend's launcher


def test_bind_gives_what_tritons_own_launcher_code_gives_its_c_function():
    """Against Triton 3.6's own Python (``CudaLauncher.__call__`` and ``wrap_handle_tensordesc``, on the CPU where a
    Triton wheel is installed), with a stand-in for the compiled C function: ``bind``'s argument list is the one that
    code passes, a host TMA descriptor expanded in its place (without the encoding metadata, which needs a GPU)."""
    nvidia = pytest.importorskip("triton.backends.nvidia.driver", reason="Triton is not installed")
    from triton.tools.tensor_descriptor import TensorDescriptor

    from launch_fakes import FakeCFunction
    if launch._triton_nvidia() is None:
        pytest.skip("this Triton's launcher is not the one bind reads")
    record = []
    signature = {"x_ptr": "*fp16", "desc": "tensordesc<int8[16, 64]>", "n": "i32", "BLOCK": "constexpr"}
    run = object.__new__(nvidia.CudaLauncher)  # its attributes as CudaLauncher.__init__ sets them, no compile
    run.launch = nvidia.wrap_handle_tensordesc(FakeCFunction(record), signature, None)
    run.global_scratch_size = run.profile_scratch_size = 0
    run.global_scratch_align = run.profile_scratch_align = 1
    run.launch_cooperative_grid, run.launch_pdl, run.num_ctas = False, True, 1
    kernel = type("Compiled", (), {"run": run, "function": 77, "packed_metadata": (4, 1, 0)})()
    desc = TensorDescriptor.from_tensor(torch.zeros(64, 64, dtype=torch.int8), [16, 64])
    values = [123456, desc, 3120, 16]
    run(2, 3, 1, 99, kernel.function, kernel.packed_metadata, None, None, None, *values)
    fn, args, places = launch.bind(kernel, (2, 3), values, 99)
    fn(*args)
    assert record[0] == record[1] and record[0][0] == "c"
    assert places[1] is None and [args[p] for p in (places[0], places[2], places[3])] == [123456, 3120, 16]


def test_a_parameter_left_to_its_default_takes_tritons_path(fake_driver):
    k = FakeKernel()
    launch.launcher(k)[(1,)](torch.zeros(4), 3, 0.5)  # BLOCK not given
    launch.launcher(k)[(1,)](torch.zeros(4), 3, 0.5)
    assert [r[0] for r in k.record] == ["triton", "triton"]


def test_stand_ins_unsupported_kernels_and_the_switch_keep_the_kernel_itself(fake_driver, monkeypatch):
    stand_in = object()
    assert launch.launcher(stand_in) is stand_in  # tests replace kernels with recorders: they stay as they are
    k = FakeKernel()
    k.params[1].annotation = "i32"  # typed parameters are specialized differently: Triton's path
    assert not launch.supported(k) and launch.launcher(k) is k
    monkeypatch.setenv(launch.ENV, "0")
    assert launch.launcher(FakeKernel()).__class__ is FakeKernel


def test_only_the_triton_it_follows(fake_driver, monkeypatch):
    assert launch.triton_matches("3.6.0") and launch.triton_matches("3.6.1+git") and not launch.triton_matches("3.7.0")
    assert not launch.triton_matches("3.5.1") and not launch.triton_matches("main")
    monkeypatch.setattr(launch, "triton", type("T", (), {"__version__": "3.7.0"})())
    k = FakeKernel()
    assert not launch.supported(k) and launch.launcher(k) is k


def test_argument_keys():
    t = torch.zeros(8)
    assert launch.arg_key(t, False) == (torch.float32, True) and launch.arg_key(t[1:], False) == (torch.float32, False)
    assert launch.arg_key(1, False) == 1 and launch.arg_key(0, False) == ("i32", True)
    assert launch.arg_key(17, False) == ("i32", False) and launch.arg_key(1 << 31, False) == ("i64", True)
    assert launch.arg_key(1 << 63, False) == ("u64", True) and launch.arg_key(-5, False) == ("i32", False)
    assert launch.arg_key(2.5, False) is float and launch.arg_key(None, False) is None
    assert launch.arg_key(True, False) == (bool, True) and launch.arg_key(64, True) == 64
    with pytest.raises(TypeError, match="str"):
        launch.arg_key("x", False)


def test_a_launch_key_is_arg_key_of_each_argument():
    """``args_key`` inlines ``arg_key``'s tensor and constexpr cases: the same key for every kind, a Parameter (a
    tensor subclass) included, and the same refusal of an argument it cannot key."""
    t = torch.zeros(8)
    values = [t, t[1:], torch.nn.Parameter(torch.zeros(4), requires_grad=False), 1, 0, 17, 1 << 40, 2.5, None, True,
              64, "constexpr string", (1, 2)]
    constexpr = [False] * 10 + [True] * 3
    assert launch.args_key(values, constexpr) == tuple(launch.arg_key(v, c) for v, c in zip(values, constexpr))
    with pytest.raises(TypeError, match="str"):
        launch.args_key([t, "x"], [False, False])


def test_argument_keys_separate_what_triton_specializes():
    """Against Triton 3.6's own specialization: two values with the same key get the same specialization."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    t = torch.zeros(64, dtype=torch.int8)
    values = [t, t[1:], t[16:], t[3:], t.view(torch.bfloat16), 0, 1, 2, 16, 17, 32, (1 << 31) - 1, 1 << 31,
              (1 << 31) + 16, 1 << 63, -5, -16, 1.5, 2.0, None]
    specs = {}
    for v in values:
        spec = native_specialize_impl(CUDABackend, v, False, True, True)
        specs.setdefault(launch.arg_key(v, False), set()).add(spec)
    assert all(len(s) == 1 for s in specs.values()), specs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 37, 3120, 5000])
@pytest.mark.parametrize("unsigned", [False, True])
def test_the_fast_path_gives_tritons_bits(m, unsigned, monkeypatch):
    """Same outputs with the fast launcher as with Triton's own, over inputs whose alignment and sizes change the
    kernel Triton compiles (m = 1 is a constant; an input one element off a 16-byte boundary), in an order where a
    wrong key would reuse a kernel compiled for other inputs; at 3120 and 5000 rows the quantizer splits K and
    the GEMM is Gluon's on an H200."""
    pytest.importorskip("triton", reason="Triton is not installed")
    from wan_w4a4.kernels import triton_w4a4 as tw

    g = torch.Generator().manual_seed(0)
    k, n = 640, 384
    p = nm.from_float(torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g),
                      smooth=torch.rand(k, generator=g) + 0.5, lr_down=torch.randn(k, 32, generator=g) * 0.1,
                      lr_up=torch.randn(32, n, generator=g) * 0.1, clip=torch.linspace(1.0, 0.6, 3), num_bins=3,
                      act_unsigned=unsigned).to("cuda")
    big = torch.randn(m * k + 8, generator=g).bfloat16().cuda()
    if unsigned:
        big = torch.nn.functional.gelu(big.float(), approximate="tanh").bfloat16()
    inputs = [big[:m * k].view(m, k), big[1:1 + m * k].view(m, k), big[8:8 + m * k].view(m, k)]
    assert [x.data_ptr() % 16 == 0 for x in inputs] == [True, False, True]
    b = torch.tensor(1, device="cuda")
    monkeypatch.setenv(launch.ENV, "0")
    ref = [tw.w4a4_linear(x, p, b) for x in inputs]
    monkeypatch.setenv(launch.ENV, "1")
    for _ in range(2):  # the first round keys each launch through Triton, the second runs them directly
        out = [tw.w4a4_linear(x, p, b) for x in inputs]
        assert all(torch.equal(o, r) for o, r in zip(out, ref))
    assert any(isinstance(v, launch.Launcher) and v.kernels for v in launch._launchers.values())
