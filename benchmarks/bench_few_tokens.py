"""W4A4 layer calls at few tokens: how the work before the GEMM is launched, GPU time and host-bound time.

At one video frame a Wan block's Linear has 1024-3120 rows (cond and uncond batched), and ComfyUI 0.33's
one-frame step is the host's (kernels/README.md, session 24). This compares, per Wan shape and row count:

- ``two launches``: the quantizer in two launches (statistics, quantization; 1/s made per call), the weight
  expansion in its own launch, then the GEMM (the rule above 2048 rows before session 25);
- ``one launch``: the one-launch quantizer, the expansion in its own launch, then the GEMM;
- ``prologue``: quantizer and expansion in one launch (``_prologue_kernel``), then the GEMM;
- ``default``: what ``kernels.w4a4_linear`` (the layer's call) runs today;
- bf16 ``F.linear`` with the same shape.

``gpu`` is the GPU's time per call: 50 calls queued while a sleep kernel holds the GPU, timed by events after the
sleep, so the host's time per call is not in it (L2 warm, as inside a model call). The session 25 run
(results/few_tokens_h200_2026-11-30_s25.log) timed this column with ``triton.testing.do_bench`` instead, whose
events around each call include the host's time where a call is host-bound. ``b2b`` is wall time per call of 200
calls issued back to back with one sync at the end (the larger of host and GPU time).
``prologue`` gives ``one launch``'s bits (checked here and in tests/kernels/test_triton.py). Prints a table; GPU only.

    python benchmarks/bench_few_tokens.py [--tokens 1024,2048,3120,4096,6240,8192] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
import torch
import torch.nn.functional as F
from bench_linear import RANK, SHAPES, back_to_back
from host_ab import behind_sleep
from wan_w4a4 import kernels
from wan_w4a4.kernels import numerics as nm


def make_layer(k: int, n: int):
    """A random layer of Wan's shape; ffn.2 (K = 13 824, after the GELU) takes unsigned activations, as in Wan."""
    w = torch.randn(n, k, device="cuda") * 0.02
    p = nm.from_float(w, torch.randn(n, device="cuda"), smooth=torch.rand(k, device="cuda") + 0.5,
                      lr_down=torch.randn(k, RANK, device="cuda") * 0.02,
                      lr_up=torch.randn(RANK, n, device="cuda") * 0.02,
                      clip=torch.tensor([1.0, 0.9, 0.8, 0.7], device="cuda"), num_bins=4, act_unsigned=k == 13824)
    return w.to(torch.bfloat16), p


GPU_CALLS = 50


def gpu_ms(fn, calls: int = GPU_CALLS) -> float:
    """GPU time per call of ``fn``: ``calls`` calls queued behind a sleep kernel, timed by events on the GPU."""
    fn()
    return behind_sleep(fn, calls, timed=True)[1] / calls


def variants(x, p, b, w, bias):
    from wan_w4a4.kernels import triton_w4a4 as tw
    m, k = x.shape
    offset = bool(p.act_unsigned)

    def separate(one_launch: bool):
        def call():
            plan = tw.quant_plan(m, k, one_launch)
            arena = tw.Arena(x.device, {**tw.quant_regions(m, k, p.rank, plan),
                                        **tw.weight_regions(p.out_features, k, offset)})
            w8, wsum = tw.expanded(p, offset, arena)
            xq, sx, u = tw.quantize(x, p, b, plan, arena=arena)
            return tw.gemm(xq, sx, u, p, x.dtype, tma=True, config=tw.gemm_config(m, async_wgmma=True), w8=w8,
                           wsum=wsum)
        return call

    return {"two launches": separate(False), "one launch": separate(True),
            "prologue": lambda: tw.w4a4_linear(x, p, b, one_launch=True),
            "default": lambda: kernels.w4a4_linear(x, p, b),
            "bf16": lambda: F.linear(x, w, bias)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,2048,3120,4096,6240,8192", help="row counts M, comma-separated")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = []
    for k, n in SHAPES:
        w, p = make_layer(k, n)
        bias = p.bias.to(torch.bfloat16)
        b = torch.tensor(1, device="cuda")
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            if p.act_unsigned:
                x = F.gelu(x, approximate="tanh")
            fns = variants(x, p, b, w, bias)
            # The same bits within a quantizer kind (the low-rank input's fp32 sums run in another order across
            # kinds: tests/kernels/test_triton.py), or the table compares different work.
            from wan_w4a4.kernels import triton_w4a4 as tw
            same = {"prologue": "one launch",
                    "default": "one launch" if tw.quant_plan(m, k).one_launch else "two launches"}
            for name, twin in same.items():
                if not torch.equal(fns[name](), fns[twin]()):
                    raise RuntimeError(f"{name} differs from {twin} at M={m}, K={k}, N={n}")
            row = dict(M=m, K=k, N=n)
            for name, fn in fns.items():
                row[name] = dict(gpu_ms=gpu_ms(fn), b2b_ms=back_to_back(fn))
            rows.append(row)
            print(f"M={m:>5} K={k:>5} N={n:>5} | " + " | ".join(
                f"{name} {v['gpu_ms']:.3f}/{v['b2b_ms']:.3f}" for name, v in row.items() if isinstance(v, dict)),
                flush=True)
    names = [name for name, v in rows[0].items() if isinstance(v, dict)]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {__import__('triton').__version__}:"
          " ms per layer call, gpu (queued behind a sleep, event-timed) / b2b (back to back, 200 calls)")
    print(f"{'M':>5} {'K x N':>13} | " + " | ".join(f"{name:>15}" for name in names))
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>5} x {r['N']:<5} | " + " | ".join(
            f"{r[name]['gpu_ms']:6.3f} / {r[name]['b2b_ms']:6.3f}" for name in names))
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
