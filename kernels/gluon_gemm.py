"""The W4A4 int8 GEMM for Hopper (sm_90) in Gluon, with its wgmma kept in flight across K steps.

Why: Triton's pipeliner makes a wgmma asynchronous only when its accumulator is fp32, so Triton's int8 tile loop
(``triton_w4a4._gemm_i8_tma_kernel``) waits for every K step's MMAs before it issues the next, and does 62 % of
the int8 peak per clock on the H200 where the same loop on fp8 operands does 84 % (kernels/README.md, session
12). Gluon states the waits itself: ``warpgroup_mma(..., is_async=True)`` then
``warpgroup_mma_wait(num_outstanding=1)``, so one K step's MMAs run while the next step's are issued and the
stage the retired step read is refilled by TMA. Measured on the H200 (kernels/README.md, session 13): 71 % of
the peak per clock, 6-23 % less time per GEMM than the Triton tile kernel at M >= 4096 on Wan's shapes.

Two kernels with one mainloop and one epilogue: ``_gemm_i8_async_kernel``, one output tile per program, and
``_gemm_i8_ws_kernel``, persistent and warp-specialised: one producer warp issues every TMA load and fills the
ring for the next tile while the MMA warps run this tile's epilogue. The second does 74 % of the peak per clock
against the first's 72 %, and took 3 % off the GEMM in a Wan step (kernels/README.md, session 14), so it is the
default wherever its shared memory fits (``warp_specialized``). Both store their output tiles in whole rows through
shared memory (``STORE_ROWS``): 74 -> 81 % of the peak per clock for the warp-specialised kernel, 6 % less GEMM time
in a Wan step (kernels/README.md, session 18). A third, ``_gemm_i8_pp_kernel``, has two consumer warpgroups take
128 x 128 tiles in turn (a ping-pong schedule: one's epilogue under the other's MMAs): 86-88 % of the peak per clock
against 80-81 %, but 3-4 % fewer operations per joule: in a Wan step on the H200 its own time fell 2 % while the
same call's attention ran 2 % slower, and the step was 0.6-0.9 % slower, so it runs only with ``WAN_W4A4_GEMM=pp``
(kernels/README.md, session 22).

Same function as the Triton kernels, bit for bit (tests/kernels/test_gluon_gemm.py): int8 x int8 -> exact
int32, then the epilogue in ``triton_w4a4._epilogue``'s order: ((acc + offset * wsum) * sx) * sw, + u @ L2 as a
bf16 wgmma accumulating into that fp32 tile, + bias. ``triton_w4a4.gemm`` launches it (``gemm_config`` says
when); this module holds the kernel, its tiles and its TMA descriptors. ``python -m wan_w4a4.kernels.gluon_gemm``
compiles the kernels for sm_90 without a GPU and prints the waits of their loops.

Hopper only: ``warpgroup_mma`` is sm_90's instruction (Blackwell has tcgen05 instead). Gluon is Triton's
experimental dialect, used here as Triton 3.6 has it: with no Triton or an older one ``gluon`` is None, and a later
Triton that cannot build the kernel gets Triton's tile kernel after one warning (``triton_w4a4._launch_gluon``).
"""
from __future__ import annotations

import functools

import torch

from . import numerics as nm
from .tiles import scale_tile, tile_of


def gluon_api_supported(version: str) -> bool:
    """Whether a Triton of this version has the Gluon API this kernel is written and measured with (3.6's)."""
    try:
        return tuple(int(v) for v in version.split(".")[:2]) >= (3, 6)
    except ValueError:  # not "major.minor..."
        return False


try:  # GPU machines only
    import triton

    if not gluon_api_supported(triton.__version__):
        raise ImportError(f"Triton {triton.__version__} predates the Gluon API of Triton 3.6")
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # pragma: no cover - no Triton, or an older one
    gluon = None


if gluon is not None:

    @gluon.jit
    def _mainloop(a_desc, b_desc, off_m, off_n, K, acc, STAGES: gl.constexpr):
        """acc + A[off_m : off_m + BM, :K] @ B[off_n : off_n + BN, :K]^T (both K-major), K steps of BK from a ring
        of STAGES TMA-loaded stages, with one K step's wgmma in flight while the next is issued. Also what
        benchmarks/gemm_power.py times with fp8 operands."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        k_tiles = gl.cdiv(K, BK)

        for i in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 K steps in flight
            first = i < k_tiles
            mbarrier.expect(ready.index(i), nbytes, pred=first)
            tma.async_copy_global_to_shared(a_desc, [off_m, i * BK], ready.index(i), a_smem.index(i), pred=first)
            tma.async_copy_global_to_shared(b_desc, [off_n, i * BK], ready.index(i), b_smem.index(i), pred=first)

        for ki in range(k_tiles):
            st = ki % STAGES
            mbarrier.wait(ready.index(st), (ki // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(st), b_smem.index(st).permute((1, 0)), acc, is_async=True)
            # at most this step's MMAs stay in flight: step ki - 1's have retired, so its stage is free
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            nk = ki + STAGES - 1
            ns = nk % STAGES
            pred = nk < k_tiles
            mbarrier.expect(ready.index(ns), nbytes, pred=pred)
            tma.async_copy_global_to_shared(a_desc, [off_m, nk * BK], ready.index(ns), a_smem.index(ns), pred=pred)
            tma.async_copy_global_to_shared(b_desc, [off_n, nk * BK], ready.index(ns), b_smem.index(ns), pred=pred)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        return acc

    @gluon.jit
    def _epilogue(acc, off_m, off_n, acc_layout: gl.constexpr, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr,
                  y_ptr, M, N, R, stride_ym, BM: gl.constexpr, BN: gl.constexpr, R_PAD: gl.constexpr,
                  HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr, STORE_ROWS: gl.constexpr):
        """The int32 tile -> output rows, in triton_w4a4._epilogue's order: ((acc + offset * wsum) * sx) * sw,
        + u @ L2 (a bf16 wgmma accumulating into that fp32 tile), + bias; masked store."""
        nw: gl.constexpr = gl.num_warps()
        rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
        rn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
        m_mask = rm < M
        n_mask = rn < N
        y = scale_tile(acc, rn, m_mask, n_mask, sx_ptr, ws_ptr, wsum_ptr, rm, OFFSET)
        if HAS_LR:
            lr_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                                instr_shape=[16, BN, 16])
            ld_u: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [nw, 1], [1, 0])  # 32 columns per warp row
            ld_l2: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [nw, 1], [1, 0])  # 128 columns
            um = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, ld_u))
            ur = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, ld_u))
            u = gl.load(u_ptr + um.to(gl.int64)[:, None] * R + ur[None, :],
                        mask=(um < M)[:, None] & (ur < R)[None, :], other=0.0)
            lr_ = gl.arange(0, R_PAD, layout=gl.SliceLayout(1, ld_l2))
            ln = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, ld_l2))
            l2 = gl.load(l2_ptr + lr_[:, None] * N + ln.to(gl.int64)[None, :],
                         mask=(lr_ < R)[:, None] & (ln < N)[None, :], other=0.0)
            u_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, R_PAD],
                                               gl.NVMMASharedLayout.get_default_for([BM, R_PAD], gl.bfloat16), u)
            l2_smem = gl.allocate_shared_memory(gl.bfloat16, [R_PAD, BN],
                                                gl.NVMMASharedLayout.get_default_for([R_PAD, BN], gl.bfloat16), l2)
            fence_async_shared()
            y = warpgroup_mma(u_smem, l2_smem, gl.convert_layout(y, lr_layout))
            y = gl.convert_layout(y, acc_layout)
        if HAS_BIAS:
            y += gl.load(bias_ptr + rn, mask=n_mask, other=0.0)[None, :]
        out = y.to(y_ptr.dtype.element_ty)
        if STORE_ROWS:  # through shared memory into whole-row 16-byte stores (the values are already final)
            vec: gl.constexpr = 128 // y_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16 bytes
            cols: gl.constexpr = BN // vec  # threads across one row
            st_layout: gl.constexpr = gl.BlockedLayout([1, vec], [32 // cols, cols], [nw, 1], [1, 0])
            out = gl.convert_layout(out, st_layout)
            rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, st_layout))
            rn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, st_layout))
            m_mask = rm < M
            n_mask = rn < N
        gl.store(y_ptr + rm.to(gl.int64)[:, None] * stride_ym + rn.to(gl.int64)[None, :],
                 out, mask=m_mask[:, None] & n_mask[None, :])

    @gluon.jit
    def _gemm_i8_async_kernel(
        a_desc, b_desc, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr, R_PAD: gl.constexpr,
        HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr, STAGES: gl.constexpr,
        STORE_ROWS: gl.constexpr = False,
    ):
        pid_m, pid_n = tile_of(gl.program_id(0), M, N, BM, BN, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        nw: gl.constexpr = gl.num_warps()
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                             instr_shape=[16, BN, 32])
        acc = _mainloop(a_desc, b_desc, off_m, off_n, K, gl.zeros([BM, BN], gl.int32, acc_layout), STAGES)
        _epilogue(acc, off_m, off_n, acc_layout, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
                  M, N, R, stride_ym, BM, BN, R_PAD, HAS_LR, HAS_BIAS, OFFSET, STORE_ROWS)


    @gluon.jit
    def _ws_load_partition(a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M: gl.constexpr):
        """Producer warp of the warp-specialised kernel: TMA loads of every K step of every tile of this program,
        into the ring, each stage once the consumers released it (``empty``)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_smem.type.shape[0]
        nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
        k_tiles = gl.cdiv(K, BK)
        num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        c = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, pid_n = tile_of(tile, M, N, BM, BN, GROUP_M)
            for ki in range(k_tiles):
                st = c % STAGES
                # barriers start in phase 0: waiting for phase 1 passes at once the first time round the ring
                mbarrier.wait(empty.index(st), ((c // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(st), nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, ki * BK], ready.index(st), a_smem.index(st))
                tma.async_copy_global_to_shared(b_desc, [pid_n * BN, ki * BK], ready.index(st), b_smem.index(st))
                c += 1

    @gluon.jit
    def _ring_tile(a_smem, b_smem, ready, empty, acc, c, k_tiles):
        """One output tile's K steps from the producer's ring, starting at the ring's step ``c``: the wgmma of each
        step as its stage arrives (``ready``), one step in flight, the stage of the retired step released to the
        producer (``empty``). Returns (acc with the last step still in flight, the ring's next step); the caller
        waits for it and releases the last stage."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        for ki in range(k_tiles):
            st = c % STAGES
            mbarrier.wait(ready.index(st), (c // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(st), b_smem.index(st).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # step c - 1 has retired: its stage goes back to the producer (none before a tile's first step)
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1, pred=ki > 0)
            c += 1
        return acc, c

    @gluon.jit
    def _ws_mma_partition(a_smem, b_smem, ready, empty, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
                          M, N, K, R, stride_ym, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                          GROUP_M: gl.constexpr, R_PAD: gl.constexpr, HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr,
                          OFFSET: gl.constexpr, STORE_ROWS: gl.constexpr):
        """Consumer warpgroups: the wgmma of each K step as its stage arrives, one step in flight, the stage of the
        retired step released to the producer; then the epilogue, while the producer loads the next tile."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        nw: gl.constexpr = gl.num_warps()
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                             instr_shape=[16, BN, 32])
        k_tiles = gl.cdiv(K, BK)
        num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        c = 0
        for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
            pid_m, pid_n = tile_of(tile, M, N, BM, BN, GROUP_M)
            acc, c = _ring_tile(a_smem, b_smem, ready, empty, gl.zeros([BM, BN], gl.int32, acc_layout), c, k_tiles)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1)
            _epilogue(acc, pid_m * BM, pid_n * BN, acc_layout, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr,
                      y_ptr, M, N, R, stride_ym, BM, BN, R_PAD, HAS_LR, HAS_BIAS, OFFSET, STORE_ROWS)

    @gluon.jit
    def _gemm_i8_ws_kernel(
        a_desc, b_desc, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr, R_PAD: gl.constexpr,
        HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr, STAGES: gl.constexpr,
        LOAD_REGS: gl.constexpr, STORE_ROWS: gl.constexpr = False,
    ):
        """_gemm_i8_async_kernel as a persistent, warp-specialised kernel (one program per SM, launched with
        ``min(SMs, tiles)`` programs): one producer warp issues the TMA loads, the kernel's warps issue the wgmma
        and run the epilogue, and the producer fills the ring for the next tile during the epilogue. Same tiles,
        same epilogue, same bits."""
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_ws_mma_partition, (a_smem, b_smem, ready, empty, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr,
                                 y_ptr, M, N, K, R, stride_ym, BM, BN, BK, GROUP_M, R_PAD, HAS_LR, HAS_BIAS, OFFSET,
                                 STORE_ROWS)),
            (_ws_load_partition, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M)),
        ], [1], [LOAD_REGS])


    @gluon.jit
    def _pp_mma_partition(a_smem, b_smem, ready, empty, order, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr,
                          y_ptr, M, N, K, R, stride_ym, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                          GROUP_M: gl.constexpr, R_PAD: gl.constexpr, HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr,
                          OFFSET: gl.constexpr, STORE_ROWS: gl.constexpr, PART: gl.constexpr):
        """One of the ping-pong kernel's two consumer warpgroups: this program's tiles of one parity (PART), each
        mainloop after the other warpgroup's previous one, so the two run their mainloops in turn and each one's
        epilogue overlaps the other's MMAs. The ring is shared: tile i of the program reads stages from i * k_tiles
        on. The turn-taking (``order``) also keeps each wait on ``ready`` at most one phase ahead of the barrier,
        which is what waits on a phase's parity need."""
        STAGES: gl.constexpr = a_smem.type.shape[0]
        nw: gl.constexpr = gl.num_warps()
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                             instr_shape=[16, BN, 32])
        k_tiles = gl.cdiv(K, BK)
        num_tiles = gl.cdiv(M, BM) * gl.cdiv(N, BN)
        step = gl.num_programs(0)
        n = 0  # this warpgroup's tiles so far
        for tile in range(gl.program_id(0) + PART * step, num_tiles, 2 * step):
            pid_m, pid_n = tile_of(tile, M, N, BM, BN, GROUP_M)
            i = 2 * n + PART  # the tile's place in the program's sequence
            if i > 0:  # the other warpgroup has issued the MMAs of tile i - 1: its turn is over
                mbarrier.wait(order.index(PART), (i - 1) // 2 & 1)
            acc, c = _ring_tile(a_smem, b_smem, ready, empty, gl.zeros([BM, BN], gl.int32, acc_layout), i * k_tiles,
                                k_tiles)
            mbarrier.arrive(order.index(1 - PART), count=1)  # the other warpgroup's turn
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(empty.index((c + STAGES - 1) % STAGES), count=1)
            _epilogue(acc, pid_m * BM, pid_n * BN, acc_layout, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr,
                      y_ptr, M, N, R, stride_ym, BM, BN, R_PAD, HAS_LR, HAS_BIAS, OFFSET, STORE_ROWS)
            n += 1

    @gluon.jit
    def _gemm_i8_pp_kernel(
        a_desc, b_desc, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr, wsum_ptr, y_ptr,
        M, N, K, R, stride_ym,
        BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, GROUP_M: gl.constexpr, R_PAD: gl.constexpr,
        HAS_LR: gl.constexpr, HAS_BIAS: gl.constexpr, OFFSET: gl.constexpr, STAGES: gl.constexpr,
        LOAD_REGS: gl.constexpr, MMA_REGS: gl.constexpr, STORE_ROWS: gl.constexpr = False,
    ):
        """The persistent warp-specialised kernel with a ping-pong schedule (CUTLASS's name for it on Hopper): two
        consumer warpgroups, launched with ``num_warps=4`` (the first is the kernel's own warps, the second a
        worker with ``MMA_REGS`` registers), each with its own BM x BN accumulator, take the program's tiles in turn
        (``_pp_mma_partition``); the producer warp (``_ws_load_partition``, unchanged) loads every tile's K steps
        into one ring in tile order. Same tiles' function, same epilogue, same bits."""
        a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(2):
            mbarrier.init(order.index(i), count=1)
        gl.warp_specialize([
            (_pp_mma_partition, (a_smem, b_smem, ready, empty, order, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr,
                                 wsum_ptr, y_ptr, M, N, K, R, stride_ym, BM, BN, BK, GROUP_M, R_PAD, HAS_LR, HAS_BIAS,
                                 OFFSET, STORE_ROWS, 0)),
            (_pp_mma_partition, (a_smem, b_smem, ready, empty, order, sx_ptr, ws_ptr, u_ptr, l2_ptr, bias_ptr,
                                 wsum_ptr, y_ptr, M, N, K, R, stride_ym, BM, BN, BK, GROUP_M, R_PAD, HAS_LR, HAS_BIAS,
                                 OFFSET, STORE_ROWS, 1)),
            (_ws_load_partition, (a_desc, b_desc, a_smem, b_smem, ready, empty, M, N, K, GROUP_M)),
        ], [4, 1], [MMA_REGS, LOAD_REGS])


# Tiles of the kernels: 256 x 128 output tiles, K steps of 128, four stages of TMA loads in flight (192 KiB of
# shared memory), two warpgroups. Measured best of the variants in benchmarks/gemm_power.py on the H200.
CONFIG = dict(BM=256, BN=128, BK=128, GROUP_M=8, num_stages=4, num_warps=8)
# The warp-specialised kernel keeps the four stages beside the epilogue's low-rank tiles (216 KiB at rank
# padding 32, 240 KiB at 64, of Hopper's 227 KiB); a wider low-rank branch (a folded LoRA pads to 64-128) takes
# _gemm_i8_async_kernel, which frees its stages before the epilogue. The producer warp needs 40 registers.
WS_MAX_RANK_PAD = 32
WS_LOAD_REGS = 40
# The ping-pong kernel (_gemm_i8_pp_kernel): 128 x 128 tiles per consumer warpgroup, K steps of 128.
PP_CONFIG = dict(BM=128, BN=128, BK=128, GROUP_M=8, num_stages=4, num_warps=4)
PP_MMA_REGS = 232
PP_MAX_RANK_PAD = 64


# The epilogue's stores: False, each thread stores the values the wgmma layout gives it (two adjacent columns, 4
# bytes); True, the tile goes through shared memory into whole-row 16-byte stores: 74 -> 81 % of the int8 peak per
# clock for one Wan block's Linears on the H200, same bits (kernels/README.md, session 18). The warp-specialised
# kernel's shared memory holds the staging tile only for 2-byte outputs (224 KiB at rank padding 32, of 227 KiB;
# 256 KiB for fp32, compiled offline for sm_90).
STORE_ROWS = True


def store_rows(cfg: dict, ws: bool, out_dtype: torch.dtype) -> bool:
    """Whether a launch with ``cfg`` stores its tiles in whole rows (``STORE_ROWS``; ``cfg["store_rows"]``
    overrides), given the kernel (``ws``: warp-specialised) and the output dtype."""
    return bool(cfg.get("store_rows", STORE_ROWS)) and (not ws or out_dtype.itemsize <= 2)


def ping_pong(cfg: dict, r_pad: int) -> bool:
    """Whether a launch with ``cfg`` and low-rank padding ``r_pad`` runs the ping-pong kernel: its four or five
    stages and both warpgroups' epilogue tiles fit Hopper's shared memory up to rank padding ``PP_MAX_RANK_PAD``, any
    output dtype (compiled offline for sm_90: tests/kernels/test_shared_memory.py)."""
    return bool(cfg.get("ping_pong")) and r_pad <= PP_MAX_RANK_PAD


def warp_specialized(cfg: dict, r_pad: int) -> bool:
    """Whether a launch with ``cfg`` and low-rank padding ``r_pad`` runs the warp-specialised kernel."""
    return bool(cfg.get("warp_specialized")) and r_pad <= WS_MAX_RANK_PAD


def descriptors(xq: torch.Tensor, w8: torch.Tensor, cfg: dict):
    """TMA descriptors of the int8 activations [M, K] and expanded weights [N, K] for the tiles of ``cfg`` (also of
    fp8 operands: the layouts depend only on the element width)."""
    return (TensorDescriptor.from_tensor(xq, [cfg["BM"], cfg["BK"]], int8_layout(cfg["BM"], cfg["BK"])),
            TensorDescriptor.from_tensor(w8, [cfg["BN"], cfg["BK"]], int8_layout(cfg["BN"], cfg["BK"])))


@functools.lru_cache(maxsize=None)
def int8_layout(rows: int, cols: int):
    """The shared-memory layout of an int8 [rows, cols] TMA tile; made once per shape (``get_default_for`` is a
    constexpr_function in Triton 3.6, called through ``ConstexprFunction.__call__`` as ``triton.cdiv`` is)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.int8)


def compile_offline(cfg: dict = CONFIG, out_dtype: str = "fp16", offset: int = 0, has_lr: bool = True,
                    r_pad: int = 32, ws: bool = False, load_regs: int = WS_LOAD_REGS, store_rows: bool = False,
                    pp: bool = False, mma_regs: int = PP_MMA_REGS):
    """Compile for sm_90 without a GPU (Triton's ``triton.compile`` with an explicit target): the kernel's
    TTGIR/PTX, to check what the pipeline became. ``ws``: the warp-specialised kernel; ``pp``: the ping-pong one
    (``cfg`` its tiles, ``PP_CONFIG``)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    a_layout, b_layout = int8_layout(cfg["BM"], cfg["BK"]), int8_layout(cfg["BN"], cfg["BK"])
    sig = {"a_desc": f"tensordesc<i8[{cfg['BM']}, {cfg['BK']}],{a_layout!r}>",
           "b_desc": f"tensordesc<i8[{cfg['BN']}, {cfg['BK']}],{b_layout!r}>",
           "sx_ptr": "*fp32", "ws_ptr": "*fp32", "u_ptr": "*bf16", "l2_ptr": "*bf16", "bias_ptr": "*fp32",
           "wsum_ptr": "*i32", "y_ptr": f"*{out_dtype}", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
           "stride_ym": "i32"}
    const = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], GROUP_M=cfg["GROUP_M"], R_PAD=r_pad, HAS_LR=has_lr,
                 HAS_BIAS=True, OFFSET=offset, STAGES=cfg["num_stages"], STORE_ROWS=store_rows)
    if ws or pp:
        const["LOAD_REGS"] = load_regs
    if pp:
        const["MMA_REGS"] = mma_regs
    for name in const:
        sig[name] = "constexpr"
    # What a launch on Wan's shapes specializes (Triton marks pointers and integers divisible by 16): without it the
    # stores would compile to one element each.
    fn = _gemm_i8_pp_kernel if pp else _gemm_i8_ws_kernel if ws else _gemm_i8_async_kernel
    aligned = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
               for a in ("sx_ptr", "ws_ptr", "u_ptr", "l2_ptr", "bias_ptr", "wsum_ptr", "y_ptr", "M", "N", "K",
                         "stride_ym")}
    src = GluonASTSource(fn, sig, constexprs=const, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg["num_warps"]))


if __name__ == "__main__":  # pragma: no cover - needs Triton
    import re

    for kind, offset in ((k, o) for k in ("async", "ws", "pp") for o in (0, nm.UNSIGNED_OFFSET)):
        c = compile_offline(PP_CONFIG if kind == "pp" else CONFIG, offset=offset, ws=kind == "ws", pp=kind == "pp")
        waits = re.findall(r"warp_group_dot_wait[^\n]*?pendings = (\d+)", c.asm["ttgir"])
        ptx = c.asm["ptx"]
        ptx_waits = re.findall(r"wgmma.wait_group.sync.aligned (\d+)", ptx)
        mmas = sorted(set(re.findall(r"wgmma.mma_async.sync.aligned.([\w.]+) ", ptx)))
        name = f"_gemm_i8_{kind}_kernel"
        print(f"{name} OFFSET={offset}: TTGIR dot waits (pendings) {waits}; PTX wgmma.wait_group {ptx_waits}; "
              f"mma {mmas}; shared {c.metadata.shared} B")
