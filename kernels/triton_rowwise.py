"""Triton kernels for the elementwise work around the W4A4 linears (CUDA): ``torch.addcmul`` of a Wan block.

A Wan block (ComfyUI's ``WanAttentionBlock.forward``, both supported versions) makes the input of its self-attention
and of its feed-forward as ``addcmul(e0, norm(x), 1 + e1)`` and adds both results to the residual stream as
``addcmul(x, y, e2)``, where the e's are one row per sample ([B, 1, C]) broadcast over the tokens. PyTorch runs these
broadcasts in its generic elementwise kernel: at 480p x 81 (32 760 tokens, C = 5120, bf16) 0.44 ms for the modulation
and 0.47 ms for the residual update (1.19 ms on ComfyUI 0.3.64, which keeps the residual stream channels-first);
``addcmul`` here takes 0.17, 0.25 and 0.27 ms, 3.7-4.1 TB/s on the H200 (``benchmarks/bench_rowwise.py``,
benchmarks/results/bench_rowwise_tiles_h200_2026-11-30.log), in programs shaped by the operands' layout (``tile``).

Same bits as ``torch.addcmul(a, b, c)``: PyTorch computes ``a + 1 * b * c`` in fp32 and converts it to the output
dtype; for 16-bit inputs ``b * c`` is exact in fp32 (two 8- or 11-bit significands), so the only fp32 rounding is that
of the sum, fused multiply-add or not, and the conversion is the same. Calls outside that form (``rowwise_reason``)
are not taken here.
"""
from __future__ import annotations

import torch

from .launch import launcher

try:  # GPU machines only; imported lazily by kernels/__init__.py
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None

DTYPES = (torch.bfloat16, torch.float16)
BLOCK_L, BLOCK_C = 64, 64  # a program's tile of tokens x channels: coalesced along either (see _addcmul_kernel)
# Where every full operand and the output are row-major (ComfyUI 0.33's block; 0.3.64's modulations): 4 tokens x 1024
# channels, 4 warps. H200, 32 760 x 5120 bf16: modulation 0.195 -> 0.172 ms, residual update 0.273 -> 0.245 ms against
# the square tile, same bits. The other shapes tried (2-32 tokens) were within -1.5 to +2.2 % of it (2 x 2048 the
# fastest by 0.5-1.5 %, not taken: the tests and the step ran 4 x 1024); on a channels-first operand the square tile
# stays 4x faster (benchmarks/bench_rowwise.py --tiles; benchmarks/results/bench_rowwise_tiles_h200_2026-11-30.log).
ROW_MAJOR_TILE = (4, 1024, 4)
TILES = ((BLOCK_L, BLOCK_C, 4), ROW_MAJOR_TILE)  # the candidates bench_rowwise.py --tiles compares


def _layout(t: torch.Tensor, shape: torch.Size) -> str | None:
    """"full": ``t`` has the output's shape [B, L, C] and is stored row-major or channels-first (strides (L C, C, 1)
    or (L C, 1, L): ComfyUI 0.3.64's Wan keeps its residual stream in the second); "row": one row per sample
    ([B, 1, C]) broadcast over the tokens, its channels contiguous; None: neither."""
    B, L, C = shape
    if t.shape == shape and (t.is_contiguous() or t.stride() == (L * C, 1, L)):
        return "full"
    if t.ndim == 3 and t.shape[0] == B and t.shape[1] == 1 and t.shape[2] == C and t.stride(2) == 1:
        return "row"
    return None


def form_reason(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dtypes=DTYPES) -> str | None:
    """None when the operands have the form the kernel takes, whatever their device: one dtype of ``dtypes`` (the
    16-bit ones, whose products are exact in fp32), ``b`` a full [B, L, C] tensor, ``a`` and ``c`` each full or one
    row per sample (``_layout``)."""
    if not all(isinstance(t, torch.Tensor) for t in (a, b, c)):
        return "an operand is not a tensor"
    if b.dtype not in dtypes or a.dtype != b.dtype or c.dtype != b.dtype:
        return f"dtypes {a.dtype}, {b.dtype}, {c.dtype} (one 16-bit dtype expected)"
    if b.ndim != 3 or b.numel() == 0 or _layout(b, b.shape) != "full":
        return f"the product's first operand {tuple(b.shape)} {b.stride()} is not a [B, L, C] tensor of either layout"
    if _layout(a, b.shape) is None or _layout(c, b.shape) is None:
        return (f"operands {tuple(a.shape)} {a.stride()} and {tuple(c.shape)} {c.stride()} are neither "
                f"{tuple(b.shape)} of either layout nor one row per sample")
    if b.numel() >= 2**31:
        return "more than 2**31 elements"
    return None


def rowwise_reason(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> str | None:
    """None when ``addcmul(a, b, c)`` computes ``torch.addcmul(a, b, c)`` here, else why not: Triton, the operands on
    one CUDA device, and the form of ``form_reason``."""
    if triton is None:
        return "triton is not installed"
    if not all(isinstance(t, torch.Tensor) and t.is_cuda and t.device == b.device for t in (a, b, c)):
        return "the operands are not all on one CUDA device"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, c)):
        return "an operand requires grad (the kernel has no backward)"
    return form_reason(a, b, c)


if triton is not None:

    @triton.jit
    def _full(ptr, bi, li, ci, mask, sb, sl, sc):
        """A [BLOCK_L, BLOCK_C] tile of a full operand. Offsets fit int32: ``form_reason`` caps the elements below
        2**31."""
        return tl.load(ptr + bi * sb + li[:, None] * sl + ci[None, :] * sc, mask=mask).to(tl.float32)

    @triton.jit
    def _row(ptr, bi, ci, c_mask, sb, sc):
        """The [1, BLOCK_C] row of a one-row-per-sample operand (it broadcasts over the tokens)."""
        return tl.load(ptr + bi * sb + ci * sc, mask=c_mask, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _addcmul_kernel(a_ptr, b_ptr, c_ptr, o_ptr, L, C, a_sb, a_sl, a_sc, b_sb, b_sl, b_sc, c_sb, c_sl, c_sc,
                        o_sb, o_sl, o_sc, A_ROW: tl.constexpr, C_ROW: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """out = a + b * c over one sample's tile of tokens x channels, in fp32, rounded once to out's dtype. The
        strides are the tensors' own: Triton coalesces each operand's loads along whichever of its axes is unit
        stride (it specialises strides equal to 1), so row-major and channels-first operands mix."""
        li = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        bi = tl.program_id(2)
        c_mask = ci < C
        mask = (li < L)[:, None] & c_mask[None, :]
        if A_ROW:
            a = _row(a_ptr, bi, ci, c_mask, a_sb, a_sc)
        else:
            a = _full(a_ptr, bi, li, ci, mask, a_sb, a_sl, a_sc)
        b = _full(b_ptr, bi, li, ci, mask, b_sb, b_sl, b_sc)
        if C_ROW:
            c = _row(c_ptr, bi, ci, c_mask, c_sb, c_sc)
        else:
            c = _full(c_ptr, bi, li, ci, mask, c_sb, c_sl, c_sc)
        out = o_ptr + bi * o_sb + li[:, None] * o_sl + ci[None, :] * o_sc
        tl.store(out, (a + b * c).to(o_ptr.dtype.element_ty), mask=mask)


def tile(full: list[torch.Tensor]) -> tuple[int, int, int]:
    """(tokens, channels, warps) of a program of ``_addcmul_kernel`` over these full operands and output: the
    row-major tile where they all are row-major, else the square one that coalesces along either axis."""
    return ROW_MAJOR_TILE if all(t.is_contiguous() for t in full) else (BLOCK_L, BLOCK_C, 4)


def addcmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, program: tuple[int, int, int] | None = None):
    """``torch.addcmul(a, b, c)`` for operands that ``rowwise_reason`` accepts (it raises otherwise). The output takes
    the layout of the first full operand, as PyTorch's elementwise kernels choose it (tests compare the strides).
    ``program``: (tokens, channels, warps) in place of ``tile``'s (benchmarks)."""
    reason = rowwise_reason(a, b, c)
    if reason:
        raise ValueError(f"addcmul on the Triton path: {reason}")
    B, L, C = b.shape
    a_row, c_row = _layout(a, b.shape) == "row", _layout(c, b.shape) == "row"
    out = torch.empty_like(b if a_row else a)
    bl, bc, warps = program or tile([t for t, row in ((a, a_row), (b, False), (c, c_row), (out, False)) if not row])
    grid = (-(-L // bl), -(-C // bc), B)  # not triton.cdiv: a constexpr_function in Triton 3.6, 1-3 us per host call
    launcher(_addcmul_kernel)[grid](a, b, c, out, L, C, *a.stride(), *b.stride(), *c.stride(), *out.stride(),
                                    A_ROW=a_row, C_ROW=c_row, BLOCK_L=bl, BLOCK_C=bc, num_warps=warps)
    return out
