"""Triton kernels against the torch reference (numerics.py). GPU only: skipped on CPU machines.

What "the same function" means here, per stage:
- quantized activations (int8 operand q * f and the per-token scales): bit-exact;
- int32 accumulation: exact; the epilogue multiplies in the reference's order;
- low-rank branch: bf16 operands with fp32 accumulation in another order -> a tolerance.
So the outputs agree to a few bf16 ulps of the output: we require SQNR(ref, kernel) >= 45 dB and
max |diff| <= 2e-2 * max |ref| per case (bf16 output rounding alone is ~2^-9 = 0.2 %).
"""
import pytest
import torch

from wan_w4a4.kernels import numerics as nm

triton = pytest.importorskip("triton", reason="Triton is not installed (GPU machines only)")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from wan_w4a4.kernels import triton_w4a4 as tw  # noqa: E402  (after the skip: needs triton)

DEV = "cuda"
# Wan2.2 shapes scaled down by 20 / 27 (dim 5120 -> 256, ffn 13824 -> 640): K, N multiples of 128.
SHAPES = [(256, 256), (256, 640), (640, 256)]
# Where the one-launch quantizer takes its widest steps (ONE_LAUNCH_GPB groups: K a multiple of 512, as Wan's 5120).
WIDE_STEPS = [(1024, 256)]


def make_layer(k, n, *, rank=32, bins=3, unsigned=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    smooth = torch.rand(k, generator=g) + 0.5
    l1 = torch.randn(k, rank, generator=g) * 0.1 if rank else None
    l2 = torch.randn(rank, n, generator=g) * 0.1 if rank else None
    clip = torch.linspace(1.0, 0.55, bins)
    p = nm.from_float(w, torch.randn(n, generator=g), smooth=smooth, lr_down=l1, lr_up=l2,
                      clip=clip, num_bins=bins, act_unsigned=unsigned)
    return p.to(DEV)


def make_input(m, k, *, unsigned=False, dtype=torch.bfloat16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:4]] *= 25.0  # outlier channels
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype).to(DEV)


def assert_close_output(ref, out):
    assert torch.isfinite(out).all()
    assert nm.sqnr_db(ref.float(), out.float()) >= 45.0
    assert (ref.float() - out.float()).abs().max() <= 2e-2 * ref.float().abs().max()


def plans(m, k):
    """The default plan and each kind forced: one launch (at two row-block sizes), two launches with K
    whole (u written by the first; the quantizing launch at the default and at the earlier row block),
    and two launches with K in chunks (u summed by the second)."""
    bk = tw._quant_bk(k)
    out = {"default": tw.quant_plan(m, k), "one launch": tw.quant_plan(m, k, one_launch=True, block_m=32),
           "one launch, 16 rows": tw.quant_plan(m, k, one_launch=True, block_m=16),
           "two launches, K whole": tw.QuantPlan(32, 1, k),
           "two launches, K whole, 32-row quantizing programs of 4 warps": tw.QuantPlan(32, 1, k, False, 32, 4),
           "two launches, K whole, wide statistics programs": tw.QuantPlan(tw.STATS_ROWS_WIDE, 1, k,
                                                                           stats_bk=tw.STATS_BK_WIDE)}
    if k // bk >= 2:
        kc = -(-(k // bk) // 2) * bk
        out["two launches, K in chunks"] = tw.QuantPlan(32, -(-k // kc), kc)
    return out


@pytest.mark.parametrize("k,n", SHAPES + WIDE_STEPS)
@pytest.mark.parametrize("m", [1, 37, 300, 1000, 7200, 17000])
@pytest.mark.parametrize("unsigned", [False, True])
def test_quantize_kernel_is_bit_exact(m, k, n, unsigned):
    """Every plan (see triton_w4a4.quant_plan): few rows -> several K chunks, statistics and u summed
    in a second launch; one chunk -> the one-launch kernel. The kernels take 1/s themselves (div.rn),
    the reference multiplies by ``inv_smooth()``: the operands must still agree bit for bit."""
    p = make_layer(k, n, unsigned=unsigned)
    x = make_input(m, k, unsigned=unsigned)
    inv = p.inv_smooth()
    xh = nm.smooth_input(x, p, inv)
    u_ref = xh.to(torch.bfloat16).float() @ p.lr_down.float()
    for name, plan in plans(m, k).items():
        for b in range(p.num_bins):
            xq, sx, u = tw.quantize(x, p, torch.tensor(b, device=DEV), plan)
            a_ref, s_ref = nm.quantize_activation(xh, p.clip[b], unsigned)
            assert torch.equal(sx, s_ref), name
            assert torch.equal(xq, a_ref), name
            assert (u.float() - u_ref).abs().max() <= 1e-2 * u_ref.abs().max() + 1e-3, name


@pytest.mark.parametrize("k,n", SHAPES + WIDE_STEPS)
@pytest.mark.parametrize("m", [1, 37, 300, 1000, 3120])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("rank", [0, 32])
def test_quantize_and_expand_is_the_two_launches_it_joins(m, k, n, unsigned, rank):
    """``_prologue_kernel`` (the one-launch quantizer and the weight expansion in one launch) writes what
    ``quantize`` and ``expand_weight`` write, bit for bit, and so the reference's operands; a layer call under a
    one-launch plan, which takes it, gives the separate launches' output (which calls take it by default:
    test_dispatch.py's routing test)."""
    p = make_layer(k, n, unsigned=unsigned, rank=rank)
    x = make_input(m, k, unsigned=unsigned)
    b = torch.tensor(2, device=DEV)
    plan = tw.quant_plan(m, k, one_launch=True)
    regions = {**tw.quant_regions(m, k, rank, plan), **tw.weight_regions(n, k, unsigned)}
    got = tw.quantize_and_expand(x, p, b, plan, unsigned, tw.Arena(x.device, regions))
    arena = tw.Arena(x.device, regions)
    w8_wsum = tw.expanded(p, unsigned, arena)
    want = (*tw.quantize(x, p, b, plan, arena=arena), *w8_wsum)
    for name, g, w in zip(("xq", "sx", "u", "w8", "wsum"), got, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w)), name
    a_ref, s_ref = nm.quantize_activation(nm.smooth_input(x, p, p.inv_smooth()), p.clip[2], unsigned)
    assert torch.equal(got[0], a_ref) and torch.equal(got[1], s_ref)
    assert torch.equal(got[3], nm.int8_operand(nm.unpack_int4(p.qweight), p.wfactor))
    cap = torch.cuda.get_device_capability()
    tma = tw.tma_available(cap)
    cfg = tw.gemm_config(m, async_wgmma=tma and tw.async_wgmma_available(cap))  # w4a4_linear's choice
    y = tw.gemm(*want[:3], p, x.dtype, tma=tma, config=cfg, w8=want[3], wsum=want[4])
    assert torch.equal(tw.w4a4_linear(x, p, b, one_launch=True), y)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", [1, 37, 1000, 4099])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_matches_reference(m, k, n, unsigned, dtype):
    p = make_layer(k, n, unsigned=unsigned)
    x = make_input(m, k, unsigned=unsigned, dtype=dtype)
    for b in range(p.num_bins):
        out = tw.w4a4_linear(x, p, torch.tensor(b, device=DEV))
        assert out.dtype == dtype and out.shape == (m, n)
        assert_close_output(nm.w4a4_linear(x, p, b), out)


@pytest.mark.parametrize("rank", [32, 96])
def test_quantize_allocates_only_its_outputs_when_k_is_not_split(rank):
    """At video sizes (tens of thousands of tokens) K is one chunk: the quantizer must then allocate its
    outputs, row maxima and 1/s only, not fp32 partial projections ([M, R_PAD] fp32, 10 MB here at rank
    96, padded to 128; that transient is what a LoRA's extra rank would add to the peak)."""
    m, k = 20000, 640
    p = make_layer(k, 256, rank=rank)
    x = make_input(m, k)
    inv, b = p.inv_smooth(), torch.tensor(1, device=DEV)
    plan = tw.quant_plan(m, k)
    assert plan.n_split == 1 and not plan.one_launch
    tw.quantize(x, p, b)  # compile outside the measured call
    torch.cuda.synchronize()
    # Requested bytes, not allocated ones: allocated bytes depend on what earlier tests left in the caching
    # allocator (this test failed after tests/kernels/test_gluon_gemm.py with 383 744 B more "allocated" and
    # passed before it; benchmarks/results/quantizer_peak_diag_h200_2026-11-29.log, kernels/README.md).
    stat = "requested_bytes.all.peak"
    base = torch.cuda.memory_stats()["requested_bytes.all.current"]
    torch.cuda.reset_peak_memory_stats()
    xq, sx, u = tw.quantize(x, p, b)
    torch.cuda.synchronize()
    # xq int8, sx fp32, u bf16, row maxima, 1/s fp32: one allocation, each region on a 256-byte boundary (Arena)
    a = tw.ARENA_ALIGN
    outputs = sum(-(-b // a) * a for b in (m * k, 4 * m, 2 * m * rank, 4 * m, 4 * k))
    assert torch.cuda.memory_stats()[stat] - base <= outputs
    a_ref, s_ref = nm.quantize_activation(nm.smooth_input(x, p, inv), p.clip[1], False)
    assert torch.equal(xq, a_ref) and torch.equal(sx, s_ref)
    u_ref = nm.smooth_input(x, p, inv).to(torch.bfloat16).float() @ p.lr_down.float()
    assert (u.float() - u_ref).abs().max() <= 1e-2 * u_ref.abs().max() + 1e-3


@pytest.mark.parametrize("k,n", SHAPES)
def test_expansion_sums_its_rows_exactly(k, n):
    """The expand launch also makes sum_k w8[n, k] (int32 atomics over K tiles), which restores the
    unsigned activations' offset: exactly the reference's sum, and the same w8."""
    p = make_layer(k, n, unsigned=True)
    w8, wsum = tw.expand_weight(p, with_sum=True)
    ref = nm.int8_operand(nm.unpack_int4(p.qweight), p.wfactor)
    assert torch.equal(w8, ref)
    assert wsum.dtype == torch.int32 and torch.equal(wsum, ref.sum(1, dtype=torch.int32))


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("rank", [0, 32, 96])
@pytest.mark.parametrize("m,k", [(5000, 640), (20000, 640)])  # quantizer split over K in 3, and not
@pytest.mark.parametrize("tma", [True, False])
def test_row_passes_give_the_same_bits(m, k, unsigned, rank, tma):
    """A call in passes over its rows (a small budget forces 4-6, the last one ragged) is the one-pass
    call bit for bit: every pass takes the whole call's quantizer split and GEMM tiles."""
    p = make_layer(k, 384, unsigned=unsigned, rank=rank)
    x = make_input(m, k, unsigned=unsigned)
    budget = m * (k + 4 + 2 * rank) // 5
    rows = tw.pass_rows(m, k, rank, budget)
    assert rows % tw.PASS_ROW_TILE == 0 and 4 <= -(-m // rows) <= 6 and m % rows
    b = torch.tensor(1, device=DEV)
    one = tw.w4a4_linear(x, p, b, tma=tma, pass_bytes=1 << 40)
    passes = tw.w4a4_linear(x, p, b, tma=tma, pass_bytes=budget)
    assert torch.equal(passes, one)
    if rank == 32 and tma:
        assert_close_output(nm.w4a4_linear(x, p, 1), passes)


def test_row_passes_bound_the_activation_operands():
    """What a call holds beyond its output and expanded weights is one pass of activation operands:
    at video sizes this is what keeps a LoRA's wider u (and K-wide int8 activations) out of the peak."""
    m, k, n, rank = 20000, 2560, 256, 96
    p = make_layer(k, n, rank=rank)
    x = make_input(m, k)
    b = torch.tensor(0, device=DEV)
    budget = 8 << 20
    rows = tw.pass_rows(m, k, rank, budget)
    peaks = {}
    for name, nbytes in (("one", 1 << 40), ("passes", budget)):
        tw.w4a4_linear(x, p, b, pass_bytes=nbytes)  # compile outside the measured call
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        y = tw.w4a4_linear(x, p, b, pass_bytes=nbytes)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del y
    fixed = m * n * 2 + n * k + 4 * k  # output bf16, expanded weights int8, 1/s fp32
    one_pass = rows * (k + 4 + 2 * rank) + 4 * rows  # xq, sx, u; row maxima fp32 (two launches, K whole)
    print(f"\npeak beyond inputs: one pass {peaks['one'] / 2**20:.1f} MiB, passes of {rows} rows "
          f"{peaks['passes'] / 2**20:.1f} MiB (bound {(fixed + one_pass) / 2**20:.1f} MiB)")
    # The native caching allocator counts a reused block it does not split (a remainder under 1 MiB) as
    # allocated: up to 1 MiB over each request, for the two large operands of a pass (xq, u).
    assert peaks["passes"] <= fixed + one_pass + 2 * 2**20
    assert peaks["one"] - peaks["passes"] >= (m - rows) * k  # the int8 activations of all but one pass


@pytest.mark.parametrize("m", [77, 9000])
@pytest.mark.parametrize("rank", [0, 16, 48, 96, 128])
def test_any_rank(rank, m):
    """LoRAs widen the low-rank branch, so every rank the GPU's shared memory holds must work (padded in the kernel;
    ``max_rank_pad``: 128 on Hopper, a rank-32 branch with a LoRA of rank up to 96 folded)."""
    if tw._rank_pad(rank) > tw.max_rank_pad(torch.cuda.get_device_capability()):
        pytest.skip(f"rank {rank} is wider than this GPU's kernels take")
    p = make_layer(256, 640, rank=rank)
    x = make_input(m, 256)
    assert_close_output(nm.w4a4_linear(x, p, 1), tw.w4a4_linear(x, p, 1))


def test_a_branch_wider_than_the_gpu_holds_runs_on_the_reference():
    """A rank whose padding is over ``max_rank_pad`` is refused with the reason before any kernel runs (Triton's
    OutOfResources otherwise, at the first call); the dispatcher runs that layer on the reference instead."""
    from wan_w4a4 import kernels
    widest = tw.max_rank_pad(torch.cuda.get_device_capability())
    p = make_layer(256, 640, rank=widest + 1)
    x = make_input(77, 256)
    why = tw.unsupported_reason(x, p)
    assert why is not None and f"rank {widest + 1}" in why and f"at most rank {widest}" in why
    with pytest.raises(RuntimeError, match="at most rank"):
        tw.w4a4_linear(x, p, 1)
    assert kernels.select_backend(x, p) == "reference"
    assert torch.equal(kernels.w4a4_linear(x, p, 1), nm.w4a4_linear(x, p, 1))
    assert tw.unsupported_reason(x, make_layer(256, 640, rank=widest)) is None


@pytest.mark.parametrize("m", [1, 513, 4099])
@pytest.mark.parametrize("unsigned", [False, True])
def test_all_gemm_paths_agree_exactly(m, unsigned):
    """Pointer and TMA loads, the persistent TMA kernel, and another tile configuration compute the same
    int32 sums and the same epilogue: with rank 0 their outputs are bit-identical. Against the reference
    they differ only where Triton contracts (acc * sx) * sw + bias into one FMA: 1 ulp."""
    p = make_layer(640, 256, rank=0, unsigned=unsigned)
    x = make_input(m, 640, unsigned=unsigned)
    xq, sx, _ = tw.quantize(x, p, torch.tensor(0, device=DEV))
    ref = nm.w4a4_linear(x.float(), p, 0)
    assert torch.equal(tw.expand_weight(p), nm.int8_operand(nm.unpack_int4(p.qweight), p.wfactor))
    narrow = dict(BM=64, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    outs = [tw.gemm(xq, sx, None, p, torch.float32),
            tw.gemm(xq, sx, None, p, torch.float32, tma=True),
            tw.gemm(xq, sx, None, p, torch.float32, config=narrow),
            tw.gemm(xq, sx, None, p, torch.float32, config={**narrow, "persistent": True}, tma=True)]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    ulp = torch.finfo(torch.float32).eps * ref.abs().max()
    assert (outs[0] - ref).abs().max() <= 2 * ulp


@pytest.mark.parametrize("rank", [0, 32, 96])
@pytest.mark.parametrize("m", [4099, 20000])
def test_persistent_gemm_gives_the_tile_kernels_bits(rank, m):
    """The persistent kernel runs the same tiles and epilogue as the one-tile-per-program TMA kernel, so
    with the large-M tile configurations (gemm_config) their bf16 outputs are equal bit for bit; there are
    more tiles than SMs, so programs run several. Where its buffers would not fit shared memory (rank
    above 32, 4-byte outputs) the call takes the tile kernel instead of failing."""
    p = make_layer(256, 640, rank=rank)
    x = make_input(m, 256)
    xq, sx, u = tw.quantize(x, p, torch.tensor(1, device=DEV))
    cfg = {**tw.gemm_config(m), "persistent": True}
    assert tw.persistent_fits(rank, torch.bfloat16) == (rank <= 32)
    tile = tw.gemm(xq, sx, u, p, torch.bfloat16, config={**cfg, "persistent": False}, tma=True)
    persistent = tw.gemm(xq, sx, u, p, torch.bfloat16, config=cfg, tma=True)
    assert torch.equal(tile, persistent)
    assert_close_output(nm.w4a4_linear(x, p, 1), persistent)
    assert not tw.persistent_fits(rank, torch.float32)
    wide = tw.gemm(xq, sx, u, p, torch.float32, config=cfg, tma=True)
    assert_close_output(nm.w4a4_linear(x.float(), p, 1), wide)


def test_bin_switch_is_a_device_write_and_graph_capturable():
    """Changing the bin changes the output, recompiles nothing, and works inside a CUDA graph."""
    if torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        # Under cudaMallocAsync (ComfyUI's main.py's allocator) the capture failed at the first Triton launch given a
        # buffer allocated inside it, at Triton's pointer check (H200, kernels/README.md, session 24): this test
        # proves the bin switch needs no host sync, which it can do only under PyTorch's own allocator.
        pytest.skip("a W4A4 call is not capturable under cudaMallocAsync (Triton's pointer check)")
    p = make_layer(256, 256)
    x = make_input(64, 256)
    bin_t = torch.zeros((), dtype=torch.int64, device=DEV)
    tw.w4a4_linear(x, p, bin_t)  # compile
    kernel = tw._gemm_i8_tma_kernel  # the GEMM w4a4_linear runs by default (TMA loads)
    n_compiled = len(kernel.device_caches[0][0]) if hasattr(kernel, "device_caches") else None
    assert n_compiled != 0, "the default GEMM did not compile: this test watches the wrong kernel"
    graph = torch.cuda.CUDAGraph()
    static_out = None
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        static_out = tw.w4a4_linear(x, p, bin_t)
    outs = []
    for b in range(p.num_bins):
        bin_t.fill_(b)
        graph.replay()
        outs.append(static_out.clone())
        assert_close_output(nm.w4a4_linear(x, p, b), outs[-1])
    assert not torch.equal(outs[0], outs[-1])
    if n_compiled is not None:
        assert len(kernel.device_caches[0][0]) == n_compiled


def test_unsupported_shapes_and_devices_say_why():
    p = make_layer(256, 256)
    assert "cpu" in tw.unsupported_reason(torch.zeros(2, 256), p.to("cpu"))
    with pytest.raises(ValueError, match="features"):
        tw.w4a4_linear(torch.zeros(2, 384, device=DEV, dtype=torch.bfloat16), p)
