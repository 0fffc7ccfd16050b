"""The W4A4 numerics and packed layout: the eager torch reference that *defines* the function.

Everything else - the Triton kernels, calibration, the on-disk format - calls or matches this file.
Scheme ``i8g64`` version 1 ("4-bit values, integer group factors, int8 tensor cores").

Notation: M tokens, K input features, N output features, G = K // 64 groups, R low-rank rank,
B timestep bins.

Forward (SVDQuant, arXiv 2411.05007, with a per-bin activation clip ratio, arXiv 2605.27003)::

    x^   = (x + shift) / smooth                      smoothing (shift != 0 only for unsigned inputs)
    y_lr = bf16(bf16(x^) @ L1) @ L2                  BF16 low-rank branch, fp32 accumulation
    y    = (Qa(x^; c[bin]) @ Qw^T) * sx * sw + y_lr + bias

Two-level 4-bit quantization (weights and activations alike). A row v of length K is cut into
groups of 64. Each element is a 4-bit integer q; each group has a small *integer* factor f and each
row one fp32 scale s, so ``v ~= q * f * s``. Why integers: Hopper has no 4-bit tensor cores
(int4 mma is emulated at ~50 TOP/s on Hopper), so the product runs on the int8 tensor cores. q * f is
an exact int8 (|q * f| <= 128), the dot over the whole K accumulates exactly in int32, and the only
floating-point work is one multiply by ``sx[m] * sw[n]`` in the epilogue - no re-scaling of the
accumulator every 64 columns, which is what makes a plain per-group layout run at 0.25x bf16.

- signed values q in [-8, 7], factors f in [1, 16]:   s = c * rowmax / (7 * 16)
- unsigned values q in [0, 15], factors f in [1, 16]: s = c * rowmax / (15 * 16)  (post-GELU inputs,
  shifted by GELU_SHIFT so that they are >= 0). q * f reaches 240, so the int8 operand is
  q * f - 128 and the accumulator gets back the exact int32 term 128 * sum_k w8[n, k].
- f_g = clamp(round(fmax * amax_g / rowmax), 1, fmax), weights and activations alike: the nearest
  factor (it may clip a group's largest value slightly, which costs less than rounding the step
  up; kernels/README.md has the measurements). With c < 1 every group is clipped by the same ratio.

Packed weight layout (``qweight``, uint8 [N, K // 2]): K is cut into tiles of 128; byte j (0..63)
of a tile holds element k = j in its low nibble and k = j + 64 in its high nibble, each stored as
offset binary u = q + 8. A kernel that loads a [BN, 64] byte tile therefore gets two [BN, 64] int4
tiles - one per group, one factor each - with two masks and no shuffles. Requires K % 128 == 0.

Activations are quantized on the fly. Their 4-bit values are written for the GEMM as the int8
``q * f`` (``q * f - 128`` for unsigned inputs; one byte per element): the int8 tensor cores consume it directly and the tensor is
transient (read by one GEMM and freed).

Rounding is specified to the bit so that the kernels reproduce the quantized activations exactly,
on any device: fp32 throughout; the row scale is ``(rowmax * c) * fp32(1 / (qmax * fmax))``; the
factor is ``round((amax_g / rowmax) * fmax)`` with a true division; values are
``round(v * reciprocal(s * f))`` with ``round`` = half-to-even. (Reciprocal-multiply rather than
division by a scalar: torch divides a CUDA tensor by a scalar that way and a CPU tensor exactly,
so spelling it out is what makes CPU, CUDA and Triton agree.)
"""
from __future__ import annotations

import dataclasses
import math

import torch

SCHEME = "i8g64"
SCHEME_VERSION = 1
GROUP = 64  # K elements per scale group
PACK_TILE = 2 * GROUP  # K elements per packing tile (two groups share a byte)
SIGNED = (-8, 7, 16)  # (qmin, qmax, fmax)
UNSIGNED = (0, 15, 16)
UNSIGNED_OFFSET = 128  # unsigned activations are stored as q * f - 128 (see the module doc)
# GELU-tanh has its minimum at about -0.16997; SVDQuant shifts post-GELU inputs by this
# dyadic constant so that they are non-negative and can use the unsigned grid.
GELU_SHIFT = 0.171875


def _grid(unsigned: bool) -> tuple[int, int, int]:
    return UNSIGNED if unsigned else SIGNED


def check_k(k: int, what: str = "K") -> None:
    if k % PACK_TILE:
        raise ValueError(f"{what} = {k} is not a multiple of {PACK_TILE}: the {SCHEME} layout packs "
                         f"K in tiles of {PACK_TILE} (Wan2.2 uses 5120 and 13824)")


# ---------------------------------------------------------------------------------------------
# Two-level quantization of rows (weights and activations)
# ---------------------------------------------------------------------------------------------

def inv_qf(unsigned: bool) -> torch.Tensor:
    """fp32(1 / (qmax * fmax)): the row scale is rowmax * clip times this constant."""
    _, qmax, fmax = _grid(unsigned)
    return torch.tensor(1.0 / (qmax * fmax), dtype=torch.float32)


def choose_grid(v: torch.Tensor, clip: torch.Tensor | float = 1.0, unsigned: bool = False):
    """Row scale and group factors for rows ``v`` [R, K] (fp32). Returns (scale [R] fp32, factor [R, G] uint8).

    ``clip`` multiplies every group's range (c = 1 is plain absmax). Zero rows get scale c / (qmax*fmax).
    """
    _, qmax, fmax = _grid(unsigned)
    v = v.float()
    amax = v.reshape(v.shape[0], -1, GROUP).abs().amax(-1)  # [R, G]
    rmax = amax.amax(-1, keepdim=True)  # [R, 1]
    rmax = torch.where(rmax > 0, rmax, torch.ones_like(rmax))
    clip = torch.as_tensor(clip, dtype=torch.float32, device=v.device)
    scale = (rmax * clip) * inv_qf(unsigned)
    factor = torch.round((amax / rmax) * float(fmax)).clamp_(1, fmax)
    return scale.squeeze(-1), factor.to(torch.uint8)


def quantize_weight_rows(w: torch.Tensor, clip=1.0):
    """Round-to-nearest weights (always signed): (q int8 [N, K], scale fp32 [N], factor uint8 [N, G]).

    No per-group refinement by squared error: after smoothing, a group's largest weight often meets
    an outlier activation channel, and clipping it costs more at the output than it saves in the
    weight (measured: -2 dB on ffn.2); GPTQ, which sees the Hessian, is the way to do better."""
    return quantize_rows(w, clip)


def quantize_to_grid(v: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor, unsigned: bool = False):
    """4-bit values q (int8 [R, K]) of rows ``v`` on a given grid: clamp(round(v / (s * f)))."""
    qmin, qmax, _ = _grid(unsigned)
    step = scale.float()[:, None] * factor.float()  # [R, G]
    q = torch.round(v.float().reshape(v.shape[0], -1, GROUP) * torch.reciprocal(step)[..., None])
    return q.clamp_(qmin, qmax).reshape(v.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """fp32 rows ``q * f * s``."""
    qf = q.float().reshape(q.shape[0], -1, GROUP) * factor.float()[..., None]
    return (qf * scale.float()[:, None, None]).reshape(q.shape)


def int8_operand(q: torch.Tensor, factor: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The int8 tensor-core operand ``q * f - offset`` (exact: signed q * f is in [-128, 112];
    unsigned q * f is in [0, 240] and is stored with offset 128)."""
    qf = q.to(torch.int16).reshape(q.shape[0], -1, GROUP) * factor.to(torch.int16)[..., None] - offset
    return qf.reshape(q.shape).to(torch.int8)


def quantize_rows(v, clip=1.0, unsigned=False):
    """Round-to-nearest quantization of rows: (q int8 [R, K], scale fp32 [R], factor uint8 [R, G])."""
    scale, factor = choose_grid(v, clip, unsigned)
    return quantize_to_grid(v, scale, factor, unsigned), scale, factor


# ---------------------------------------------------------------------------------------------
# Packed int4 weights
# ---------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> uint8 [N, K // 2] in the tile layout described in the module doc."""
    n, k = q.shape
    check_k(k)
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k // PACK_TILE, 2, GROUP)
    return (u[:, :, 0, :] | (u[:, :, 1, :] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, K // 2] -> int8 [N, K]."""
    n, half = packed.shape
    p = packed.reshape(n, half // GROUP, 1, GROUP)
    u = torch.cat([p & 0x0F, p >> 4], dim=2)  # [N, K/128, 2, 64]
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(n, 2 * half)


# ---------------------------------------------------------------------------------------------
# A quantized layer and its forward
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class W4A4Params:
    """Tensors of one W4A4 linear layer (``y = W x + b`` with W [N, K]).

    qweight  uint8   [N, K // 2]  packed residual values (see module doc)
    wscale   float32 [N]          residual row scales
    wfactor  uint8   [N, G]       residual group factors, 1..16
    smooth   float32 [K]          smoothing divisor s (x^ = (x + act_shift) / s)
    lr_down  bfloat16 [K, R]      L1, low-rank down projection in the smoothed space (R may be 0)
    lr_up    bfloat16 [R, N]      L2
    clip     float32 [B]          activation clip ratio per timestep bin
    bias     float32 [N] or None  (for unsigned layers already corrected for the shift)
    act_unsigned                  activations use the unsigned grid (post-GELU inputs)
    act_shift                     added to x before smoothing (GELU_SHIFT for unsigned, else 0)
    """

    qweight: torch.Tensor
    wscale: torch.Tensor
    wfactor: torch.Tensor
    smooth: torch.Tensor
    lr_down: torch.Tensor
    lr_up: torch.Tensor
    clip: torch.Tensor
    bias: torch.Tensor | None = None
    act_unsigned: bool = False
    act_shift: float = 0.0

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def rank(self) -> int:
        return self.lr_down.shape[1]

    @property
    def num_bins(self) -> int:
        return self.clip.shape[0]

    def inv_smooth(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return reciprocal_smooth(self.smooth, out=out)

    def residual(self) -> torch.Tensor:
        """Dequantized residual Q(R), fp32 [N, K], in the smoothed space."""
        return dequantize(unpack_int4(self.qweight), self.wscale, self.wfactor)

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer applies to x (fp32 [N, K]): (Q(R) + L1 L2)^T-space mapped back by 1/s."""
        w_hat = self.residual() + (self.lr_down.float() @ self.lr_up.float()).T
        return w_hat * self.inv_smooth()[None, :]

    def to(self, device) -> "W4A4Params":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def reciprocal_smooth(smooth: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """1/s in fp32. Kernels and reference multiply by this one tensor, so both see the same x^ (the kernels that
    divide by s themselves round as this does). ``out``: an fp32 [K] tensor to write it into (a region of the
    kernels' one allocation per call)."""
    return torch.reciprocal(smooth.float(), out=out)


def smooth_input(x2d: torch.Tensor, p: W4A4Params, inv_smooth: torch.Tensor | None = None) -> torch.Tensor:
    """x^ in fp32 [M, K]."""
    inv = p.inv_smooth() if inv_smooth is None else inv_smooth
    return (x2d.float() + p.act_shift) * inv


def act_offset(unsigned: bool) -> int:
    return UNSIGNED_OFFSET if unsigned else 0


def quantize_activation(xh: torch.Tensor, clip, unsigned: bool = False):
    """Dynamic per-token quantization of x^ [M, K] -> (operand int8 [M, K] = q * f - offset, scale fp32 [M])."""
    q, scale, factor = quantize_rows(xh, clip, unsigned)
    return int8_operand(q, factor, act_offset(unsigned)), scale


def low_rank(xh: torch.Tensor, lr_down: torch.Tensor, lr_up: torch.Tensor) -> torch.Tensor:
    """y_lr fp32 [M, N]: bf16 inputs, fp32 accumulation, the intermediate rounded to bf16 (as the kernels do)."""
    if lr_down.shape[1] == 0:
        return xh.new_zeros(xh.shape[0], lr_up.shape[1])
    u = (xh.to(torch.bfloat16).float() @ lr_down.float()).to(torch.bfloat16)
    return u.float() @ lr_up.float()


# An fp32 GEMM adds integers exactly, in any order, while every partial sum stays below 2^24. With
# |a + offset| <= 255 and |b| <= 128, a slice of this many columns sums to at most 512 * 255 * 128 =
# 16 711 680 < 2^24. On a CPU it runs about twice as fast as the fp64 GEMM, and the CPU calibration spends
# much of its time here (the clip and smoothing searches).
EXACT_F32_COLUMNS = 512


def cpu_f32_gemm_is_ieee() -> bool:
    """Whether CPU fp32 GEMMs round in fp32 (not through bf16: ``torch.set_float32_matmul_precision``)."""
    setting = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", None)
    if setting is not None:
        return setting in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"


def exact_in_f32_slices(a: torch.Tensor, offset: int) -> bool:
    """Whether :func:`int_matmul` takes the fp32 slices: a CPU operand, an offset of at most 128 (the bound
    above), and fp32 GEMMs that round in fp32."""
    return a.device.type == "cpu" and 0 <= offset <= 128 and cpu_f32_gemm_is_ieee()


def int_matmul(a: torch.Tensor, b: torch.Tensor, offset: int = 0, b64: torch.Tensor | None = None) -> torch.Tensor:
    """Exact sum_k (a + offset)[m, k] * b[n, k] -> fp32, rounded once (as the kernels convert int32).

    a int8 [M, K] (activation operand, stored minus ``offset``), b int8 [N, K]. |sum| < 2^31 < 2^53,
    so the fp64 GEMM is exact. On a CPU with fp32 GEMMs in fp32, exact fp32 GEMMs over slices of
    ``EXACT_F32_COLUMNS`` columns, summed in fp64, give the same integer. ``b64``: ``b.double()``, for a
    caller that multiplies by one b many times (the fp64 GEMM's operand)."""
    k = a.shape[1]
    if exact_in_f32_slices(a, offset):
        af, bf = a.float(), b.float()
        if offset:
            af = af + offset  # exact: integers of at most 255
        if k <= EXACT_F32_COLUMNS:
            return af @ bf.T
        acc = af[:, :EXACT_F32_COLUMNS] @ bf[:, :EXACT_F32_COLUMNS].T
        acc = acc.double()
        for k0 in range(EXACT_F32_COLUMNS, k, EXACT_F32_COLUMNS):
            acc += af[:, k0:k0 + EXACT_F32_COLUMNS] @ bf[:, k0:k0 + EXACT_F32_COLUMNS].T
        return acc.float()
    b64 = b.double() if b64 is None else b64
    acc = a.double() @ b64.T
    if offset:
        acc = acc + offset * b64.sum(1)[None, :]
    return acc.float()


def forward_smoothed(xh: torch.Tensor, clip, wq: torch.Tensor, wscale: torch.Tensor, y_lr: torch.Tensor,
                     bias: torch.Tensor | None, unsigned: bool, matmul=int_matmul) -> torch.Tensor:
    """y = (Qa(x^; c) @ Qw^T) * sx * sw + y_lr + bias, fp32 [M, N], from the smoothed input x^ [M, K] and the
    layer's parts that do not depend on c: the int8 weight operand ``wq`` (:func:`int8_operand`), the row
    scales and the low-rank output y_lr (:func:`low_rank`). The forward's formula, written once; the order
    of the fp32 operations is part of it (the kernels' epilogue follows it). ``matmul``: a function with
    :func:`int_matmul`'s arguments and exact result (the clip search passes the int8 tensor cores')."""
    a, sx = quantize_activation(xh, clip, unsigned)
    y = (matmul(a, wq, act_offset(unsigned)) * sx[:, None]) * wscale.float()[None, :]
    y = y + y_lr
    if bias is not None:
        y = y + bias.float()
    return y


def w4a4_linear(x: torch.Tensor, p: W4A4Params, bin_index: int | torch.Tensor = 0) -> torch.Tensor:
    """The reference forward. x [..., K] (any float dtype) -> y [..., N] in x's dtype."""
    k, n = p.in_features, p.out_features
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {k}")
    xh = smooth_input(x.reshape(-1, k), p)
    wq = int8_operand(unpack_int4(p.qweight), p.wfactor)
    y = forward_smoothed(xh, p.clip[bin_index], wq, p.wscale, low_rank(xh, p.lr_down, p.lr_up), p.bias,
                         p.act_unsigned)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# ---------------------------------------------------------------------------------------------
# Timestep bins: which clip ratio c[bin] a call uses
# ---------------------------------------------------------------------------------------------

def bin_of(t: float, edges) -> int:
    """The bin of model timestep ``t`` given B + 1 strictly descending ``edges``: the one definition of
    the rule that calibration (``capture``), the state format (``StateMeta.bin_index``) and the sampling
    hook (``nodes/hook.py``) use.

    Bin i covers edges[i+1] <= t < edges[i]: closed at the low end, so that t = boundary falls in the
    high expert's last bin, matching Wan2.2's "high expert for t >= boundary". A t above edges[0] gets
    bin 0 and one below edges[B] bin B - 1 (the nearest bin).
    """
    b = len(edges) - 1
    if b < 1:
        raise ValueError(f"bin_of needs B + 1 >= 2 edges, got {list(edges)}")
    for i in range(b):
        if t >= edges[i + 1]:
            return i
    return b - 1


# ---------------------------------------------------------------------------------------------
# Building a layer from a float weight (the calibration-free path; calibration refines each step)
# ---------------------------------------------------------------------------------------------

def unsigned_bias_correction(p: W4A4Params) -> torch.Tensor:
    """For a shifted (unsigned) layer: the bias term that cancels the shift, -W_eff (shift * 1)."""
    w_eff = p.effective_weight()
    return -p.act_shift * w_eff.sum(dim=1)


def from_float(weight: torch.Tensor, bias: torch.Tensor | None = None, *, smooth: torch.Tensor | None = None,
               lr_down: torch.Tensor | None = None, lr_up: torch.Tensor | None = None,
               residual_q: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               clip: torch.Tensor | None = None, num_bins: int = 1, act_unsigned: bool = False) -> W4A4Params:
    """Assemble a layer. Without the optional parts this is plain RTN W4A4 (s = 1, rank 0, c = 1).

    ``residual_q`` = (q int8 [N, K], scale, factor) from GPTQ; otherwise the residual
    W diag(s) - L1 L2 is rounded to nearest.
    """
    n, k = weight.shape
    check_k(k, "in_features")
    w = weight.float()
    s = torch.ones(k) if smooth is None else smooth.float().cpu()
    s = s.to(w.device)
    if lr_down is None:
        lr_down = torch.zeros(k, 0, dtype=torch.bfloat16, device=w.device)
        lr_up = torch.zeros(0, n, dtype=torch.bfloat16, device=w.device)
    w_hat = w * s[None, :]
    resid = w_hat - (lr_down.float() @ lr_up.float()).T
    q, scale, factor = residual_q if residual_q is not None else quantize_weight_rows(resid)
    p = W4A4Params(
        qweight=pack_int4(q), wscale=scale.float(), wfactor=factor.to(torch.uint8), smooth=s,
        lr_down=lr_down.to(torch.bfloat16), lr_up=lr_up.to(torch.bfloat16),
        clip=(torch.ones(num_bins) if clip is None else clip.float()).to(w.device),
        bias=None if bias is None else bias.float(),
        act_unsigned=act_unsigned, act_shift=GELU_SHIFT if act_unsigned else 0.0)
    if act_unsigned:
        corr = unsigned_bias_correction(p)
        p.bias = corr if p.bias is None else p.bias + corr
    return p


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - test||)."""
    ref, test = ref.double(), test.double()
    noise = (ref - test).norm().item()
    return math.inf if noise == 0 else 20.0 * math.log10(ref.norm().item() / noise)
