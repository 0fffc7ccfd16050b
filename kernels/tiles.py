"""The order in which the int8 GEMMs (``triton_w4a4``'s Triton kernels and ``gluon_gemm``'s Gluon kernel, which can
call a ``triton.jit`` function for scalar work) walk their output tiles. Triton is imported only on GPU machines."""
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
else:  # pragma: no cover
    tile_of = None
