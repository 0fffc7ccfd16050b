"""What the int8 GEMMs share (``triton_w4a4``'s Triton kernels and ``gluon_gemm``'s Gluon kernel, which can call a
``triton.jit`` function): the order in which they walk their output tiles, and the exact part of their epilogue.
Triton is imported only on GPU machines."""
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None

if triton is not None:

    @triton.jit
    def tile_of(tile, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
        """(row block, column block) of output tile ``tile``, in grouped order: GROUP_M row blocks run next to each
        other over the same weight tiles, which they then share in L2."""
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        first_m = (tile // width) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % size_m
        pid_n = (tile % width) // size_m
        return pid_m, pid_n

    @triton.jit
    def scale_tile(acc, rn, m_mask, n_mask, sx_ptr, ws_ptr, wsum_ptr, rm, OFFSET: tl.constexpr):
        """The int32 tile's exact part of the epilogue, in the reference's order: ((acc + offset * wsum) * sx) * sw
        in fp32 (the offset term restores unsigned activations stored as q * f - 128, exactly, in int32)."""
        if OFFSET != 0:
            acc += OFFSET * tl.load(wsum_ptr + rn, mask=n_mask, other=0)[None, :]
        sx = tl.load(sx_ptr + rm, mask=m_mask, other=0.0)
        sw = tl.load(ws_ptr + rn, mask=n_mask, other=0.0)
        return (acc.to(tl.float32) * sx[:, None]) * sw[None, :]
else:  # pragma: no cover
    tile_of = scale_tile = None
