"""The benchmark's model files: random Wan2.2-I2V experts at real shapes (a BF16 safetensors file, or
state dicts in host memory), the W4A4 checkpoint the pack makes from the same tensors, and a random
LoRA. Values change neither bytes nor FLOPs, so random weights measure memory and speed honestly;
they are drawn on the GPU when there is one (14 B values in seconds)."""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
from pathlib import Path

from .common import (
    BENCH_TAG,
    LORA_RANK,
    W4A4_BINS,
    W4A4_RANK,
    arch_of,
    base_dir,
    device_of,
    file_names,
    gib,
    host_peak_rss_gib,
    warch,
)

log = logging.getLogger(__name__)

# What the W4A4 checkpoint's metadata records about how it was made: a file made another way is
# remade, not reused, so that every run of this version measures the same kind of checkpoint.
W4A4_MAKER = "calibration.lowrank.low_rank + kernels.numerics.from_float (RTN residual, clip 1)"


def block_linear_shapes(arch) -> dict[str, tuple[int, int]]:
    """(out, in) of every block Linear that W4A4 quantizes (and the benchmark's LoRA targets), from the
    checkpoint's own shape table."""
    shapes = warch.wan_state_dict_shapes(arch)
    return {name: tuple(shapes[f"{name}.weight"]) for name in warch.quantizable_linears(arch)}


def bytes_lora_bf16(arch, rank: int = LORA_RANK) -> int:
    return sum(rank * (n + k) * 2 for n, k in block_linear_shapes(arch).values())


def bytes_bf16_file(arch) -> int:
    return sum(math.prod(s) for s in warch.wan_state_dict_shapes(arch).values()) * 2


def bytes_w4a4_file(arch) -> int:
    """Estimated size of the W4A4 checkpoint: the tensors of each block Linear's W4A4 layer at rank
    W4A4_RANK (int4 weight, its scales, per-row and per-column vectors, the BF16 branch), every other
    tensor BF16. Used to decide whether the work folder has room for the files."""
    r = W4A4_RANK
    linears = block_linear_shapes(arch).values()
    layers = sum(n * k // 2 + n * k // 64 + 8 * n + 4 * k + 2 * r * (n + k) for n, k in linears)
    quantized = sum(n * k + n for n, k in linears)
    rest = sum(math.prod(s) for s in warch.wan_state_dict_shapes(arch).values()) - quantized
    return layers + 2 * rest


def random_tensor(arch, key: str, shape, seed: int, device):
    """One tensor of a random Wan checkpoint, bf16 on ``device``: the kinds and scales of
    ``minimodel.arch.random_tensor`` (weights N(0, 0.02^2), biases 0, norm gains 1, modulation
    N(0, 1/dim)), but drawn with ``device``'s generator: 14 B values in seconds on a GPU."""
    import torch
    kind = warch._init_kind(key)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.bfloat16, device=device)
    g = torch.Generator(device=device).manual_seed(warch._tensor_seed(seed, key))
    std = arch.dim ** -0.5 if kind == "modulation" else 0.02
    return (torch.randn(shape, generator=g, dtype=torch.float32, device=device) * std).to(torch.bfloat16)


def random_state_dict(arch, seed: int, device) -> dict:
    """The whole expert in host memory (bf16), generated on ``device`` one tensor at a time."""
    return {k: random_tensor(arch, k, s, seed, device).cpu() for k, s in warch.wan_state_dict_shapes(arch).items()}


def w4a4_layer(w, bias, name: str, rank: int, num_bins: int):
    """An RTN-grade W4A4 layer of one BF16 Linear (on its device), made by the pack: smoothing 1, the
    rank-``rank`` branch of ``calibration.lowrank.low_rank``, the residual rounded to nearest and clip 1
    in every bin (``numerics.from_float``); unsigned activations for the layers calibration makes so."""
    from wan_w4a4.calibration.config import UNSIGNED_LINEARS
    from wan_w4a4.calibration.lowrank import low_rank
    from wan_w4a4.kernels import numerics as nm

    wf = w.float()
    lr_down, lr_up = low_rank(wf, rank) if rank else (None, None)
    p = nm.from_float(wf, None if bias is None else bias.float(), lr_down=lr_down, lr_up=lr_up, num_bins=num_bins,
                      act_unsigned=name.split(".", 2)[-1] in UNSIGNED_LINEARS)
    return p.to("cpu")


def _file_tag(path: Path) -> dict | None:
    """The safetensors metadata of ``path`` (None if missing or unreadable)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
        return None


def write_lora(args, path: Path) -> dict:
    """A rank-LORA_RANK LoRA on every block Linear (lightx2v key names, alpha = rank), bf16, random
    factors of small norm; reused when the file carries this arch and seed."""
    import torch
    from safetensors.torch import save_file

    arch, device = arch_of(args.arch), device_of(args)
    want = {"wan_w4a4.arch": arch.to_json(), "bench": BENCH_TAG, "seed": str(args.seed), "rank": str(LORA_RANK)}
    meta = _file_tag(path)
    if meta is not None and all(meta.get(k) == v for k, v in want.items()):
        return {"lora_file": str(path), "lora_generated": False, "lora_gib": gib(os.path.getsize(path))}
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(args.seed + 77)
    tensors = {}
    for name, (n, k) in block_linear_shapes(arch).items():
        up = torch.randn((n, LORA_RANK), generator=g, device=device) * 0.01
        down = torch.randn((LORA_RANK, k), generator=g, device=device) * 0.01
        tensors[f"diffusion_model.{name}.lora_up.weight"] = up.to(torch.bfloat16).cpu()
        tensors[f"diffusion_model.{name}.lora_down.weight"] = down.to(torch.bfloat16).cpu()
        tensors[f"diffusion_model.{name}.alpha"] = torch.tensor(float(LORA_RANK))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=want)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"lora_file": str(path), "lora_generated": True, "lora_gib": gib(os.path.getsize(path)),
            "lora_s": round(time.perf_counter() - t0, 2)}


# safetensors dtype names and their sizes in bytes, for the headers written ahead of streamed tensors
DTYPE_BYTES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def safetensors_header(entries: dict, metadata: dict) -> bytes:
    """The safetensors header (length prefix included) of a file holding ``entries`` (key -> (dtype
    name, shape)) in order, so the tensors can be streamed after it one at a time instead of held in
    memory."""
    header = {"__metadata__": {"format": "pt", **metadata}}
    offset = 0
    for key, (dtype, shape) in entries.items():
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def bf16_header(shapes: dict, metadata: dict) -> bytes:
    """The header of a BF16 file holding ``shapes`` in order (``safetensors_header``)."""
    return safetensors_header({k: ("BF16", s) for k, s in shapes.items()}, metadata)


# ComfyUI's fp8_scaled files (the official Wan2.2 ``*_fp8_scaled`` experts), as both supported versions
# read them (calibration/capture.py, ``stored_weight``): a marker tensor ``scaled_fp8`` of the fp8 dtype
# (empty; a 2-element marker would ask both versions for 16-bit matmuls, any other size for fp8 matmuls
# where the GPU has them: ComfyUI 0.3.64's model_detection, 0.33's utils.convert_old_quants), every Linear
# weight (2-D ``.weight``) in float8_e4m3fn with a float32 ``scale_weight`` = max|w| / 448 and
# ``scale_input`` = 1, everything else as it was.
FP8_MAX = 448.0
FP8_MARKER = "scaled_fp8"


def fp8_scaled_layout(shapes: dict) -> dict:
    """(dtype name, shape) of every tensor of the fp8_scaled file of a BF16 checkpoint of ``shapes``,
    in file order: the marker, then what ``fp8_scaled_tensors`` makes of each tensor (worked out on
    meta tensors, without data)."""
    import torch
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}
    out = {FP8_MARKER: ("F8_E4M3", (0,))}
    for key, shape in shapes.items():
        for k, t in fp8_scaled_tensors(key, torch.empty(shape, dtype=torch.bfloat16, device="meta")):
            out[k] = (names[t.dtype], tuple(t.shape))
    return out


def fp8_scaled_tensors(key: str, t) -> list:
    """(key, tensor) pairs that stand for the BF16 tensor ``t`` in an fp8_scaled file, in file order."""
    import torch
    if not (key.endswith(".weight") and t.ndim == 2):
        return [(key, t)]
    layer = key[:-len(".weight")]
    w = t.float()
    scale = (w.abs().max() / FP8_MAX).to(torch.float32).reshape(())
    return [(key, (w / scale).to(torch.float8_e4m3fn)), (f"{layer}.scale_weight", scale),
            (f"{layer}.scale_input", torch.ones((), dtype=torch.float32, device=t.device))]


def _write_tensor(fh, t) -> None:
    import torch
    fh.write(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def generate_files(args, need_bf16_file: bool, need_w4a4: bool, need_lora: bool = False,
                   need_fp8_file: bool = False) -> dict:
    """Writes the BF16 file, the fp8_scaled file (ComfyUI's layout, ``fp8_scaled_layout``) and/or the W4A4
    checkpoint (one pass over the tensors); reuses files that carry this arch and seed. Returns what was
    done, with timings."""
    from wan_w4a4.calibration.config import bin_edges
    from wan_w4a4.kernels import format as fmt

    arch, device = arch_of(args.arch), device_of(args)
    names, base = file_names(args), base_dir(args)
    bf16_path = base / "models" / "diffusion_models" / names["bf16"]
    fp8_path = base / "models" / "diffusion_models" / names["fp8_scaled"]
    w4a4_path = base / "models" / "w4a4" / names["w4a4"]
    want = {"wan_w4a4.arch": arch.to_json(), "bench": BENCH_TAG, "seed": str(args.seed)}
    out = {"device": str(device), "bf16_file": str(bf16_path) if need_bf16_file else None,
           "fp8_scaled_file": str(fp8_path) if need_fp8_file else None,
           "w4a4_file": str(w4a4_path) if need_w4a4 else None}

    def stale(path: Path, needed: bool) -> bool:
        meta = _file_tag(path) if needed else None
        return needed and not (meta is not None and all(meta.get(k) == v for k, v in want.items()))

    do_bf16, do_fp8 = stale(bf16_path, need_bf16_file), stale(fp8_path, need_fp8_file)
    do_w4a4 = False
    if need_w4a4:
        meta = _file_tag(w4a4_path)
        rep = json.loads(meta.get("report", "{}")) if meta else {}
        do_w4a4 = not (rep.get("bench") == BENCH_TAG and rep.get("arch") == arch.to_json()
                       and rep.get("seed") == args.seed and rep.get("rank") == W4A4_RANK
                       and rep.get("quantizer") == W4A4_MAKER)
    out.update(bf16_generated=do_bf16, fp8_scaled_generated=do_fp8, w4a4_generated=do_w4a4)
    if need_lora:
        out.update(write_lora(args, base / "models" / "loras" / names["lora"]))
    if not (do_bf16 or do_fp8 or do_w4a4):
        log.info("reusing %s", ", ".join(p for p in (out["bf16_file"], out["fp8_scaled_file"], out["w4a4_file"]) if p))
        return out

    shapes = warch.wan_state_dict_shapes(arch)
    quantized = set(warch.quantizable_linears(arch))
    t0 = time.perf_counter()
    files = {}  # final path -> (temporary path, open handle): streamed tensor by tensor, renamed at the end
    layers, rest = {}, {}
    t_quant = 0.0
    try:
        for path, header in ((bf16_path, do_bf16 and bf16_header(shapes, want)),
                             (fp8_path, do_fp8 and safetensors_header(fp8_scaled_layout(shapes), want))):
            if header:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                files[path] = (tmp, open(tmp, "wb"))  # noqa: SIM115 - closed in the finally
                files[path][1].write(header)
        for i, (key, shape) in enumerate(shapes.items()):
            t = random_tensor(arch, key, shape, args.seed, device)
            if bf16_path in files:
                _write_tensor(files[bf16_path][1], t)
            if fp8_path in files:
                for _, part in fp8_scaled_tensors(key, t):
                    _write_tensor(files[fp8_path][1], part)
            if do_w4a4:
                layer, _, field = key.rpartition(".")
                if layer in quantized:
                    if field == "weight":
                        tq = time.perf_counter()
                        # The bias is a pure function of its key (random_tensor), drawn here so that
                        # the layer is made in one call; the file loop draws it again for the BF16 file.
                        bkey = f"{layer}.bias"
                        bias = random_tensor(arch, bkey, shapes[bkey], args.seed, device) if bkey in shapes else None
                        layers[layer] = w4a4_layer(t, bias, layer, W4A4_RANK, 2 * W4A4_BINS)
                        t_quant += time.perf_counter() - tq
                else:
                    rest[key] = t.cpu()
            if i % 100 == 0:
                log.info("generating: %d/%d tensors, %.1f s", i, len(shapes), time.perf_counter() - t0)
        for path, (tmp, fh) in files.items():
            fh.close()
            os.replace(tmp, path)  # no fsync: scratch files for this session
    finally:
        for tmp, fh in files.values():
            fh.close()
            tmp.unlink(missing_ok=True)
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    out["w4a4_quantize_s"] = round(t_quant, 2)
    if do_w4a4:
        # One checkpoint serves both experts: 4 bins over the high-noise range and 4 over the
        # low-noise range, so neither expert meets a timestep outside its bins (same cost per layer).
        edges = bin_edges("high", W4A4_BINS) + bin_edges("low", W4A4_BINS)[1:]
        meta = fmt.StateMeta(expert="high+low (benchmark)", bin_edges=edges, clip_policy="none",
                             fingerprint="", report={"bench": BENCH_TAG, "arch": arch.to_json(), "seed": args.seed,
                                                     "quantizer": W4A4_MAKER,
                                                     "rank": W4A4_RANK, "note": "RTN W4A4 of random weights, "
                                                     "for benchmarking bytes and speed only"})
        t1 = time.perf_counter()
        w4a4_path.parent.mkdir(parents=True, exist_ok=True)
        fmt.save_checkpoint(w4a4_path, layers, rest, meta, overwrite=True)
        out["w4a4_save_s"] = round(time.perf_counter() - t1, 2)
        out["w4a4_layers"] = len(layers)
    for k in ("bf16_file", "fp8_scaled_file", "w4a4_file"):
        if out[k]:
            out[k.replace("file", "gib")] = gib(os.path.getsize(out[k]))
    out["host_peak_rss_gib"] = host_peak_rss_gib()
    return out

