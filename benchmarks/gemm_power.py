"""The Linears of one Wan block under the GPU's power cap: sustained TOP/s, SM clock, power and work per clock.

    python benchmarks/gemm_power.py                       # CUDA GPU with nvidia-smi; about 1 minute
    python benchmarks/gemm_power.py --seconds 10 --json out.json

Why this exists: ``bench_linear.py`` times each layer in bursts of about 100 ms. On the H200 the int8 GEMM and
cuBLAS's fp8 GEMM both run into the 700 W power cap within a second, and then each runs at the SM clock its
power allows. A kernel that draws less power per clock keeps a higher clock, and that hides part of its lower
work per clock. Inside a Wan step the clock is set by the step's power as a whole, where attention is half of
the step, so two GEMMs run at about the same clock there. Work per clock then decides. This script shows
both numbers (kernels/README.md, session 12: "the GEMM under the 700 W power cap").

Each configuration runs one Wan2.2-A14B block's Linears back to back for ``--seconds``. A block at 480p x 81
is 32 760 tokens through six 5120 x 5120 Linears, ffn.0 and ffn.2. The cross-attention k/v over the 512 text
tokens are left out. The configurations:
- ``w4a4``: the pack's int8 GEMM over expanded weights, with its epilogue (scales, rank-32 low-rank, bias),
  in the row passes the layer runs (``pass_rows``), fp16 out, as ComfyUI loads Wan (benchmarks/RESULTS.md).
  The activation quantizer and the weight expansion are not included: this is the GEMM alone.
  On an H200 it is the warp-specialised Gluon kernel of 256 x 128 tiles with its MMAs in flight across K steps
  (``kernels/gluon_gemm.py``; ``w4a4_ws`` the same), ``w4a4_ws3`` that with three stages, ``w4a4_async`` its
  one-tile-per-program kernel; ``w4a4_pp`` / ``w4a4_pp5`` / ``w4a4_pp3``: the ping-pong kernel (two consumer
  warpgroups taking 128 x 128 tiles in turn, ``WAN_W4A4_GEMM=pp``) with four / five / three stages;
- ``w4a4_triton``: the same with Triton's tile kernel (what runs off Hopper, or with ``WAN_W4A4_GEMM=triton``);
- ``w4a4_persistent``: the Triton kernel as a persistent kernel (a configuration option, not the default);
- ``w4a4_async_bk64`` / ``w4a4_async_128``: the Gluon kernel with K steps of 64 (six stages) or 128-row tiles
  (four warps): tile variants measured against its default; ``w4a4_async_128x2``: 128-row tiles in three stages,
  small enough (98 KB of shared memory, 255 registers x 128 threads) for two programs per SM, so that one's
  epilogue can overlap the other's mainloop;
- ``fp8``: ``torch._scaled_mm`` with one scale per tensor and bias, batch 2: what ComfyUI's
  ``fp8_e4m3fn_fast`` calls, with cond and uncond in one call;
- ``fp16``: ``F.linear`` in fp16, batch 2: what ComfyUI's default weight dtype runs;
- ``triton_int8_plain`` / ``triton_fp8_plain``: the W4A4 kernel's TMA tile loop (same tiles, same row passes)
  with a bare epilogue (convert and store), on int8 and on fp8 operands: what the epilogue costs, and whether
  Triton's mainloop itself reaches cuBLAS's work per clock on 8-bit operands.
- ``gluon_int8_plain`` / ``gluon_fp8_plain``: the same for the Gluon kernel's mainloop (``gluon_gemm._mainloop``),
  whose loop on fp8 compiles to the instructions of Triton's fp8 loop: does int8 reach fp8's work per clock there?
- ``*_rows`` (``w4a4_rows``: the warp-specialised kernel, ``w4a4_async_rows``, ``gluon_int8_plain_rows``,
  ``gluon_fp8_plain_rows``): the same kernels with their tiles stored in whole rows through shared memory
  (``gluon_gemm.STORE_ROWS``), as Triton's own epilogue stores them, against each thread storing the wgmma layout's
  4-byte pairs.

nvidia-smi is sampled every 100 ms; the first second of each run is dropped. The table gives the TOP/s of the
run's second half, the median SM clock and power, TOP/J, and the work per clock as a share of the dense peak
at that clock: (TOP/s / clock) / (peak / maximum clock). ``--peak-tops`` is the 8-bit dense peak (1979 on an
H100/H200 SXM); 16-bit has half of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time

import torch
import torch.nn.functional as F

import _checkout  # noqa: F401  (makes ``import wan_w4a4`` work from a checkout)

TOKENS = 32760  # 480p x 81 frames: 21 x 60 x 104 / 4
BLOCK = [(5120, 5120)] * 6 + [(5120, 13824), (13824, 5120)]  # (K, N): attention q k v o + cross q o, ffn.0, ffn.2
SMI_QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.active"


def parse_smi(line: str) -> tuple[float, float, str]:
    """One ``nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader,nounits``
    line -> (SM clock MHz, power W, throttle reasons as printed)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        raise ValueError(f"unexpected nvidia-smi line: {line!r}")
    return float(parts[0]), float(parts[1]), parts[2]


def summarize(name: str, flop: float, times_ms: list[float], smi: list[tuple[float, float, str]],
              peak_tops: float, max_clock_mhz: float) -> dict:
    """A table row from the per-repetition times of one block (ms) and the nvidia-smi samples of the run."""
    if not times_ms or not smi:
        raise ValueError(f"{name}: no timings or no nvidia-smi samples")
    steady = statistics.median(times_ms[len(times_ms) // 2:])
    tops = flop / steady / 1e9
    clock = statistics.median(s[0] for s in smi)
    power = statistics.median(s[1] for s in smi)
    return dict(config=name, tops=tops, clock_mhz=clock, power_w=power, tops_per_joule=tops / power,
                tops_per_ghz=tops / clock * 1e3, per_clock_share=(tops / clock) / (peak_tops / max_clock_mhz),
                throttle=sorted({s[2] for s in smi}), repetitions=len(times_ms))


def table(rows: list[dict]) -> str:
    head = ("| config | TOP/s | SM clock MHz | power W | TOP/J | TOP/s per GHz | per-clock share of peak | "
            "throttle reasons |\n|---|---|---|---|---|---|---|---|")
    body = [f"| {r['config']} | {r['tops']:.0f} | {r['clock_mhz']:.0f} | {r['power_w']:.0f} | "
            f"{r['tops_per_joule']:.3f} | {r['tops_per_ghz']:.0f} | {100 * r['per_clock_share']:.1f} % | "
            f"{' '.join(r['throttle'])} |" for r in rows]
    return "\n".join([head, *body])


def smi(query: str) -> str:
    """The first GPU's line of ``nvidia-smi --query-gpu=<query> --format=csv,noheader,nounits``."""
    return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, check=True).stdout.splitlines()[0]


class Sampler:
    """nvidia-smi in a background thread, every ``period`` s: (time, (clock, power, reasons))."""

    def __init__(self, period: float = 0.1):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.time(), parse_smi(smi(SMI_QUERY))))
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def between(self, t0: float, t1: float) -> list:
        return [s for t, s in self.samples if t0 <= t <= t1]


def sustained(fn, seconds: float) -> tuple[list[float], float, float]:
    """Repeat ``fn`` (one block) for ``seconds``: (ms per block of each group of 5, start, end)."""
    fn()
    torch.cuda.synchronize()
    t0, times = time.time(), []
    while time.time() - t0 < seconds:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(5):
            fn()
        e1.record()
        torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / 5)
    return times, t0, time.time()


def _plain_tma_gemm():
    """The W4A4 GEMM's tile loop (``triton_w4a4._tma_tile``) with a bare epilogue: acc -> fp16, masked store."""
    import triton
    import triton.language as tl

    from wan_w4a4.kernels.tiles import tile_of

    @triton.jit
    def plain_tma_gemm(a_desc, b_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       GROUP_M: tl.constexpr, INT8: tl.constexpr):
        pid_m, pid_n = tile_of(tl.program_id(0), M, N, BM, BN, GROUP_M)
        if INT8:
            acc = tl.zeros([BM, BN], dtype=tl.int32)
            for k in range(0, K, BK):
                acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([pid_n * BN, k]).T, acc, out_dtype=tl.int32)
            c = acc.to(tl.float32).to(tl.float16)
        else:
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k in range(0, K, BK):
                acc = tl.dot(a_desc.load([pid_m * BM, k]), b_desc.load([pid_n * BN, k]).T, acc)
            c = acc.to(tl.float16)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        tl.store(c_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], c, mask=(rm < M)[:, None] & (rn < N)[None, :])

    return plain_tma_gemm


def _plain_gluon_gemm():
    """The Gluon GEMM's mainloop (``gluon_gemm._mainloop``, its tiles) with a bare epilogue: acc -> fp16, masked store.
    The accumulator is int32 for int8 operands and fp32 for fp8 ones."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from wan_w4a4.kernels import gluon_gemm as gg
    from wan_w4a4.kernels.tiles import tile_of

    @gluon.jit
    def plain_gluon_gemm(a_desc, b_desc, c_ptr, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                         ROWS: gl.constexpr = False):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        pid_m, pid_n = tile_of(gl.program_id(0), M, N, BM, BN, GROUP_M)
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, BN, 32])
        acc_dtype: gl.constexpr = gl.int32 if a_desc.dtype == gl.int8 else gl.float32
        acc = gg._mainloop(a_desc, b_desc, pid_m * BM, pid_n * BN, K, gl.zeros([BM, BN], acc_dtype, layout), STAGES)
        c = acc.to(gl.float32).to(gl.float16)
        if ROWS:  # gluon_gemm.STORE_ROWS's stores: through shared memory, 16 bytes per thread along a row
            rows_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BN, BN // 8], [gl.num_warps(), 1], [1, 0])
            c = gl.convert_layout(c, rows_layout)
            rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, rows_layout))
            rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, rows_layout))
        else:
            rm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
            rn = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        gl.store(c_ptr + rm.to(gl.int64)[:, None] * N + rn[None, :], c, mask=(rm < M)[:, None] & (rn < N)[None, :])

    return plain_gluon_gemm


def block_functions(dev: str) -> dict:
    """config -> (one block's Linears, flop multiplier (the batch), share of the 8-bit peak (16-bit: 0.5))."""
    from wan_w4a4.kernels import gluon_gemm as gg
    from wan_w4a4.kernels import numerics as nm
    from wan_w4a4.kernels import triton_w4a4 as tw

    torch.manual_seed(0)
    b = torch.tensor(1, device=dev)
    layers, dense = {}, {}
    for k, n in set(BLOCK):
        w = torch.randn(n, k, device=dev) * 0.02
        unsigned = k == 13824  # ffn.2's input is GELU's output
        p = nm.from_float(w, torch.randn(n, device=dev), smooth=torch.rand(k, device=dev) + 0.5,
                          lr_down=torch.randn(k, 32, device=dev) * 0.02, lr_up=torch.randn(32, n, device=dev) * 0.02,
                          clip=torch.tensor([1.0, 0.9], device=dev), num_bins=2, act_unsigned=unsigned)
        w8, wsum = tw.expanded(p, unsigned)
        x = torch.randn(TOKENS, k, device=dev, dtype=torch.float16)
        if unsigned:
            x = F.gelu(x, approximate="tanh")
        layers[(k, n)] = (p, w8, wsum, tw.quantize(x, p, b), torch.empty((TOKENS, n), dtype=torch.float16, device=dev))
        dense[(k, n)] = (w.to(torch.float8_e4m3fn), w.half(), torch.randn(n, device=dev, dtype=torch.float16))
    x2 = {k: torch.randn(2 * TOKENS, k, device=dev, dtype=torch.float16) for k in (5120, 13824)}
    x8 = {k: v.to(torch.float8_e4m3fn) for k, v in x2.items()}
    one = torch.ones((), device=dev)

    def w4a4(async_wgmma: bool = False, **over):
        config = dict(tw.gemm_config(TOKENS, async_wgmma=async_wgmma), **over)

        def run():
            for k, n in BLOCK:
                p, w8, wsum, (xq, sx, u), y = layers[(k, n)]
                rows = tw.pass_rows(TOKENS, k, p.rank)
                for s in range(0, TOKENS, rows):
                    tw.gemm(xq[s:s + rows], sx[s:s + rows], u[s:s + rows], p, torch.float16, config=config, w8=w8,
                            wsum=wsum, tma=True, out=y[s:s + rows])
        return run

    def fp8():
        for k, n in BLOCK:
            w8f, _, bias = dense[(k, n)]
            torch._scaled_mm(x8[k], w8f.T, scale_a=one, scale_b=one, bias=bias, out_dtype=torch.float16)

    def fp16():
        for k, n in BLOCK:
            _, w16, bias = dense[(k, n)]
            F.linear(x2[k], w16, bias)

    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    here = tw.async_wgmma_available(torch.cuda.get_device_capability(dev))
    kernels = {False: (_plain_tma_gemm(), tw.gemm_config(TOKENS))}
    if here:
        kernels[True] = (_plain_gluon_gemm(), dict(gg.CONFIG, async_wgmma=True))  # the 256 x 128 tiles
    operands = {}
    for k, n in set(BLOCK):
        _, w8, _, (xq, _, _), _ = layers[(k, n)]
        operands[(k, n)] = {True: (xq, w8), False: (x8[k][:TOKENS], dense[(k, n)][0])}

    def plain(int8: bool, gluon: bool = False, rows: bool = False):
        kernel, cfg = kernels[gluon]

        def run():
            for k, n in BLOCK:
                a, w = operands[(k, n)][int8]
                y = layers[(k, n)][4]
                rows = tw.pass_rows(TOKENS, k, 32)
                bdesc = None if gluon else TensorDescriptor.from_tensor(w, [cfg["BN"], cfg["BK"]])
                for s in range(0, TOKENS, rows):
                    xs, ys = a[s:s + rows], y[s:s + rows]
                    tiles = triton.cdiv(xs.shape[0], cfg["BM"]) * triton.cdiv(n, cfg["BN"])
                    if gluon:
                        kernel[(tiles,)](*gg.descriptors(xs, w, cfg), ys, xs.shape[0], n, k, GROUP_M=cfg["GROUP_M"],
                                         STAGES=cfg["num_stages"], ROWS=rows, num_warps=cfg["num_warps"])
                    else:
                        kernel[(tiles,)](TensorDescriptor.from_tensor(xs, [cfg["BM"], cfg["BK"]]), bdesc, ys,
                                         xs.shape[0], n, k, BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
                                         GROUP_M=cfg["GROUP_M"], INT8=int8, num_warps=cfg["num_warps"],
                                         num_stages=cfg["num_stages"])
        return run

    funcs = {"w4a4": (w4a4(here), 1, 1.0), "w4a4_triton": (w4a4(), 1, 1.0),
             "w4a4_persistent": (w4a4(persistent=True), 1, 1.0), "fp8": (fp8, 2, 1.0), "fp16": (fp16, 2, 0.5),
             "triton_int8_plain": (plain(True), 1, 1.0), "triton_fp8_plain": (plain(False), 1, 1.0)}
    if here:  # the Gluon kernel's rows: Hopper only (off it they would time Triton's kernel under their names)
        ws = dict(gg.CONFIG, warp_specialized=True, ping_pong=False)  # gluon_gemm._gemm_i8_ws_kernel
        one_tile = dict(gg.CONFIG, warp_specialized=False, ping_pong=False)  # gluon_gemm._gemm_i8_async_kernel
        pp = dict(gg.PP_CONFIG, ping_pong=True)  # gluon_gemm._gemm_i8_pp_kernel
        funcs.update({"w4a4_async_bk64": (w4a4(True, **dict(one_tile, BK=64, num_stages=6)), 1, 1.0),
                      "w4a4_async_128": (w4a4(True, **dict(one_tile, BM=128, num_stages=5, num_warps=4)), 1, 1.0),
                      "w4a4_async_128x2": (w4a4(True, **dict(one_tile, BM=128, num_stages=3, num_warps=4)), 1, 1.0),
                      "w4a4_async": (w4a4(True, **one_tile), 1, 1.0),
                      "w4a4_ws": (w4a4(True, **ws), 1, 1.0),
                      "w4a4_ws3": (w4a4(True, **dict(ws, num_stages=3)), 1, 1.0),
                      "w4a4_pp": (w4a4(True, **pp), 1, 1.0),
                      "w4a4_pp5": (w4a4(True, **dict(pp, num_stages=5)), 1, 1.0),
                      "w4a4_pp3": (w4a4(True, **dict(pp, num_stages=3)), 1, 1.0),
                      "gluon_int8_plain": (plain(True, gluon=True), 1, 1.0),
                      "gluon_fp8_plain": (plain(False, gluon=True), 1, 1.0),
                      "w4a4_rows": (w4a4(True, **dict(ws, store_rows=True)), 1, 1.0),
                      "w4a4_async_rows": (w4a4(True, **dict(one_tile, store_rows=True)), 1, 1.0),
                      "gluon_int8_plain_rows": (plain(True, gluon=True, rows=True), 1, 1.0),
                      "gluon_fp8_plain_rows": (plain(False, gluon=True, rows=True), 1, 1.0)})
    return funcs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="sustained run per configuration (default: 6)")
    ap.add_argument("--peak-tops", type=float, default=1979.0,
                    help="dense 8-bit peak at the maximum SM clock (default: 1979, H100/H200 SXM); 16-bit: half")
    ap.add_argument("--configs", default="w4a4,w4a4_triton,w4a4_persistent,fp8,fp16,triton_int8_plain,triton_fp8_plain",
                    help="comma-separated (default: all)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gemm_power.py needs a CUDA GPU (and nvidia-smi)")
    from wan_w4a4.kernels import triton_w4a4 as tw

    max_clock = float(smi("clocks.max.sm"))
    funcs = block_functions("cuda")
    unknown = set(args.configs.split(",")) - set(funcs)
    if unknown:
        raise SystemExit(f"unknown configs, or not on this GPU: {sorted(unknown)}; choose from {sorted(funcs)}")
    flop = sum(2.0 * TOKENS * k * n for k, n in BLOCK)
    rows = []
    with Sampler() as sampler:
        for name in args.configs.split(","):
            fn, batch, peak_scale = funcs[name]
            times, t0, t1 = sustained(fn, args.seconds)
            if tw._gluon_failure:  # the w4a4* rows would have timed Triton's kernel (triton_w4a4._launch_gluon)
                raise SystemExit(f"the Gluon GEMM did not build here: {tw._gluon_failure[0]}")
            rows.append(summarize(name, batch * flop, times, sampler.between(t0 + 1.0, t1), args.peak_tops * peak_scale,
                                  max_clock))
            print(f"{name}: {rows[-1]['tops']:.0f} TOP/s at {rows[-1]['clock_mhz']:.0f} MHz", flush=True)
            time.sleep(2.0)
    name = torch.cuda.get_device_name()
    print(f"\nOne Wan2.2-A14B block's Linears at 480p x 81 ({TOKENS} tokens), sustained {args.seconds:.0f} s each, on "
          f"{name} (max SM clock {max_clock:.0f} MHz), torch {torch.__version__}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, max_clock_mhz=max_clock, seconds=args.seconds, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
