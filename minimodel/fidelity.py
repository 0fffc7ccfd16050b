"""Measuring W4A4 against BF16 on the mini model: metrics, per-call recorders, the W4A4 variants of the
fidelity benchmark, and its pictures (the demo's figure is ``apps/mini_pictures.draw_comparison``). Used by
``apps/demo.py`` and ``benchmarks/bench_fidelity.py``.

Metrics, in two spaces:

Pixel space (videos ``[F, H, W, 3]`` in [0, 1], one picture per latent frame, decoded by whatever VAE the
caller passes through ``latent_to_rgb``: the demo uses ``decoder.embedded_vae()``, the learned decoder when
``minimodel/decoder.safetensors`` is there, else the linear VAE, and records which in ``pixel_space``):

- PSNR: 10 log10(1 / MSE) over the whole video;
- SSIM: Wang et al. 2004, Gaussian window 11 x 11 (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, per frame
  and colour channel, averaged;

Latent space (independent of the decoder):

- latent relative error: ||z_w4a4 - z_bf16|| / ||z_bf16|| on the normalised output latents;
- velocity SQNR per call (:class:`CallRecorder`): the W4A4 model is run, at every sampling call,
  a second time on the *BF16 trajectory's* input of the same call (same x, sigma and conditioning),
  and its velocity v = (x - denoised) / sigma is compared with the BF16 velocity:
  20 log10(||v_bf16|| / ||v_w4a4 - v_bf16||). That isolates each step's quantization error from the
  drift of the trajectory; the W4A4 video itself follows its own trajectory.

Variants (:func:`variant_states`) are built from one calibration at ``max_bins`` bins per expert
(bin_spacing "steps"): the per-layer smoothing, low-rank branch and GPTQ residual come from it, and
only the clip ratios change between variants - chosen by ``calibration.report.choose_clips`` from the
calibration's own per-bin clip error tables, pooled by addition for fewer bins (the tables are sums
of squared errors, so pooling bins is exact). RTN W4A4 is ``numerics.from_float`` per layer; SVDQuant
with an RTN residual rebuilds each layer from the calibrated smoothing and low-rank factors.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch
import torch.nn.functional as F

from ..calibration.capture import layer_weight
from ..calibration.config import BLOCK_LINEARS
from ..calibration.report import LayerRecord, choose_clips
from ..kernels import format as fmt
from ..kernels import numerics as nm

log = logging.getLogger(__name__)

WRAPPER_KEY = "wan_w4a4.fidelity"


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def psnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """PSNR in dB of ``test`` against ``ref`` (both in [0, 1]); inf when equal."""
    mse = float((ref.double() - test.double()).square().mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The 1-D Gaussian weights (summing to 1) whose outer product is SSIM's 11 x 11 window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _window_mean(x: torch.Tensor) -> torch.Tensor:
    """Gaussian-weighted mean of every 11 x 11 window that fits in ``x`` [N, 1, H, W]: the 2-D window
    is separable, so a column pass then a row pass (a 2-D float64 convolution took seconds per video
    on a CPU)."""
    g = _gauss()
    return F.conv2d(F.conv2d(x, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))


def ssim(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean SSIM of two ``[..., H, W, 3]`` pictures or videos in [0, 1] (module doc); the window is
    only placed where it fits (as Wang et al.'s reference code, ``filter2(..., 'valid')``)."""
    if ref.shape != test.shape or ref.ndim < 3 or min(ref.shape[-3:-1]) < 11:
        raise ValueError(f"ssim needs two [..., H, W, C] tensors of one shape with H, W >= 11 (the 11 x 11 "
                         f"window), got {tuple(ref.shape)} and {tuple(test.shape)}")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    a = ref.double().reshape(-1, *ref.shape[-3:]).permute(0, 3, 1, 2).reshape(-1, 1, *ref.shape[-3:-1])
    b = test.double().reshape(-1, *test.shape[-3:]).permute(0, 3, 1, 2).reshape(-1, 1, *test.shape[-3:-1])
    mu_a, mu_b = _window_mean(a), _window_mean(b)
    saa = _window_mean(a * a) - mu_a ** 2
    sbb = _window_mean(b * b) - mu_b ** 2
    sab = _window_mean(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


COMPARISONS = (("bf16_vs_reference", "reference", "bf16"), ("w4a4_vs_reference", "reference", "w4a4"),
               ("w4a4_vs_bf16", "bf16", "w4a4"))


def video_metrics(videos: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """PSNR (dB) and SSIM of each pair of ``COMPARISONS`` (name, against, tested) among ``videos``
    ("reference", "bf16", "w4a4": ``[F, H, W, 3]`` in [0, 1]). The demo prints, saves and draws
    these very numbers."""
    return {name: {"psnr_db": psnr(videos[a], videos[b]), "ssim": ssim(videos[a], videos[b])}
            for name, a, b in COMPARISONS}


def rel_err(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float((test.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return nm.sqnr_db(ref, test)


# ---------------------------------------------------------------------------------------------
# Per-call recorders (keyed APPLY_MODEL wrappers)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Call:
    """One model call: model timestep, sigma, the input latent and the velocity."""
    t: float
    sigma: float
    x: torch.Tensor
    v: torch.Tensor
    sqnr: float | None = None  # W4A4 runs: velocity SQNR on the BF16 input of the same call


class CallRecorder:
    """APPLY_MODEL wrapper. BF16 (``reference`` None): records every call's input and velocity and,
    with ``ranges``, the max |input| of every block Linear. W4A4 (``reference`` = the BF16 calls of
    the same run): runs the call as usual (its own trajectory) and once more on the BF16 input of the
    same call index, recording that velocity's SQNR."""

    def __init__(self, reference: list[Call] | None = None, ranges: dict | None = None, linears=()):
        self.reference = reference
        self.calls: list[Call] = []
        self.ranges = ranges  # name -> list of (t, absmax)
        self.linears = tuple(linears)

    def attach(self, model):
        import comfy.patcher_extension as pe
        m = model.clone()
        m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self)
        return m

    @staticmethod
    def _v(x, sigma, denoised):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
        return ((x - denoised) / s).float()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        sigma = t
        ts = float(executor.class_obj.model_sampling.timestep(sigma.reshape(-1)[:1].float()).item())
        handles = []
        if self.ranges is not None:
            inner = executor.class_obj.diffusion_model
            for name in self.linears:
                mod = inner.get_submodule(name)

                def hook(module, args, name=name):
                    self.ranges.setdefault(name, []).append((ts, float(args[0].detach().abs().max())))
                handles.append(mod.register_forward_pre_hook(hook))
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            for h in handles:
                h.remove()
        call = Call(ts, float(sigma.reshape(-1)[0]), x.detach().float().cpu().clone(),
                    self._v(x, sigma, out).cpu())
        if self.reference is not None:
            i = len(self.calls)
            if i >= len(self.reference) or abs(self.reference[i].t - ts) > 1e-3:
                raise RuntimeError(f"fidelity replay: call {i} at t={ts:.3f} has no BF16 call to match")
            ref = self.reference[i]
            xr = ref.x.to(x)
            out_r = executor(xr, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            call.sqnr = sqnr_db(ref.v, self._v(xr, sigma, out_r).cpu())
            call.x = None  # not needed after the comparison
        self.calls.append(call)
        return out


def block_linears(model) -> list[str]:
    """Names (inside the diffusion model) of the block Linears the W4A4 path quantizes."""
    n = len(model.model.diffusion_model.blocks)
    return [f"blocks.{i}.{name}" for i in range(n) for name in BLOCK_LINEARS]


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

def w4a4_bytes(layers: dict[str, nm.W4A4Params]) -> int:
    """Bytes of the stored W4A4 tensors (4-bit values, scales, factors, smoothing, low-rank, clip, bias)."""
    total = 0
    for p in layers.values():
        for f in fmt.FIELDS:
            t = getattr(p, f)
            if t is not None:
                total += t.nelement() * t.element_size()
    return total


def bf16_bytes(layers: dict[str, nm.W4A4Params]) -> int:
    """Bytes of the same Linears in BF16 (weight and bias, 2 bytes each)."""
    return sum(2 * (p.out_features * p.in_features + p.out_features) for p in layers.values())


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------

def rtn_layers(model, names, num_bins: int = 1) -> dict[str, nm.W4A4Params]:
    """Plain RTN W4A4 (no smoothing, no low-rank, no GPTQ, c = 1) of the Linears ``names``."""
    out = {}
    for name in names:
        w, b = layer_weight(model, name)  # on the model's device (the GPU once ComfyUI loaded it)
        out[name] = nm.from_float(w.float().cpu(), None if b is None else b.float().cpu(), num_bins=num_bins)
    return out


def svdq_rtn_layers(model, calibrated: dict[str, nm.W4A4Params], num_bins: int = 1) -> dict[str, nm.W4A4Params]:
    """SVDQuant with a round-to-nearest residual and c = 1: the calibrated smoothing and low-rank
    branch of each layer, its residual rounded to nearest (what the pipeline builds before GPTQ)."""
    out = {}
    for name, p in calibrated.items():
        w, b = layer_weight(model, name)  # the calibrated tensors are on the CPU: quantize there
        out[name] = nm.from_float(w.float().cpu(), None if b is None else b.float().cpu(), smooth=p.smooth,
                                  lr_down=p.lr_down, lr_up=p.lr_up, num_bins=num_bins,
                                  act_unsigned=p.act_unsigned)
    return out


def with_clips(layers: dict[str, nm.W4A4Params], clips: dict[str, list[float]] | float) -> dict[str, nm.W4A4Params]:
    """Copies of ``layers`` with clip tables replaced (a float: one bin with that ratio)."""
    out = {}
    for name, p in layers.items():
        c = [float(clips)] if isinstance(clips, (int, float)) else clips[name]
        out[name] = dataclasses.replace(p, clip=torch.tensor(c, dtype=torch.float32))
    return out


def _records(report: dict, grid) -> dict:
    """calibration.report.LayerRecord objects back from a report's JSON."""
    names = {f.name for f in dataclasses.fields(LayerRecord)} - {"grid"}
    return {e: {d["name"]: LayerRecord(**{k: v for k, v in d.items() if k in names}, grid=tuple(grid))
                for d in x["layers"]} for e, x in report["experts"].items()}


def pool_bins(records: dict, factor: int) -> dict:
    """Records whose per-bin clip error tables are summed over ``factor`` adjacent bins."""
    out = {}
    for e, layers in records.items():
        out[e] = {}
        for name, r in layers.items():
            tables = []
            for j in range(0, len(r.clip_fit), factor):
                part = [t for t in r.clip_fit[j:j + factor] if t is not None]
                tables.append([sum(v) for v in zip(*part)] if part else None)
            out[e][name] = dataclasses.replace(r, clip_fit=tables, clip=[], clip_source=[])
    return out


def choose(report: dict, policy: str, bins: int) -> dict[str, dict[str, list[float]]]:
    """expert -> layer -> clip ratios, by ``policy`` ("per_bin", "per_expert", "global") on the
    calibration's fit-row error tables pooled to ``bins`` bins."""
    grid = tuple(float(c) for c in report["config"]["clip_grid"])
    recs = _records(report, grid)
    nb = len(next(iter(recs["high"].values())).clip_fit)
    if nb % bins:
        raise ValueError(f"cannot pool {nb} calibrated bins into {bins}")
    recs = pool_bins(recs, nb // bins)
    choose_clips(recs, grid, policy)
    return {e: {n: list(r.clip) for n, r in layers.items()} for e, layers in recs.items()}


def coarse_edges(edges, bins: int) -> tuple[float, ...]:
    nb = len(edges) - 1
    return tuple(edges[i] for i in range(0, nb + 1, nb // bins))


@dataclasses.dataclass
class Variant:
    key: str
    label: str
    layers: dict  # expert -> {name: W4A4Params}
    meta: dict  # expert -> StateMeta


def variant_states(models: dict, states: dict, report: dict, bin_counts=(1, 2, 4, 8),
                   default_bins: int = 4) -> list[Variant]:
    """The benchmark's W4A4 configurations (module doc). ``models``: expert -> BF16 MODEL;
    ``states``: expert -> (layers, meta) of the calibration at the finest bin count."""
    full = {e: states[e][0] for e in states}
    metas = {e: states[e][1] for e in states}
    edges = {e: metas[e].bin_edges for e in states}
    nb = metas["high"].num_bins

    def meta(e, bins, policy):
        return dataclasses.replace(metas[e], bin_edges=coarse_edges(edges[e], bins), clip_policy=policy)

    one = {e: (edges[e][0], edges[e][-1]) for e in states}
    out = [
        Variant("rtn", "RTN W4A4 (no smoothing, no low-rank, no GPTQ, c=1)",
                {e: rtn_layers(models[e], full[e]) for e in states},
                {e: dataclasses.replace(metas[e], bin_edges=one[e], clip_policy="none", fingerprint="")
                 for e in states}),
        Variant("svdq", "SVDQuant (smoothing + low-rank, RTN residual, c=1)",
                {e: svdq_rtn_layers(models[e], full[e]) for e in states},
                {e: meta(e, 1, "none") for e in states}),
        Variant("svdq_gptq", "SVDQuant + GPTQ (c=1)", {e: with_clips(full[e], 1.0) for e in states},
                {e: meta(e, 1, "none") for e in states}),
    ]
    for policy, key, label in (("global", "global", "+ global clip (one c per layer, both experts)"),
                               ("per_expert", "per_expert", "+ per-expert clip")):
        clips = choose(report, policy, 1)
        out.append(Variant(key, label, {e: with_clips(full[e], clips[e]) for e in states},
                           {e: meta(e, 1, policy.replace("_", "-")) for e in states}))
    for b in bin_counts:
        if nb % b:
            log.warning("skipping %d bins: the calibration has %d", b, nb)
            continue
        clips = choose(report, "per_bin", b)
        tag = " (full method, default)" if b == default_bins else (" (= per-expert clip)" if b == 1 else "")
        out.append(Variant(f"full_{b}bins", f"+ per-expert per-bin clip, {b} bin{'s' * (b > 1)}{tag}",
                           {e: with_clips(full[e], clips[e]) for e in states},
                           {e: meta(e, b, "per-bin") for e in states}))
    return out


# ---------------------------------------------------------------------------------------------
# Pictures (Pillow only)
# ---------------------------------------------------------------------------------------------

def _font(size: int = 12):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


# one colour per block of the shipped 6-block experts (matplotlib's tab10 order); deeper models cycle
TYPE_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def draw_activation_ranges(ranges: dict, path, boundary: float = 900.0) -> None:
    """Figure 1 of arXiv 2605.27003 for the mini model: max |input| of each block Linear against the
    model timestep, one panel per Linear type, one line per block (log scale), both experts (the
    high-noise expert left of the boundary, the low-noise one right of it)."""
    from PIL import Image, ImageDraw
    pw, ph, ml, mb, mt = 250, 170, 48, 26, 20
    cols = 5
    rows_n = math.ceil(len(BLOCK_LINEARS) / cols)
    canvas = Image.new("RGB", (cols * pw, rows_n * ph + 24), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    n_blocks = 1 + max((int(n.split(".")[1]) for n in ranges), default=0)
    draw.text((6, 4), "max |x| at the input of each block Linear vs model timestep t, sampling order (both experts; "
              f"dashed: expert switch t=900; colours: blocks 0..{n_blocks - 1}; log scale; mean over pairs)",
              fill="black", font=_font(12))
    # x: the sampled timesteps in sampling order, evenly spaced (with shift 8 most steps sit near t = 1000)
    all_t = sorted({round(t, 3) for v in ranges.values() for t, _ in v}, reverse=True)
    pos = {t: i for i, t in enumerate(all_t)}
    n_hi = sum(t >= boundary for t in all_t)
    for idx, lin in enumerate(BLOCK_LINEARS):
        ox, oy = (idx % cols) * pw, (idx // cols) * ph + 24
        series = {n: v for n, v in ranges.items() if n.split(".", 2)[2] == lin}
        vals = [a for v in series.values() for _, a in v if a > 0]
        if not vals:
            continue
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        if hi - lo < 0.3:
            lo, hi = lo - 0.15, hi + 0.15
        x0, x1, y0, y1 = ox + ml, ox + pw - 8, oy + ph - mb, oy + mt

        def X(t):
            return x0 + 6 + pos[round(t, 3)] / max(1, len(all_t) - 1) * (x1 - x0 - 12)

        def Y(a):
            return y0 - (math.log10(a) - lo) / (hi - lo) * (y0 - y1)
        draw.rectangle([x0, y1, x1, y0], outline=(120, 120, 120))
        xb = (X(all_t[n_hi - 1]) + X(all_t[n_hi])) / 2 if 0 < n_hi < len(all_t) else X(all_t[0])
        for yy in range(int(y1), int(y0), 6):
            draw.line([xb, yy, xb, yy + 3], fill=(90, 90, 90))
        draw.text((ox + ml, oy + 4), lin, fill="black", font=font)
        for tick in all_t[::max(1, len(all_t) // 5)]:
            draw.text((X(tick) - 8, y0 + 3), f"{tick:.0f}", fill=(60, 60, 60), font=font)
        for v in (lo, hi):  # right-aligned against this panel's axis
            label = f"{10 ** v:.3g}"
            draw.text((x0 - 3 - draw.textlength(label, font=font), Y(10 ** v) - 6), label, fill=(60, 60, 60), font=font)
        for name, pts in sorted(series.items()):
            block = int(name.split(".")[1])
            color = TYPE_COLORS[block % len(TYPE_COLORS)]
            by_t: dict[float, list[float]] = {}
            for t, a in pts:
                by_t.setdefault(round(t, 3), []).append(a)
            line = [(X(t), Y(max(sum(a) / len(a), 1e-30))) for t, a in sorted(by_t.items(), reverse=True)]
            for side in (lambda t: t >= boundary, lambda t: t < boundary):  # one line per expert
                seg = [p for (t, _), p in zip(sorted(by_t.items(), reverse=True), line) if side(t)]
                if len(seg) > 1:
                    draw.line(seg, fill=color, width=2)
                for p in seg:
                    draw.ellipse([p[0] - 1.5, p[1] - 1.5, p[0] + 1.5, p[1] + 1.5], fill=color)
    canvas.save(path)


def draw_clip_heatmap(clips: dict, edges: dict, path, grid=(0.5, 1.0)) -> None:
    """Chosen clip ratio per layer (rows) and timestep bin (columns, high-noise expert then
    low-noise), as a heatmap with the values written in."""
    from PIL import Image, ImageDraw
    names = list(clips["high"])
    nb = {e: len(next(iter(clips[e].values()))) for e in clips}
    cw, rh, lw, th = 58, 15, 150, 46
    w = lw + cw * (nb["high"] + nb["low"]) + 10
    h = th + rh * len(names) + 30
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(10)
    lo_c, hi_c = min(grid), max(grid)
    draw.text((6, 4), "chosen activation clip ratio c per layer and timestep bin (white 1.0 ... dark "
              f"{lo_c:g})", fill="black", font=_font(12))
    col = lw
    for e in ("high", "low"):
        for b in range(nb[e]):
            a, z = edges[e][b], edges[e][b + 1]
            draw.text((col + 2, 20), f"{e} b{b}", fill="black", font=font)
            draw.text((col + 2, 32), f"{z:.0f}-{a:.0f}", fill=(70, 70, 70), font=font)
            for r, name in enumerate(names):
                c = clips[e][name][b]
                u = 0.0 if hi_c == lo_c else (hi_c - c) / (hi_c - lo_c)
                fill = (int(255 - 200 * u), int(255 - 150 * u), int(255 - 40 * u))
                y = th + r * rh
                draw.rectangle([col, y, col + cw - 1, y + rh - 1], fill=fill, outline=(230, 230, 230))
                draw.text((col + 16, y + 2), f"{c:.2f}", fill="black" if u < 0.6 else "white", font=font)
            col += cw
        col += 0
    for r, name in enumerate(names):
        draw.text((4, th + r * rh + 2), name, fill="black", font=font)
    canvas.save(path)
