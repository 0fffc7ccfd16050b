"""Triton kernels for the ``i8g64`` W4A4 linear (CUDA; Hopper first). Same function as
``numerics.w4a4_linear``; the layout and rounding rules are documented there.

Launches per layer (kernels/README.md has the measurements behind this shape):

1. Activation quantization, planned per call by ``quant_plan``:
   - few tokens of a short K (<= 4096 x 8192): one launch, ``_act_quant_fused_kernel``, which takes the row
     maxima and the low-rank input over all of K, then quantizes in a second sweep, dividing by s itself; in a
     layer call that launch also expands the weights (step 2), as ``_prologue_kernel``;
   - otherwise two, ``_act_stats_kernel`` then ``_act_quant_kernel``, over K chunks when there are few
     tokens so that every SM has work, dividing by s themselves in a call of up to ``DIVIDE_MAX_ROWS`` rows in
     one pass, else (more rows, or passes) multiplying by a 1/s made once per call.
   Pass 1 smooths x, takes the (partial) row maxima and the low-rank down projection
   u = bf16(bf16(x^) @ L1); pass 2 picks each group's integer factor, rounds to 4-bit values and writes
   the int8 operand q * f (minus 128 for unsigned inputs, restored exactly in the GEMM's epilogue). The
   clip ratio is read on the device from ``clip[bin]``: switching bins is a one-element device write - no
   recompilation, no host sync, capturable in a CUDA graph.
2. ``_expand_kernel`` - the packed 4-bit weights become a transient int8 copy (q * f) of one layer
   (~20-50 us; freed after the GEMM), and for unsigned inputs the same launch sums its rows (int32
   atomics), which the epilogue needs. Measured faster than unpacking inside the GEMM, whose
   register-to-shared-memory round trip halved the tensor-core rate (kernels/README.md; that fused
   kernel was removed).
3. ``_gemm_i8_tma_kernel`` - int8 x int8 -> int32 over the whole K (exact) on the int8 tensor
   cores, tiles fetched by TMA; the epilogue applies sx * sw, adds the low-rank up projection
   (u @ L2, a small bf16 dot) and the bias, and stores in the input dtype. ``_gemm_i8_kernel`` is the
   same with pointer loads (sm_80..89), ``_gemm_i8_persistent_kernel`` the same as a persistent kernel
   (a configuration option; not the default, see ``gemm_config``). On Hopper (sm_90), above 2048 tokens,
   a Gluon kernel of ``gluon_gemm`` runs instead: the same function with its MMAs kept in flight across K
   steps, warp-specialised where its shared memory fits (``async_wgmma_available``; ``WAN_W4A4_GEMM=triton``
   turns it off, ``WAN_W4A4_GEMM=pp`` runs the ping-pong kernel instead).

At video sizes steps 1 and 3 run in passes over the token rows (``pass_rows``): the int8
activations, their scales and u are then held for one pass of rows, not for all tokens, while the
expanded weights and the output are made once. Each row's result depends only on its own row and
the launch configuration, which every pass takes from the whole call: the passes give the same bits
as one.

The host side matters at few tokens, where a layer call has less GPU work than the host needs to launch it: a
call's transients (one pass's activation operands, 1/s, the expanded weights) come from one allocation (``Arena``),
and every kernel is launched through ``launch.launcher``, which skips Triton's per-call binder once a
specialization has been launched (kernels/README.md, session 24). ``replay.py`` goes further for calls of up to
``REPLAY_MAX_ROWS`` rows: ``call_into``'s launches are recorded once per call signature and re-issued with the next
call's addresses (session 26).

Notation: M tokens, K in, N out, R rank. Requires K % 128 == 0.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple

import torch

from . import gluon_gemm as gg
from . import numerics as nm
from .launch import compute_, launcher, zero_
from .tiles import scale_tile, tile_of

log = logging.getLogger(__name__)

try:  # Triton is optional: CPU installs and CI have none, and nothing here runs there.
    import triton
    import triton.language as tl
    from triton.errors import TritonError
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None
    TritonError = None



def unsupported_reason(x: torch.Tensor, p: nm.W4A4Params) -> str | None:
    """None when the Triton path can run this call, else why not (the dispatcher reports it)."""
    if triton is None:
        return "triton is not installed"
    if not x.is_cuda:
        return f"input is on {x.device.type}, the Triton kernels need CUDA"
    capability = _capability(_index(x.device))
    if capability < (8, 0):
        return "needs compute capability >= 8.0 (int8 tensor cores through tl.dot)"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"input dtype {x.dtype} is not supported"
    if p.in_features % nm.PACK_TILE:
        return f"in_features {p.in_features} is not a multiple of {nm.PACK_TILE}"
    if p.qweight.device != x.device:
        return f"layer tensors are on {p.qweight.device}, input on {x.device}"
    widest = max_rank_pad(capability)
    if _rank_pad(p.rank) > widest:
        return (f"its low-rank branch has rank {p.rank} (a folded LoRA's included); the quantizer's shared memory on "
                f"this GPU holds at most rank {widest}")
    return None


# The widest low-rank branch (its rank padded to a power of two, ``_rank_pad``) whose kernels fit the GPU's shared
# memory per block: the quantizer's statistics and one-launch kernels pipeline L1 tiles [BK, R_PAD]. Compiled offline
# as a launch specializes them (tests/kernels/test_shared_memory.py, whose sizes are the ones the H200 reported:
# 238 592 and 288 768 bytes at rank 256), every kernel fits at these paddings and the quantizer overflows at twice
# them: Triton's OutOfResources at the first call. A folded LoRA widens the branch by its rank (rank 32 and a rank-64
# LoRA: 96, padded to 128); a wider layer is refused here, so the dispatcher runs it on the torch reference and warns.
MAX_RANK_PAD = {(9, 0): 128, (10, 0): 128, (10, 3): 128,  # 227 KiB per block: H100/H200, B200/B300
                (8, 0): 64, (8, 7): 64}  # 163 KiB: A100, Orin


def max_rank_pad(capability: tuple[int, int]) -> int:
    """The widest padded rank the kernels take on a GPU of this compute capability (else 32: 99 KiB per block, as on
    RTX 30, 40 and 50)."""
    return MAX_RANK_PAD.get(tuple(capability), 32)


if triton is not None:

    @triton.jit
    def _round_half_even(y):
        # 1.5 * 2**23: adding and subtracting it rounds fp32 half-to-even (torch.round) for
        # |y| < 2**22; portable (no libdevice), and exact for our clamped range. Callers that pass a
        # product launch with enable_fp_fusion=False, else y * c + 1.5 * 2**23 becomes one fma.
        return (y + 12582912.0) - 12582912.0

    @triton.jit
    def _smoothed(x_rows, s_ptr, k0, rk, m_mask, shift, INV_S: tl.constexpr):
        """x^ = (x + shift) * (1 / s) for one [rows, BK] tile, in fp32. INV_S: ``s_ptr`` holds 1 / s already
        (``W4A4Params.inv_smooth``); else the kernel divides, rounding as ``torch.reciprocal`` rounds (IEEE
        division, div.rn), so x^ is ``numerics.smooth_input``'s bit for bit either way."""
        x = tl.load(x_rows + k0 + rk[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
        if INV_S:
            inv = tl.load(s_ptr + k0 + rk)
        else:
            inv = tl.math.div_rn(1.0, tl.load(s_ptr + k0 + rk))
        return (x + shift) * inv[None, :]

    @triton.jit
    def _stats_range(x_rows, s_ptr, l1_ptr, m_mask, k_lo, k_hi, R, shift,
                     BLOCK_M: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, HAS_LR: tl.constexpr,
                     INV_S: tl.constexpr, TILE_MAX: tl.constexpr):
        """Row maxima of |x^| and the fp32 low-rank projection x^ @ L1 over columns [k_lo, k_hi). TILE_MAX: the
        maxima are kept elementwise over the K steps and reduced across the row once, at the end, else reduced at
        every step. A maximum is exact in any order, so both give the same bits; on the H200 the first took 8-10 %
        less time over K whole at many tokens with the same programs, and up to 3.2x more over the short chunks of
        split plans (kernels/README.md, session 19)."""
        rk = tl.arange(0, BK)
        rr = tl.arange(0, R_PAD)
        rmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        amax = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
        u_acc = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            xh = _smoothed(x_rows, s_ptr, k0, rk, m_mask, shift, INV_S)
            if TILE_MAX:
                amax = tl.maximum(amax, tl.abs(xh))
            else:
                rmax = tl.maximum(rmax, tl.max(tl.abs(xh), axis=1))
            if HAS_LR:
                l1 = tl.load(l1_ptr + (k0 + rk)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
                u_acc = tl.dot(xh.to(tl.bfloat16), l1, u_acc)
        if TILE_MAX:
            rmax = tl.max(amax, axis=1)
        return rmax, u_acc

    @triton.jit
    def _quant_range(x_rows, xq_rows, s_ptr, m_mask, k_lo, k_hi, rmax, scale, shift,
                     QMIN: tl.constexpr, QMAX: tl.constexpr, FMAX: tl.constexpr, OFFSET: tl.constexpr,
                     BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, INV_S: tl.constexpr):
        """Group factors, 4-bit values and the int8 operand q * f - OFFSET for columns [k_lo, k_hi).
        Callers launch with enable_fp_fusion=False (see ``quantize``)."""
        BK: tl.constexpr = GROUP * GPB
        rk = tl.arange(0, BK)
        for k0 in range(k_lo, k_hi, BK):
            xh = _smoothed(x_rows, s_ptr, k0, rk, m_mask, shift, INV_S)
            xg = tl.reshape(xh, [BLOCK_M, GPB, GROUP])
            amax = tl.max(tl.abs(xg), axis=2)  # [BLOCK_M, GPB]
            f = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(amax, rmax[:, None]) * FMAX), 1.0), FMAX * 1.0)
            inv_step = tl.math.div_rn(1.0, scale[:, None] * f)
            q = _round_half_even(xg * inv_step[:, :, None])
            q = tl.minimum(tl.maximum(q, QMIN * 1.0), QMAX * 1.0)
            qf = tl.reshape((q * f[:, :, None] - OFFSET).to(tl.int8), [BLOCK_M, BK])
            tl.store(xq_rows + k0 + rk[None, :], qf, mask=m_mask[:, None])

    @triton.jit
    def _row_scale(rmax, clip_ptr, bin_ptr, inv_qf):
        """Zero rows get maximum 1 (their values quantize to 0 whatever the scale); scale = c[bin] * max / (qmax * fmax)."""
        rmax = tl.where(rmax > 0.0, rmax, 1.0)
        clip = tl.load(clip_ptr + tl.load(bin_ptr))
        return rmax, (rmax * clip) * inv_qf

    @triton.jit
    def _store_u(u_ptr, rm, m_mask, u, R, R_PAD: tl.constexpr):
        rr = tl.arange(0, R_PAD)
        tl.store(u_ptr + rm[:, None].to(tl.int64) * R + rr[None, :], u.to(tl.bfloat16),
                 mask=m_mask[:, None] & (rr[None, :] < R))

    @triton.jit
    def _act_stats_kernel(
        x_ptr, s_ptr, l1_ptr, rmax_part_ptr, u_part_ptr, u_ptr,
        M, K, R, KC, stride_xm, shift,
        BLOCK_M: tl.constexpr, BK: tl.constexpr, R_PAD: tl.constexpr, HAS_LR: tl.constexpr,
        DIRECT_U: tl.constexpr, INV_S: tl.constexpr,
    ):
        """Two-launch quantizer, pass 1 over one K chunk: partial row max of |x^| and fp32 partials of
        x^ @ L1. DIRECT_U (one chunk, the large-M case): the projection is whole, so u = bf16(x^ @ L1) is
        written here and the fp32 partials [M, R_PAD] - 4x the bytes of u at rank 96 - are never allocated;
        there the row maxima are kept elementwise (``_stats_range``'s TILE_MAX)."""
        pid_m = tl.program_id(0)
        s = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        rmax, u_acc = _stats_range(x_rows, s_ptr, l1_ptr, m_mask, s * KC, tl.minimum(s * KC + KC, K), R, shift,
                                   BLOCK_M, BK, R_PAD, HAS_LR, INV_S, DIRECT_U)
        tl.store(rmax_part_ptr + s * M + rm, rmax, mask=m_mask)
        if HAS_LR:
            if DIRECT_U:
                _store_u(u_ptr, rm, m_mask, u_acc, R, R_PAD)
            else:
                rr = tl.arange(0, R_PAD)
                tl.store(u_part_ptr + (s * M + rm[:, None]).to(tl.int64) * R_PAD + rr[None, :], u_acc,
                         mask=m_mask[:, None])

    @triton.jit
    def _act_quant_kernel(
        x_ptr, s_ptr, clip_ptr, bin_ptr, rmax_part_ptr, u_part_ptr, xq_ptr, sx_ptr, u_ptr,
        M, K, R, KC, S, stride_xm, shift, inv_qf,
        QMIN: tl.constexpr, QMAX: tl.constexpr, FMAX: tl.constexpr, OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, R_PAD: tl.constexpr, SUM_U: tl.constexpr,
        INV_S: tl.constexpr,
    ):
        """Two-launch quantizer, pass 2 over one K chunk: row scale from the partial maxima, then
        ``_quant_range``. Chunk 0 also writes the row scales and, when SUM_U (pass 1 left fp32 partials of
        the low-rank input), u = bf16(sum of the partials)."""
        pid_m = tl.program_id(0)
        s = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        rmax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(S):  # max is order-independent: the result does not depend on the split
            rmax = tl.maximum(rmax, tl.load(rmax_part_ptr + i * M + rm, mask=m_mask, other=0.0))
        rmax, scale = _row_scale(rmax, clip_ptr, bin_ptr, inv_qf)
        if s == 0:
            tl.store(sx_ptr + rm, scale, mask=m_mask)
            if SUM_U:
                rr = tl.arange(0, R_PAD)
                u = tl.zeros([BLOCK_M, R_PAD], dtype=tl.float32)
                for i in range(S):
                    u += tl.load(u_part_ptr + (i * M + rm[:, None]).to(tl.int64) * R_PAD + rr[None, :],
                                 mask=m_mask[:, None], other=0.0)
                _store_u(u_ptr, rm, m_mask, u, R, R_PAD)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        xq_rows = xq_ptr + rm[:, None].to(tl.int64) * K
        _quant_range(x_rows, xq_rows, s_ptr, m_mask, s * KC, tl.minimum(s * KC + KC, K), rmax, scale, shift,
                     QMIN, QMAX, FMAX, OFFSET, BLOCK_M, GROUP, GPB, INV_S)

    @triton.jit
    def _fused_quant_block(
        pid_m, x_ptr, s_ptr, l1_ptr, clip_ptr, bin_ptr, xq_ptr, sx_ptr, u_ptr,
        M, K, R, stride_xm, shift, inv_qf,
        QMIN: tl.constexpr, QMAX: tl.constexpr, FMAX: tl.constexpr, OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, R_PAD: tl.constexpr, HAS_LR: tl.constexpr,
        BK: tl.constexpr, INV_S: tl.constexpr,
    ):
        """The whole quantizer for row block ``pid_m`` (K not split): row maxima and u over all of K, then the
        quantization in a second sweep over the same rows - the same expressions as the split kernels,
        with no partial maxima or partial projections in memory."""
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < M
        x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
        rmax, u_acc = _stats_range(x_rows, s_ptr, l1_ptr, m_mask, 0, K, R, shift, BLOCK_M, BK, R_PAD, HAS_LR, INV_S,
                                   False)
        rmax, scale = _row_scale(rmax, clip_ptr, bin_ptr, inv_qf)
        tl.store(sx_ptr + rm, scale, mask=m_mask)
        if HAS_LR:  # bf16(0 + p) == bf16(p): the same values as summing one partial
            _store_u(u_ptr, rm, m_mask, u_acc, R, R_PAD)
        _quant_range(x_rows, xq_ptr + rm[:, None].to(tl.int64) * K, s_ptr, m_mask, 0, K, rmax, scale, shift,
                     QMIN, QMAX, FMAX, OFFSET, BLOCK_M, GROUP, GPB, INV_S)

    @triton.jit
    def _act_quant_fused_kernel(
        x_ptr, s_ptr, l1_ptr, clip_ptr, bin_ptr, xq_ptr, sx_ptr, u_ptr,
        M, K, R, stride_xm, shift, inv_qf,
        QMIN: tl.constexpr, QMAX: tl.constexpr, FMAX: tl.constexpr, OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, R_PAD: tl.constexpr, HAS_LR: tl.constexpr,
        BK: tl.constexpr, INV_S: tl.constexpr,
    ):
        """The whole quantizer in one launch, one row block per program (``_fused_quant_block``)."""
        _fused_quant_block(tl.program_id(0), x_ptr, s_ptr, l1_ptr, clip_ptr, bin_ptr, xq_ptr, sx_ptr, u_ptr,
                           M, K, R, stride_xm, shift, inv_qf, QMIN, QMAX, FMAX, OFFSET, BLOCK_M, GROUP, GPB, R_PAD,
                           HAS_LR, BK, INV_S)

    @triton.jit
    def _epilogue(acc, rm, rn, M, N, R, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr, stride_ym,
                  R_PAD: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr):
        """y = ((acc + offset * wsum) * sx) * sw + u @ L2 + bias, in the reference's order; masked store."""
        m_mask = rm < M
        n_mask = rn < N
        rm_l = rm.to(tl.int64)
        rn_l = rn.to(tl.int64)
        y = scale_tile(acc, rn, m_mask, n_mask, sx_ptr, ws_ptr, wsum_ptr, rm, OFFSET)
        if HAS_LR:
            rr = tl.arange(0, R_PAD)
            u = tl.load(u_ptr + rm_l[:, None] * R + rr[None, :], mask=m_mask[:, None] & (rr[None, :] < R), other=0.0)
            l2 = tl.load(l2_ptr + rr[:, None] * N + rn_l[None, :], mask=(rr[:, None] < R) & n_mask[None, :], other=0.0)
            y += tl.dot(u, l2)
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
        tl.store(y_ptr + rm_l[:, None] * stride_ym + rn_l[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _tile_ids(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        return tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)

    @triton.jit
    def _expand_tile(pid_n, kt, qw_ptr, wf_ptr, w8_ptr, wsum_ptr, N, K, BN: tl.constexpr, WSUM: tl.constexpr):
        """4-bit weights -> int8 operand q * f for rows [pid_n * BN, +BN) of one 128-wide K tile ``kt``.
        WSUM: also add this tile's part of sum_k w8[n, k] into ``wsum`` (zeroed; int32 atomics, exact in
        any order), which restores unsigned activations' offset in the GEMM's epilogue."""
        rn = pid_n * BN + tl.arange(0, BN)
        rj = tl.arange(0, 64)
        n_mask = rn < N
        rn_l = rn.to(tl.int64)
        p = tl.load(qw_ptr + rn_l[:, None] * (K // 2) + kt * 64 + rj[None, :], mask=n_mask[:, None], other=0)
        f_lo = tl.load(wf_ptr + rn_l * (K // 64) + 2 * kt, mask=n_mask, other=0)
        f_hi = tl.load(wf_ptr + rn_l * (K // 64) + 2 * kt + 1, mask=n_mask, other=0)
        lo = ((p & 15).to(tl.int8) - 8) * f_lo[:, None].to(tl.int8)
        hi = ((p >> 4).to(tl.int8) - 8) * f_hi[:, None].to(tl.int8)
        out = w8_ptr + rn_l[:, None] * K + kt * 128 + rj[None, :]
        tl.store(out, lo, mask=n_mask[:, None])
        tl.store(out + 64, hi, mask=n_mask[:, None])
        if WSUM:
            part = tl.sum(lo.to(tl.int32), axis=1) + tl.sum(hi.to(tl.int32), axis=1)
            tl.atomic_add(wsum_ptr + rn, part, mask=n_mask)

    @triton.jit
    def _expand_kernel(qw_ptr, wf_ptr, w8_ptr, wsum_ptr, N, K, BN: tl.constexpr, WSUM: tl.constexpr):
        """4-bit weights -> transient int8 operand q * f [N, K] (``_expand_tile``; one 128-wide K tile per
        program)."""
        _expand_tile(tl.program_id(0), tl.program_id(1), qw_ptr, wf_ptr, w8_ptr, wsum_ptr, N, K, BN, WSUM)

    @triton.jit
    def _prologue_kernel(
        x_ptr, s_ptr, l1_ptr, clip_ptr, bin_ptr, xq_ptr, sx_ptr, u_ptr, qw_ptr, wf_ptr, w8_ptr, wsum_ptr,
        M, K, R, N, stride_xm, shift, inv_qf, QUANT_PROGRAMS,
        QMIN: tl.constexpr, QMAX: tl.constexpr, FMAX: tl.constexpr, OFFSET: tl.constexpr,
        BLOCK_M: tl.constexpr, GROUP: tl.constexpr, GPB: tl.constexpr, R_PAD: tl.constexpr, HAS_LR: tl.constexpr,
        BK: tl.constexpr, INV_S: tl.constexpr, EXPAND_BN: tl.constexpr, WSUM: tl.constexpr,
    ):
        """Everything a one-launch call does before its GEMM, in one launch: the first ``QUANT_PROGRAMS``
        programs quantize row blocks (``_fused_quant_block``), the others expand weight tiles (``_expand_tile``,
        in ``_expand_kernel``'s order). The two parts share no data; each runs the same code as its own kernel."""
        pid = tl.program_id(0)
        if pid < QUANT_PROGRAMS:
            _fused_quant_block(pid, x_ptr, s_ptr, l1_ptr, clip_ptr, bin_ptr, xq_ptr, sx_ptr, u_ptr,
                               M, K, R, stride_xm, shift, inv_qf, QMIN, QMAX, FMAX, OFFSET, BLOCK_M, GROUP, GPB,
                               R_PAD, HAS_LR, BK, INV_S)
        else:
            e = pid - QUANT_PROGRAMS
            n_tiles = tl.cdiv(N, EXPAND_BN)
            _expand_tile(e % n_tiles, e // n_tiles, qw_ptr, wf_ptr, w8_ptr, wsum_ptr, N, K, EXPAND_BN, WSUM)

    @triton.jit
    def _tma_tile(a_desc, b_desc, pid_m, pid_n, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
                  M, N, K, R, stride_ym, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  R_PAD: tl.constexpr, HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr):
        """One output tile from TMA-fetched int8 tiles (both operands K-major), then the epilogue; the
        body of the TMA kernel and of each step of the persistent one (inlined by Triton)."""
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for k in range(0, K, BK):
            a = a_desc.load([off_m, k])
            b = b_desc.load([off_n, k])
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        rm = off_m + tl.arange(0, BM)
        rn = off_n + tl.arange(0, BN)
        _epilogue(acc, rm, rn, M, N, R, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr, stride_ym,
                  R_PAD, HAS_LR, HAS_BIAS, OFFSET)

    @triton.jit
    def _gemm_i8_kernel(
        a_ptr, b_ptr, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
        HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """int8 activations [M, K] x int8 weights [N, K] (both K-major) -> int32, then the epilogue."""
        pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :]
        b_ptrs = b_ptr + rn.to(tl.int64)[None, :] * K + rk[:, None]
        acc = tl.zeros([BM, BN], dtype=tl.int32)
        for k in range(0, K, BK):
            a = tl.load(a_ptrs + k, mask=(rm < M)[:, None], other=0)
            b = tl.load(b_ptrs + k, mask=(rn < N)[None, :], other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        _epilogue(acc, rm, rn, M, N, R, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr, stride_ym,
                  R_PAD, HAS_LR, HAS_BIAS, OFFSET)

    @triton.jit
    def _gemm_i8_tma_kernel(
        a_desc, b_desc, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
        HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr,
    ):
        """Same as _gemm_i8_kernel with tiles fetched by the Hopper tensor-memory accelerator."""
        pid_m, pid_n = _tile_ids(M, N, BM, BN, GROUP_M)
        _tma_tile(a_desc, b_desc, pid_m, pid_n, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
                  M, N, K, R, stride_ym, BM, BN, BK, R_PAD, HAS_LR, HAS_BIAS, OFFSET)


    @triton.jit
    def _gemm_i8_persistent_kernel(
        a_desc, b_desc, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, R_PAD: tl.constexpr,
        HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, OFFSET: tl.constexpr, NUM_SMS: tl.constexpr,
    ):
        """_gemm_i8_tma_kernel as a persistent kernel (Triton's persistent-matmul tutorial): one program
        per SM walks the output tiles, and the flattened loop lets the next tile's TMA loads start while
        this tile's epilogue (scales, low-rank dot, bias, store) runs. Same tiles, same bits."""
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = tile_of(tile, M, N, BM, BN, GROUP_M)
            _tma_tile(a_desc, b_desc, pid_m, pid_n, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
                      M, N, K, R, stride_ym, BM, BN, BK, R_PAD, HAS_LR, HAS_BIAS, OFFSET)



# ---------------------------------------------------------------------------------------------
# Launch configuration. Chosen by benchmarks/bench_linear.py on the H100 (see kernels/README.md).
# ---------------------------------------------------------------------------------------------

def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length()) if r else 16  # triton.next_power_of_2, without Triton


# Per-M-bucket configuration of the int8 GEMM. Chosen from benchmarks/bench_linear.py --sweep.
def gemm_config(m: int, async_wgmma: bool = False) -> dict:
    """Tile sizes by the number of tokens, from the H100 sweep in kernels/README.md. The persistent kernel
    (``persistent=True``) measured 3-9 % faster per layer on the H200 but no faster in a Wan step
    (kernels/README.md), so the default stays the one-tile-per-program kernel. ``async_wgmma``: the GPU runs
    the Gluon kernel (``async_wgmma_available``), which takes over above 2048 tokens: it measured faster from
    4096 tokens on, and at 1024 the Triton kernel's narrow tiles beat its tiles on all three of Wan's shapes
    (kernels/README.md, session 13; nothing between 1024 and 4096 was measured). There the warp-specialised
    Gluon kernel runs where it fits (``gluon_gemm.warp_specialized``): 3 % less GEMM time in a Wan step than the
    one-tile-per-program Gluon kernel (session 14)."""
    if m <= 2048:  # few row blocks: narrow tiles so that every SM gets work
        return dict(BM=64, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    if async_wgmma:  # with the Triton tiles of the same call, should this Triton fail to build the Gluon kernel
        if gemm_choice() == "pp":
            return dict(gg.PP_CONFIG, async_wgmma=True, ping_pong=True, fallback=gemm_config(m))
        return dict(gg.CONFIG, async_wgmma=True, warp_specialized=True, fallback=gemm_config(m))
    if m < 16384:
        return dict(BM=128, BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3)


# The persistent kernel keeps the next tile's buffers beside the epilogue's: the low-rank tiles of a rank
# above 32 (a folded LoRA pads to 128) or a 4-byte output overflow Hopper's 227 KiB of shared memory with its
# large tiles (measured on the H200), so those calls take the one-tile-per-program kernel.
PERSISTENT_MAX_RANK_PAD = 32


def persistent_fits(rank: int, out_dtype: torch.dtype) -> bool:
    return _rank_pad(rank) <= PERSISTENT_MAX_RANK_PAD and out_dtype.itemsize <= 2


# "auto" (default): the Gluon kernels where async_wgmma_available; "pp": the ping-pong Gluon kernel in place of the
# warp-specialised one (A/B measurements: more work per clock, no faster Wan step; kernels/README.md, session 22);
# "triton": Triton's kernels only.
GEMM_ENV = "WAN_W4A4_GEMM"
GEMM_CHOICES = ("auto", "pp", "triton")


def gemm_choice() -> str:
    choice = os.environ.get(GEMM_ENV, "auto") or "auto"
    if choice not in GEMM_CHOICES:
        raise ValueError(f"${GEMM_ENV}={choice!r}: expected one of {', '.join(GEMM_CHOICES)}")
    return choice


def async_wgmma_available(capability: tuple[int, int]) -> bool:
    """Whether ``gemm`` may run the Gluon kernel (``gluon_gemm``) on a GPU of this compute capability: Hopper
    (sm_90, whose wgmma it issues), a Triton with Gluon (3.6 or later) that has built it, and ``$WAN_W4A4_GEMM``
    not "triton"."""
    return (gemm_choice() != "triton" and gg.gluon is not None and not _gluon_failure
            and tuple(capability) == (9, 0))


QUANT_BLOCK_M = 32
# The quantizing launch of two-launch plans: 16-row programs of 8 warps. The H200 launch sweep measured ffn.2's
# 8192 x 13 824 pass 0.135 -> 0.102 ms and 16 384 x 5120 unchanged (quant_launch_sweep_h200_2026-11-29.log);
# bench_linear.py, the whole quantizer, 0.208 -> 0.194 ms there and nothing slower, inside its run-to-run spread
# (bench_linear_h200_2026-11-30_quant16.log, kernels/README.md). Rows are independent: any block gives the same bits.
QUANT_ROWS_QUANTIZING, QUANT_WARPS_QUANTIZING = 16, 8
QUANT_GPB = 4  # groups of 64 per load in the quantize kernels (256 columns)
QUANT_TARGET_PROGRAMS = 528  # ~4 per SM on an H100: split K until the grid has this many programs
EXPAND_BN = 64


def _cdiv(a: int, b: int) -> int:
    # Plain integers: the plans are tested without Triton, and in Triton 3.6 triton.cdiv is a constexpr_function
    # whose host calls go through ConstexprFunction.__call__: 1.1-3.1 us each on the H200 machines
    # (benchmarks/host_cost.py), and a layer call made 8 of them (benchmarks/RESULTS.md, twenty-seventh part).
    return -(-a // b)


def quant_split(m: int, k: int, bk: int, block_m: int = QUANT_BLOCK_M) -> tuple[int, int]:
    """(number of K chunks S, chunk length KC): few rows -> split K so that every SM has work."""
    row_blocks = _cdiv(m, block_m)
    steps = k // bk
    s = max(1, min(steps, _cdiv(QUANT_TARGET_PROGRAMS, row_blocks)))
    kc = _cdiv(steps, s) * bk
    return _cdiv(k, kc), kc


class QuantPlan(NamedTuple):
    """How a call's activations are quantized: ``block_m`` rows per program, K in ``n_split`` chunks of
    ``kc`` columns; ``one_launch``: statistics and quantization in one kernel (``_act_quant_fused_kernel``,
    K whole), else two launches (partial statistics, then quantization, whose programs take ``quant_rows``
    rows with ``quant_warps`` warps). ``stats_bk``: the statistics' K step (0: the quantizing one, ``_quant_bk``)."""
    block_m: int
    n_split: int
    kc: int
    one_launch: bool = False
    quant_rows: int = QUANT_ROWS_QUANTIZING
    quant_warps: int = QUANT_WARPS_QUANTIZING
    stats_bk: int = 0


# Few tokens of a short K: one launch, which also computes 1/s itself and joins the weight expansion
# (``quantize_and_expand``): two launches per layer call instead of four and 1/s's. A one-frame step is short of the
# host's time, not the GPU's (kernels/README.md, sessions 24 and 25). H200, whole layer calls on their own, quantizer
# and expansion in one launch against two quantizing launches (benchmarks/bench_few_tokens.py,
# results/few_tokens_h200_2026-11-30_s25.log; do_bench, so host time included where a call is host-bound; noise up
# to 10 %), ms: K = 5120, N = 5120: 0.199 / 0.201 at 3120 rows, 0.227 / 0.226 at 4096; N = 13 824: 0.428 / 0.440 and
# 0.510 / 0.548; at 8192 rows 0.439 / 0.424 and 0.972 / 0.962. Inside a one-frame model call the joined launch cost
# the GPU 5.6 ms more than the launches it replaces, and the host's time per call fell (benchmarks/RESULTS.md,
# twenty-eighth part). K = 13 824 (ffn.2): slower at every row count measured (0.303 / 0.232 ms at 1024 rows,
# 0.516 / 0.454 at 3120).
ONE_LAUNCH_MAX_ROWS = 4096  # 16-row programs, so that a 1024-token call has 64 of them
ONE_LAUNCH_MAX_K = 8192
# The statistics launch of two-launch plans with K whole (many tokens) and K <= 8192 (Wan's 5120): 64-row programs
# over 128-column steps. H200, one 480p pass (16 384 x 5120): 69.4 -> 56.6 us, and 138.0 -> 104.5 us at 32 760 rows,
# same bits; at 8192 x 13 824 (ffn.2's passes) 64-row programs leave SMs idle (92.1 us against 79.2 with 32 rows):
# benchmarks/results/stats_sweep_h200_2026-11-30.log, kernels/README.md (session 19).
STATS_ROWS_WIDE, STATS_BK_WIDE, STATS_WIDE_MAX_K = 64, 128, 8192


def quant_plan(m: int, k: int, one_launch: bool | None = None, block_m: int | None = None) -> QuantPlan:
    """The plan for ``m`` rows of ``k`` features (``one_launch``/``block_m`` force a kind, for tests and the
    benchmark). Two launches split K by ``quant_split``; one launch takes K whole. Unforced two-launch plans that
    take K whole with K <= ``STATS_WIDE_MAX_K`` get the wide statistics programs (``STATS_ROWS_WIDE``)."""
    if one_launch is None:
        one_launch = m <= ONE_LAUNCH_MAX_ROWS and k <= ONE_LAUNCH_MAX_K
    forced_rows = block_m is not None
    if block_m is None:
        block_m = 16 if one_launch else QUANT_BLOCK_M
    if one_launch:
        return QuantPlan(block_m, 1, k, True)
    plan = QuantPlan(block_m, *quant_split(m, k, _quant_bk(k), block_m), False)
    if plan.n_split == 1 and k <= STATS_WIDE_MAX_K and not forced_rows:
        plan = plan._replace(block_m=STATS_ROWS_WIDE, stats_bk=STATS_BK_WIDE)
    return plan


def _check_plan(plan: QuantPlan, k: int, bk: int) -> None:
    stats_bk = plan.stats_bk or bk
    if (plan.kc % bk or plan.kc % stats_bk or stats_bk % nm.GROUP or plan.n_split != _cdiv(k, plan.kc)
            or (plan.one_launch and (plan.n_split != 1 or plan.stats_bk))):
        raise ValueError(f"quantizer plan {plan} does not cover K = {k} in whole {bk}-column steps (statistics: "
                         f"{stats_bk}-column steps of whole {nm.GROUP}-column groups)")


# Up to this many rows the two-launch quantizer divides by s itself (``INV_S`` False; ``div_rn``, the same bits as
# ``torch.reciprocal``) instead of multiplying by a 1/s made by a torch call first: one step less per call, whose
# host time counts at few tokens (kernels/README.md, session 26). 8192 (4096 until session 29, when replay needed
# calls without a torch call between launches; since session 30 it re-issues the 1/s call, ``launch.compute_``):
# one 720p frame (7200 rows with ComfyUI's cond and uncond in one call) and two 480p latent frames (6240) were
# host-bound before replay reached them (benchmarks/RESULTS.md, thirty-second part). Dividing costs 9-10 % more
# quantizer time, about 1 % of a model call's GPU time there (same source); whether a replayed 1/s call costs less
# between 4097 and 8192 rows is not measured.
DIVIDE_MAX_ROWS = 8192


def kernels_divide(m: int) -> bool:
    """Whether a ``quantize`` of ``m`` rows, given no 1/s, has its two launches divide by s (no 1/s region)."""
    return m <= DIVIDE_MAX_ROWS


# Calls of up to this many rows are recorded and replayed (``CallPlan.replayable``, ``replay.py``), in one pass or
# several, their 1/s made by a noted torch call (``launch.compute_``) above DIVIDE_MAX_ROWS. Below it the host could
# set the step: replayed, 480p x 9 frames (9360 rows with cond and uncond) went from 1.08 / 1.17x BF16's step to
# 0.76 / 0.74x, while at 480p x 17 (15 600 rows) the GPU already set it, 0.71x before and after (H200, ComfyUI 0.33;
# benchmarks/RESULTS.md, thirty-third part). Above it replay would only keep the workspace allocated between calls;
# 480p x 81 (32 760 rows per call) keeps ``run_checked``, as measured before.
REPLAY_MAX_ROWS = 16384


def replayed(m: int) -> bool:
    """Whether ``replay.py`` records and replays a call of ``m`` rows."""
    return m <= REPLAY_MAX_ROWS


def _inv_smooth_into(p: nm.W4A4Params, out: torch.Tensor) -> torch.Tensor:
    """1/s into ``out`` (a region of the call's allocation), by a torch call ``replay.py`` re-issues."""
    return compute_(nm.reciprocal_smooth, out, p.smooth)


# Bytes of per-pass activation operands (int8 activations, scales, u) a W4A4 linear may hold at once.
# At 480p x 81 (32 760 tokens) one pass over Wan's ffn.2 (K = 13 824) would hold 453 MB next to the
# 905 MB GELU output it reads; in four passes it holds 113 MB, so a linear is no longer where a step
# peaks and a LoRA's wider u does not raise that peak. Passes are GEMM row tiles of 9+ waves on an
# H100: step time unchanged (kernels/README.md).
PASS_BYTES = 128 << 20
PASS_ROW_TILE = 256  # the largest BM of gemm_config: passes end on row-tile boundaries


def pass_rows(m: int, k: int, r: int, budget: int = PASS_BYTES) -> int:
    """Rows per quantize + GEMM pass: all ``m`` when their operands fit ``budget``, else the fewest
    equal passes that do, rounded up to whole row tiles."""
    per_row = k + 4 + 2 * r  # xq int8 [K], sx fp32, u bf16 [R]
    if m * per_row <= budget:
        return m
    n_pass = -(-m * per_row // budget)
    rows = -(-m // n_pass)
    return -(-rows // PASS_ROW_TILE) * PASS_ROW_TILE  # (plain integers: tested without Triton)


def _quant_bk(k: int) -> int:
    gpb = QUANT_GPB if k % (nm.GROUP * QUANT_GPB) == 0 else 2  # K % 128 == 0 always holds
    return nm.GROUP * gpb


# The one-launch quantizer (alone, or in ``_prologue_kernel``) quantizes in 512-column steps where K allows. Its
# programs each sweep a 16-row block's whole K twice; the timings fit a call that lasts one program's latency, which
# fewer, wider steps shorten (not measured directly). H200, the prologue at one 480p frame's shapes, GPU time per
# call with 4 / 8 groups per step (50 calls queued behind a sleep, L2 warm): 74.0 -> 63.0 us at 3120 x 5120 x 5120,
# 53.7 -> 44.3 at 1024 rows, 82.9 -> 79.3 at 3120 x 5120 x 13 824; the same bits (a group's factor and values depend
# on that group only). benchmarks/results/prologue_sweep_h200_2026-12-01_s27.log: more warps, wider statistics steps
# and 32-row programs (with 8 warps) were slower there; 4 pipeline stages 66.4 us at the first shape and slower at
# the third.
ONE_LAUNCH_GPB = 8


def _one_launch_gpb(k: int) -> int:
    return ONE_LAUNCH_GPB if k % (nm.GROUP * ONE_LAUNCH_GPB) == 0 else _quant_bk(k) // nm.GROUP


# A call's transient operands come from one allocation, carved into aligned regions (``Arena``). Under the
# cudaMallocAsync allocator that ComfyUI's main.py picks, a torch.empty took the host 5-10 us in host_cost.py and
# 17 us inside a ComfyUI 0.33 model call with dynamic VRAM (cProfile's own time; benchmarks/RESULTS.md,
# twenty-seventh part), and a two-launch layer call made eight or nine. The regions start on 256-byte boundaries:
# every pointer a kernel gets is as aligned as a fresh allocation's (TMA needs 16 bytes; Triton specializes on it).
ARENA_ALIGN = 256


def arena_layout(sizes: dict[str, int], align: int = ARENA_ALIGN) -> tuple[dict[str, int], int]:
    """(byte offset of each region, total bytes) for regions of ``sizes`` bytes, each starting on ``align``."""
    offsets, end = {}, 0
    for name, n in sizes.items():
        offsets[name] = end
        end += -(-n // align) * align
    return offsets, end


Regions = dict  # name -> (shape, dtype) of a tensor a call writes


def region_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


@functools.lru_cache(maxsize=256)
def _arena_plan(items: tuple) -> tuple[dict[str, int], dict[str, int], int]:
    """(offsets, bytes of each region, total bytes) of regions ``items`` (``Regions.items()``): a few
    distinct layouts per model, computed once each instead of per call."""
    sizes = {name: region_bytes(*spec) for name, spec in items}
    offsets, total = arena_layout(sizes)
    return offsets, sizes, total


class Arena:
    """One device allocation holding named regions (``arena_layout``); ``get`` views a region as a contiguous
    tensor, of its own shape or (a shorter row pass) a smaller one. The kernels of one call, and of its row passes,
    run in stream order, so a pass may reuse the regions of the one before it, as the caching allocator would reuse
    their freed blocks. ``buf``: a caller's allocation to carve instead of a new one (``replay.py``'s workspace)."""

    def __init__(self, device: torch.device, regions: Regions, buf: torch.Tensor | None = None):
        self.regions = regions
        self.offsets, self.sizes, total = _arena_plan(tuple(regions.items()))
        if buf is None:
            buf = torch.empty((max(total, 1),), dtype=torch.uint8, device=device)
        elif buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < total or buf.data_ptr() % ARENA_ALIGN:
            raise ValueError(f"arena buffer: {buf.numel()} {buf.dtype} from {buf.data_ptr():#x}, needs {total} "
                             f"uint8 from a {ARENA_ALIGN}-byte boundary")
        self.buf = buf

    @staticmethod
    def bytes_for(regions: Regions) -> int:
        """Bytes of the one allocation that holds ``regions``."""
        return _arena_plan(tuple(regions.items()))[2]

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        full, dtype = self.regions[name]
        cap = self.sizes[name]
        if shape is None or shape == full:
            shape, n = full, cap
        else:
            n = region_bytes(shape, dtype)
            if n > cap:
                raise ValueError(f"arena region {name} holds {cap} bytes, {tuple(shape)} {dtype} needs {n}")
        start = self.offsets[name]
        return self.buf[start:start + n].view(dtype).view(shape)


def quant_regions(m: int, k: int, r: int, plan: QuantPlan, with_inv_s: bool = True) -> Regions:
    """What ``quantize`` writes for ``m`` rows under ``plan``: its outputs (int8 xq, fp32 scales, bf16 u), and for
    two launches the partial row maxima, fp32 partial projections (K split) and 1/s (unless the caller holds it:
    ``with_inv_s`` False)."""
    regions = {"xq": ((m, k), torch.int8), "sx": ((m,), torch.float32)}
    if r:
        regions["u"] = ((m, r), torch.bfloat16)
    if not plan.one_launch:
        regions["rmax_part"] = ((plan.n_split, m), torch.float32)
        if r and plan.n_split > 1:
            regions["u_part"] = ((plan.n_split, m, _rank_pad(r)), torch.float32)
        if with_inv_s:
            regions["inv_s"] = ((k,), torch.float32)
    return regions


def weight_regions(n: int, k: int, with_sum: bool) -> Regions:
    """``expand_weight``'s outputs: the int8 weights [N, K] and, ``with_sum``, their int32 row sums."""
    return {"w8": ((n, k), torch.int8), **({"wsum": ((n,), torch.int32)} if with_sum else {})}


def _quant_meta(p: nm.W4A4Params, k: int, gpb: int | None = None) -> dict:
    """The quantizing launches' constexpr arguments and options for layer ``p`` (K = ``k``); ``gpb``: groups per
    quantizing step (default: the two-launch quantizer's, ``_quant_bk``)."""
    qmin, qmax, fmax = nm.UNSIGNED if p.act_unsigned else nm.SIGNED
    return dict(QMIN=qmin, QMAX=qmax, FMAX=fmax, OFFSET=nm.act_offset(p.act_unsigned), GROUP=nm.GROUP,
                GPB=gpb or _quant_bk(k) // nm.GROUP, R_PAD=_rank_pad(p.rank),
                # No fma contraction: round(v * inv) must round the product before the rounding
                # trick adds 1.5 * 2**23, as torch does; fused, about one value in a few million
                # lands on the other side of a tie (seen at 17000 x 256).
                enable_fp_fusion=False)


def _carve(arena: Arena, regions: Regions) -> dict[str, torch.Tensor]:
    """``regions`` (of at most the arena's rows) as tensors of ``arena``."""
    return {name: arena.get(name, shape) for name, (shape, _) in regions.items()}


def _smooth_f32(p: nm.W4A4Params) -> torch.Tensor:
    """s in fp32, for kernels that divide by it themselves (``INV_S`` False)."""
    return p.smooth if p.smooth.dtype == torch.float32 else p.smooth.float()


def _fused_quant_args(x2d: torch.Tensor, p: nm.W4A4Params, bin_index: torch.Tensor, plan: QuantPlan,
                      out: dict) -> dict:
    """The arguments, by name, of one launch of ``_fused_quant_block`` over the rows of ``x2d`` into ``out``'s xq,
    sx and u: ``_act_quant_fused_kernel``'s, and the quantizing part of ``_prologue_kernel``'s."""
    m, k = x2d.shape
    r = p.rank
    return dict(x_ptr=x2d, s_ptr=_smooth_f32(p),
                l1_ptr=p.lr_down if r else x2d, clip_ptr=p.clip, bin_ptr=bin_index, xq_ptr=out["xq"],
                sx_ptr=out["sx"], u_ptr=out.get("u", out["sx"]), M=m, K=k, R=r, stride_xm=x2d.stride(0),
                shift=float(p.act_shift), inv_qf=float(nm.inv_qf(p.act_unsigned)), HAS_LR=bool(r), BK=_quant_bk(k),
                INV_S=False, BLOCK_M=plan.block_m, num_warps=4, **_quant_meta(p, k, _one_launch_gpb(k)))


def quantize(x2d: torch.Tensor, p: nm.W4A4Params, bin_index: torch.Tensor, plan: QuantPlan | None = None,
             inv_smooth: torch.Tensor | None = None, arena: Arena | None = None):
    """Quantize activations: (xq int8 [M, K], sx fp32 [M], u bf16 [M, R] or None), in one launch or two
    (``quant_plan``). ``plan``: ``quant_plan`` of the whole call when this is one pass of its rows (the same
    plan gives the same bits); ``inv_smooth``: ``p.inv_smooth()`` when the caller already has it; ``arena``:
    where to write (holding ``quant_regions`` of at least these rows; default: a new one)."""
    m, k = x2d.shape
    r = p.rank
    bk = _quant_bk(k)
    plan = plan or quant_plan(m, k)
    _check_plan(plan, k, bk)
    divide = inv_smooth is None and kernels_divide(m)
    regions = quant_regions(m, k, r, plan, inv_smooth is None and not divide)
    out = _carve(arena or Arena(x2d.device, regions), regions)
    if plan.one_launch:  # the kernel divides by s itself: no 1/s launch
        launcher(_act_quant_fused_kernel)[(_cdiv(m, plan.block_m),)](**_fused_quant_args(x2d, p, bin_index, plan, out))
        return out["xq"], out["sx"], out.get("u")
    xq, sx = out["xq"], out["sx"]
    u = out.get("u", sx)
    l1 = p.lr_down if r else x2d
    quant_meta = _quant_meta(p, k)
    shift, inv_qf = float(p.act_shift), float(nm.inv_qf(p.act_unsigned))
    # The streaming first pass slows by a sixth when it divides (H200, 32 760 tokens): it multiplies by
    # a 1/s made here, or by the caller for all passes of a call; up to DIVIDE_MAX_ROWS rows the kernels divide.
    if divide:
        inv_s = _smooth_f32(p)
    else:
        inv_s = inv_smooth if inv_smooth is not None else _inv_smooth_into(p, out["inv_s"])
    grid = (_cdiv(m, plan.block_m), plan.n_split)
    rmax_part = out["rmax_part"]
    # One chunk: pass 1 writes u itself (bf16(0 + p) == bf16(p), the same values as summing one partial).
    direct_u = plan.n_split == 1
    u_part = out.get("u_part", sx)
    launcher(_act_stats_kernel)[grid](
        x2d, inv_s, l1, rmax_part, u_part, u, m, k, r, plan.kc, x2d.stride(0), shift, BLOCK_M=plan.block_m,
        BK=plan.stats_bk or bk, R_PAD=quant_meta["R_PAD"], HAS_LR=bool(r), DIRECT_U=direct_u, INV_S=not divide,
        num_warps=4)
    launcher(_act_quant_kernel)[(_cdiv(m, plan.quant_rows), plan.n_split)](
        x2d, inv_s, p.clip, bin_index, rmax_part, u_part, xq, sx, u, m, k, r, plan.kc, plan.n_split, x2d.stride(0),
        shift, inv_qf, SUM_U=bool(r) and not direct_u, INV_S=not divide, BLOCK_M=plan.quant_rows,
        num_warps=plan.quant_warps, **quant_meta)
    return xq, sx, out.get("u")


def expand_weight(p: nm.W4A4Params, with_sum: bool = False, arena: Arena | None = None):
    """Transient int8 operand q * f [N, K] of the packed weights (freed after the GEMM); ``with_sum``:
    (w8, its int32 row sums), made by the same launch (plus the sums' zeroing). ``arena``: where to write
    (holding ``weight_regions``; default: a new one)."""
    n, k = p.out_features, p.in_features
    arena = arena or Arena(p.qweight.device, weight_regions(n, k, with_sum))
    w8 = arena.get("w8")
    wsum = zero_(arena.get("wsum")) if with_sum else w8
    launcher(_expand_kernel)[(_cdiv(n, EXPAND_BN), k // nm.PACK_TILE)](p.qweight, p.wfactor, w8, wsum, n, k,
                                                                      BN=EXPAND_BN, WSUM=with_sum)
    return (w8, wsum) if with_sum else w8


def expanded(p: nm.W4A4Params, with_sum: bool, arena: Arena | None = None):
    """``expand_weight`` as the pair a GEMM takes: (w8, its row sums where ``with_sum`` (unsigned layers), else
    None)."""
    return expand_weight(p, with_sum=True, arena=arena) if with_sum else (expand_weight(p, arena=arena), None)


def quantize_and_expand(x2d: torch.Tensor, p: nm.W4A4Params, bin_index: torch.Tensor, plan: QuantPlan,
                        with_sum: bool, arena: Arena):
    """``quantize`` under a one-launch ``plan`` and ``expand_weight`` in one launch (``_prologue_kernel``):
    (xq, sx, u or None, w8, wsum or None), the same tensors as the two calls give. ``arena`` holds
    ``quant_regions`` of these rows and ``weight_regions``."""
    m, k = x2d.shape
    n, r = p.out_features, p.rank
    if not plan.one_launch:
        raise ValueError(f"quantize_and_expand needs a one-launch plan, got {plan}")
    _check_plan(plan, k, _quant_bk(k))
    out = _carve(arena, quant_regions(m, k, r, plan))
    w8 = arena.get("w8")
    wsum = zero_(arena.get("wsum")) if with_sum else w8
    quant_programs = _cdiv(m, plan.block_m)
    grid = (quant_programs + _cdiv(n, EXPAND_BN) * (k // nm.PACK_TILE),)
    launcher(_prologue_kernel)[grid](**_fused_quant_args(x2d, p, bin_index, plan, out), qw_ptr=p.qweight,
                                     wf_ptr=p.wfactor, w8_ptr=w8, wsum_ptr=wsum, N=n, QUANT_PROGRAMS=quant_programs,
                                     EXPAND_BN=EXPAND_BN, WSUM=with_sum)
    return out["xq"], out["sx"], out.get("u"), w8, (wsum if with_sum else None)


def _epilogue_args(sx, u, p, wsum):
    r = p.rank
    return (sx, p.wscale, u if r else sx, p.lr_up if r else sx, p.bias if p.bias is not None else sx,
            wsum if wsum is not None else sx)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=8)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)  # 5 us of host time per call uncached (host_cost.py)


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _launch_meta(cfg: dict, p: nm.W4A4Params, m: int) -> tuple[int, dict]:
    """(number of output tiles, the constexpr arguments and warps) of a GEMM launch with the tiles of ``cfg``."""
    tiles = _cdiv(m, cfg["BM"]) * _cdiv(p.out_features, cfg["BN"])
    return tiles, dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], R_PAD=_rank_pad(p.rank),
                       HAS_LR=bool(p.rank), HAS_BIAS=p.bias is not None, OFFSET=nm.act_offset(p.act_unsigned),
                       num_warps=cfg["num_warps"])


# Why the Gluon kernel could not be built in this process (empty: it can). Gluon is Triton's experimental dialect
# and the kernel is written against Triton 3.6's: a Triton whose Gluon differs fails to compile it, and then
# Triton's tile kernel serves the rest of the process with the same bits, after one warning.
_gluon_failure: list[str] = []


def _is_build_failure(e: BaseException) -> bool:
    """A failure to build a kernel (Triton's front end, its MLIR passes, its resource checks), not a fault of a
    running kernel, which must propagate."""
    return isinstance(e, TritonError) or (isinstance(e, RuntimeError) and "PassManager::run failed" in str(e))


def _launch_gluon(xq, w8, cfg: dict, p: nm.W4A4Params, args: tuple, out_dtype: torch.dtype) -> bool:
    """Run the Gluon kernel; False (and one warning) when this Triton cannot build it."""
    m = xq.shape[0]
    if cfg.get("ping_pong") and not gg.ping_pong(cfg, _rank_pad(p.rank)):  # too wide a low-rank branch for it
        cfg = dict(gg.CONFIG, async_wgmma=True, warp_specialized=True)
    tiles, meta = _launch_meta(cfg, p, m)
    try:  # host-side Gluon API (layouts, descriptors): any failure here is this Triton's API, not the data's
        descriptors = gg.descriptors(xq, w8, cfg)
    except Exception as e:
        return _gluon_unbuildable(e)
    try:
        if gg.ping_pong(cfg, meta["R_PAD"]):  # persistent, two consumer warpgroups taking tiles in turn
            grid = min(_num_sms(_index(xq.device)), tiles)
            launcher(gg._gemm_i8_pp_kernel)[(grid,)](*descriptors, *args, **meta, STAGES=cfg["num_stages"],
                                                     LOAD_REGS=gg.WS_LOAD_REGS, MMA_REGS=gg.PP_MMA_REGS,
                                                     STORE_ROWS=gg.store_rows(cfg, False, out_dtype))
            return True
        ws = gg.warp_specialized(cfg, meta["R_PAD"])
        rows = gg.store_rows(cfg, ws, out_dtype)
        if ws:  # persistent: one program per SM walks the tiles
            grid = min(_num_sms(_index(xq.device)), tiles)
            launcher(gg._gemm_i8_ws_kernel)[(grid,)](*descriptors, *args, **meta, STAGES=cfg["num_stages"],
                                                     LOAD_REGS=gg.WS_LOAD_REGS, STORE_ROWS=rows)
        else:
            launcher(gg._gemm_i8_async_kernel)[(tiles,)](*descriptors, *args, **meta, STAGES=cfg["num_stages"],
                                                         STORE_ROWS=rows)
        return True
    except Exception as e:
        if not _is_build_failure(e):
            raise
        return _gluon_unbuildable(e)


def _gluon_unbuildable(e: Exception) -> bool:
    """Record why the Gluon kernel cannot be built here, warn once, and say so (False)."""
    lines = [line for line in str(e).splitlines() if line.strip()]  # compile errors end with their cause
    _gluon_failure.append(f"{type(e).__name__}: {lines[-1].strip()[:300] if lines else ''}")
    log.warning("W4A4: the Hopper int8 GEMM (kernels/gluon_gemm.py) did not compile with Triton %s (%s); "
                "Triton's tile kernel runs instead for the rest of this process, with the same results. "
                "%s=triton skips the attempt.", triton.__version__, _gluon_failure[0], GEMM_ENV)
    return False


def gemm(xq, sx, u, p: nm.W4A4Params, out_dtype, *, config: dict | None = None, w8: torch.Tensor | None = None,
         tma: bool = False, wsum: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """The int8 GEMM (over the expanded weights) + epilogue; ``tma``: tiles fetched by TMA (Hopper), by the
    Gluon kernel where the configuration says ``async_wgmma``, by a persistent kernel where it says
    ``persistent``. ``w8``/``wsum``: the expanded weights and their row sums when several passes share them;
    ``out``: a contiguous [M, N] tensor (rows of the whole call's output) to write into."""
    m, k = xq.shape
    n, r = p.out_features, p.rank
    cfg = dict(config or gemm_config(m))
    if out is None:
        y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"gemm out: {tuple(out.shape)} {out.dtype}, expected contiguous ({m}, {n}) {out_dtype}")
    else:
        y = out
    offset = nm.act_offset(p.act_unsigned)
    if w8 is None:
        w8, wsum = expanded(p, bool(offset))
    elif offset and wsum is None:  # a caller's own w8 (benchmarks, tests): sum it here
        wsum = w8.sum(1, dtype=torch.int32)
    args = (*_epilogue_args(sx, u, p, wsum), y, m, n, k, r, y.stride(0))
    if tma and cfg.get("async_wgmma"):  # Hopper: the Gluon kernel (gemm_config)
        if gg.gluon is not None and not _gluon_failure:
            if _launch_gluon(xq, w8, cfg, p, args, out_dtype):
                return y
        cfg = cfg.get("fallback") or gemm_config(m)  # the same bits (tests/kernels/test_gluon_gemm.py)
    tiles, meta = _launch_meta(cfg, p, m)
    stages = cfg["num_stages"]
    if not tma:
        launcher(_gemm_i8_kernel)[(tiles,)](xq, w8, *args, **meta, num_stages=stages)
        return y
    from triton.tools.tensor_descriptor import TensorDescriptor
    a_desc = TensorDescriptor.from_tensor(xq, [cfg["BM"], cfg["BK"]])
    b_desc = TensorDescriptor.from_tensor(w8, [cfg["BN"], cfg["BK"]])
    if cfg.get("persistent") and persistent_fits(r, out_dtype):
        sms = _num_sms(_index(xq.device))
        launcher(_gemm_i8_persistent_kernel)[(min(sms, tiles),)](a_desc, b_desc, *args, NUM_SMS=sms, **meta,
                                                                  num_stages=stages)
    else:
        launcher(_gemm_i8_tma_kernel)[(tiles,)](a_desc, b_desc, *args, **meta, num_stages=stages)
    return y


@functools.lru_cache(maxsize=8)
def _bin_tensor(index: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(index, dtype=torch.int64, device=device)


def tma_available(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability fetches tiles with TMA (Hopper, sm_90, and later); the
    pointer-load GEMM serves sm_80..89 (RTX 30/40, A100), with the same bits."""
    return tuple(capability) >= (9, 0)


def w4a4_linear(x: torch.Tensor, p: nm.W4A4Params, bin_index=0, *, tma: bool | None = None,
                pass_bytes: int | None = None, one_launch: bool | None = None) -> torch.Tensor:
    """Triton forward with the signature of ``numerics.w4a4_linear``.

    ``bin_index``: a 0-d int64 tensor on the input's device (no host sync; what the timestep hook
    passes) or a Python int. ``tma``: GEMM tiles fetched by TMA (None, the default: where the GPU has it,
    ``tma_available``; False: pointer loads).
    ``pass_bytes``: the per-pass budget of ``pass_rows`` (default ``PASS_BYTES``); ``one_launch``: force the
    quantizer's kind (``quant_plan``; for benchmarks and tests).
    """
    reason = unsupported_reason(x, p)
    if reason:
        raise RuntimeError(f"W4A4 Triton kernel cannot run: {reason}")
    return run_checked(x, p, bin_index, tma=tma, pass_bytes=pass_bytes, one_launch=one_launch)


class CallPlan(NamedTuple):
    """How ``run_checked`` runs one call: the input as rows, the bin as a device tensor, the GEMM's kind and tiles,
    the rows per pass, the quantizer's plan, whether the activations are unsigned (offset), and the regions of the
    call's one allocation (one pass's activation operands, 1/s, the expanded weights)."""
    x2d: torch.Tensor
    bin_index: torch.Tensor
    tma: bool
    config: dict
    rows: int
    plan: QuantPlan
    offset: bool
    regions: Regions

    @property
    def prologue(self) -> bool:
        """Few tokens: quantizer and expansion in one launch (``quantize_and_expand``), then the GEMM."""
        return self.rows >= self.x2d.shape[0] and self.plan.one_launch

    @property
    def replayable(self) -> bool:
        """What ``replay.py`` may record: up to ``REPLAY_MAX_ROWS`` rows, in one pass or several. Between launches
        only noted torch calls run (``launch.zero_``, ``launch.compute_``)."""
        return replayed(self.x2d.shape[0])


def _one_pass_divides(rows: int, m: int) -> bool:
    """A call of ``m`` rows in one pass of up to ``rows`` whose quantizer divides by s itself (no 1/s region)."""
    return rows >= m and kernels_divide(m)


def call_plan(x: torch.Tensor, p: nm.W4A4Params, bin_index=0, *, tma: bool | None = None,
              pass_bytes: int | None = None, one_launch: bool | None = None) -> CallPlan:
    """``run_checked``'s plan of a call (its arguments as there)."""
    k = p.in_features
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {k}")
    if not isinstance(bin_index, torch.Tensor):
        bin_index = _bin_tensor(int(bin_index), x.device)
    capability = _capability(_index(x.device))
    if tma is None:
        tma = tma_available(capability)
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    config = gemm_config(m, async_wgmma=tma and async_wgmma_available(capability))
    rows = pass_rows(m, k, p.rank, PASS_BYTES if pass_bytes is None else pass_bytes)
    plan = quant_plan(m, k, one_launch)
    offset = bool(nm.act_offset(p.act_unsigned))
    regions = {**quant_regions(min(rows, m), k, p.rank, plan, not _one_pass_divides(rows, m)),
               **weight_regions(p.out_features, k, offset)}
    return CallPlan(x2d, bin_index, tma, config, rows, plan, offset, regions)


def call_into(c: CallPlan, p: nm.W4A4Params, arena: Arena, y: torch.Tensor) -> None:
    """The call of plan ``c`` into ``y`` [M, N]: in one pass (``one_pass_call``) or in passes over the rows with the
    whole call's launch configuration (the same bits as one pass), sharing the expanded weights and 1/s."""
    x2d, rows, plan = c.x2d, c.rows, c.plan
    m = x2d.shape[0]
    if rows >= m:
        one_pass_call(c, p, arena, y)
        return
    w8, wsum = expanded(p, c.offset, arena)
    inv_smooth = None if plan.one_launch else _inv_smooth_into(p, arena.get("inv_s"))
    for start in range(0, m, rows):
        xq, sx, u = quantize(x2d[start:start + rows], p, c.bin_index, plan, inv_smooth, arena=arena)
        gemm(xq, sx, u, p, y.dtype, tma=c.tma, config=c.config, w8=w8, wsum=wsum, out=y[start:start + rows])


def one_pass_call(c: CallPlan, p: nm.W4A4Params, arena: Arena, y: torch.Tensor) -> None:
    """A call whose rows fit one pass (``c.rows`` >= M) into ``y`` [M, N]: quantizer and expansion in one launch
    (``c.prologue``) or the expansion and the quantizer's launches, then the GEMM."""
    if c.prologue:
        xq, sx, u, w8, wsum = quantize_and_expand(c.x2d, p, c.bin_index, c.plan, c.offset, arena)
    else:
        w8, wsum = expanded(p, c.offset, arena)
        xq, sx, u = quantize(c.x2d, p, c.bin_index, c.plan, arena=arena)
    gemm(xq, sx, u, p, y.dtype, tma=c.tma, config=c.config, w8=w8, wsum=wsum, out=y)


def run_checked(x: torch.Tensor, p: nm.W4A4Params, bin_index=0, *, tma: bool | None = None,
                pass_bytes: int | None = None, one_launch: bool | None = None) -> torch.Tensor:
    """``w4a4_linear`` for a call that ``unsupported_reason`` has already accepted: what the dispatcher
    (``kernels.w4a4_linear``) runs after its own check, so that a layer call is checked once."""
    c = call_plan(x, p, bin_index, tma=tma, pass_bytes=pass_bytes, one_launch=one_launch)
    n = p.out_features
    # One allocation for the call's transients (``Arena``); the passes reuse the activation regions in stream order.
    y = torch.empty((c.x2d.shape[0], n), dtype=x.dtype, device=x.device)
    call_into(c, p, Arena(x.device, c.regions), y)
    return y.reshape(*x.shape[:-1], n)
