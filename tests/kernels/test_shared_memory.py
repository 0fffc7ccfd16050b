"""Shared memory of the GEMM and quantizer kernels on GPUs we cannot run here, compiled offline (Triton's compiler
with an explicit target needs no GPU): every tile configuration that ``gemm_config`` can choose must fit the
per-block limit of the GPU that would run it, or that GPU fails at the first large call with Triton's
OutOfResources. The widest cases are taken: fp32 output, the GEMMs at a folded LoRA's rank padding of 128, the
quantizer at each GPU's ``max_rank_pad``, every argument specialized as Wan's shapes specialize it. Skips without
Triton (CI)."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (GPU machines; or a CPU wheel for this test)")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from wan_w4a4.kernels import triton_w4a4 as tw  # noqa: E402

# Maximum dynamic shared memory per block (CUDA C++ Programming Guide, compute capabilities table): A100 and Orin
# (sm_87) 163 KiB; RTX 30 / RTX 40 / RTX 50 99 KiB; H100/H200, B200 and B300 (sm_103) 227 KiB.
LIMIT = {80: 163 << 10, 86: 99 << 10, 87: 163 << 10, 89: 99 << 10, 90: 227 << 10, 100: 227 << 10, 103: 227 << 10,
         120: 99 << 10}
TOKENS = (1024, 8192, 32760)  # one per tile configuration of gemm_config
EPILOGUE = dict(sx_ptr="*fp32", ws_ptr="*fp32", u_ptr="*bf16", l2_ptr="*bf16", bias_ptr="*fp32", wsum_ptr="*i32",
                y_ptr="*fp32", M="i32", N="i32", K="i32", R="i32", stride_ym="i32")


def _aligned(kernel, sig: dict) -> dict:
    """Every pointer and integer argument specialized as a launch on Wan's shapes specializes it (Triton marks those
    divisible by 16; a rank of 96 or 128 is): then the compiler may pipeline the loads it could not otherwise, and the
    kernel takes the most shared memory (a rank-256 branch fit Hopper at rank 200 and overflowed at 256 on the H200,
    kernels/README.md, session 30)."""
    return {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in sig.items() if kind.startswith("*") or kind == "i32"}


def _shared(kernel, operands: dict, cfg: dict, cc: int, r_pad: int, **const) -> int:
    const = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], R_PAD=r_pad, HAS_LR=True,
                 HAS_BIAS=True, OFFSET=128, **const)
    sig = dict(operands, **EPILOGUE, **{name: "constexpr" for name in const})
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=const, attrs=_aligned(kernel, sig)),
                              target=GPUTarget("cuda", cc, 32),
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return compiled.metadata.shared


@pytest.mark.parametrize("cc", [80, 86, 89, 100, 120])
@pytest.mark.parametrize("m", TOKENS)
def test_the_triton_gemm_fits_every_gpu_that_runs_it(cc, m):
    cfg = tw.gemm_config(m, async_wgmma=False)  # only sm_90 runs the Gluon kernels
    if tw.tma_available((cc // 10, cc % 10)):
        kernel = tw._gemm_i8_tma_kernel
        operands = dict(a_desc=f"tensordesc<i8[{cfg['BM']}, {cfg['BK']}]>",
                        b_desc=f"tensordesc<i8[{cfg['BN']}, {cfg['BK']}]>")
    else:
        kernel, operands = tw._gemm_i8_kernel, dict(a_ptr="*i8", b_ptr="*i8")
    shared = _shared(kernel, operands, cfg, cc, r_pad=128)
    assert shared <= LIMIT[cc], f"sm_{cc}, {m} tokens, {cfg}: {shared} B of shared memory, limit {LIMIT[cc]}"


@pytest.mark.parametrize("out_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("rows", [False, True])  # the configuration's store_rows (gluon_gemm.STORE_ROWS)
@pytest.mark.parametrize("r_pad", [32, 128])
def test_the_gluon_gemm_fits_hopper_where_it_is_chosen(r_pad, rows, out_dtype):
    gg = tw.gg
    if gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    cfg = dict(tw.gemm_config(32760, async_wgmma=True), store_rows=rows)
    ws = gg.warp_specialized(cfg, r_pad)
    store_rows = gg.store_rows(cfg, ws, {"fp16": torch.float16, "fp32": torch.float32}[out_dtype])
    compiled = gg.compile_offline(cfg, out_dtype=out_dtype, offset=128, r_pad=r_pad, ws=ws, store_rows=store_rows)
    assert compiled.metadata.shared <= LIMIT[90]


def test_the_warp_specialised_kernel_cannot_stage_a_4_byte_tile():
    """store_rows leaves 4-byte outputs of the warp-specialised kernel to the direct stores: staging them would
    overflow Hopper's shared memory."""
    gg = tw.gg
    if gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    cfg = tw.gemm_config(32760, async_wgmma=True)
    compiled = gg.compile_offline(cfg, out_dtype="fp32", offset=128, r_pad=32, ws=True, store_rows=True)
    assert compiled.metadata.shared > LIMIT[90]


def test_the_warp_specialised_kernel_takes_every_rank_padding_that_fits():
    """WS_MAX_RANK_PAD is the largest padding the warp-specialised kernel fits: the next one (x2) overflows."""
    gg = tw.gg
    if gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    cfg = tw.gemm_config(32760, async_wgmma=True)
    compiled = gg.compile_offline(cfg, out_dtype="fp32", offset=128, r_pad=2 * gg.WS_MAX_RANK_PAD, ws=True)
    assert compiled.metadata.shared > LIMIT[90]


@pytest.mark.parametrize("out_dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("stages", [4, 5])
def test_the_ping_pong_kernel_takes_every_rank_padding_that_fits(stages, out_dtype):
    """PP_MAX_RANK_PAD: the ping-pong kernel (``WAN_W4A4_GEMM=pp``) fits Hopper with both warpgroups' epilogue tiles
    up to that padding at four or five stages, rows staged for any output dtype; the next padding (x2) overflows, so
    ``triton_w4a4._launch_gluon`` gives those calls the 256 x 128 kernels."""
    gg = tw.gg
    if gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    cfg = dict(gg.PP_CONFIG, num_stages=stages)
    for r_pad in (16, 32, gg.PP_MAX_RANK_PAD):
        fits = gg.compile_offline(cfg, out_dtype=out_dtype, offset=128, r_pad=r_pad, pp=True, store_rows=True)
        assert fits.metadata.shared <= LIMIT[90], (r_pad, fits.metadata.shared)
    wider = gg.compile_offline(cfg, out_dtype=out_dtype, offset=128, r_pad=2 * gg.PP_MAX_RANK_PAD, pp=True,
                               store_rows=True)
    assert wider.metadata.shared > LIMIT[90]


def _quantizer_kernels(r_pad: int) -> list:
    """(kernel, signature, constexprs) of the quantizer's kernels with a tl.dot (the low-rank projection) at rank
    padding ``r_pad``: the statistics kernel, also with its wide programs (``quant_plan``: many tokens of K <= 8192),
    the one-launch quantizer and the same joined with the weight expansion (``_prologue_kernel``), in its widest steps
    (``ONE_LAUNCH_GPB``)."""
    x = dict(x_ptr="*fp16", s_ptr="*fp32", l1_ptr="*bf16")
    stats_sig = dict(x, rmax_part_ptr="*fp32", u_part_ptr="*fp32", u_ptr="*bf16", M="i32", K="i32", R="i32", KC="i32",
                     stride_xm="i32", shift="fp32")
    return [
        (tw._act_stats_kernel, stats_sig,
         dict(BLOCK_M=tw.QUANT_BLOCK_M, BK=256, R_PAD=r_pad, HAS_LR=True, DIRECT_U=False, INV_S=True)),
        (tw._act_stats_kernel, stats_sig,
         dict(BLOCK_M=tw.QUANT_BLOCK_M, BK=256, R_PAD=r_pad, HAS_LR=True, DIRECT_U=True, INV_S=True)),
        (tw._act_stats_kernel, stats_sig,
         dict(BLOCK_M=tw.STATS_ROWS_WIDE, BK=tw.STATS_BK_WIDE, R_PAD=r_pad, HAS_LR=True, DIRECT_U=True, INV_S=True)),
        (tw._act_quant_fused_kernel, dict(x, clip_ptr="*fp32", bin_ptr="*i64", xq_ptr="*i8", sx_ptr="*fp32",
                                          u_ptr="*bf16", M="i32", K="i32", R="i32", stride_xm="i32", shift="fp32",
                                          inv_qf="fp32"),
         dict(QMIN=-8, QMAX=7, FMAX=16, OFFSET=0, BLOCK_M=16, GROUP=64, GPB=tw.ONE_LAUNCH_GPB, R_PAD=r_pad,
              HAS_LR=True, BK=256, INV_S=False)),
        (tw._prologue_kernel, dict(x, clip_ptr="*fp32", bin_ptr="*i64", xq_ptr="*i8", sx_ptr="*fp32", u_ptr="*bf16",
                                   qw_ptr="*u8", wf_ptr="*u8", w8_ptr="*i8", wsum_ptr="*i32", M="i32", K="i32",
                                   R="i32", N="i32", stride_xm="i32", shift="fp32", inv_qf="fp32",
                                   QUANT_PROGRAMS="i32"),
         dict(QMIN=0, QMAX=15, FMAX=16, OFFSET=128, BLOCK_M=16, GROUP=64, GPB=tw.ONE_LAUNCH_GPB, R_PAD=r_pad,
              HAS_LR=True, BK=256, INV_S=False, EXPAND_BN=tw.EXPAND_BN, WSUM=True)),
    ]


def _quantizer_shared(kernel, sig: dict, const: dict, cc: int) -> int:
    sig = dict(sig, **{name: "constexpr" for name in const})
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=const, attrs=_aligned(kernel, sig)),
                              target=GPUTarget("cuda", cc, 32), options=dict(num_warps=4, enable_fp_fusion=False))
    return compiled.metadata.shared


def _gemm_shared(cc: int, m: int, r_pad: int) -> int:
    """Shared memory of the GEMM that ``triton_w4a4.gemm`` launches for ``m`` tokens on ``cc`` at rank padding
    ``r_pad`` and fp32 output: on sm_90 the Gluon one-tile kernel (wider paddings than the persistent and
    warp-specialised kernels take), elsewhere Triton's TMA tile or pointer-load kernel."""
    if cc == 90:
        cfg = tw.gemm_config(m, async_wgmma=True)
        rows = tw.gg.store_rows(cfg, False, torch.float32)
        return tw.gg.compile_offline(cfg, out_dtype="fp32", offset=128, r_pad=r_pad, store_rows=rows).metadata.shared
    cfg = tw.gemm_config(m, async_wgmma=False)
    if tw.tma_available((cc // 10, cc % 10)):
        operands = dict(a_desc=f"tensordesc<i8[{cfg['BM']}, {cfg['BK']}]>",
                        b_desc=f"tensordesc<i8[{cfg['BN']}, {cfg['BK']}]>")
        return _shared(tw._gemm_i8_tma_kernel, operands, cfg, cc, r_pad=r_pad)
    return _shared(tw._gemm_i8_kernel, dict(a_ptr="*i8", b_ptr="*i8"), cfg, cc, r_pad=r_pad)


@pytest.mark.parametrize("cc", [80, 86, 87, 89, 90, 100, 103, 120])
def test_max_rank_pad_is_the_widest_branch_that_every_kernel_fits(cc):
    """``triton_w4a4.max_rank_pad``: at that padding every quantizer kernel and the GEMM of each token bucket fit the
    GPU's shared memory; at twice it a kernel a call takes overflows, so ``unsupported_reason`` must refuse wider
    branches before Triton's OutOfResources (on the H200, rank 256: kernels/README.md, session 30). Rank 32, the
    branch calibration makes, fits every GPU."""
    if cc == 90 and tw.gg.gluon is None:
        pytest.skip("this Triton has no Gluon")
    widest = tw.max_rank_pad((cc // 10, cc % 10))
    sizes = {}
    for r_pad in (widest, 2 * widest):
        sizes[r_pad] = [_quantizer_shared(*k, cc) for k in _quantizer_kernels(r_pad)]
        sizes[r_pad] += [_gemm_shared(cc, m, r_pad) for m in TOKENS]
    assert max(sizes[widest]) <= LIMIT[cc], (cc, widest, sizes[widest])
    assert max(sizes[2 * widest]) > LIMIT[cc], (cc, 2 * widest, sizes[2 * widest])
