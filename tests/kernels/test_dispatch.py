"""The backend dispatcher (kernels/__init__.py): default choice, forcing, refusals with reasons,
and that Triton is imported only when a CUDA call could use it."""
import subprocess
import sys
import types

import pytest
import torch

from wan_w4a4 import kernels
from wan_w4a4.kernels import numerics as nm


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(0)
    return nm.from_float(torch.randn(64, 256, generator=g), torch.randn(64, generator=g),
                         clip=torch.tensor([1.0, 0.7]), num_bins=2)


@pytest.fixture
def fake_triton(monkeypatch):
    """A stand-in Triton backend on a pretend CUDA machine: records calls, refuses when told to."""
    calls = []
    mod = types.SimpleNamespace(refusal=None)
    mod.checks = 0

    def unsupported_reason(x, p):
        mod.checks += 1
        return mod.refusal

    mod.unsupported_reason = unsupported_reason
    mod.w4a4_linear = lambda x, p, b: pytest.fail("the dispatcher checks the call itself and runs run_checked")
    mod.run_checked = lambda x, p, b: calls.append((x, p, b)) or "triton-result"
    mod.calls = calls
    monkeypatch.setitem(kernels._imports, "triton_w4a4", (mod, None))
    # replay.py wraps the real triton_w4a4; without it the dispatcher runs the backend's run_checked
    monkeypatch.setitem(kernels._imports, "replay", (None, "the stand-in backend has no replay"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return mod


def cuda_input():
    # Only .device is read by the dispatcher; the fake backend never touches the data.
    return types.SimpleNamespace(device=torch.device("cuda", 0), is_cuda=True)


@pytest.mark.slow  # a new Python process importing torch
def test_import_does_not_import_triton():
    code = ("import sys, torch\n"
            "import wan_w4a4.kernels as k\n"
            "from wan_w4a4.kernels import numerics as nm\n"
            "assert 'triton' not in sys.modules and 'wan_w4a4.kernels.triton_w4a4' not in sys.modules\n"
            "p = nm.from_float(torch.randn(8, 128))\n"
            "k.w4a4_linear(torch.randn(2, 128), p)\n"
            "k.available_backends('cpu')\n"
            "assert 'triton' not in sys.modules, 'a CPU call imported triton'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_uses_the_reference(layer):
    x = torch.randn(5, 256)
    assert kernels.select_backend(x, layer) == "reference"
    assert torch.equal(kernels.w4a4_linear(x, layer, 1), nm.w4a4_linear(x, layer, 1))


def test_available_backends_says_why():
    cpu = kernels.available_backends("cpu")
    assert set(cpu) == set(kernels.BACKENDS) == {"reference", "triton"}
    assert cpu["reference"] is None
    assert "CUDA" in cpu["triton"]


@pytest.mark.parametrize("value", ["reference", "REFERENCE", " reference "])
def test_force_reference(layer, value, monkeypatch):
    x = torch.randn(3, 256)
    assert kernels.select_backend(x, layer, backend=value) == "reference"
    monkeypatch.setenv(kernels.ENV_VAR, value)
    assert kernels.select_backend(x, layer) == "reference"


def test_forcing_an_unavailable_backend_raises_with_the_reason(layer, monkeypatch):
    x = torch.randn(3, 256)
    with pytest.raises(kernels.BackendUnavailable, match="'triton' was forced by the backend argument.*CUDA"):
        kernels.w4a4_linear(x, layer, backend="triton")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(kernels.BackendUnavailable, match=r"\$WAN_W4A4_BACKEND.*CUDA"):
        kernels.w4a4_linear(x, layer)


def test_argument_overrides_environment(layer, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.select_backend(torch.randn(3, 256), layer, backend="reference") == "reference"
    assert kernels.select_backend(torch.randn(3, 256), layer, backend="auto") == "reference"


def test_unknown_backend(layer, monkeypatch):
    with pytest.raises(ValueError, match="unknown W4A4 backend 'cutlass'.*reference, triton"):
        kernels.select_backend(torch.randn(3, 256), layer, backend="cutlass")
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=r"\$WAN_W4A4_BACKEND"):
        kernels.select_backend(torch.randn(3, 256), layer)


@pytest.mark.parametrize("value", ["", "auto", "Auto"])
def test_auto_values(layer, value, monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, value)
    assert kernels.select_backend(torch.randn(3, 256), layer) == "reference"


def test_cuda_input_prefers_triton(layer, fake_triton):
    x = cuda_input()
    assert kernels.available_backends("cuda") == {"reference": None, "triton": None}
    assert kernels.select_backend(x, layer) == "triton"
    fake_triton.checks = 0
    assert kernels.w4a4_linear(x, layer, 1) == "triton-result"
    assert fake_triton.calls == [(x, layer, 1)]
    assert fake_triton.checks == 1  # the kernel's own check runs once per layer call, in the dispatcher


def test_cuda_input_falls_back_when_the_kernel_refuses(layer, fake_triton, caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    fake_triton.refusal = "in_features 200 is not a multiple of 128"
    x = cuda_input()
    assert kernels.select_backend(x, layer) == "reference"
    assert kernels.select_backend(x, layer) == "reference"
    warnings = [r for r in caplog.records if "slow torch reference" in r.getMessage()]
    assert len(warnings) == 1 and "multiple of 128" in warnings[0].getMessage()  # said once, with why
    with pytest.raises(kernels.BackendUnavailable, match="multiple of 128"):
        kernels.select_backend(x, layer, backend="triton")
    assert kernels.select_backend(x, layer, backend="reference") == "reference"


def test_triton_module_that_fails_to_import(layer, monkeypatch):
    # A copy of the import table: the failure recorded here must not outlive the test (a later GPU test in the
    # same process would find the Triton backend "failed to import").
    monkeypatch.setattr(kernels, "_imports", {k: v for k, v in kernels._imports.items() if k != "triton_w4a4"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_import = kernels.importlib.import_module

    def failing_import(name, package=None):
        if name.endswith("triton_w4a4"):
            raise ImportError("No module named 'triton'")
        return real_import(name, package)

    monkeypatch.setattr(kernels.importlib, "import_module", failing_import)
    reason = kernels.available_backends("cuda")["triton"]
    assert "failed to import" in reason and "No module named 'triton'" in reason
    assert kernels.select_backend(cuda_input(), layer) == "reference"
    with pytest.raises(kernels.BackendUnavailable, match="failed to import"):
        kernels.select_backend(cuda_input(), layer, backend="triton")


@pytest.mark.gpu
def test_gpu_default_is_triton_and_matches_the_reference(layer):
    # On the GPU machine: the real Triton module is chosen by default for a CUDA input.
    # (Kernel accuracy is tests/kernels/test_triton.py's subject; this checks the wiring.)
    p = layer.to("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 256, device="cuda", generator=g).to(torch.bfloat16)
    assert kernels.available_backends("cuda")["triton"] is None
    assert kernels.select_backend(x, p) == "triton"
    ref = kernels.w4a4_linear(x, p, 1, backend="reference")
    out = kernels.w4a4_linear(x, p, torch.tensor(1, device="cuda"))
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert nm.sqnr_db(ref.float(), out.float()) >= 45.0  # test_triton.py's stated tolerance


@pytest.mark.parametrize("m,k,r", [(32760, 13824, 32), (32760, 13824, 96), (32760, 5120, 32), (75600, 13824, 96),
                                   (1000, 5120, 32), (4096, 13824, 0)])
def test_row_passes_fit_the_budget_in_whole_tiles(m, k, r):
    """The Triton linear's passes (kernels/triton_w4a4.py, pure arithmetic, checked here without a GPU):
    one pass while the operands fit, else the fewest equal passes of whole row tiles that fit."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    budget, per_row = tw.PASS_BYTES, k + 4 + 2 * r
    rows = tw.pass_rows(m, k, r)
    if m * per_row <= budget:
        assert rows == m
        return
    n_pass = -(-m // rows)
    assert rows % tw.PASS_ROW_TILE == 0 and rows < m
    assert rows * per_row <= budget + tw.PASS_ROW_TILE * per_row  # rounding up by less than a tile
    assert n_pass <= -(-m * per_row // budget)  # no more passes than the budget needs
    # a LoRA's wider u never makes a pass hold more than the budget allows
    assert tw.pass_rows(m, k, r + 64) * (per_row + 128) <= budget + tw.PASS_ROW_TILE * (per_row + 128)


@pytest.mark.parametrize("m,k,one_launch,block_m,stats_bk", [
    (1024, 5120, True, 16, 0), (2048, 5120, True, 16, 0), (3120, 5120, True, 16, 0), (4096, 5120, True, 16, 0),
    (4097, 5120, False, 32, 0), (8192, 5120, False, 32, 0), (12000, 5120, False, 32, 0), (3120, 13824, False, 32, 0),
    (32760, 5120, False, 64, 128), (75600, 5120, False, 64, 128), (1024, 13824, False, 32, 0),
    (8192, 13824, False, 32, 0), (32760, 13824, False, 32, 0), (1, 256, True, 16, 0)])
def test_quantizer_plan_follows_the_measured_rule(m, k, one_launch, block_m, stats_bk):
    """Which quantizer a call runs (kernels/README.md has the H200 timings behind the rule): one launch for
    few tokens of a short K, else two, which split K only where rows are few; with K whole and K <= 8192 the
    statistics run in 64-row programs over 128-column steps."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    plan = tw.quant_plan(m, k)
    assert (plan.one_launch, plan.block_m, plan.stats_bk) == (one_launch, block_m, stats_bk)
    bk = tw._quant_bk(k)
    tw._check_plan(plan, k, bk)
    assert plan.n_split * plan.kc >= k and plan.kc % bk == 0
    if not one_launch:  # a forced row count is kept, with the quantizing K step
        forced = tw.quant_plan(m, k, block_m=32)
        assert (forced.block_m, forced.stats_bk) == (32, 0)
    if plan.one_launch or m >= 16384:
        assert plan.n_split == 1
    if not plan.one_launch:  # the quantizing launch's own programs (QUANT_ROWS_QUANTIZING)
        assert (plan.quant_rows, plan.quant_warps) == (16, 8)


@pytest.mark.parametrize("k,gpb", [(5120, 8), (13824, 8), (1024, 8), (768, 4), (640, 2), (128, 2)])
def test_the_one_launch_quantizer_steps_over_eight_groups_where_k_allows(k, gpb):
    """``_fused_quant_block`` (one-launch quantizer, prologue) quantizes in steps of ``ONE_LAUNCH_GPB`` groups where K
    is a multiple of them (measured faster, same bits: kernels/README.md, session 27), else in the two-launch
    quantizer's steps; its K loop has no mask, so a step must divide K."""
    from wan_w4a4.kernels import numerics as nm
    from wan_w4a4.kernels import triton_w4a4 as tw
    assert tw._one_launch_gpb(k) == gpb
    for kk in range(nm.PACK_TILE, 16384 + 1, nm.PACK_TILE):  # every K the layout allows, up to 16 384
        assert kk % (nm.GROUP * tw._one_launch_gpb(kk)) == 0, kk
    p = nm.from_float(torch.randn(64, k) * 0.02, None, smooth=torch.rand(k) + 0.5, lr_down=torch.zeros(k, 0),
                      lr_up=torch.zeros(0, 64), clip=torch.ones(1), num_bins=1)
    x = torch.randn(3, k)
    out = {"xq": torch.empty(3, k, dtype=torch.int8), "sx": torch.empty(3)}
    args = tw._fused_quant_args(x, p, torch.tensor(0), tw.quant_plan(3, k, one_launch=True), out)
    assert args["GPB"] == gpb and args["BK"] == tw._quant_bk(k)  # the statistics' steps are unchanged


def test_a_plan_that_does_not_cover_k_is_refused():
    from wan_w4a4.kernels import triton_w4a4 as tw
    bk = tw._quant_bk(640)
    with pytest.raises(ValueError, match="does not cover K = 640"):
        tw._check_plan(tw.QuantPlan(32, 2, 320), 640, bk)  # 320 is not a whole number of 128-column steps
    with pytest.raises(ValueError, match="does not cover"):
        tw._check_plan(tw.QuantPlan(32, 2, 384, True), 640, bk)  # one launch takes K whole
    with pytest.raises(ValueError, match="does not cover"):
        tw._check_plan(tw.QuantPlan(64, 1, 640, stats_bk=32), 640, bk)  # statistics steps of whole groups only
    tw._check_plan(tw.QuantPlan(32, 2, 384), 640, bk)
    tw._check_plan(tw.QuantPlan(64, 1, 640, stats_bk=128), 640, bk)


def test_the_arena_carves_aligned_regions_that_do_not_overlap():
    """A call's transients come from one allocation (``triton_w4a4.Arena``): each region starts on a 256-byte
    boundary, no two overlap, a view of a region's size or less is a contiguous tensor of its own dtype, and a
    view larger than its region is refused."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    sizes = {"xq": 3120 * 5120, "sx": 4 * 3120, "u": 2 * 3120 * 32, "rmax_part": 4 * 5 * 3120, "inv_s": 4 * 5120,
             "w8": 5120 * 5120, "wsum": 4 * 5120, "odd": 3}
    offsets, total = tw.arena_layout(sizes)
    spans = sorted((offsets[n], offsets[n] + b) for n, b in sizes.items())
    assert all(o % tw.ARENA_ALIGN == 0 for o in offsets.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert total == spans[-1][0] + tw.ARENA_ALIGN and total - sum(sizes.values()) < tw.ARENA_ALIGN * len(sizes)
    regions = {"xq": ((3120, 5120), torch.int8), "sx": ((3120,), torch.float32), "u": ((3120, 32), torch.bfloat16),
               "rmax_part": ((5, 3120), torch.float32), "inv_s": ((5120,), torch.float32),
               "w8": ((5120, 5120), torch.int8), "wsum": ((5120,), torch.int32), "odd": ((3,), torch.uint8)}
    assert {n: tw.region_bytes(*spec) for n, spec in regions.items()} == sizes
    arena = tw.Arena(torch.device("cpu"), regions)
    assert arena.buf.numel() == total
    sx = arena.get("sx")
    u = arena.get("u", (1000, 32))  # a ragged last pass takes fewer rows
    assert sx.is_contiguous() and u.is_contiguous() and u.dtype == torch.bfloat16 and u.shape == (1000, 32)
    assert sx.shape == (3120,) and sx.dtype == torch.float32
    assert sx.data_ptr() - arena.buf.data_ptr() == offsets["sx"] and u.data_ptr() - arena.buf.data_ptr() == offsets["u"]
    sx.fill_(1.0)
    u.fill_(2.0)
    assert (arena.get("sx") == 1.0).all()  # writing u did not touch sx
    with pytest.raises(ValueError, match="region sx holds 12480 bytes"):
        arena.get("sx", (3121,))


@pytest.mark.parametrize("m,k,r,plan_kind", [(3120, 13824, 32, "split"), (32760, 5120, 32, "whole"),
                                             (1024, 5120, 32, "one"), (1024, 13824, 0, "split")])
def test_quantizer_regions_are_what_its_plan_writes(m, k, r, plan_kind):
    """``quant_regions``: the outputs always; partial maxima and 1/s for two launches; fp32 partial projections only
    where K is split and there is a branch (one chunk writes u directly)."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    plan = tw.quant_plan(m, k)
    assert {"one": plan.one_launch, "whole": not plan.one_launch and plan.n_split == 1,
            "split": plan.n_split > 1}[plan_kind]
    f32 = torch.float32
    expect = {"xq": ((m, k), torch.int8), "sx": ((m,), f32), **({"u": ((m, r), torch.bfloat16)} if r else {})}
    if not plan.one_launch:
        expect.update(rmax_part=((plan.n_split, m), f32), inv_s=((k,), f32))
        if r and plan.n_split > 1:
            expect["u_part"] = ((plan.n_split, m, tw._rank_pad(r)), f32)
    assert tw.quant_regions(m, k, r, plan) == expect
    assert "inv_s" not in tw.quant_regions(m, k, r, plan, with_inv_s=False)
    assert tw.weight_regions(5120, k, True) == {"w8": ((5120, k), torch.int8), "wsum": ((5120,), torch.int32)}


@pytest.mark.parametrize("m,k,n,unsigned,pass_bytes,want", [
    (3120, 5120, 512, False, None, ["quantize_and_expand", "gemm"]),  # a one-frame block Linear: the prologue
    (4096, 5120, 512, False, None, ["quantize_and_expand", "gemm"]),
    (1024, 5120, 512, True, None, ["quantize_and_expand", "gemm"]),  # unsigned: the prologue sums the rows too
    (4097, 5120, 512, False, None, ["expand_weight", "quantize", "gemm"]),  # two quantizing launches
    (1024, 13824, 512, True, None, ["expand_weight", "quantize", "gemm"]),  # ffn.2's K: two launches
    (3120, 5120, 512, False, 1 << 22, ["expand_weight"] + ["quantize", "gemm"] * 4),  # row passes (of 1024)
])
def test_a_layer_call_takes_the_prologue_where_its_plan_is_one_launch_of_one_pass(monkeypatch, m, k, n, unsigned,
                                                                                 pass_bytes, want):
    """``run_checked``'s routing, host only (its kernels stand-ins that record the calls): quantizer and expansion
    in one launch (``quantize_and_expand``) exactly where the call is one pass under a one-launch plan; the separate
    launches otherwise. Both give the same bits (tests/kernels/test_triton.py, on a GPU)."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    calls = []

    def record(name, result):
        def fn(*args, **kwargs):
            calls.append(name)
            return result(*args, **kwargs)
        return fn

    def operands(x2d, *args, **kwargs):
        return torch.zeros(x2d.shape, dtype=torch.int8), torch.zeros(x2d.shape[0]), None

    monkeypatch.setattr(tw, "quantize_and_expand", record("quantize_and_expand", lambda x2d, p, b, plan, with_sum, a: (
        *operands(x2d), torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, dtype=torch.int32) if with_sum else None)))
    monkeypatch.setattr(tw, "quantize", record("quantize", operands))
    monkeypatch.setattr(tw, "expand_weight", record("expand_weight", lambda p, with_sum=False, arena=None: (
        (torch.zeros(n, k, dtype=torch.int8), torch.zeros(n, dtype=torch.int32)) if with_sum
        else torch.zeros(n, k, dtype=torch.int8))))
    monkeypatch.setattr(tw, "gemm", record("gemm", lambda xq, sx, u, p, dtype, out=None, **kw: torch.zeros(
        xq.shape[0], n, dtype=dtype)))
    monkeypatch.setattr(tw, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(tw, "_index", lambda device: 0)
    g = torch.Generator().manual_seed(0)
    p = nm.from_float(torch.randn(n, k, generator=g) * 0.05, act_unsigned=unsigned)
    if pass_bytes:
        assert tw.pass_rows(m, k, p.rank, pass_bytes) == 1024
    y = tw.run_checked(torch.zeros(m, k, dtype=torch.bfloat16), p, 0, pass_bytes=pass_bytes)
    assert y.shape == (m, n) and calls == want


def _shaped_layer(n: int, k: int, rank: int) -> nm.W4A4Params:
    """A layer of these shapes (zeros): what a call's plan reads."""
    return nm.W4A4Params(qweight=torch.zeros(n, k // 2, dtype=torch.uint8), wscale=torch.zeros(n),
                         wfactor=torch.ones(n, k // nm.GROUP, dtype=torch.uint8), smooth=torch.ones(k),
                         lr_down=torch.zeros(k, rank, dtype=torch.bfloat16),
                         lr_up=torch.zeros(rank, n, dtype=torch.bfloat16), clip=torch.ones(4))


@pytest.mark.parametrize("m,k,rank,divides", [
    (4096, 5120, 32, True), (6240, 5120, 32, True), (7200, 13824, 32, True), (8192, 13824, 1278, True),
    (8192, 13824, 1279, False), (8193, 5120, 32, False), (9360, 5120, 32, False), (14400, 13824, 32, False),
    (16384, 13824, 32, False), (16385, 5120, 32, False), (32760, 13824, 32, False)])
def test_calls_of_up_to_16384_rows_are_replayable_and_up_to_8192_in_one_pass_divide(monkeypatch, m, k, rank, divides):
    """Two 480p latent frames (6240 rows with cond and uncond), one 720p frame (7200) and 8192 rows of Wan's ffn.2 up
    to rank 1278 are one pass whose quantizer divides by s itself (no 1/s region). Above 8192 rows, or in two passes,
    1/s is made first by a torch call that ``replay.py`` re-issues (kernels/README.md, sessions 29 and 30). All of
    them are replayed, up to ``REPLAY_MAX_ROWS``."""
    from wan_w4a4.kernels import triton_w4a4 as tw
    monkeypatch.setattr(tw, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(tw, "_index", lambda device: 0)
    c = tw.call_plan(torch.zeros(m, k, dtype=torch.bfloat16), _shaped_layer(256, k, rank))
    assert c.replayable == (m <= 16384) and ("inv_s" not in c.regions) == divides
    if m <= 8192:
        assert (c.rows >= m) == (rank <= 1278)  # one pass


def test_widest_rank_is_the_kernels_limit_where_they_run(monkeypatch):
    """``kernels.widest_rank``: None off CUDA or without Triton; on a GPU ``triton_w4a4.max_rank_pad`` of its compute
    capability (what nodes/lora.py warns against at fold time)."""
    import wan_w4a4.kernels as kernels
    from wan_w4a4.kernels import triton_w4a4 as tw
    assert kernels.widest_rank(torch.device("cpu")) is None
    monkeypatch.setattr(kernels, "_triton_device_reason", lambda device: "no Triton here")
    assert kernels.widest_rank(torch.device("cuda")) is None
    monkeypatch.setattr(kernels, "_triton_device_reason", lambda device: None)
    monkeypatch.setattr(kernels, "_triton_module", lambda: (tw, None))
    for capability, widest in [((9, 0), 128), ((10, 0), 128), ((8, 0), 64), ((8, 6), 32), ((8, 9), 32), ((12, 0), 32)]:
        monkeypatch.setattr(tw, "_capability", lambda index, c=capability: c)
        assert kernels.widest_rank(torch.device("cuda", 0)) == widest == tw.max_rank_pad(capability)
