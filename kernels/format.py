"""The on-disk W4A4 format: the one module that reads and writes it (safetensors only, never pickle).

Two kinds of file, same layer encoding:

- a **state** (``kind = "state"``) holds the W4A4 layers of ONE expert of a Wan2.2 model; the
  BF16 model it was made from supplies everything else;
- a **checkpoint** (``kind = "checkpoint"``) adds the model's other tensors (norms, modulation,
  embeddings, head...) under their original keys, so that one file is the whole expert.

Tensors, per quantized layer ``<layer>`` (the module path inside ComfyUI's WanModel, e.g.
``blocks.0.self_attn.q``); shapes in the notation of ``numerics`` (N out, K in, G = K/64, R rank,
B bins)::

    <layer>.qweight  uint8    [N, K/2]  packed 4-bit residual (nibble layout: numerics doc)
    <layer>.wscale   float32  [N]       residual row scale, finite > 0
    <layer>.wfactor  uint8    [N, G]    residual group factor, 1..16 (weights are always signed)
    <layer>.smooth   float32  [K]       smoothing divisor, finite > 0
    <layer>.lr_down  bfloat16 [K, R]    low-rank L1 (R may be 0)
    <layer>.lr_up    bfloat16 [R, N]    low-rank L2
    <layer>.clip     float32  [B]       activation clip ratio per timestep bin, in (0, 1]
    <layer>.bias     float32  [N]       optional

Header (``__metadata__``, str -> str; JSON where structured)::

    format          "wan-w4a4"           format_version  "1"
    kind            "state" | "checkpoint"
    scheme          "i8g64"              scheme_version  "1"      (numerics.SCHEME, SCHEME_VERSION)
    bits            "4"                  group_size      "64"
    expert          "high" | "low" | any non-empty string
    num_bins        "B"
    bin_edges       JSON list of B+1 model timesteps (Wan: t = 1000 * sigma), strictly DESCENDING,
                    in the order a sampler meets them. Bin i is the interval edges[i+1] <= t < edges[i];
                    t above edges[0] falls in bin 0, t below edges[B] in bin B-1 (see StateMeta.bin_index).
                    Closed at the low end like the expert switch (Wan2.2 I2V: t >= 900 -> high expert).
    clip_policy     "per-bin" | "per-expert" | "global" | "none"  (none: c = 1 everywhere)
    fingerprint     model_fingerprint() of the expert the state was made from ("" = unknown): of its BF16/FP16
                    weights, or of the dequantized weights of an fp8_scaled file (see source)
    producer        e.g. "wan_w4a4 0.1.0"
    report          JSON object, free-form (e.g. {"path": "high.report.json"})
    handover        optional JSON object: the two-expert sampling the bins were calibrated for (calibration
                    writes {"by": "boundary" | "step", "boundary", "high_steps", "steps", "shift", "sampler",
                    "scheduler"}; see handover_text). Absent in files written before it existed, and in
                    states made without calibration; readers that do not know it ignore it, so the format
                    version is unchanged
    source          optional JSON object: what the expert's Linear weights were when the state was calibrated,
                    {"kind": one of SOURCE_KINDS, "weight_dtype": the storage dtype, e.g. "float8_e4m3fn"}.
                    "fp8_scaled": a ComfyUI fp8_scaled file, its weights dequantized as float32(weight) * scale
                    (and the fingerprint taken of those); "bf16" / "fp16" / "fp32": plain weights, as ComfyUI
                    held them (it may hold a BF16 file in fp16). Absent (older files, states made without
                    calibration) means plain BF16/FP16 weights. Optional like handover: the format version is
                    unchanged; a reader that does not know it ignores it
    layers          JSON object, in the order save_state got them: layer -> {"in_features", "out_features", "rank",
                    "act_unsigned", "act_shift", "bias", "crc32": {tensor: crc32 of its bytes}}
    rest            (checkpoints only) JSON object: key -> crc32 of the non-quantized tensors
    header_crc32    crc32 of the JSON of all other header entries (sorted keys): catches a corrupted
                    free-form value (fingerprint, expert...) that would still parse

Tensor names do not copy comfy-kitchen's ``svdquant_w4a4`` keys (``wscales``, ``proj_up``...) on
purpose: their shapes and meaning differ (per-group scales [G, N], ``proj_up`` [N, R]), and a loader
that recognised the names would misread the tensors.

Loading reads the file through one open handle (``_File``; a concurrent replace cannot mix two files)
and checks, before reading any tensor data: the safetensors header itself (a JSON object; every tensor's
dtype, shape and offsets, which must tile the data section to the end of the file), the W4A4 header,
every tensor's presence, dtype and shape, the header's CRC32, and that no tensor is undeclared. Then
values (non-finite ones refused, also in a checkpoint's other tensors) and every tensor's CRC32
(``verify=False`` skips the CRCs, about 4 GB/s of one core's time). ``read_layout`` stops before the
data, so that a node can hold a file against the model first. Any problem raises
:class:`W4A4FormatError` naming the file, the layer and the problem, with a hint.

Writing goes to ``.<name>.w4a4-tmp-<pid>-<random>`` beside the target, then publishes it: os.replace
with ``overwrite``, otherwise os.link, which fails if the name exists, also when another process took
it meanwhile. Temporary files left by killed writers are removed once stale (``is_stale_temp``) when
their folder is next written or listed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import struct
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from . import numerics as nm

log = logging.getLogger(__name__)

FORMAT_NAME = "wan-w4a4"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
KINDS = ("state", "checkpoint")
BITS = 4
# scheme -> newest version this code reads. A second scheme (native INT4 / NVFP4) adds a row here.
SUPPORTED_SCHEMES = {nm.SCHEME: nm.SCHEME_VERSION}
CLIP_POLICIES = ("per-bin", "per-expert", "global", "none")
# StateMeta.source kinds: plain weights as ComfyUI held them, and ComfyUI's fp8_scaled files (dequantized).
SOURCE_KINDS = ("bf16", "fp16", "fp32", "fp8_scaled")
SOURCE_KEYS = ("kind", "weight_dtype")
PLAIN = "bf16/fp16"  # the family of the plain kinds: one file may be held in any of them (model_fingerprint v2)
FIELDS = ("qweight", "wscale", "wfactor", "smooth", "lr_down", "lr_up", "clip", "bias")
_HINT_RECREATE = "re-create the file with the calibration command, or download it again"


def _default_producer() -> str:
    from .. import __version__
    return f"wan_w4a4 {__version__}"


class W4A4FormatError(ValueError):
    """A W4A4 file (or the layers about to be written to one) breaks the format.

    ``file``, ``layer`` (None for file-level problems), ``problem`` and ``hint`` are kept as attributes.
    """

    def __init__(self, file, problem: str, layer: str | None = None, hint: str | None = None):
        self.file, self.layer, self.problem, self.hint = str(file), layer, problem, hint
        where = f"layer {layer!r}: " if layer is not None else ""
        super().__init__(f"{self.file}: {where}{problem}" + (f" (hint: {hint})" if hint else ""))


class W4A4WrongKindError(W4A4FormatError):
    """A W4A4 file of the other kind (a state where a checkpoint was asked for, or the reverse); ``found``
    is the kind the file is."""

    def __init__(self, file, problem: str, found: str, hint: str | None = None):
        super().__init__(file, problem, hint=hint)
        self.found = found


class W4A4CorruptTensorError(W4A4FormatError):
    """A tensor's bytes do not match the CRC32 its header records (``_read`` reads again once if the file
    was replaced meanwhile)."""


# ---------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StateMeta:
    """File-level metadata of a state or checkpoint (everything but the per-layer entries)."""

    expert: str
    bin_edges: tuple[float, ...]
    fingerprint: str = ""
    clip_policy: str = "per-bin"
    producer: str = dataclasses.field(default_factory=_default_producer)
    report: dict = dataclasses.field(default_factory=dict)
    scheme: str = nm.SCHEME
    scheme_version: int = nm.SCHEME_VERSION
    handover: dict = dataclasses.field(default_factory=dict)  # {} = not recorded
    source: dict = dataclasses.field(default_factory=dict)  # {} = not recorded: plain BF16/FP16 weights

    def __post_init__(self):
        if not isinstance(self.expert, str) or not self.expert.strip():
            raise ValueError(f"expert must be a non-empty string such as 'high' or 'low', got {self.expert!r}")
        try:
            edges = tuple(float(e) for e in self.bin_edges)
        except (TypeError, ValueError):
            raise ValueError(f"bin_edges must be a sequence of numbers, got {self.bin_edges!r}") from None
        if len(edges) < 2:
            raise ValueError(f"bin_edges needs B+1 >= 2 timesteps, got {list(edges)}")
        if not all(math.isfinite(e) and e >= 0 for e in edges):
            raise ValueError(f"bin_edges must be finite timesteps >= 0, got {list(edges)}")
        if any(a <= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bin_edges must be strictly descending (sampling order, e.g. "
                             f"[1000, 950, 900]), got {list(edges)}")
        object.__setattr__(self, "bin_edges", edges)
        if self.clip_policy not in CLIP_POLICIES:
            raise ValueError(f"clip_policy {self.clip_policy!r} is not one of {CLIP_POLICIES}")
        for name in ("fingerprint", "producer"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("report", "handover", "source"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict (JSON object), got {type(value).__name__}")
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name} is not JSON-serialisable: {e}") from None
        _check_source(self.source)  # after the dict check above
        newest = SUPPORTED_SCHEMES.get(self.scheme)
        if newest is None:
            raise ValueError(f"scheme {self.scheme!r} is not supported (known: {sorted(SUPPORTED_SCHEMES)})")
        if not isinstance(self.scheme_version, int) or not 1 <= self.scheme_version <= newest:
            raise ValueError(f"scheme {self.scheme!r} version {self.scheme_version!r} is not supported "
                             f"(this pack reads versions 1..{newest}; a newer file needs a newer ComfyUI-WanW4A4)")

    @property
    def source_family(self) -> str:
        """The kind of file the state was calibrated from, as :func:`source_family` names it."""
        return source_family(self.source.get("kind"))

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) - 1

    def bin_index(self, t: float) -> int:
        """The bin of model timestep ``t`` (``numerics.bin_of``: edges[i+1] <= t < edges[i], clamped)."""
        return nm.bin_of(t, self.bin_edges)


def _check_source(source: dict) -> None:
    """StateMeta.source: {} or {"kind": one of SOURCE_KINDS, "weight_dtype": a dtype name} (a dict: checked
    with report and handover)."""
    if not source:
        return
    extra = sorted(set(source) - set(SOURCE_KEYS))
    if extra:
        raise ValueError(f"source has unknown entries {extra} (known: {list(SOURCE_KEYS)})")
    if source.get("kind") not in SOURCE_KINDS:
        raise ValueError(f"source kind {source.get('kind')!r} is not one of {SOURCE_KINDS}")
    dtype = source.get("weight_dtype", "")
    if type(dtype) is not str or len(dtype) > 64:
        raise ValueError(f"source weight_dtype must be a dtype name, got {dtype!r}")


def source_family(kind: str | None) -> str:
    """"fp8_scaled", or PLAIN ("bf16/fp16") for the plain kinds and for a state that records no source;
    any other kind of weights (fp8 without scales, ...) is named as it is."""
    if kind is None or kind in ("bf16", "fp16", "fp32"):
        return PLAIN
    return kind


def handover_text(handover: dict) -> str:
    """One line saying which sampling a state was calibrated for ("" when the file does not record it)."""
    if not handover:
        return ""
    h = handover
    try:
        if h.get("by") == "step":
            bits = [f"hand-over at step {h['high_steps']} of {h['steps']} (bins split at t = {h['boundary']:.1f})"]
        else:
            bits = [f"expert switch at t = {h['boundary']:g} (step {h['high_steps']} of {h['steps']})"]
        if h.get("shift") is not None:
            bits.append(f"shift {h['shift']:g}")
        if h.get("sampler") or h.get("scheduler"):
            bits.append(f"{h.get('sampler')}/{h.get('scheduler')}")
    except (KeyError, TypeError, ValueError):  # a free-form header entry: show it as it is rather than fail
        return json.dumps(h, sort_keys=True)
    return ", ".join(bits)


def _meta_header(meta: StateMeta, kind: str) -> dict[str, str]:
    header = {
        "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "kind": kind,
        "scheme": meta.scheme, "scheme_version": str(meta.scheme_version),
        "bits": str(BITS), "group_size": str(nm.GROUP),
        "expert": meta.expert, "num_bins": str(meta.num_bins), "bin_edges": json.dumps(list(meta.bin_edges)),
        "clip_policy": meta.clip_policy, "fingerprint": meta.fingerprint, "producer": meta.producer,
        "report": json.dumps(meta.report, sort_keys=True),
    }
    if meta.handover:  # only when known: files without it stay byte-identical to what older versions wrote
        header["handover"] = json.dumps(meta.handover, sort_keys=True)
    if meta.source:  # likewise
        header["source"] = json.dumps(meta.source, sort_keys=True)
    return header


class _Ctx:
    """The file an operation is about, so that every error names it, and the generic fix to suggest."""

    def __init__(self, path, writing: bool = False):
        self.path = os.fspath(path)
        self.fix = ("nothing was written; the layers break the numerics layout (a bug in the code that made them)"
                    if writing else _HINT_RECREATE)

    def error(self, problem: str, layer: str | None = None, hint: str | None = None) -> W4A4FormatError:
        return W4A4FormatError(self.path, problem, layer, hint)


def _parse_header(ctx: _Ctx, header: dict[str, str] | None, kind: str):
    """Validate the file-level header. Returns (meta, layer entries dict, rest crc dict or None)."""
    hint_kind = "this does not look like a W4A4 file (a plain model checkpoint?)"
    if not header or header.get("format") != FORMAT_NAME:
        got = None if not header else header.get("format")
        raise ctx.error(f"header has format {got!r}, expected {FORMAT_NAME!r}", hint=hint_kind)

    def integer(key):
        try:
            return int(header[key])
        except KeyError:
            raise ctx.error(f"header lacks {key!r}", hint=_HINT_RECREATE) from None
        except ValueError:
            raise ctx.error(f"header {key!r} = {header[key]!r} is not an integer", hint=_HINT_RECREATE) from None

    def load_json(key, typ):
        try:
            value = json.loads(header[key])
        except KeyError:
            raise ctx.error(f"header lacks {key!r}", hint=_HINT_RECREATE) from None
        except json.JSONDecodeError as e:
            raise ctx.error(f"header {key!r} is not valid JSON ({e})", hint=_HINT_RECREATE) from None
        if not isinstance(value, typ):
            raise ctx.error(f"header {key!r} is a {type(value).__name__}, expected {typ.__name__}",
                            hint=_HINT_RECREATE)
        return value

    version = integer("format_version")
    if version > FORMAT_VERSION:
        raise ctx.error(f"format_version {version} is newer than this pack reads ({FORMAT_VERSION})",
                        hint="update ComfyUI-WanW4A4")
    if version < 1:
        raise ctx.error(f"format_version {version} is invalid", hint=_HINT_RECREATE)
    file_kind = header.get("kind")
    if file_kind not in KINDS:  # not "a checkpoint" to one reader and "a state" to the other: say what it is
        problem = "header lacks 'kind'" if file_kind is None else f"header kind {file_kind!r} is unknown"
        raise ctx.error(f"{problem}: neither a W4A4 state nor a W4A4 checkpoint", hint=_HINT_RECREATE)
    if file_kind != kind:
        other = {"state": "load_state", "checkpoint": "load_checkpoint"}[file_kind]
        raise W4A4WrongKindError(ctx.path, f"file is a {file_kind!r}, expected a {kind!r}", file_kind,
                                 hint=f"open it with {other}()")
    for key, want in (("bits", BITS), ("group_size", nm.GROUP)):
        if integer(key) != want:
            raise ctx.error(f"header {key} = {header[key]}, this pack only reads {want}", hint="update ComfyUI-WanW4A4")
    scheme = header.get("scheme")
    newest = SUPPORTED_SCHEMES.get(scheme)
    if newest is None:
        raise ctx.error(f"scheme {scheme!r} is not supported (this pack reads {sorted(SUPPORTED_SCHEMES)})",
                        hint="a newer ComfyUI-WanW4A4 may read it")
    scheme_version = integer("scheme_version")
    if scheme_version > newest:
        raise ctx.error(f"scheme {scheme} version {scheme_version} is newer than this pack reads ({newest})",
                        hint="update ComfyUI-WanW4A4")
    num_bins = integer("num_bins")
    edges, report = load_json("bin_edges", list), load_json("report", dict)
    handover = load_json("handover", dict) if "handover" in header else {}
    source = load_json("source", dict) if "source" in header else {}
    try:
        meta = StateMeta(expert=header.get("expert", ""), bin_edges=edges, fingerprint=header.get("fingerprint", ""),
                         clip_policy=header.get("clip_policy", ""), producer=header.get("producer", ""),
                         report=report, scheme=scheme, scheme_version=scheme_version, handover=handover,
                         source=source)
    except ValueError as e:
        raise ctx.error(f"header: {e}", hint=_HINT_RECREATE) from None
    if meta.num_bins != num_bins:
        raise ctx.error(f"header num_bins = {num_bins} but bin_edges has {meta.num_bins + 1} edges",
                        hint=_HINT_RECREATE)
    layers = load_json("layers", dict)
    if not layers:
        raise ctx.error("header lists no layers", hint=_HINT_RECREATE)
    rest = load_json("rest", dict) if kind == "checkpoint" else None
    return meta, layers, rest


# ---------------------------------------------------------------------------------------------
# Per-layer checks (shared by save and load)
# ---------------------------------------------------------------------------------------------

# torch dtype -> the name safetensors uses in its header (what get_slice().get_dtype() returns)
_DTYPE_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                torch.bool: "BOOL"}
_FIELD_DTYPE = {"qweight": torch.uint8, "wscale": torch.float32, "wfactor": torch.uint8,
                "smooth": torch.float32, "lr_down": torch.bfloat16, "lr_up": torch.bfloat16,
                "clip": torch.float32, "bias": torch.float32}


def _expected_shapes(entry: dict, num_bins: int) -> dict[str, tuple[tuple[int, ...], str]]:
    n, k, r = entry["out_features"], entry["in_features"], entry["rank"]
    return {"qweight": ((n, k // 2), "(out_features, in_features/2)"), "wscale": ((n,), "(out_features,)"),
            "wfactor": ((n, k // nm.GROUP), "(out_features, in_features/64)"), "smooth": ((k,), "(in_features,)"),
            "lr_down": ((k, r), "(in_features, rank)"), "lr_up": ((r, n), "(rank, out_features)"),
            "clip": ((num_bins,), "(num_bins,)"), "bias": ((n,), "(out_features,)")}


def _check_entry(ctx: _Ctx, name: str, entry: Any) -> None:
    """A header layer entry: types and the layout's constraints."""
    if not isinstance(entry, dict):
        raise ctx.error(f"layer entry is a {type(entry).__name__}, expected an object", name, ctx.fix)
    for key in ("in_features", "out_features", "rank"):
        v = entry.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "rank" else 1):
            raise ctx.error(f"{key} = {v!r} is not a valid count", name, ctx.fix)
    if entry["in_features"] % nm.PACK_TILE:
        raise ctx.error(f"in_features = {entry['in_features']} is not a multiple of {nm.PACK_TILE} "
                        f"(the {nm.SCHEME} layout packs K in tiles of {nm.PACK_TILE})", name,
                        "leave this layer unquantized")
    if entry["rank"] > min(entry["in_features"], entry["out_features"]):  # no branch is wider than its layer
        raise ctx.error(f"rank = {entry['rank']} exceeds min(in_features, out_features) = "
                        f"{min(entry['in_features'], entry['out_features'])}", name, ctx.fix)
    for key in ("act_unsigned", "bias"):
        if not isinstance(entry.get(key), bool):
            raise ctx.error(f"{key} = {entry.get(key)!r} is not a boolean", name, ctx.fix)
    shift = entry.get("act_shift")
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift):
        raise ctx.error(f"act_shift = {shift!r} is not a finite number", name, ctx.fix)


def _check_specs(ctx: _Ctx, name: str, entry: dict, specs: Mapping[str, tuple[str, tuple]], num_bins: int):
    """Presence, dtype and shape of a layer's tensors; ``specs``: field -> (safetensors dtype, shape)."""
    fields = [f for f in FIELDS if f != "bias" or entry["bias"]]
    for field in fields:
        if field not in specs:
            raise ctx.error(f"tensor {name}.{field} is missing", name, ctx.fix)
    extra = sorted(set(specs) - set(fields))
    if extra:
        raise ctx.error(f"unexpected tensor(s) {', '.join(f'{name}.{f}' for f in extra)}", name,
                        "the header does not declare them; the file was edited or made by another tool")
    for field, (shape, meaning) in _expected_shapes(entry, num_bins).items():
        if field not in fields:
            continue
        dtype, got = specs[field]
        want = _DTYPE_NAMES[_FIELD_DTYPE[field]]
        if dtype != want:
            raise ctx.error(f"{field} has dtype {dtype}, expected {want} ({_FIELD_DTYPE[field]})", name,
                            ctx.fix)
        if tuple(got) != shape:
            raise ctx.error(f"{field} has shape {tuple(got)}, expected {shape} = {meaning}", name,
                            "the tensors disagree with each other or with the header")


def _check_values(ctx: _Ctx, name: str, t: Mapping[str, torch.Tensor], clip_policy: str) -> None:
    """Value ranges that the kernels rely on (all small tensors; qweight has no invalid byte)."""
    def bad(field, cond_ok, what):
        if not bool(cond_ok):
            raise ctx.error(f"{field} {what}", name, ctx.fix)

    lo, hi = torch.aminmax(t["wfactor"]) if t["wfactor"].numel() else (1, 1)
    bad("wfactor", 1 <= int(lo) and int(hi) <= nm.SIGNED[2], f"has values outside 1..{nm.SIGNED[2]}")
    for field in ("wscale", "smooth"):
        v = t[field]
        bad(field, (torch.isfinite(v) & (v > 0)).all(), "has values that are not finite and > 0")
    c = t["clip"]
    bad("clip", (torch.isfinite(c) & (c > 0) & (c <= 1)).all(), f"has values outside (0, 1]: {c.tolist()}")
    if clip_policy == "none":
        bad("clip", (c == 1).all(), f"must be all 1 under clip_policy 'none', got {c.tolist()}")
    elif clip_policy in ("per-expert", "global"):
        bad("clip", (c == c[0]).all(), f"must be equal across bins under clip_policy {clip_policy!r}, got {c.tolist()}")
    for field in ("lr_down", "lr_up", "bias"):
        if field in t:
            bad(field, torch.isfinite(t[field]).all(), "has non-finite values")


def _crc32(t: torch.Tensor) -> int:
    # The bytes safetensors stores: little-endian, C order.
    return zlib.crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _header_crc32(header: Mapping[str, str]) -> str:
    body = {k: v for k, v in header.items() if k != "header_crc32"}
    return str(zlib.crc32(json.dumps(body, sort_keys=True).encode()))


def _check_suffix(ctx: _Ctx) -> None:
    if not ctx.path.endswith(SUFFIX):
        raise ctx.error(f"not a {SUFFIX} file", hint="W4A4 states are safetensors files; this pack reads and "
                                                     "writes nothing else (and never unpickles)")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _layer_tensors(ctx: _Ctx, name: str, p: nm.W4A4Params, meta: StateMeta) -> tuple[dict, dict]:
    """Validate one layer for writing. Returns (entry for the header, field -> CPU tensor)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ctx.error(f"invalid layer name {name!r}", hint="use the module path, e.g. 'blocks.0.self_attn.q'")
    if not isinstance(p, nm.W4A4Params):
        raise ctx.error(f"is a {type(p).__name__}, expected numerics.W4A4Params", name)
    tensors = {f: getattr(p, f) for f in FIELDS if getattr(p, f) is not None}
    for field, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise ctx.error(f"{field} is a {type(v).__name__}, expected a tensor", name)
    qw, lr = p.qweight, p.lr_down
    if qw.dim() != 2 or lr.dim() != 2:
        raise ctx.error(f"qweight {tuple(qw.shape)} and lr_down {tuple(lr.shape)} must be 2-D", name)
    if not isinstance(p.act_unsigned, bool):
        raise ctx.error(f"act_unsigned = {p.act_unsigned!r} is not a boolean", name)
    entry = {"in_features": qw.shape[1] * 2, "out_features": qw.shape[0], "rank": lr.shape[1],
             "act_unsigned": p.act_unsigned, "act_shift": float(p.act_shift), "bias": p.bias is not None}
    _check_entry(ctx, name, entry)
    specs = {f: (_DTYPE_NAMES.get(v.dtype, str(v.dtype).replace("torch.", "")), tuple(v.shape))
             for f, v in tensors.items()}
    _check_specs(ctx, name, entry, specs, meta.num_bins)
    tensors = {f: v.detach().to("cpu").contiguous() for f, v in tensors.items()}
    _check_values(ctx, name, tensors, meta.clip_policy)
    entry["crc32"] = {f: _crc32(v) for f, v in tensors.items()}
    return entry, tensors


# Temporary files: ".<name>.w4a4-tmp-<pid>-<random>" beside the target, so that a writer killed mid-save
# leaves a file that says what it is and who made it (TEMP_RE); ``remove_stale_temps`` deletes them later.
TEMP_MARK = ".w4a4-tmp-"
TEMP_RE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)-[0-9a-f]+$")
# what versions before TEMP_MARK left (tempfile.mkstemp(prefix=".<name>.", suffix=".tmp")): no pid in the name
_LEGACY_TEMP_RE = re.compile(r"^\..+\.(safetensors|json)\.[0-9a-z_]{8}\.tmp$")
STALE_TEMP_AGE_S = 24 * 3600


def pid_alive(pid: int) -> bool | None:
    """Whether process ``pid`` exists on this machine (None: cannot tell)."""
    if pid <= 0:
        return None  # os.kill(0, ...) would signal our own process group
    if os.name == "nt":  # os.kill(pid, 0) sends CTRL_C_EVENT on Windows: ask the kernel instead
        import ctypes
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() == 5  # ERROR_ACCESS_DENIED: it exists; otherwise it does not
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return None if not ok else code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OSError, OverflowError):
        return None
    return True


def is_stale_temp(name: str, mtime: float, now: float, pid_alive=pid_alive) -> bool:
    """The one rule for leftover temporary files: a W4A4 temp file older than STALE_TEMP_AGE_S whose
    writer is not alive (or cannot be told: an old-style name without a pid, a pid we cannot query)."""
    m = TEMP_RE.match(name)
    if m is None and not _LEGACY_TEMP_RE.match(name):
        return False
    if now - mtime < STALE_TEMP_AGE_S:
        return False
    return m is None or pid_alive(int(m.group(1))) is not True


def remove_stale_temps(folder, now: float | None = None) -> list[str]:
    """Delete the stale temporary files (``is_stale_temp``) directly in ``folder``; returns their paths.
    Never fails: cleaning up must not stop the listing or the write that triggered it."""
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            if is_stale_temp(entry.name, entry.stat(follow_symlinks=False).st_mtime, now):
                os.unlink(entry.path)
                removed.append(entry.path)
                log.warning("removed %s: a temporary file left by an interrupted W4A4 save", entry.path)
        except OSError:  # gone meanwhile (another cleaner), or not ours to delete
            continue
    return removed


def temp_name(base: str, pid: int | None = None, token: str | None = None) -> str:
    """The temporary file name under which ``base`` is written (``TEMP_RE``)."""
    pid = os.getpid() if pid is None else pid
    return f".{base}{TEMP_MARK}{pid}-{secrets.token_hex(4) if token is None else token}"


# The most bytes ``temp_name`` adds to a file name (a pid of 7 digits: Linux's largest pid_max is
# 4194304); names that must fit the file system's NAME_MAX with it check against this.
TEMP_NAME_MAX_EXTRA = len(os.fsencode(temp_name("", 4194304, "0" * 8)))


def _temp_path(path: str) -> str:
    """A new, empty temporary file beside ``path`` (created with O_EXCL: never shared with another writer)."""
    folder, base = os.path.split(path)
    while True:
        tmp = os.path.join(folder, temp_name(base))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return tmp
        except FileExistsError:
            continue


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "W4A4 file already exists (pass overwrite=True to replace it)", path)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    """Give the finished ``tmp`` the name ``path``. Without ``overwrite`` this is one atomic step that
    fails if ``path`` exists, also when another process published it a moment ago (a check followed
    by os.replace would let both succeed, the second silently replacing the first)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a file system without hard links: reserve the name with O_EXCL, then replace the empty
        # reservation (a reader in between sees an empty file, which it refuses as truncated)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _atomic_write(path: str, fill, overwrite: bool, what: str) -> None:
    """The one way files are written here: stale temporary files cleaned, a named temporary file beside
    ``path`` filled by ``fill(tmp)`` and fsynced, then ``_publish`` (no replace between processes without
    ``overwrite``); on any failure the temporary file goes and ``path`` is untouched."""
    remove_stale_temps(os.path.dirname(os.path.abspath(path)))
    if not overwrite and os.path.lexists(path):  # early, before the work; _publish decides for sure
        raise _exists_error(path)
    tmp = _temp_path(path)
    try:
        try:
            fill(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:  # safetensors reports a full disk as its own error type, not as OSError
            code = getattr(e, "errno", None) or errno.EIO
            raise OSError(code, f"cannot write {what} {path}: {getattr(e, 'strerror', None) or e} "
                                f"(nothing was written)", path) from e
        _publish(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write(path, tensors: dict[str, torch.Tensor], header: dict[str, str], overwrite: bool) -> None:
    """Write a W4A4 file atomically (``_atomic_write``)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    # safetensors refuses tensors that share memory (e.g. q/k/v sharing one L1): give each its own copy.
    seen = set()
    for key, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            tensors[key] = v.clone()
        seen.add(ptr)
    header = {**header, "header_crc32": _header_crc32(header)}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), overwrite, "the W4A4 file")
    log.info("wrote %s (%d tensors)", path, len(tensors))


def write_bytes(path, data: bytes, overwrite: bool = False) -> None:
    """Write a small file (a calibration report) as W4A4 files are written (``_atomic_write``)."""
    def fill(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write(os.fspath(path), fill, overwrite, "the file")


def _encode_layers(ctx: _Ctx, layers: Mapping[str, nm.W4A4Params], meta: StateMeta):
    if not isinstance(meta, StateMeta):
        raise TypeError(f"meta must be a StateMeta, got {type(meta).__name__}")
    if not layers:
        raise ctx.error("no layers to write", hint="a state holds at least one quantized layer")
    entries, tensors = {}, {}
    for name, p in layers.items():
        entry, t = _layer_tensors(ctx, name, p, meta)
        entries[name] = entry
        for field, v in t.items():
            key = f"{name}.{field}"
            if key in tensors:
                raise ctx.error(f"tensor name {key!r} is produced twice", name, "layer names collide")
            tensors[key] = v
    return entries, tensors


def save_state(path, layers: Mapping[str, nm.W4A4Params], meta: StateMeta, *, overwrite: bool = False) -> None:
    """Write the W4A4 layers of one expert. Validates everything first; never leaves a partial file."""
    ctx = _Ctx(path, writing=True)
    _check_suffix(ctx)
    entries, tensors = _encode_layers(ctx, layers, meta)
    header = _meta_header(meta, "state")
    header["layers"] = json.dumps(entries)
    _write(path, tensors, header, overwrite)


def save_checkpoint(path, layers: Mapping[str, nm.W4A4Params], rest: Mapping[str, torch.Tensor], meta: StateMeta,
                    *, overwrite: bool = False) -> None:
    """A self-contained expert: the W4A4 layers plus the non-quantized tensors ``rest`` (original keys)."""
    ctx = _Ctx(path, writing=True)
    _check_suffix(ctx)
    entries, tensors = _encode_layers(ctx, layers, meta)
    rest_crc = {}
    for key, v in rest.items():
        layer, _, field = key.rpartition(".")
        if not isinstance(v, torch.Tensor):
            raise ctx.error(f"rest tensor {key!r} is a {type(v).__name__}, expected a tensor")
        if key in tensors or (layer in entries and field in ("weight", "bias")):
            raise ctx.error(f"rest tensor {key!r} belongs to a quantized layer", layer if layer in entries else None,
                            "drop the float weight and bias of quantized layers from rest")
        tensors[key] = v.detach().to("cpu").contiguous()
        rest_crc[key] = _crc32(tensors[key])
    header = _meta_header(meta, "checkpoint")
    header["layers"] = json.dumps(entries)
    header["rest"] = json.dumps(rest_crc)
    _write(path, tensors, header, overwrite)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

# safetensors' dtype names -> torch dtypes this reader can return
_ST_DTYPES = {name: dt for dt, name in _DTYPE_NAMES.items()}
_ST_DTYPES.update({n: getattr(torch, t) for n, t in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                                                      ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"))
                   if hasattr(torch, t)})
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor as the safetensors header declares it; ``begin`` is its offset in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    nbytes: int


class _File:
    """A safetensors file read through ONE open handle: a concurrent os.replace of the path can never
    mix two files (safetensors' own reader re-opens the path for tensor data). The constructor checks
    the whole header - JSON object, metadata, every tensor's dtype, shape and offsets, and that the
    offsets tile the data section exactly to the end of the file - before any tensor byte is read."""

    def __init__(self, ctx: _Ctx):
        self.ctx = ctx
        try:
            fd = os.open(ctx.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # FIFO: no hang
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "W4A4 file not found", ctx.path) from None
        except OSError as e:
            raise ctx.error(f"cannot be opened ({e.strerror or e})", hint=_HINT_RECREATE) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ctx.error("is not a regular file (a FIFO, device or folder?)",
                                hint="put the W4A4 .safetensors file itself in the folder")
        except BaseException:
            os.close(fd)
            raise
        self.stat = st
        self.fh = os.fdopen(fd, "rb", buffering=0)
        try:
            self._parse(st.st_size)
        except BaseException:
            self.fh.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def replaced(self) -> bool:
        """Whether the path now names another file than the one we read (replaced meanwhile)."""
        try:
            now = os.stat(self.ctx.path)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (self.stat.st_dev, self.stat.st_ino)

    def _bad(self, problem: str, hint: str = f"the file is truncated or corrupt; {_HINT_RECREATE}"):
        return self.ctx.error(f"cannot be read as safetensors: {problem}", hint=hint)

    def _read_exact(self, offset: int, n: int, out=None) -> memoryview:
        buf = memoryview(bytearray(n) if out is None else out).cast("B")
        self.fh.seek(offset)
        got = 0
        while got < n:
            k = self.fh.readinto(buf[got:])
            if not k:
                raise self._bad(f"ends at byte {offset + got}, {n - got} bytes before its data does "
                                f"(it shrank while being read?)")
            got += k
        return buf

    def _parse(self, size: int) -> None:
        if size < 8:
            raise self._bad(f"is {size} bytes long, too short for a safetensors file")
        (n,) = struct.unpack("<Q", bytes(self._read_exact(0, 8)))
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise self._bad(f"header claims {n} bytes, but the file has {size - 8} after the length field"
                            + (f" and safetensors allows at most {MAX_HEADER_BYTES}" if n > MAX_HEADER_BYTES else ""))
        try:
            header = json.loads(bytes(self._read_exact(8, n)).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._bad(f"header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise self._bad(f"header is a JSON {type(header).__name__}, expected an object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not (isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in meta.items())):
            raise self._bad("header __metadata__ is not an object of strings")
        self.meta: dict[str, str] | None = meta
        self.data_start, data_size = 8 + n, size - 8 - n
        self.specs: dict[str, TensorSpec] = {}
        for key, entry in header.items():
            self.specs[key] = self._spec(key, entry)
        end = 0
        for key, spec in sorted(self.specs.items(), key=lambda kv: (kv[1].begin, kv[1].nbytes)):
            if spec.begin != end:
                raise self._bad(f"tensor {key!r} starts at data byte {spec.begin}, expected {end} "
                                f"(tensors overlap or leave a gap)")
            end += spec.nbytes
        if end != data_size:
            raise self._bad(f"the header declares {end} bytes of tensor data, the file holds {data_size}")

    def _spec(self, key: str, entry) -> TensorSpec:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(entry, dict):
            raise self._bad(f"tensor {key!r}: header entry is a {type(entry).__name__}, expected an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise self._bad(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(is_int(d) for d in shape):
            raise self._bad(f"tensor {key!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
            raise self._bad(f"tensor {key!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._bad(f"tensor {key!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                            f"its {dtype} shape {shape} needs {nbytes}")
        return TensorSpec(dtype, tuple(shape), offsets[0], nbytes)

    def keys(self) -> list[str]:
        return list(self.specs)

    def metadata(self) -> dict[str, str] | None:
        return self.meta

    def get_tensor(self, key: str) -> torch.Tensor:
        spec = self.specs[key]
        raw = torch.empty(spec.nbytes, dtype=torch.uint8)
        if spec.nbytes:
            self._read_exact(self.data_start + spec.begin, spec.nbytes, raw.numpy())
        return raw.view(_ST_DTYPES[spec.dtype]).reshape(spec.shape)  # safetensors stores little-endian


def _open(ctx: _Ctx) -> _File:
    _check_suffix(ctx)
    return _File(ctx)


def _layer_specs(ctx: _Ctx, f: _File, entries: dict, num_bins: int) -> dict[str, dict]:
    """Check every layer's tensors from the safetensors header alone (no data read). layer -> field -> spec."""
    by_layer: dict[str, dict] = {name: {} for name in entries}
    for key, spec in f.specs.items():
        layer, _, field = key.rpartition(".")
        if layer in by_layer and field in FIELDS:
            by_layer[layer][field] = (spec.dtype, spec.shape)
    for name, entry in entries.items():
        _check_entry(ctx, name, entry)
        _check_specs(ctx, name, entry, by_layer[name], num_bins)
    return by_layer


def _check_rest(ctx: _Ctx, others: list[str], entries: dict, rest_crc: dict | None) -> None:
    """The tensors that are no W4A4 layer's must be exactly the header's ``rest`` (a state: none)."""
    def owner(key):
        layer = key.rpartition(".")[0]
        return layer if layer in entries else None

    if rest_crc is None:
        if others:
            more = f" (and {len(others) - 1} more)" if others[1:] else ""
            raise ctx.error(f"unexpected tensor {others[0]!r}{more}", owner(others[0]),
                            "a state holds only the W4A4 layers its header lists; is this a checkpoint?")
        return
    missing, extra = sorted(set(rest_crc) - set(others)), sorted(set(others) - set(rest_crc))
    if missing or extra:
        raise ctx.error(f"non-quantized tensors disagree with the header: missing {missing[:5]}, undeclared "
                        f"{extra[:5]}", owner((missing or extra)[0]), _HINT_RECREATE)
    for key in others:
        if owner(key) is not None and key.endswith(".weight"):
            raise ctx.error(f"holds both W4A4 tensors and the float weight {key!r}", owner(key), _HINT_RECREATE)


def _read_rest(ctx: _Ctx, f: _File, others: list[str], entries: dict, rest_crc: dict | None, verify: bool) -> dict:
    """The non-quantized tensors of a checkpoint (checked by ``_check_rest`` first)."""
    rest = {}
    for key in others:
        owner = key.rpartition(".")[0] if key.rpartition(".")[0] in entries else None
        rest[key] = f.get_tensor(key)
        if verify and _crc32(rest[key]) != rest_crc[key]:
            raise W4A4CorruptTensorError(ctx.path, f"tensor {key!r} is corrupt (CRC32 mismatch)", owner, _HINT_RECREATE)
        if rest[key].is_floating_point() and not bool(torch.isfinite(rest[key].float()).all()):  # fp8 too
            # a NaN norm or embedding gives NaN videos without another word
            raise ctx.error(f"tensor {key!r} has non-finite values (NaN or inf)", owner, _HINT_RECREATE)
    return rest


def _read_layer(ctx: _Ctx, f: _File, name: str, entry: dict, fields, meta: StateMeta, verify: bool) -> nm.W4A4Params:
    t = {field: f.get_tensor(f"{name}.{field}") for field in fields}
    if verify:
        crcs = entry.get("crc32")
        if not isinstance(crcs, dict) or set(crcs) != set(t):
            raise ctx.error("header lacks the CRC32 of every tensor", name, _HINT_RECREATE)
        for field, v in t.items():
            if _crc32(v) != crcs[field]:
                raise W4A4CorruptTensorError(ctx.path, f"tensor {name}.{field} is corrupt (CRC32 mismatch)", name,
                                             _HINT_RECREATE)
    _check_values(ctx, name, t, meta.clip_policy)
    return nm.W4A4Params(**t, act_unsigned=entry["act_unsigned"], act_shift=float(entry["act_shift"]))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Everything a file's header says, checked, before any tensor data is read."""

    meta: StateMeta
    entries: dict
    by_layer: dict  # layer -> field -> (dtype, shape)
    others: list    # the non-quantized tensors (checkpoints)
    rest_crc: dict | None


def _check_layout(ctx: _Ctx, f: _File, kind: str, verify: bool) -> _Layout:
    header = f.metadata()
    meta, entries, rest_crc = _parse_header(ctx, header, kind)
    by_layer = _layer_specs(ctx, f, entries, meta.num_bins)
    # after the structural checks, whose messages are more precise; before any data is trusted
    if verify and header.get("header_crc32") != _header_crc32(header):
        raise ctx.error("header is corrupt (header_crc32 mismatch)", hint=_HINT_RECREATE)
    claimed = {f"{name}.{field}" for name, specs in by_layer.items() for field in specs}
    others = sorted(set(f.keys()) - claimed)
    _check_rest(ctx, others, entries, rest_crc)
    return _Layout(meta, entries, by_layer, others, rest_crc)


def _read_once(ctx: _Ctx, f: _File, kind: str, verify: bool):
    lay = _check_layout(ctx, f, kind, verify)
    rest = _read_rest(ctx, f, lay.others, lay.entries, lay.rest_crc, verify)
    layers = {name: _read_layer(ctx, f, name, entry, lay.by_layer[name], lay.meta, verify)
              for name, entry in lay.entries.items()}
    return layers, rest, lay.meta


def _read(path, kind: str, device, verify: bool):
    ctx = _Ctx(path)
    for attempt in (1, 2):
        with _open(ctx) as f:
            try:
                layers, rest, meta = _read_once(ctx, f, kind, verify)
                break
            except W4A4CorruptTensorError:
                # One handle cannot mix two files, but a writer that rewrites in place can change the bytes
                # under it. When the path now names another file, that file was replaced: read the new one.
                if attempt == 2 or not f.replaced():
                    raise
                log.info("%s changed while being read; reading it again", ctx.path)
    if torch.device(device) != torch.device("cpu"):
        layers = {name: p.to(device) for name, p in layers.items()}
        rest = {key: v.to(device) for key, v in rest.items()}
    log.info("read %s: %d W4A4 layers, expert %r, %d bins", ctx.path, len(layers), meta.expert, meta.num_bins)
    return layers, rest, meta


def load_state(path, device="cpu", *, verify: bool = True) -> tuple[dict[str, nm.W4A4Params], StateMeta]:
    """Read and validate a state. ``verify`` checks the CRC32 of every tensor (about 4 GB/s on one core)."""
    layers, _, meta = _read(path, "state", device, verify)
    return layers, meta


def load_checkpoint(path, device="cpu", *, verify: bool = True):
    """Read and validate a checkpoint: (layers, rest tensors by original key, meta)."""
    return _read(path, "checkpoint", device, verify)


def read_meta(path, kind: str = "state") -> StateMeta:
    """The validated file-level metadata, without reading tensors (e.g. to list states in a node)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ctx = _Ctx(path)
    with _open(ctx) as f:
        return _parse_header(ctx, f.metadata(), kind)[0]


def read_header(path) -> dict[str, str]:
    """The safetensors ``__metadata__`` of ``path`` ({} if none) after the structural checks of the
    whole safetensors header; no W4A4 checks, no tensor data read (e.g. to tell the kinds apart)."""
    ctx = _Ctx(path)
    with _open(ctx) as f:
        return dict(f.metadata() or {})


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A W4A4 layer's size as its file's header declares it (what ``check_state_fits`` compares)."""

    out_features: int
    in_features: int
    rank: int


@contextlib.contextmanager
def _checked(path, kind: str):
    """(ctx, open file, layout) of ``path`` after every header check a load makes, before any data."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    ctx = _Ctx(path)
    with _open(ctx) as f:
        yield ctx, f, _check_layout(ctx, f, kind, verify=True)


def read_layout(path, kind: str = "state") -> tuple[StateMeta, dict[str, LayerShape]]:
    """(meta, layer -> LayerShape) from the header alone, after every check a load makes before reading
    data: so that a file is held against the model before gigabytes of it are read."""
    with _checked(path, kind) as (_, _f, lay):
        pass
    shapes = {}
    for name, e in lay.entries.items():
        shapes[name] = LayerShape(e["out_features"], e["in_features"], e["rank"])
    return lay.meta, shapes


def read_clips(path, kind: str = "state") -> tuple[StateMeta, dict[str, torch.Tensor]]:
    """(meta, layer -> clip table [num_bins]) reading only the small clip tensors (for Inspect)."""
    with _checked(path, kind) as (ctx, f, lay):
        clips = {}
        for name, entry in lay.entries.items():
            c = f.get_tensor(f"{name}.clip")
            crcs = entry.get("crc32")
            if not isinstance(crcs, dict) or crcs.get("clip") != _crc32(c):
                raise ctx.error(f"tensor {name}.clip is corrupt (CRC32 mismatch or missing)", name, _HINT_RECREATE)
            if not bool((torch.isfinite(c) & (c > 0) & (c <= 1)).all()):
                raise ctx.error(f"clip has values outside (0, 1]: {c.tolist()}", name, _HINT_RECREATE)
            clips[name] = c
    return lay.meta, clips


# ---------------------------------------------------------------------------------------------
# Source-model fingerprint
# ---------------------------------------------------------------------------------------------

_FP_CHUNKS, _FP_CHUNK = 8, 32  # 256 values per layer, in 8 runs: a few pages of a memory-mapped file


FINGERPRINT_V2 = "v2-"  # prefix of today's fingerprints; a bare 16-hex fingerprint is version 1


def model_fingerprint(weights: Mapping[str, torch.Tensor], layers: Iterable[str], version: int = 2) -> str:
    """A short stable hash of the source model: names, shapes and a deterministic sample of values.

    ``weights`` maps state-dict keys to the BF16 weights (``<layer>.weight``), or to objects with ``shape``
    and ``runs(starts, length)`` -> the values of those flat runs, concatenated (an fp8_scaled file's
    weights, dequantized where read: ``calibration.capture.SampledWeight``); only 256 values per
    layer are read (8 evenly spaced runs of 32), so a memory-mapped or GPU-resident 14B model costs
    milliseconds. Two experts of one model share names and shapes but not values, so their
    fingerprints differ.

    Version 2 (``"v2-"`` + 16 hex digits) hashes each value as bf16(fp16(x)): the same for a BF16
    weight and for the fp16 or fp32 copy ComfyUI may hold of it (it runs Wan in fp16 where the GPU
    prefers that, and fp16 rounds BF16 values below 2^-14). Version 1 (16 hex digits, older states)
    hashed bf16(x), which an fp16 copy does not always reproduce.
    """
    if version not in (1, 2):
        raise ValueError(f"model_fingerprint: unknown version {version}")
    h = hashlib.sha256(f"wan-w4a4 fingerprint v{version}\0".encode())
    for name in sorted(set(layers)):
        key = f"{name}.weight"
        if key not in weights:
            raise KeyError(f"model_fingerprint: the model has no {key!r}; is it a Wan2.2 model with this layer?")
        w = weights[key]
        n = math.prod(w.shape)
        if n <= _FP_CHUNKS * _FP_CHUNK:
            starts, length = [0], n
        else:
            starts, length = [i * (n - _FP_CHUNK) // (_FP_CHUNKS - 1) for i in range(_FP_CHUNKS)], _FP_CHUNK
        if isinstance(w, torch.Tensor):
            flat = w.detach().reshape(-1)
            sample = torch.cat([flat[s:s + length] for s in starts])
        else:  # a weight that makes only the values read (an fp8_scaled layer dequantized: capture.SampledWeight)
            sample = w.runs(starts, length)
        if version == 2:
            sample = sample.float().to(torch.float16)
        sample = sample.to(torch.bfloat16).cpu().view(torch.int16).numpy().astype("<i2")
        h.update(f"{name}|{tuple(w.shape)}|".encode())
        h.update(sample.tobytes())
    digest = h.hexdigest()[:16]
    return FINGERPRINT_V2 + digest if version == 2 else digest


def fingerprint_version(fingerprint: str) -> int:
    """The version of a stored fingerprint (see ``model_fingerprint``)."""
    return 2 if fingerprint.startswith(FINGERPRINT_V2) else 1


def model_fingerprint_like(fingerprint: str, weights: Mapping[str, torch.Tensor], layers: Iterable[str]) -> str:
    """The model's fingerprint in the version of a stored one, to compare the two."""
    return model_fingerprint(weights, layers, version=fingerprint_version(fingerprint))
