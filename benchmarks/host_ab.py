"""Host time of W4A4 layer calls: this checkout's kernels against another copy's, in one process (GPU only).

The host's speed on the GPU machines moved by about 2x between two processes of one device call (kernels/README.md,
session 25), so step times of separate runs cannot resolve a change to the host's work per call. Here both
``kernels`` packages run in one process, interleaved over rounds (their order alternating). While the host issues
``--calls`` layer calls, the GPU is held by a sleep kernel queued before them, so the time to issue them is the
host's alone (its Python, Triton's launcher, the allocator), not the GPU's.

The shapes are a one-frame Wan 480p model call's (1560 tokens, cond and uncond batched): 3120 rows for the 240
attention q/k/v/o calls, 1024 for the 80 cross-attention k/v calls, 3120 for ffn.0 and ffn.2 (40 each); the last
column weighs each shape by its calls per model call. Prints a table.

    python benchmarks/host_ab.py --other /tmp/old/kernels [--rounds 10] [--calls 40] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)
import torch
from wan_w4a4 import kernels
from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm

# (rows, K, N, unsigned activations, calls per one-frame model call)
SHAPES = [(3120, 5120, 5120, False, 240), (1024, 5120, 5120, False, 80), (3120, 5120, 13824, False, 40),
          (3120, 13824, 5120, True, 40)]
SLEEP_CYCLES = 400_000_000  # ~0.2 s on an H200: longer than the host needs to issue one measurement's calls


def load_kernels(folder: Path, name: str = "wan_w4a4_other_kernels"):
    """Another ``kernels`` folder as a package of its own (its modules import each other relatively)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def layer(k: int, n: int, unsigned: bool) -> dict:
    w = torch.randn(n, k, device="cuda") * 0.02
    p = nm.from_float(w, torch.randn(n, device="cuda"), smooth=torch.rand(k, device="cuda") + 0.5,
                      lr_down=torch.randn(k, 32, device="cuda") * 0.02, lr_up=torch.randn(32, n, device="cuda") * 0.02,
                      clip=torch.tensor([1.0, 0.9, 0.8, 0.7], device="cuda"), num_bins=4, act_unsigned=unsigned)
    return {f: getattr(p, f) for f in (*fmt.FIELDS, "act_unsigned", "act_shift")}


def behind_sleep(fn, calls: int, timed: bool = False) -> tuple[float, float | None]:
    """Queue ``calls`` calls of ``fn`` behind a sleep kernel: (host seconds to issue them, and with ``timed`` the
    GPU's ms from the first call's start to the last one's end, with no host gap between them). An error if the
    sleep ended before the last call was issued: then the host may have waited for the GPU."""
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    start, end = torch.cuda.Event(enable_timing=timed), torch.cuda.Event(enable_timing=timed)
    if timed:
        start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = time.perf_counter() - t0
    end.record()
    if end.query():  # everything queued has already run: the GPU woke up before the host was done
        raise RuntimeError(f"the GPU's sleep ended before {calls} calls were issued: use fewer calls")
    torch.cuda.synchronize()
    return dt, (start.elapsed_time(end) if timed else None)


def issue_us(package, x, p, b, calls: int) -> float:
    """Host microseconds per layer call, issued while the GPU sleeps."""
    return behind_sleep(lambda: package.w4a4_linear(x, p, b), calls)[0] * 1e6 / calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", type=Path, required=True, help="another checkout's kernels/ folder")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=40, help="layer calls per measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    packages = {"this": kernels, "other": load_kernels(args.other.resolve())}
    rows = []
    for m, k, n, unsigned, per_call in SHAPES:
        fields = layer(k, n, unsigned)
        params = {name: pkg.numerics.W4A4Params(**fields) for name, pkg in packages.items()}
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        if unsigned:
            x = torch.nn.functional.gelu(x, approximate="tanh")
        b = torch.tensor(1, device="cuda")
        outs = {name: pkg.w4a4_linear(x, params[name], b) for name, pkg in packages.items()}  # compiles
        same = torch.equal(outs["this"], outs["other"])
        times = {name: [] for name in packages}
        for r in range(args.rounds):
            for name in (("this", "other") if r % 2 == 0 else ("other", "this")):
                times[name].append(issue_us(packages[name], x, params[name], b, args.calls))
        med = {name: statistics.median(t) for name, t in times.items()}
        rows.append(dict(M=m, K=k, N=n, unsigned=unsigned, calls_per_model_call=per_call, same_bits=same,
                         host_us=med, host_us_all=times))
        print(f"M={m} K={k} N={n}: this {med['this']:.1f} us, other {med['other']:.1f} us, same bits: {same}",
              flush=True)
    total = {name: sum(r["host_us"][name] * r["calls_per_model_call"] for r in rows) / 1e3 for name in packages}
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}: host us per layer call issued while the GPU "
          f"sleeps (median of {args.rounds} rounds of {args.calls} calls; this = {Path(kernels.__file__).parent}, "
          f"other = {args.other})")
    print(f"{'M':>5} {'K x N':>13} | {'this':>7} | {'other':>7} | {'this/other':>10} | same bits")
    for r in rows:
        h = r["host_us"]
        print(f"{r['M']:>5} {r['K']:>5} x {r['N']:<5} | {h['this']:7.1f} | {h['other']:7.1f} | "
              f"{h['this'] / h['other']:10.2f} | {r['same_bits']}")
    print(f"one-frame model call (400 layer calls): this {total['this']:.1f} ms, other {total['other']:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows, total_ms=total), indent=1))


if __name__ == "__main__":
    main()
