"""Host cost of one small W4A4 linear call: per-part wall times back to back, then a cProfile.

At a few thousand tokens a W4A4 layer's GPU work is shorter than the host's work to launch it (the
dispatcher, the quantizer's plan, allocations, Triton's launch path), so the layer runs at the speed
of the host. This prints, for one layer shape, each part's wall time per call when called back to back
(one sync at the end: the larger of its host and GPU time), and where the host time of the whole call
goes (``cProfile``, sorted by own time). Prints a table; GPU only.

    python benchmarks/host_cost.py [--tokens 1024] [--k 5120] [--n 5120]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
import torch
from bench_linear import back_to_back, make_random_layer
from wan_w4a4 import kernels


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024, help="rows M of the call (default 1024)")
    ap.add_argument("--k", type=int, default=5120, help="in features (default 5120)")
    ap.add_argument("--n", type=int, default=5120, help="out features (default 5120)")
    args = ap.parse_args(argv)
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor
    from wan_w4a4.kernels import triton_w4a4 as tw

    @triton.jit
    def _empty(x_ptr, n):  # no tl annotation: Triton 3.6 resolves names in the module's globals, not main()'s
        pass

    w, p = make_random_layer(args.k, args.n, "cuda")
    x = torch.randn(args.tokens, args.k, device="cuda", dtype=torch.bfloat16)
    b = torch.tensor(1, device="cuda")
    xq, sx, u = tw.quantize(x, p, b)
    w8 = tw.expand_weight(p)
    parts = {
        "kernels.w4a4_linear (the layer's call)": lambda: kernels.w4a4_linear(x, p, b),
        "triton_w4a4.w4a4_linear": lambda: tw.w4a4_linear(x, p, b),
        "select_backend": lambda: kernels.select_backend(x, p),
        f"quantize {tw.quant_plan(args.tokens, args.k)}": lambda: tw.quantize(x, p, b),
        "expand_weight": lambda: tw.expand_weight(p),
        "gemm, TMA (given w8)": lambda: tw.gemm(xq, sx, u, p, torch.bfloat16, w8=w8, tma=True),
        "gemm, pointer loads (given w8)": lambda: tw.gemm(xq, sx, u, p, torch.bfloat16, w8=w8, tma=False),
        "two TensorDescriptors": lambda: (TensorDescriptor.from_tensor(xq, [64, 128]),
                                          TensorDescriptor.from_tensor(w8, [128, 128])),
        "an empty Triton launch": lambda: _empty[(1,)](x, 3),
        "four torch.empty": lambda: [torch.empty((args.tokens, args.k), dtype=torch.int8, device="cuda")
                                     for _ in range(4)],
        "torch.cuda.get_device_capability": lambda: torch.cuda.get_device_capability(x.device),
        "triton.cdiv on the host": lambda: triton.cdiv(args.tokens, 64),
        "one Arena of the call's transients": lambda: tw.Arena(x.device, {
            **tw.quant_regions(args.tokens, args.k, p.rank, tw.quant_plan(args.tokens, args.k)),
            **tw.weight_regions(args.n, args.k, False)}),
        "bf16 F.linear (reference)": lambda: torch.nn.functional.linear(x, w),
    }
    print(f"{torch.cuda.get_device_name()}, M={args.tokens} K={args.k} N={args.n}: wall time per call, back to back")
    for name, fn in parts.items():
        print(f"{name:48s} {back_to_back(fn, calls=300) * 1e3:8.1f} us", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        kernels.w4a4_linear(x, p, b)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
