"""A Wan block's ``torch.addcmul`` calls against ``kernels.addcmul`` (``kernels/triton_rowwise.py``) on a CUDA GPU.

Prints a markdown table: per token count and form (the modulation ``addcmul(e0, norm(x), 1 + e1)``; the residual
update ``addcmul(x, y, e2)`` with x row-major, as ComfyUI 0.33 keeps it, and channels-first, as 0.3.64 does), the time
of each (``triton.testing.do_bench``: L2 flushed between calls), the achieved bandwidth over the bytes each must move,
and whether the outputs are equal (values and strides). Wan2.2-A14B's width, bf16, one sample.

    python benchmarks/bench_rowwise.py [--tokens 32760,75600] [--tiles]

``--tiles``: also each program shape of ``triton_rowwise.TILES`` and a few more on every form (the rule's choice is the
``kernels.addcmul`` column).
"""
from __future__ import annotations

import argparse

import torch

import _checkout  # noqa: F401,E402  (makes ``import wan_w4a4`` work from a checkout)
from wan_w4a4 import kernels  # noqa: E402

DIM = 5120  # Wan2.2-A14B


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32760,75600")
    ap.add_argument("--tiles", action="store_true", help="also time each candidate program shape")
    args = ap.parse_args()
    from wan_w4a4.kernels import triton_rowwise as trw
    shapes = sorted(set(trw.TILES) | {(8, 512, 4), (2, 2048, 4), (4, 1024, 8), (16, 256, 4), (32, 128, 4)})
    import triton.testing  # GPU machines only: after --help
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, C = {DIM}, bf16, one sample")
    print()
    print("| tokens | form | torch ms | kernels.addcmul ms | ratio | GB/s torch / ours | same bits and strides |")
    print("|---|---|---|---|---|---|---|")
    for L in [int(t) for t in args.tokens.split(",")]:
        g = torch.Generator(device="cuda").manual_seed(L)
        x = (torch.randn(1, L, DIM, device="cuda", generator=g) * 3).to(torch.bfloat16)
        y = torch.randn(1, L, DIM, device="cuda", generator=g).to(torch.bfloat16)
        e = (torch.randn(1, 6, DIM, device="cuda", generator=g) * 0.3).to(torch.bfloat16).chunk(6, dim=1)
        x_cf = x.transpose(1, 2).contiguous().transpose(1, 2)
        forms = {"modulation (e0, n, 1 + e1)": ((e[0], y, 1 + e[1]), 4),
                 "residual (x, y, e2), x row-major": ((x, y, e[2]), 6),
                 "residual (x, y, e2), x channels-first": ((x_cf, y, e[2]), 6)}
        for name, (ops, bytes_per) in forms.items():
            assert kernels.addcmul_reason(*ops) is None, kernels.addcmul_reason(*ops)
            ref, out = torch.addcmul(*ops), kernels.addcmul(*ops)
            same = torch.equal(ref, out) and ref.stride() == out.stride()
            t_ref = triton.testing.do_bench(lambda: torch.addcmul(*ops), warmup=25, rep=200)
            t_out = triton.testing.do_bench(lambda: kernels.addcmul(*ops), warmup=25, rep=200)
            gb = bytes_per * L * DIM / 1e6
            print(f"| {L} | {name} | {t_ref:.3f} | {t_out:.3f} | {t_out / t_ref:.2f} | {gb / t_ref:.0f} / "
                  f"{gb / t_out:.0f} | {'yes' if same else 'NO'} |")
            for shape in shapes if args.tiles else ():
                out = trw.addcmul(*ops, program=shape)
                same = torch.equal(ref, out) and ref.stride() == out.stride()
                t = triton.testing.do_bench(lambda: trw.addcmul(*ops, program=shape), warmup=25, rep=200)
                print(f"| {L} | {name}, program {shape} | - | {t:.3f} | {t / t_ref:.2f} | - / {gb / t:.0f} | "
                      f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
