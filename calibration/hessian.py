"""Streaming statistics of one layer input, mergeable by addition.

A quantized Linear sees its input ``x`` [..., K] many times during capture (every sampling step,
cond and uncond, every calibration item). Nothing here keeps those activations: each statistic is
a sum, a max/min or a bounded sample, so that two partial statistics (two passes, two GPUs under
torch.distributed) combine with :meth:`InputStats.merge` / :meth:`RowReservoir.merge` into exactly
what one pass over all the rows would give.

- :class:`InputStats`: H = sum x x^T (the GPTQ Hessian up to a factor, arXiv 2210.17323 sec. 3),
  sum x (for the shift of unsigned layers), per-channel min / max (SVDQuant's max|x_j|, arXiv
  2411.05007 sec. 4), row count.
- :class:`RowReservoir`: a uniform sample of input rows without replacement (bottom-k sampling by
  random keys), per timestep bin, for the activation clip search (arXiv 2605.27003).
- :func:`smoothed_hessian`: the Hessian seen by the residual of the smoothed layer.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Rows per Hessian chunk: the fp32 copy of one chunk stays under 2**26 floats (256 MiB), whatever K.
_CHUNK_FLOATS = 1 << 26
# Rows per tensor-core GEMM on the bf16 path. Hopper's tensor cores accumulate in fp32 but truncate,
# so the error of one long GEMM grows with its length (measured on an H100, K = 5120: 1.4e-4 of
# max|H| for 32760 rows in one GEMM); chunks of 1024 rows summed in fp32 measured 2.4e-6, below
# the plain fp32 GEMM's 7.8e-6, at 6.4 ms instead of 32 ms.
_TC_CHUNK_ROWS = 1024


def _check_finite(lo: torch.Tensor, hi: torch.Tensor, what: str) -> None:
    """Raise if a per-channel min / max is NaN or inf (NaN propagates through amax / amin)."""
    bad = ~(torch.isfinite(lo) & torch.isfinite(hi))
    if bool(bad.any()):
        idx = bad.nonzero().flatten()
        raise ValueError(
            f"{what}: the layer input holds NaN or inf in {idx.numel()} of {lo.numel()} channels "
            f"(first: channel {int(idx[0])}). The model produced non-finite activations on this "
            f"calibration item; check the item (image, latent, conditioning) and the model's dtype.")


_MM_OUT_DTYPE_OK: bool | None = None  # does this torch build have mm(..., out_dtype=) on CUDA?


def _gram_fp32(x: torch.Tensor) -> torch.Tensor:
    """x^T x with fp32 accumulation and an fp32 result, x [T, K] of any float dtype.

    bf16 / fp16 inputs on CUDA use the half-precision tensor cores with an fp32 output
    (``torch.mm(..., out_dtype=float32)``, chunks of ``_TC_CHUNK_ROWS`` rows): products of two
    bf16 numbers are exact in fp32 and the tensor cores accumulate in fp32, 5x faster than the
    fp32 GEMM - which matters at T ~ 3e4 rows and K = 13824 (1.3e13 FLOP per call).
    """
    global _MM_OUT_DTYPE_OK
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE_OK is not False:
        try:
            g = torch.mm(x[:_TC_CHUNK_ROWS].T, x[:_TC_CHUNK_ROWS], out_dtype=torch.float32)
            for i in range(_TC_CHUNK_ROWS, x.shape[0], _TC_CHUNK_ROWS):
                g += torch.mm(x[i:i + _TC_CHUNK_ROWS].T, x[i:i + _TC_CHUNK_ROWS], out_dtype=torch.float32)
            _MM_OUT_DTYPE_OK = True
            return g
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE_OK = False
            log.info("torch.mm(out_dtype=float32) is unavailable; the Hessian is accumulated with fp32 GEMMs")
    xf = x.float()
    return xf.T @ xf


class InputStats:
    """Streaming, mergeable statistics of one layer input with K features.

    Accumulates (all on ``device``, fp32 unless stated):

    - ``h``: sum over rows of x x^T, [K, K] (only with ``hessian=True``; 764 MB at K = 13824);
    - ``xsum``: sum of x, [K], fp64 (cheap, and the mean feeds the shifted Hessian below);
    - ``xmin`` / ``xmax``: per-channel min and max, [K];
    - ``count``: number of rows.

    Every field combines by addition (``h``, ``xsum``, ``count``) or by min / max, so
    :meth:`merge` of partial statistics equals one pass over all rows. The GPTQ Hessian
    (arXiv 2210.17323, eq. 2: H = 2 X X^T, the factor is irrelevant) is :meth:`hessian`.
    """

    def __init__(self, k: int, device="cpu", hessian: bool = True):
        if k <= 0:
            raise ValueError(f"InputStats: k must be positive, got {k}")
        self.k = int(k)
        self.device = torch.device(device)
        self.h = torch.zeros(k, k, dtype=torch.float32, device=self.device) if hessian else None
        self.xsum = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.xmin = torch.full((k,), float("inf"), dtype=torch.float32, device=self.device)
        self.xmax = torch.full((k,), float("-inf"), dtype=torch.float32, device=self.device)
        self.count = 0

    # -- accumulation ------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` [..., K] (any float dtype). Raises ValueError on NaN / inf."""
        if x.shape[-1] != self.k:
            raise ValueError(f"InputStats.update: input has {x.shape[-1]} features, expected {self.k}")
        x2 = x.detach().reshape(-1, self.k).to(self.device)
        if x2.shape[0] == 0:
            return
        lo, hi = x2.amin(0).float(), x2.amax(0).float()
        _check_finite(lo, hi, "InputStats.update")  # one host sync per call: 2K values, not T*K
        torch.minimum(self.xmin, lo, out=self.xmin)
        torch.maximum(self.xmax, hi, out=self.xmax)
        # In row chunks: a float64 sum casts its whole input first (6.2 GB for one ffn.2 input at
        # 480p x 33 with CFG), the transient a GPU memory budget (calibration/budget.py) cannot see.
        chunk = max(1, _CHUNK_FLOATS // self.k)
        for i in range(0, x2.shape[0], chunk):
            self.xsum += x2[i:i + chunk].sum(0, dtype=torch.float64)
            if self.h is not None:
                self.h += _gram_fp32(x2[i:i + chunk])
        self.count += x2.shape[0]

    def merge(self, other: InputStats) -> InputStats:
        """Add ``other`` into ``self`` (H and sums add, min / max combine, counts add). Returns self."""
        if other.k != self.k or (other.h is None) != (self.h is None):
            raise ValueError(f"InputStats.merge: incompatible statistics (k {self.k} vs {other.k}, "
                             f"hessian {self.h is not None} vs {other.h is not None})")
        if self.h is not None:
            self.h += other.h.to(self.device)
        self.xsum += other.xsum.to(self.device)
        torch.minimum(self.xmin, other.xmin.to(self.device), out=self.xmin)
        torch.maximum(self.xmax, other.xmax.to(self.device), out=self.xmax)
        self.count += other.count
        return self

    # -- derived quantities ------------------------------------------------------------------
    @property
    def absmax(self) -> torch.Tensor:
        """max |x_j| per channel, [K] fp32 (zeros before any update)."""
        return torch.maximum(self.xmax, -self.xmin).clamp_min(0.0)

    def absmax_shifted(self, shift: float = 0.0) -> torch.Tensor:
        """max |x_j + shift| per channel: what smoothing needs for an unsigned (shifted) layer.

        Exact from min and max, because |x + d| is largest at an extreme of x.
        """
        if shift == 0.0:
            return self.absmax
        return torch.maximum((self.xmax + shift).abs(), (self.xmin + shift).abs()).nan_to_num(0.0, 0.0, 0.0)

    def mean(self) -> torch.Tensor:
        """E[x], [K] fp32."""
        self._need_rows("mean")
        return (self.xsum / self.count).float()

    def hessian(self, shift: float = 0.0) -> torch.Tensor:
        """E[(x + shift)(x + shift)^T], [K, K] fp32 (the mean of x x^T for shift = 0).

        An unsigned layer quantizes x + shift (numerics.GELU_SHIFT), whose second moment follows
        from H, the mean m and d = shift without another pass:
        E[(x + d)(x + d)^T] = E[x x^T] + d (m 1^T + 1 m^T) + d^2 1 1^T.
        """
        if self.h is None:
            raise ValueError("InputStats.hessian: these statistics were built with hessian=False")
        self._need_rows("hessian")
        h = self.h / self.count
        if shift != 0.0:
            m = self.mean()
            h = h + shift * (m[:, None] + m[None, :]) + shift * shift
        return h

    def _need_rows(self, what: str) -> None:
        if self.count == 0:
            raise ValueError(f"InputStats.{what}: no rows were recorded for this layer "
                             f"(was it reached during capture?)")

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors can store it); ``count`` as an int64 [1] tensor."""
        sd = {"xsum": self.xsum, "xmin": self.xmin, "xmax": self.xmax,
              "count": torch.tensor([self.count], dtype=torch.int64)}
        if self.h is not None:
            sd["h"] = self.h
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> InputStats:
        if sd["xsum"].shape != (self.k,) or ("h" in sd) != (self.h is not None):
            raise ValueError(f"InputStats.load_state_dict: state does not match k = {self.k}, "
                             f"hessian = {self.h is not None}")
        if self.h is not None:
            self.h = sd["h"].to(self.device, torch.float32).clone()
        self.xsum = sd["xsum"].to(self.device, torch.float64).clone()
        self.xmin = sd["xmin"].to(self.device, torch.float32).clone()
        self.xmax = sd["xmax"].to(self.device, torch.float32).clone()
        self.count = int(sd["count"].reshape(-1)[0])
        return self


def smoothed_hessian(h: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """The Hessian of the smoothed input x^ = (x + shift) / s: diag(1/s) H diag(1/s).

    ``h`` must already be the Hessian of x + shift (:meth:`InputStats.hessian` with the layer's
    shift). GPTQ on the residual W^ - L1 L2 (SVDQuant, arXiv 2411.05007 sec. 4.3) minimises
    ||(W^ - Q) x^||, whose Hessian is this one. Uses 1/s as numerics does (``inv_smooth``).
    """
    inv = torch.reciprocal(smooth.float().to(h.device))
    return h.float() * inv[:, None] * inv[None, :]


class RowReservoir:
    """A bounded, uniform sample of input rows without replacement, seeded and mergeable.

    Bottom-k sampling: every row offered gets an independent U(0, 1) key from the reservoir's own
    generator; the reservoir keeps the ``capacity`` rows with the smallest keys. That is a uniform
    sample of all rows seen, and :meth:`merge` (keep the smallest keys of the union) gives the
    same distribution as one reservoir over both streams - provided the two reservoirs were seeded
    differently (e.g. ``seed + rank``), since equal seeds give equal key sequences. The rows are kept
    in key order, so equal (key, row) pairs give equal samples whatever the order they were offered in.

    Rows are stored on ``device`` in ``dtype`` (default bf16: Wan's activations are bf16, so this
    is lossless for them and halves the memory; pass float32 for fp32 inputs).
    """

    def __init__(self, k: int, capacity: int, seed: int, *, device="cpu", dtype=torch.bfloat16):
        if k <= 0 or capacity <= 0:
            raise ValueError(f"RowReservoir: k and capacity must be positive, got k={k}, capacity={capacity}")
        self.k, self.capacity = int(k), int(capacity)
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator().manual_seed(int(seed))
        self.keys = torch.empty(0, dtype=torch.float64)  # CPU: small, and decides which rows move
        self.data = torch.empty(0, self.k, dtype=dtype, device=self.device)
        self.seen = 0

    def __len__(self) -> int:
        return self.keys.numel()

    def add(self, x: torch.Tensor) -> None:
        """Offer the rows of ``x`` [..., K]; only rows that enter the sample are copied."""
        if x.shape[-1] != self.k:
            raise ValueError(f"RowReservoir.add: input has {x.shape[-1]} features, expected {self.k}")
        x2 = x.detach().reshape(-1, self.k)
        t = x2.shape[0]
        if t == 0:
            return
        keys = torch.rand(t, generator=self.gen, dtype=torch.float64)
        self.seen += t
        sel = torch.arange(t)
        if len(self) == self.capacity:
            sel = (keys < self.keys.max()).nonzero().flatten()
        if sel.numel() > self.capacity:  # at most `capacity` new rows can enter
            sel = sel[keys[sel].topk(self.capacity, largest=False).indices]
        if sel.numel() == 0:
            return
        rows = x2[sel.to(x2.device)].to(self.device, self.dtype)
        _check_finite(rows.amin(0).float(), rows.amax(0).float(), "RowReservoir.add")
        self._keep(torch.cat([self.keys, keys[sel]]), torch.cat([self.data, rows]))

    def merge(self, other: RowReservoir) -> RowReservoir:
        """Combine with ``other`` (a reservoir over a disjoint stream). Returns self."""
        if other.k != self.k:
            raise ValueError(f"RowReservoir.merge: k {self.k} vs {other.k}")
        self.seen += other.seen
        self._keep(torch.cat([self.keys, other.keys]),
                   torch.cat([self.data, other.data.to(self.device, self.dtype)]))
        return self

    def _keep(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        # The sample is kept in key order, so that it depends only on the (key, row) pairs offered, not on
        # the order they came in: one stream, or parts merged in any order (calibration/distributed.py),
        # give the same rows in the same order.
        idx = keys.argsort(stable=True)[:self.capacity]
        self.keys, self.data = keys[idx], rows[idx.to(rows.device)]

    def reseed(self, seed: int) -> None:
        """Draw the keys of the rows offered from now on from a generator seeded with ``seed``
        (capture seeds each calibration item's draws from the item, ``capture.GroupStats.begin_item``)."""
        self.gen.manual_seed(int(seed))

    def rows(self) -> torch.Tensor:
        """The sampled rows, [min(seen, capacity), K] in ``dtype`` (do not modify in place)."""
        return self.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, including the generator state, so a resumed capture continues the stream."""
        return {"keys": self.keys, "rows": self.data, "seen": torch.tensor([self.seen], dtype=torch.int64),
                "rng": self.gen.get_state()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> RowReservoir:
        if sd["rows"].ndim != 2 or sd["rows"].shape[1] != self.k or sd["keys"].numel() > self.capacity:
            raise ValueError(f"RowReservoir.load_state_dict: state does not match k = {self.k}, "
                             f"capacity = {self.capacity}")
        self.keys = sd["keys"].to(torch.float64).cpu().clone()
        self.data = sd["rows"].to(self.device, self.dtype).clone()
        self.seen = int(sd["seen"].reshape(-1)[0])
        self.gen.set_state(sd["rng"].cpu())
        return self
