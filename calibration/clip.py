"""Activation clip search: the ratio c that scales every activation group's range.

The method paper (arXiv 2605.27003, "Timestep-Aware SVDQuant-GPTQ") picks, per layer, expert and
timestep bin, the clip ratio from a grid by the layer's output MSE; numerics applies it as
``s = c * rowmax / (qmax * fmax)`` (``numerics.choose_grid``), so c < 1 trades clipping the
largest values for a finer step everywhere else - worth it for heavy-tailed activations.

The search runs the exact W4A4 forward of numerics. Only the activation quantization depends on
c, so :class:`ClipEvaluator` computes the rest once per set of rows (smoothing, the int8 weight
operand, the low-rank branch) and each candidate costs one activation quantization and one
integer GEMM. Policies (per bin, per expert, global) combine the per-bin error dicts of
:func:`search_clip` by addition (:func:`combine_errors`, :func:`best_clip`): errors are sums of
squares, so a pooled error is the sum of the bins' errors.
"""
from __future__ import annotations

import torch

from ..kernels import numerics
from .parallel import map_candidates

DEFAULT_CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5


def _int_dot(a: torch.Tensor, wq: torch.Tensor, offset: int = 0, wq_f64: torch.Tensor | None = None) -> torch.Tensor:
    """numerics.int_matmul(a, wq, offset): the exact int32 sum of the int8 operands (plus the
    unsigned offset term), as fp32 rounded once.

    On CUDA the int8 tensor cores (``torch._int_mm``) give the same integers far faster than the
    fp64 GEMM of the reference; both sums are exact, so the fp32 results are identical.
    """
    m, k = a.shape
    if a.is_cuda and m > 16 and k % 8 == 0 and wq.shape[0] % 8 == 0:
        try:
            acc = torch._int_mm(a, wq.T)
            if offset:
                acc = acc + offset * wq.sum(1, dtype=torch.int32)[None, :]
            return acc.float()
        except RuntimeError:
            pass
    return numerics.int_matmul(a, wq, offset, wq_f64)


class ClipEvaluator:
    """The W4A4 forward of one layer on fixed rows, for many clip ratios.

    x_rows [T, K]: raw layer inputs (any float dtype; the output is cast to it, as
    ``numerics.w4a4_linear`` does). p: the layer (its ``clip`` field is ignored). y_ref [T, N]:
    the BF16 layer's output on the same rows, bias included.
    """

    def __init__(self, x_rows: torch.Tensor, p: numerics.W4A4Params, y_ref: torch.Tensor):
        k, n = p.in_features, p.out_features
        if x_rows.ndim != 2 or x_rows.shape[1] != k:
            raise ValueError(f"clip search: x_rows must be [T, {k}], got {tuple(x_rows.shape)}")
        if x_rows.shape[0] == 0:
            raise ValueError("clip search: no input rows (a timestep bin that received no samples?); "
                             "the caller must fall back to a neighbouring bin's ratio")
        if tuple(y_ref.shape) != (x_rows.shape[0], n):
            raise ValueError(f"clip search: y_ref must be [{x_rows.shape[0]}, {n}], got {tuple(y_ref.shape)}")
        dev = p.qweight.device
        x = x_rows.to(dev)
        self.out_dtype = x.dtype
        self.unsigned = p.act_unsigned
        self.xh = numerics.smooth_input(x, p)
        self.wq = numerics.int8_operand(numerics.unpack_int4(p.qweight), p.wfactor)
        # the fp64 GEMM's operand, made once where int_matmul takes it (not on CUDA: int8 tensor cores; not on a
        # CPU: exact fp32 slices)
        self.wq_f64 = None if dev.type in ("cuda", "cpu") else self.wq.double()
        self.wscale = p.wscale.float()
        self.y_lr = numerics.low_rank(self.xh, p.lr_down, p.lr_up)
        self.bias = None if p.bias is None else p.bias.float()
        self.y_ref = y_ref.to(dev)

    def _matmul(self, a: torch.Tensor, wq: torch.Tensor, offset: int) -> torch.Tensor:
        return _int_dot(a, wq, offset, self.wq_f64)

    def output(self, c: float) -> torch.Tensor:
        """numerics.w4a4_linear(x_rows, p with clip = c), bit for bit: numerics' forward on the
        c-independent parts computed once."""
        y = numerics.forward_smoothed(self.xh, c, self.wq, self.wscale, self.y_lr, self.bias, self.unsigned,
                                      matmul=self._matmul)
        return y.to(self.out_dtype)

    def error(self, c: float) -> float:
        """Sum of squared differences to y_ref (fp64): the layer output error of arXiv 2605.27003."""
        return float((self.output(c).double() - self.y_ref.double()).square().sum())

    def errors(self, grid) -> list[float]:
        """``[self.error(c) for c in grid]``, the candidates computed as ``parallel.map_candidates`` says."""
        return map_candidates(lambda c: self.error(float(c)), grid, self.y_ref.device)


def best_clip(errors: dict[float, float]) -> float:
    """The c with the smallest error; ties go to the larger c (less clipping)."""
    if not errors:
        raise ValueError("best_clip: no candidates")
    return min(errors, key=lambda c: (errors[c], -c))


def combine_errors(*errors: dict[float, float]) -> dict[float, float]:
    """Pool per-bin error dicts (same grid) by addition: the error of one shared c over all rows."""
    keys = set(errors[0])
    if any(set(e) != keys for e in errors):
        raise ValueError("combine_errors: the error dicts were computed on different grids")
    return {c: sum(e[c] for e in errors) for c in errors[0]}


def search_clip(x_rows: torch.Tensor, p: numerics.W4A4Params, y_ref: torch.Tensor, grid=DEFAULT_CLIP_GRID):
    """Choose the activation clip ratio from ``grid`` by layer output error (arXiv 2605.27003).

    Returns (best_c, {c: error}); the dict lets a caller pool bins or experts for the per-expert
    and global policies (:func:`combine_errors`, then :func:`best_clip`).
    """
    if not grid:
        raise ValueError("search_clip: empty grid")
    ev = ClipEvaluator(x_rows, p, y_ref)
    errors = dict(zip(map(float, grid), ev.errors(grid)))
    return best_clip(errors), errors
