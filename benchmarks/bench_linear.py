"""W4A4 linear layer: speed against bf16 and fp8 on the GPU, and accuracy of the layout.

    python benchmarks/bench_linear.py                 # speed + accuracy tables (CUDA)
    python benchmarks/bench_linear.py --accuracy-only # accuracy table only (CPU is fine, slower)
    python benchmarks/bench_linear.py --sweep         # also try every tile config (pick defaults)

Speed: at M in {1024, 8192, 32760} tokens and the three Wan2.2-A14B shapes it times
bf16 ``F.linear``, fp8 e4m3 ``torch._scaled_mm`` with row-wise scales (GEMM only, inputs already
fp8: a lower bound for an fp8 layer) and our W4A4 layer end to end (quantize + GEMM + rank-32
low-rank + bias) through the call a W4A4 layer makes in ComfyUI (``kernels.w4a4_linear(x, params,
bin)``, nodes/ops.py), and prints TOP/s (2*M*K*N / time) and the ratio to bf16, plus bytes per weight.
The quantize / expand / GEMM columns time the Triton stages on their own (a breakdown, not a sum).

Accuracy: SQNR (dB) of the layer output against the bf16 layer, on activations with outlier
channels, for the same SVDQuant preprocessing (smoothing alpha 0.5 + rank-32 low-rank branch, RTN):
our two-level integer-factor layout (``i8g64``) versus SVDQuant's plain per-group-64 layout
(int4 values, one float scale per group of 64, weights and activations).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import _checkout  # noqa: F401,E402  (makes ``import wan_w4a4`` work from a checkout)
from wan_w4a4 import kernels  # noqa: E402
from wan_w4a4.kernels import numerics as nm  # noqa: E402

SHAPES = [(5120, 5120), (5120, 13824), (13824, 5120)]  # (K, N): attention/proj, ffn.0, ffn.2
TOKENS = [1024, 8192, 32760]
RANK = 32


def weight_bytes_per_param(k, n, rank=None):
    rank = RANK if rank is None else rank
    b = n * k // 2 + n * k // nm.GROUP + 4 * n + 4 * k + 2 * rank * (k + n) + 4 * n  # + clip (tiny)
    return b / (n * k)


# --------------------------------------------------------------------------------------------- accuracy

def plain_g64_quant(v, unsigned=False):
    """SVDQuant-style int4 with one float scale per group of 64 (absmax), simulated in fp32."""
    qmin, qmax = (0, 15) if unsigned else (-8, 7)
    g = v.float().reshape(v.shape[0], -1, 64)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.round(g / s).clamp(qmin, qmax) * s).reshape(v.shape)


def svdquant_prep(w, x, rank=None, alpha=0.5):
    rank = RANK if rank is None else rank
    s = (x.abs().amax(0).clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
    w_hat = w * s[None, :]
    u, sv, vh = torch.linalg.svd(w_hat.double(), full_matrices=False)
    l1 = (vh[:rank].T * sv[:rank]).float()  # [K, R]
    l2 = u[:, :rank].T.float()  # [R, N]
    return s, l1, l2


def accuracy_table(device, m=2048, seed=0):
    torch.manual_seed(seed)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device=device) * 0.02
        w[:, torch.randperm(k)[:8]] *= 4.0
        x = torch.randn(m, k, device=device)
        x = x * (torch.rand(m, 1, device=device) * 2 + 0.5)  # per-token range varies
        x[:, torch.randperm(k)[:16]] *= 30.0  # outlier channels
        unsigned = k == 13824
        if unsigned:
            x = F.gelu(x, approximate="tanh")
        y_ref = x @ w.T
        s, l1, l2 = svdquant_prep(w, x)
        # ours
        p = nm.from_float(w, smooth=s, lr_down=l1, lr_up=l2, act_unsigned=unsigned)
        y_ours = nm.w4a4_linear(x, p, 0)
        # plain per-group-64 with the same smoothing and low-rank branch
        xh = x / s[None, :] if not unsigned else (x + nm.GELU_SHIFT) / s[None, :]
        resid = w * s[None, :] - (l1.bfloat16().float() @ l2.bfloat16().float()).T
        y_plain = plain_g64_quant(xh, unsigned) @ plain_g64_quant(resid).T + nm.low_rank(xh, p.lr_down, p.lr_up)
        if unsigned:
            w_eff = (plain_g64_quant(resid) + (p.lr_down.float() @ p.lr_up.float()).T) / s[None, :]
            y_plain = y_plain - nm.GELU_SHIFT * w_eff.sum(1)[None, :]
        rows.append(dict(K=k, N=n, unsigned=unsigned, sqnr_i8g64=nm.sqnr_db(y_ref, y_ours),
                         sqnr_plain_g64=nm.sqnr_db(y_ref, y_plain)))
    print(f"\nAccuracy (M={m}, SVDQuant prep: smoothing a=0.5, rank {RANK}, RTN; SQNR vs bf16 layer, dB)")
    print(f"{'K x N':>14} {'act':>8} {'plain g64':>10} {'i8g64':>8} {'delta':>7}")
    for r in rows:
        print(f"{r['K']:>6} x {r['N']:<6} {'uint4' if r['unsigned'] else 'int4':>8} {r['sqnr_plain_g64']:>10.2f} "
              f"{r['sqnr_i8g64']:>8.2f} {r['sqnr_i8g64'] - r['sqnr_plain_g64']:>+7.2f}")
    return rows


# --------------------------------------------------------------------------------------------- speed

def bench(fn, reps=None):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _try_bench(fn):
    try:
        return bench(fn)
    except Exception as e:  # pragma: no cover - depends on the torch build and GPU
        print(f"   unavailable: {type(e).__name__}: {str(e)[:160]}")
        return math.nan


def back_to_back(fn, calls=200):
    """Wall-clock ms per call of ``calls`` calls issued back to back (one sync at the end): where the
    host's launch work per call exceeds the GPU's, this is the host's time, which ``bench`` hides."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


def make_random_layer(k, n, device):
    w = torch.randn(n, k, device=device) * 0.02
    l1 = torch.randn(k, RANK, device=device) * 0.02
    l2 = torch.randn(RANK, n, device=device) * 0.02
    p = nm.from_float(w, torch.randn(n, device=device), smooth=torch.rand(k, device=device) + 0.5,
                      lr_down=l1, lr_up=l2, clip=torch.tensor([1.0, 0.9, 0.8, 0.7], device=device), num_bins=4)
    return w.to(torch.bfloat16), p


SWEEP = [  # expand path (int8 GEMM); BK is the K step
    dict(BM=128, BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BM=64, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4),
    # persistent TMA kernel (one program per SM walks the tiles; the TMA loads only)
    dict(BM=128, BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3, persistent=True),
    dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3, persistent=True),
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4, persistent=True),
    dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4, persistent=True),
    dict(BM=64, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4, persistent=True),
    # the Gluon kernel (Hopper; kernels/gluon_gemm.py), its tiles and two variants
    dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4, async_wgmma=True),
    dict(BM=256, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=6, async_wgmma=True),
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=5, async_wgmma=True),
    # the warp-specialised Gluon kernel (the default there: triton_w4a4.gemm_config)
    dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4, async_wgmma=True, warp_specialized=True),
    # the ping-pong Gluon kernel (two consumer warpgroups taking tiles in turn), four and five stages
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4, async_wgmma=True, ping_pong=True),
    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=5, async_wgmma=True, ping_pong=True),
]


def speed_table(sweep: bool):
    from wan_w4a4.kernels import triton_w4a4 as tw
    dev = "cuda"
    rows = []
    for k, n in SHAPES:
        w_bf16, p = make_random_layer(k, n, dev)
        bin_t = torch.tensor(1, device=dev)
        bias = p.bias.to(torch.bfloat16)
        w8f = w_bf16.to(torch.float8_e4m3fn)
        sw8 = torch.rand(1, n, device=dev, dtype=torch.float32)
        t_expand = bench(lambda: tw.expand_weight(p))
        w8 = tw.expand_weight(p)
        for m in TOKENS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            flops = 2.0 * m * k * n
            t_bf16 = bench(lambda: F.linear(x, w_bf16, bias))
            x8 = x.to(torch.float8_e4m3fn)
            sx8 = torch.rand(m, 1, device=dev, dtype=torch.float32)
            try:
                t_fp8 = bench(lambda: torch._scaled_mm(x8, w8f.T, scale_a=sx8, scale_b=sw8, bias=bias,
                                                         out_dtype=torch.bfloat16))
            except Exception as e:  # pragma: no cover - depends on the torch build
                print(f"fp8 _scaled_mm unavailable: {e}")
                t_fp8 = math.nan
            # What ComfyUI's fp8 layers call: one scale per tensor (cuBLAS picks other kernels than for
            # row-wise scales). And cuBLASLt's int8 GEMM on the same int8 operands as W4A4's, int32 out
            # (the W4A4 epilogue would still have to read that back).
            one = torch.ones((), device=dev, dtype=torch.float32)
            t_fp8_tensor = _try_bench(lambda: torch._scaled_mm(x8, w8f.T, scale_a=one, scale_b=one, bias=bias,
                                                              out_dtype=torch.bfloat16))
            xq8 = torch.randint(-128, 112, (m, k), device=dev, dtype=torch.int8)
            t_int_mm = _try_bench(lambda: torch._int_mm(xq8, w8.T))
            plans = {"default": tw.quant_plan(m, k),
                     "two launches 32": tw.quant_plan(m, k, one_launch=False, block_m=32),
                     "two launches 32, quantizing 32 rows 4 warps (before)":
                         tw.quant_plan(m, k, one_launch=False, block_m=32)._replace(quant_rows=32, quant_warps=4),
                     "two launches 16": tw.quant_plan(m, k, one_launch=False, block_m=16),
                     "one launch 32": tw.quant_plan(m, k, one_launch=True, block_m=32),
                     "one launch 16": tw.quant_plan(m, k, one_launch=True, block_m=16)}
            t_plans = {name: bench(lambda plan=plan: tw.quantize(x, p, bin_t, plan)) for name, plan in plans.items()}
            t_quant = t_plans["default"]
            print("   quantize ms: " + ", ".join(f"{name} {plans[name]} {t:.3f}" for name, t in t_plans.items()))
            xq, sx, u = tw.quantize(x, p, bin_t)
            variants = {}
            hopper = tw.async_wgmma_available(torch.cuda.get_device_capability())
            configs = SWEEP if sweep else [tw.gemm_config(m)]
            if not sweep and hopper and m > 2048:  # what the layer runs there, and the Triton kernel before it
                configs = configs + [tw.gemm_config(m, async_wgmma=True)]
            for cfg in configs:
                if cfg.get("async_wgmma") and not hopper:
                    continue
                tma_only = cfg.get("persistent") or cfg.get("async_wgmma")
                for tma in ((True,) if tma_only else (False, True)):
                    kind = ("-persistent" if cfg.get("persistent")
                            else "-pp" if cfg.get("async_wgmma") and tw.gg.ping_pong(cfg, tw._rank_pad(p.rank))
                            else "-ws" if cfg.get("async_wgmma") and tw.gg.warp_specialized(cfg, tw._rank_pad(p.rank))
                            else "-async" if cfg.get("async_wgmma") else "-tma" if tma else "")
                    tag = f"i8{kind} {cfg['BM']}x{cfg['BN']}x{cfg['BK']} w{cfg['num_warps']} s{cfg['num_stages']}"
                    variants[tag] = (lambda cfg=cfg, tma=tma: tw.gemm(xq, sx, u, p, torch.bfloat16, config=cfg,
                                                                       w8=w8, tma=tma))
            times = {}
            for tag, fn in variants.items():
                try:
                    times[tag] = bench(fn)
                except Exception as e:  # out of shared memory etc.
                    print(f"  {tag} failed: {type(e).__name__}: {str(e)[:160]}")
            if tw._gluon_failure:  # the -async rows would have timed Triton's kernel (triton_w4a4._launch_gluon)
                raise RuntimeError(f"the Gluon GEMM did not build here: {tw._gluon_failure[0]}")
            best_tag, t_gemm = min(times.items(), key=lambda kv: kv[1])
            # End to end: exactly the call W4A4Core.w4a4_forward makes (nodes/ops.py), dispatcher included.
            backend = kernels.select_backend(x, p)
            if backend != "triton":
                raise RuntimeError(f"the W4A4 layer would run on the {backend!r} backend here, not Triton")
            t_e2e = bench(lambda: kernels.w4a4_linear(x, p, bin_t))
            t_wall = back_to_back(lambda: kernels.w4a4_linear(x, p, bin_t))
            t_wall_bf16 = back_to_back(lambda: F.linear(x, w_bf16, bias))
            row = dict(M=m, K=k, N=n, bf16_ms=t_bf16, fp8_gemm_ms=t_fp8, w4a4_ms=t_e2e, quant_ms=t_quant,
                       fp8_tensorwise_ms=t_fp8_tensor, int_mm_ms=t_int_mm,
                       fp8_tensorwise_tops=flops / t_fp8_tensor / 1e9, int_mm_tops=flops / t_int_mm / 1e9,
                       quant_plans_ms=t_plans, w4a4_back_to_back_ms=t_wall, bf16_back_to_back_ms=t_wall_bf16,
                       expand_ms=t_expand, gemm_best_ms=t_gemm, gemm_best=best_tag, gemm_times=times,
                       bf16_tops=flops / t_bf16 / 1e9, fp8_tops=flops / t_fp8 / 1e9,
                       w4a4_tops=flops / t_e2e / 1e9, w4a4_vs_bf16=t_bf16 / t_e2e,
                       fp8_vs_bf16=t_bf16 / t_fp8, gemm_best_tops=flops / t_gemm / 1e9,
                       bytes_per_param=weight_bytes_per_param(k, n))
            rows.append(row)
            print(f"M={m:>6} K={k:>6} N={n:>6} | bf16 {row['bf16_tops']:6.0f} | fp8 {row['fp8_tops']:6.0f} "
                  f"({row['fp8_vs_bf16']:.2f}x) | w4a4 {row['w4a4_tops']:6.0f} ({row['w4a4_vs_bf16']:.2f}x) "
                  f"quant {t_quant:.3f} expand {t_expand:.3f} gemm {t_gemm:.3f} ms ({row['gemm_best_tops']:.0f}) "
                  f"[{best_tag}] back to back: w4a4 {t_wall:.3f} bf16 {t_wall_bf16:.3f} ms | fp8 per-tensor "
                  f"{row['fp8_tensorwise_tops']:.0f} | torch._int_mm {row['int_mm_tops']:.0f}", flush=True)
            if sweep:
                print("   " + "; ".join(f"{t}: {flops / v / 1e9:.0f}" for t, v in sorted(times.items(), key=lambda kv: kv[1])))
    name = torch.cuda.get_device_name()
    print(f"\nSpeed on {name}, torch {torch.__version__}, triton {__import__('triton').__version__} "
          f"(TOP/s = 2MKN / time; W4A4 = quantize + weight expand + GEMM + rank-{RANK} low-rank + bias)")
    print(f"{'M':>6} {'K x N':>13} | {'bf16':>6} | {'fp8 GEMM':>8} {'x':>5} | {'W4A4':>6} {'x':>5} | "
          f"{'quant':>6} {'expand':>6} {'GEMM':>6} ms | {'B/param':>7}")
    for r in rows:
        print(f"{r['M']:>6} {r['K']:>5} x {r['N']:<5} | {r['bf16_tops']:6.0f} | {r['fp8_tops']:8.0f} "
              f"{r['fp8_vs_bf16']:5.2f} | {r['w4a4_tops']:6.0f} {r['w4a4_vs_bf16']:5.2f} | "
              f"{r['quant_ms']:6.3f} {r['expand_ms']:6.3f} {r['gemm_best_ms']:6.3f}    | "
              f"{r['bytes_per_param']:7.3f}")
    return dict(device=name, torch=torch.__version__, rows=rows)


def main(argv=None):
    global RANK
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accuracy-only", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time every tile configuration")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--rank", type=int, default=RANK,
                    help="low-rank branch rank (32 = SVDQuant's; 96 = 32 + a folded rank-64 LoRA)")
    ap.add_argument("--speed-only", action="store_true", help="skip the accuracy table")
    args = ap.parse_args(argv)
    RANK = args.rank
    out = {"date": time.strftime("%Y-%m-%d"), "rank": args.rank}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.accuracy_only:
        if dev != "cuda":
            ap.error("the speed table needs a CUDA GPU (use --accuracy-only on CPU)")
        out["speed"] = speed_table(args.sweep)
    if not args.speed_only:
        out["accuracy"] = accuracy_table(dev, m=2048 if dev == "cuda" else 256)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
