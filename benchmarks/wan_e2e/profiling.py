"""The summary of one profiled model call: GPU time per kernel family and the top kernels, from
torch.profiler's events (anything with ``key_averages()``). Pure functions, no torch import."""
from __future__ import annotations

# Kernel families of one model call, by kernel name (first match wins). W4A4: the pack's Triton kernels
# (kernels/triton_w4a4.py); attention: PyTorch SDPA's flash / cuDNN / memory-efficient kernels; dense
# GEMM: cuBLAS / CUTLASS (nvjet, sm90 xmma), which is every BF16 or FP8 Linear of ComfyUI; the pack's Triton addcmul
# (kernels/triton_rowwise.py) counts with the elementwise work it replaces.
KERNEL_FAMILIES = (
    # _prologue_kernel (few tokens): the one-launch quantizer and the weight expansion in one kernel
    ("W4A4 quantize (Triton)", ("_act_stats_kernel", "_act_quant_kernel", "_act_quant_fused_kernel",
                                "_prologue_kernel")),
    ("W4A4 GEMM (Triton)", ("_gemm_i8", "_expand_kernel")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("dense GEMM (cuBLAS/CUTLASS)", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "cublas")),
    ("norm / elementwise / copies", ("elementwise", "vectorized", "reduce", "norm", "copy", "memcpy", "memset",
                                     "cat", "index", "softmax", "addcmul")),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    for family, needles in KERNEL_FAMILIES:
        if any(n in low for n in needles):
            return family
    return "other"


def busy_ms(intervals) -> tuple[float, float]:
    """(union, span) in ms of kernel (start_us, end_us) intervals on any stream: the time the GPU ran
    something, and the time from the first kernel's start to the last one's end. span - union is the
    GPU's idle time inside the call (waiting for the host, or for a copy no kernel overlaps)."""
    union, first, last, end = 0.0, None, None, None
    for s, e in sorted(intervals):
        first = s if first is None else first
        last = e if last is None else max(last, e)
        if end is None or s > end:
            union += e - s
            end = e
        elif e > end:
            union += e - end
            end = e
    return round(union / 1000, 2), round(((last - first) if first is not None else 0.0) / 1000, 2)


def kernel_intervals(prof) -> list:
    """(start_us, end_us) of every device event of a torch.profiler run (kernels and copies)."""
    events = getattr(prof, "events", None)
    if not callable(events):
        return []
    return [(e.time_range.start, e.time_range.end) for e in events()
            if "CUDA" in str(getattr(e, "device_type", "")) and getattr(e, "time_range", None) is not None]


def kernel_profile(prof, top: int = 15) -> dict:
    """GPU time of one profiled call: total, per kernel family, and the top kernels (self device time);
    the busy time and span of its device events (``busy_ms``)."""
    kernels = []
    for e in prof.key_averages():
        t_us = getattr(e, "self_device_time_total", None)
        if t_us is None:
            t_us = getattr(e, "self_cuda_time_total", 0)
        if t_us and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            kernels.append({"name": e.key, "calls": int(e.count), "ms": round(t_us / 1000, 3)})
    total = sum(k["ms"] for k in kernels) or 1.0
    families: dict = {}
    for k in kernels:
        f = families.setdefault(kernel_family(k["name"]), {"ms": 0.0, "calls": 0})
        f["ms"] += k["ms"]
        f["calls"] += k["calls"]
    kernels.sort(key=lambda k: -k["ms"])
    busy = busy_ms(kernel_intervals(prof))
    return {"gpu_ms": round(total, 2), "gpu_busy_ms": busy[0], "gpu_span_ms": busy[1],
            "families": {f: {"ms": round(v["ms"], 2), "share": round(v["ms"] / total, 4), "calls": v["calls"]}
                         for f, v in sorted(families.items(), key=lambda kv: -kv[1]["ms"])},
            "top": [{**k, "family": kernel_family(k["name"]), "share": round(k["ms"] / total, 4)}
                    for k in kernels[:top]]}


def host_profile(stats, top: int = 25, by: str = "own_ms") -> list[dict]:
    """The host's functions of one profiled call from a ``pstats.Stats``-like object (its ``stats`` dict:
    (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)), by own time (``by``:
    "cum_ms", by the time under each function, which places the time of a call tree): where the
    Python side of the call spends its time when the GPU waits for it (cProfile adds its own cost per
    call, so compare shares, not absolute times, with an unprofiled call)."""
    rows = [{"function": f"{'/'.join(file.split('/')[-2:])}:{line}({name})",
             "calls": int(nc), "own_ms": round(tt * 1000, 2), "cum_ms": round(ct * 1000, 2)}
            for (file, line, name), (_, nc, tt, ct, _) in stats.stats.items()]
    rows.sort(key=lambda r: -r[by])
    return rows[:top]
