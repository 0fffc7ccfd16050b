"""Capture of layer-input statistics during real two-expert Wan2.2 I2V sampling in ComfyUI.

The models are ComfyUI MODELs (``ModelPatcher``); sampling goes through ComfyUI's own
``comfy.sample.sample`` exactly as two chained ``KSamplerAdvanced`` nodes do in the stock Wan2.2
I2V workflow: the high-noise expert from step 0 to the switch step (returning leftover noise),
the low-noise expert from there to the end (adding no noise). The switch step is
``config.handover_step`` when set (the workflow's own hand-over), else the first step whose model
timestep t = model_sampling.timestep(sigma) is below ``config.boundary`` (:func:`handover`).

Hooks exist only while our own sampling call runs: a keyed APPLY_MODEL wrapper on a clone of the
MODEL reads t of each call, picks the timestep bin, registers forward pre-hooks on the Linears and
removes them in a ``finally`` when the call returns (or raises). cond and uncond are one batch with
one timestep, so both count.

Per *input group* (Linears that read the same tensor share one set of statistics):
``self_attn.{q,k,v}`` read the same x, ``cross_attn.{k,v}`` the same text context (ComfyUI's
``WanSelfAttention`` / ``WanT2VCrossAttention``); every other Linear is its own group. The hook sits
on the first Linear of a group. Each group keeps (calibration/hessian.py):
  - InputStats: the Hessian sum x x^T, sum x, per-channel min / max, count (on ``stats_device``);
  - one RowReservoir per timestep bin (host memory, bf16) for the alpha and clip searches.
With ``token_fraction < 1`` the Hessian and the reservoirs see a seeded random subset of each call's
tokens, while min / max (smoothing) still see every token. Those draws (and the reservoirs' keys) are
seeded per calibration item (:meth:`GroupStats.begin_item`), so the rows picked from an item do not
depend on the items sampled before it: items split over several processes (calibration/distributed.py)
pick the rows one process picks.

``blocks_per_pass`` bounds memory: sampling is re-run once per subset of blocks (see
:func:`block_passes`); the high expert's final latents (the low expert's start) are cached from
the first pass, so each pass samples one expert only, and the passes after the first replay its
model outputs, computing each call only up to their last block (:class:`ExpertCapture`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from ..kernels import numerics
from .config import BLOCK_LINEARS, UNSIGNED_LINEARS, CalibrationConfig, bin_of
from .hessian import InputStats, RowReservoir

log = logging.getLogger(__name__)

WRAPPER_KEY = "wan_w4a4.calibration"
# Linears of a block that read the same tensor (ComfyUI comfy/ldm/wan/model.py): one statistic each.
INPUT_GROUP = {"self_attn.q": "self_attn.qkv", "self_attn.k": "self_attn.qkv", "self_attn.v": "self_attn.qkv",
               "cross_attn.k": "cross_attn.kv", "cross_attn.v": "cross_attn.kv"}


class CalibrationError(ValueError):
    """Bad calibration input (no items, a model that is not Wan, NaN activations, ...)."""


class CalibrationCancelled(RuntimeError):
    """Raised when the cancel callable asks to stop; no state file is written."""


# ---------------------------------------------------------------------------------------------
# Calibration items
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class CalibrationItem:
    """One I2V sample: what ``WanImageToVideo`` produces, plus the noise seed.

    positive / negative: ComfyUI CONDITIONING (``[[context, {"concat_latent_image": ...,
    "concat_mask": ...}]]``); latent: the empty video latent [B, 16, T, H/8, W/8] (the "samples" of
    its LATENT output); seed: the noise seed of the high-noise KSamplerAdvanced.
    """

    positive: list
    negative: list
    latent: torch.Tensor
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.latent, dict):
            self.latent = self.latent["samples"]
        if not isinstance(self.latent, torch.Tensor) or self.latent.ndim != 5:
            raise CalibrationError("CalibrationItem.latent must be a video latent [B, C, T, H, W], got "
                                   f"{getattr(self.latent, 'shape', type(self.latent).__name__)}")
        for what, cond in (("positive", self.positive), ("negative", self.negative)):
            if not isinstance(cond, (list, tuple)) or not cond:
                raise CalibrationError(f"CalibrationItem.{what} must be a non-empty CONDITIONING list")


def synthetic_items(n: int, *, frames: int = 5, height: int = 64, width: int = 64, text_tokens: int = 32,
                    text_dim: int = 4096, latent_channels: int = 16, seed: int = 0) -> list[CalibrationItem]:
    """``n`` random I2V items: N(0, 1) text context and start-image latent, the first latent frame
    marked as given (as WanImageToVideo does for one start image). For smoke tests and for timing
    at real shapes; real calibration should use real images and prompts."""
    if n < 1:
        raise CalibrationError(f"synthetic_items: n must be >= 1, got {n}")
    t = (frames - 1) // 4 + 1
    h, w = height // 8, width // 8
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        image = torch.randn(1, latent_channels, t, h, w, generator=g)
        mask = torch.ones(1, 1, t, h, w)
        mask[:, :, :1] = 0.0
        extra = {"concat_latent_image": image, "concat_mask": mask}
        pos = [[torch.randn(1, text_tokens, text_dim, generator=g), dict(extra)]]
        neg = [[torch.randn(1, text_tokens, text_dim, generator=g), dict(extra)]]
        items.append(CalibrationItem(pos, neg, torch.zeros(1, latent_channels, t, h, w), seed=seed + i))
    return items


# ---------------------------------------------------------------------------------------------
# The model: checks and the quantized layers
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LayerSpec:
    name: str  # relative to the diffusion model, e.g. "blocks.3.self_attn.q"
    block: int
    group: str  # input group, e.g. "blocks.3.self_attn.qkv"
    in_features: int
    out_features: int
    unsigned: bool  # post-GELU input on the unsigned grid


def diffusion_model(model, what: str = "model") -> torch.nn.Module:
    """The WanModel inside a ComfyUI MODEL, or a CalibrationError that says what it is instead."""
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if inner is None:
        raise CalibrationError(f"{what} is not a ComfyUI MODEL (got {type(model).__name__}); "
                               "pass the output of UNETLoader / comfy.sd.load_diffusion_model")
    blocks = getattr(inner, "blocks", None)
    ok = (type(inner).__name__ == "WanModel" or hasattr(inner, "head") and hasattr(inner, "text_embedding"))
    if not ok or blocks is None or len(blocks) == 0:
        raise CalibrationError(f"{what} is not a Wan model: its diffusion model is "
                               f"{type(inner).__module__}.{type(inner).__name__}; W4A4 calibration "
                               "supports Wan2.1/2.2 transformers (comfy.ldm.wan.model.WanModel)")
    for name in BLOCK_LINEARS:
        mod = bf16_module(model, f"blocks.0.{name}")
        if not is_linear(mod):
            raise CalibrationError(f"{what} is not a Wan model: blocks.0.{name} is "
                                   f"{type(mod).__name__}, expected a Linear")
    return inner


def is_linear(mod) -> bool:
    """A Linear layer, also ComfyUI 0.33's quantized ones (``comfy.ops.mixed_precision_ops``), which are
    not ``torch.nn.Linear`` subclasses but have its attributes and a 2-D weight."""
    if isinstance(mod, torch.nn.Linear):
        return True
    w = getattr(mod, "weight", None)
    return (isinstance(mod, torch.nn.Module) and isinstance(w, torch.Tensor) and w.ndim == 2
            and all(isinstance(getattr(mod, a, None), int) for a in ("in_features", "out_features")))


PREFIX = "diffusion_model."  # of the keys of a ModelPatcher's object and weight patches


def bf16_module(model, name: str) -> torch.nn.Module | None:
    """Module ``name`` (e.g. "blocks.3.self_attn.q") of this MODEL, not another clone's stand-in for it.

    Clones share one model: while another clone is loaded (an Apply W4A4 clone after its workflow
    ran), its object patches - W4A4 layers - sit in the shared module tree, the originals in
    ``object_patches_backup`` (nodes/apply.py ``w4a4_layers``). ``ModelPatcher.get_model_object``
    looks there, and ComfyUI puts those originals back in the tree when it loads a clone without
    such patches (``unpatch_model``), as the calibration's sampling clones are: hooks on them fire."""
    get = getattr(model, "get_model_object", None)
    if get is None:  # not a ModelPatcher (diffusion_model says what it is)
        return _get(model.model.diffusion_model, name)
    try:
        return get(PREFIX + name)
    except AttributeError:
        return None


def _get(root: torch.nn.Module, name: str):
    mod = root
    for part in name.split("."):
        mod = getattr(mod, part, None) if not part.isdigit() else (mod[int(part)] if mod is not None else None)
        if mod is None:
            return None
    return mod


def layer_spec(block: int, name: str, in_features: int, out_features: int, config: CalibrationConfig) -> LayerSpec:
    """The LayerSpec of block Linear ``name`` (one of BLOCK_LINEARS) of block ``block``: its input group
    and its grid."""
    return LayerSpec(f"blocks.{block}.{name}", block, f"blocks.{block}.{INPUT_GROUP.get(name, name)}", in_features,
                     out_features, config.unsigned_ffn2 and name in UNSIGNED_LINEARS)


def plan_layers(model, config: CalibrationConfig, what: str = "model") -> list[LayerSpec]:
    """The Linears to quantize, block by block, minus the keep-list; refuses weights calibration cannot
    read (:func:`check_weight_source`)."""
    inner = diffusion_model(model, what)
    specs = []
    for i in range(len(inner.blocks)):
        for name in BLOCK_LINEARS:
            full = f"blocks.{i}.{name}"
            mod = bf16_module(model, full)
            if config.is_kept(full):
                continue
            numerics.check_k(mod.in_features, f"{what} {full}.in_features")
            specs.append(layer_spec(i, name, mod.in_features, mod.out_features, config))
    if not specs:
        log.warning("%s: the keep-list keeps every block Linear in BF16; nothing to quantize", what)
    check_weight_source(model, specs, what)
    return specs


def block_passes(blocks: Sequence[int], blocks_per_pass: int | None) -> list[list[int]]:
    """The capture passes: runs of ``blocks_per_pass`` consecutive blocks, the run over the last blocks
    first. That pass computes whole calls anyway, so run first it records the outputs that every later
    pass replays, each stopping after its own last block (:class:`ExpertCapture`)."""
    blocks = sorted(set(blocks))
    if not blocks_per_pass or blocks_per_pass >= len(blocks):
        return [blocks] if blocks else []
    runs = [blocks[i:i + blocks_per_pass] for i in range(0, len(blocks), blocks_per_pass)]
    return runs[-1:] + runs[:-1]


def unpatched(model, key: str, current: torch.Tensor) -> torch.Tensor:
    """The tensor ``key`` (a ModelPatcher key, "diffusion_model.<...>") without weight patches, given the
    one now in the tree: while a clone with weight patches is loaded, the tree holds the patched tensor
    in place and ``backup`` (shared by all clones) the original."""
    bk = getattr(model, "backup", {}).get(key)
    return bk.weight if bk is not None else current


# What a source file's Linear weights are, as ComfyUI holds them (format.SOURCE_KINDS are those a state can
# be calibrated from): a plain float dtype, or fp8 with a per-tensor scale (ComfyUI's "fp8_scaled" files).
FLOAT_KINDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@dataclasses.dataclass(frozen=True)
class StoredWeight:
    """A Linear's weight as ComfyUI stores it.

    kind: "bf16" | "fp16" | "fp32" (plain); "fp8_scaled" (fp8 ``data`` times the float32 ``scale``);
    "fp8" (fp8 without a scale: a BF16/FP16 file loaded with weight_dtype fp8_*); "other" (another
    quantized layout). dtype: the storage dtype's name, e.g. "float8_e4m3fn"."""

    kind: str
    dtype: str
    data: torch.Tensor
    scale: torch.Tensor | None = None


def stored_weight(mod: torch.nn.Module, w: torch.Tensor) -> StoredWeight:
    """How ``w`` (``mod``'s weight, possibly its unpatched original) is stored, detached, by feature:

    - ComfyUI 0.33 loads an fp8_scaled file (``comfy.utils.convert_old_quants``) into a ``QuantizedTensor``
      (comfy-kitchen): fp8 ``_qdata`` and ``params.scale``, a per-tensor float32 scale;
    - ComfyUI 0.3.64 (``comfy.ops.scaled_fp8_ops``) keeps the fp8 weight as a Parameter and the scale in the
      module's ``scale_weight``.
    """
    qdata, params = getattr(w, "_qdata", None), getattr(w, "params", None)
    if isinstance(qdata, torch.Tensor) and params is not None:
        qdata = qdata.detach()  # not the QuantizedTensor: detaching it fails under inference_mode
        scale = getattr(params, "scale", None)
        if qdata.dtype in FP8_DTYPES and isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return StoredWeight("fp8_scaled", _dtype_name(qdata.dtype), qdata, scale)
        layout = getattr(w, "layout_cls", None)
        return StoredWeight("other", getattr(layout, "__name__", type(w).__name__), qdata)
    w = w.detach()
    if w.dtype in FP8_DTYPES:
        scale = getattr(mod, "scale_weight", None)
        if isinstance(scale, torch.Tensor) and scale.numel() == 1:
            return StoredWeight("fp8_scaled", _dtype_name(w.dtype), w, scale)
        return StoredWeight("fp8", _dtype_name(w.dtype), w)
    return StoredWeight(FLOAT_KINDS.get(w.dtype, "other"), _dtype_name(w.dtype), w)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dequantize(sw: StoredWeight) -> torch.Tensor:
    """The weight an fp8_scaled layer stands for, float32(fp8 weight) * scale in float32 (one rounding), on
    the weight's device; a plain weight as it is."""
    if sw.kind != "fp8_scaled":
        return sw.data
    return sw.data.float() * sw.scale.to(sw.data.device, torch.float32)


def stored_layer_weight(model, name: str) -> StoredWeight:
    """:func:`stored_weight` of the Linear ``name`` of this MODEL, without weight patches."""
    mod = bf16_module(model, name)
    return stored_weight(mod, unpatched(model, f"{PREFIX}{name}.weight", mod.weight))


def layer_weight(model, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the Linear ``name`` without weight patches: the weight calibration quantizes
    and fingerprints and nodes/apply.py checks. An fp8_scaled layer's weight is dequantized (float32,
    :func:`dequantize`); a plain one is returned as ComfyUI holds it (bf16, fp16 or fp32). The
    calibration refuses experts whose quantized layers carry patches (:func:`check_no_weight_patches`)."""
    mod = bf16_module(model, name)
    w = dequantize(stored_layer_weight(model, name))
    return w, None if mod.bias is None else mod.bias.detach()


class SampledWeight:
    """An fp8_scaled weight that dequantizes only the values read: ``format.model_fingerprint`` reads 256 of
    each layer, and dequantizing every Linear of an fp8_scaled 14B expert would make 56 GB of float32.
    ``runs`` gives exactly the values of :func:`dequantize` at those places."""

    def __init__(self, sw: StoredWeight):
        self.sw, self.shape = sw, tuple(sw.data.shape)

    def runs(self, starts: Sequence[int], length: int) -> torch.Tensor:
        flat = self.sw.data.reshape(-1)
        return dequantize(dataclasses.replace(self.sw, data=torch.cat([flat[s:s + length] for s in starts])))


class FingerprintWeights(Mapping):
    """"<layer>.weight" -> the weight of :func:`layer_weight` of ``names``, made when read, for
    ``format.model_fingerprint``: plain weights as they are, fp8_scaled ones as :class:`SampledWeight`."""

    def __init__(self, model, names: Iterable[str]):
        self.model = model
        self._names = {f"{n}.weight": n for n in names}

    def __getitem__(self, key: str):
        sw = stored_layer_weight(self.model, self._names[key])
        return SampledWeight(sw) if sw.kind == "fp8_scaled" else sw.data

    def __contains__(self, key) -> bool:  # without reading the weight
        return key in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def weight_source(model, names: Iterable[str]) -> tuple[dict, str | None]:
    """(source, a layer of that kind) of the Linears ``names``: ``{"kind", "weight_dtype"}`` as a state
    records it (``format.StateMeta.source``). An expert with any fp8_scaled layer is fp8_scaled (such files
    may keep some Linears in BF16); fp8 without scales and other layouts take precedence, since
    calibration refuses them (:func:`check_weight_source`). ({}, None) for no layer."""
    first: dict[str, tuple[StoredWeight, str]] = {}
    for name in names:
        sw = stored_layer_weight(model, name)
        first.setdefault(sw.kind, (sw, name))
    for kind in ("other", "fp8", "fp8_scaled", *FLOAT_KINDS.values()):
        if kind in first:
            sw, name = first[kind]
            return {"kind": kind, "weight_dtype": sw.dtype}, name
    return {}, None


def _check_quantized_tensors_sampleable(model, specs: Sequence[LayerSpec], what: str) -> None:
    """ComfyUI 0.33 holds fp8_scaled layers as QuantizedTensors; when it loads them for sampling under
    torch.inference_mode (calibration samples in it, as ComfyUI runs every node), ``comfy.ops``
    ``_quantized_apply`` re-wraps each as a Parameter, which fails ("Cannot set version_counter for
    inference tensor") for one made outside inference mode. ComfyUI's UNETLoader runs in inference mode;
    a model loaded in plain Python may not have: refuse it here, before any work, saying how to load it."""
    for s in specs:
        w = bf16_module(model, s.name).weight
        if isinstance(getattr(w, "_qdata", None), torch.Tensor) and not w.is_inference():
            raise CalibrationError(
                f"{what} was loaded outside torch.inference_mode(): ComfyUI holds its fp8_scaled layers "
                f"(e.g. {s.name}) as quantized tensors that it cannot load for sampling under inference mode, "
                "where calibration samples. Load it inside `with torch.inference_mode():` (ComfyUI's UNETLoader "
                "node does), or calibrate from the BF16/FP16 file")


def check_weight_source(model, specs: Sequence[LayerSpec], what: str = "model") -> dict:
    """The source of the layers to quantize (:func:`weight_source`), or a CalibrationError before any work
    when W4A4 cannot be calibrated from it: fp8 weights without scales (rounded from a BF16/FP16 file at
    load) are not the weights of any file a state could be checked against, and other quantized
    layouts are not dequantized here."""
    source, name = weight_source(model, [s.name for s in specs])
    kind = source.get("kind")
    if kind == "fp8_scaled":
        _check_quantized_tensors_sampleable(model, specs, what)
    if kind == "fp8":
        raise CalibrationError(
            f"{what} holds its weights in {source['weight_dtype']} without scales (e.g. {name}): a BF16/FP16 "
            "file loaded with an fp8 weight_dtype. W4A4 states are calibrated from BF16/FP16 experts or from "
            "ComfyUI's fp8_scaled files; load the expert with weight_dtype 'default'")
    if kind == "other":
        raise CalibrationError(
            f"{what} holds {name} in a quantized layout ({source['weight_dtype']}) that calibration does not "
            "read; calibrate from the BF16/FP16 expert or ComfyUI's fp8_scaled file")
    return source


def weight_patches_on(model, specs: Iterable[LayerSpec]) -> list[str]:
    """Keys of ``model``'s weight patches (a LoRA, ...) on the Linears ``specs``, sorted."""
    names = {s.name for s in specs}
    return sorted(k for k, v in getattr(model, "patches", {}).items()
                  if v and k.startswith(PREFIX) and k[len(PREFIX):].rpartition(".")[0] in names)


def check_no_weight_patches(model, specs: Sequence[LayerSpec], what: str = "model") -> None:
    """Refuse, before any work, an expert whose layers to quantize carry weight patches: a state holds
    the quantized plain weights and is checked against them (nodes/apply.py fingerprints the
    unpatched weights), so a LoRA before Calibrate would be neither in the state nor accepted by it."""
    keys = weight_patches_on(model, specs)
    if keys:
        raise CalibrationError(
            f"{what} carries weight patches (a LoRA?) on {len(keys)} weights of the layers to quantize, "
            f"e.g. {keys[0]}; W4A4 states are calibrated on the plain expert (BF16/FP16 or fp8_scaled). "
            "Connect the Calibrate node straight to UNETLoader and add the LoRA after 'Apply W4A4 state' "
            "(LoRAs on W4A4 layers are folded into them exactly), or keep those layers in BF16 (keep)")


# ---------------------------------------------------------------------------------------------
# Statistics of one input group
# ---------------------------------------------------------------------------------------------

def _seed(*parts) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


class GroupStats:
    """Statistics of one layer input of one expert (see module doc)."""

    def __init__(self, key: str, k: int, config: CalibrationConfig, expert: str, device):
        self.key, self.k, self.expert, self.seed = key, k, expert, config.seed
        self.fraction = config.token_fraction
        self.stats = InputStats(k, device=device, hessian=True)
        # min / max over every token even when the Hessian sees a subset
        self.range = InputStats(k, device=device, hessian=False) if self.fraction < 1.0 else None
        self.reservoirs = [RowReservoir(k, config.rows_per_bin, _seed(config.seed, expert, key, b))
                           for b in range(config.bins)]
        self.gen = torch.Generator().manual_seed(_seed(config.seed, expert, key, "tokens"))
        self.calls = [0] * config.bins

    def begin_item(self, item: int) -> None:
        """Seed the draws of calibration item ``item`` (token subset, reservoir keys) from its index."""
        self.gen.manual_seed(_seed(self.seed, self.expert, self.key, "tokens", "item", item))
        for b, r in enumerate(self.reservoirs):
            r.reseed(_seed(self.seed, self.expert, self.key, b, "item", item))

    def observe(self, x: torch.Tensor, b: int) -> None:
        x2 = x.detach().reshape(-1, self.k)
        if self.range is not None:
            self.range.update(x2)
            n = max(1, math.ceil(self.fraction * x2.shape[0]))
            idx = torch.randperm(x2.shape[0], generator=self.gen)[:n].sort().values
            x2 = x2[idx.to(x2.device)]
        self.stats.update(x2)
        self.reservoirs[b].add(x2)
        self.calls[b] += 1

    @property
    def absmax(self) -> torch.Tensor:
        return (self.range or self.stats).absmax

    @property
    def xmin(self) -> torch.Tensor:
        return (self.range or self.stats).xmin

    def absmax_shifted(self, shift: float) -> torch.Tensor:
        return (self.range or self.stats).absmax_shifted(shift)

    def hessian(self, shift: float = 0.0) -> torch.Tensor:
        return self.stats.hessian(shift)

    def rows(self, b: int) -> torch.Tensor:
        return self.reservoirs[b].rows()

    def merge(self, other: GroupStats) -> GroupStats:
        """Add another capture of the same input (another GPU, another set of items)."""
        self.stats.merge(other.stats)
        if self.range is not None:
            self.range.merge(other.range)
        for mine, theirs in zip(self.reservoirs, other.reservoirs):
            mine.merge(theirs)
        self.calls = [a + c for a, c in zip(self.calls, other.calls)]
        return self


# ---------------------------------------------------------------------------------------------
# Hooks and sampling
# ---------------------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised after the last block a replaying pass observes: the rest of the call is not computed."""


def _stop_forward(module, args, output):
    raise _StopForward


class ExpertCapture:
    """Hooks one expert's Linears (of ``blocks``) during sampling and accumulates GroupStats.

    ``replay``: the model outputs of this expert's calls, ``{(item, call): tensor on the host}``, shared by
    the passes of one expert. A call whose output is not in it runs every block and is recorded; a call
    whose output is there runs only up to the last of ``blocks`` (what the hooks observe) and returns the
    recorded output. The sampler then takes the same steps as in the full pass, and the blocks observed
    see the same inputs, so the statistics are those of full calls: a pass over blocks 0..5 of 40 runs
    6 blocks a call instead of 40.
    """

    def __init__(self, model, expert: str, layers: Iterable[LayerSpec], config: CalibrationConfig,
                 blocks: Iterable[int] | None = None, stats_device=None, edges: Sequence[float] | None = None,
                 replay: dict | None = None):
        self.expert, self.config = expert, config
        self.edges = tuple(edges) if edges is not None else config.edges(expert)
        blocks = None if blocks is None else set(blocks)
        self.layers = [s for s in layers if blocks is None or s.block in blocks]
        net = diffusion_model(model, f"the {expert}-noise model")
        self.replay = replay
        all_blocks = getattr(net, "blocks", None)
        last = max((s.block for s in self.layers), default=None)
        # the module after which a replayed call stops (None: every call runs to the end)
        self._stop_module = (all_blocks[last] if replay is not None and all_blocks is not None
                             and last is not None and last < len(all_blocks) - 1 else None)
        device = stats_device or config.stats_device or model.load_device
        self.groups: dict[str, GroupStats] = {}
        self._hook_modules: dict[str, torch.nn.Module] = {}
        for s in self.layers:
            if s.group not in self.groups:
                self.groups[s.group] = GroupStats(s.group, s.in_features, config, expert, device)
                self._hook_modules[s.group] = bf16_module(model, s.name)
        # model timestep of every model call, per calibration item (its index in the run's items), in order
        self.item_timesteps: dict[int, list[float]] = {}
        self._item = 0
        self._bin: int | None = None

    @property
    def timesteps(self) -> list[float]:
        """Model timestep of every model call, in item order."""
        return [t for i in sorted(self.item_timesteps) for t in self.item_timesteps[i]]

    def begin_item(self, item: int) -> None:
        """Calibration item ``item`` (its index in the run's items) is sampled next: its draws are seeded
        from that index (:meth:`GroupStats.begin_item`)."""
        self._item = item
        for g in self.groups.values():
            g.begin_item(item)

    def bin_label(self, b: int) -> str:
        return f"{self.expert} expert, bin {b}: t in [{self.edges[b + 1]:g}, {self.edges[b]:g})"

    def _hook(self, group: str):
        def pre_hook(module, args):
            if self._bin is None or not args:
                return
            try:
                self.groups[group].observe(args[0], self._bin)
            except ValueError as e:
                raise CalibrationError(f"non-finite activations at the input of {group} "
                                       f"({self.bin_label(self._bin)}): {e}") from None
        return pre_hook

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                            transformer_options=None, **kwargs):
        ms = executor.class_obj.model_sampling
        ts = ms.timestep(t.float()).flatten()
        tt = float(ts[0])
        if ts.numel() > 1 and float(ts.max() - ts.min()) > 1e-3:
            log.warning("one model call with several timesteps (%s); binning by the first", ts.tolist())
        calls = self.item_timesteps.setdefault(self._item, [])
        key = (self._item, len(calls))
        calls.append(tt)
        self._bin = bin_of(tt, self.edges)
        handles = [m.register_forward_pre_hook(self._hook(g)) for g, m in self._hook_modules.items()]
        recorded = self.replay.get(key) if self.replay is not None else None
        if recorded is not None and self._stop_module is not None:
            handles.append(self._stop_module.register_forward_hook(_stop_forward))
        try:
            out = executor(x, t, c_concat, c_crossattn, control,
                           {} if transformer_options is None else transformer_options, **kwargs)
        except _StopForward:
            return recorded.to(x.device, copy=True)
        finally:
            for h in handles:
                h.remove()
            self._bin = None
        if self.replay is not None and recorded is None:
            self.replay[key] = out.detach().to("cpu", copy=True)
        return out

    def bin_rows(self) -> list[int]:
        """Rows seen per bin (by any group; all groups of a block see the same calls)."""
        if not self.groups:
            return [0] * self.config.bins
        g = next(iter(self.groups.values()))
        return [r.seen for r in g.reservoirs]

    def free(self) -> None:
        self.groups.clear()
        self._hook_modules.clear()


def with_shift(model, shift: float | None):
    """A clone with ModelSamplingSD3(shift) applied (what the workflow's ModelSamplingSD3 node does)."""
    m = model.clone()
    if shift is None:
        return m
    import comfy.model_sampling

    class ModelSamplingAdvanced(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    ms = ModelSamplingAdvanced(model.model.model_config)
    ms.set_parameters(shift=shift, multiplier=1000)
    m.add_object_patch("model_sampling", ms)
    return m


def schedule(model, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [steps + 1], model timesteps [steps]) of the sampling schedule of ``model``."""
    import comfy.samplers
    ks = comfy.samplers.KSampler(model, steps=config.steps, device=model.load_device, sampler=config.sampler,
                                 scheduler=config.scheduler, denoise=1.0, model_options=model.model_options)
    sigmas = ks.sigmas.float().cpu()
    ts = model.get_model_object("model_sampling").timestep(sigmas[:-1]).float().cpu()
    return sigmas, ts


def switch_step(timesteps: torch.Tensor, boundary: float) -> int:
    """Number of steps the high-noise expert runs: those with t >= boundary."""
    return int((timesteps >= boundary).sum())


def handover(timesteps: torch.Tensor, config: CalibrationConfig) -> tuple[int, float]:
    """(steps the high-noise expert runs, the model timestep between the two experts' bins).

    ``timesteps``: the model timesteps of every step, from :func:`schedule`. By boundary (no
    ``config.handover_step``): the steps with t >= ``config.boundary``, and that boundary. By step N:
    steps 0..N-1, and the midpoint of the timesteps of steps N-1 and N. Why the midpoint: every
    timestep the high expert runs is then >= it and every one the low expert runs below it (as
    with a boundary, see ``config.bin_of``), with half a step of margin on each side for the float
    rounding of sigma on another device; it is also where ``config.step_edges`` puts inner edges.
    """
    if config.handover_step is None:
        return switch_step(timesteps, config.boundary), config.boundary
    n, ts = config.handover_step, [float(t) for t in timesteps]
    if not 0 < n < len(ts):
        raise CalibrationError(f"hand-over step {n} is outside the schedule's {len(ts)} steps")
    return n, (ts[n - 1] + ts[n]) / 2.0


def sample_expert(model, item: CalibrationItem, latent: torch.Tensor, config: CalibrationConfig, expert: str,
                  switch: int, step_callback: Callable | None = None) -> torch.Tensor:
    """One KSamplerAdvanced call of the two-expert workflow; returns the output latent."""
    import comfy.sample
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    if expert == "high":
        noise = comfy.sample.prepare_noise(latent, item.seed)
        kw = {"disable_noise": False, "start_step": 0, "last_step": switch, "force_full_denoise": False}
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
        kw = {"disable_noise": True, "start_step": switch, "last_step": 10000, "force_full_denoise": True}

    def callback(step, x0, x, total_steps):
        if step_callback is not None:
            step_callback()

    return comfy.sample.sample(model, noise, config.steps, config.cfg, config.sampler, config.scheduler,
                               item.positive, item.negative, latent, denoise=1.0, callback=callback,
                               disable_pbar=True, seed=item.seed, **kw)


def run_capture(model, expert: str, items: Sequence[CalibrationItem], latents: Sequence[torch.Tensor],
                config: CalibrationConfig, capture: ExpertCapture | None, switch: int,
                step_callback: Callable | None = None, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Sample every item (or the items at ``indices``, this process's share) with one expert, with
    ``capture`` hooked for the duration of each call.

    ``model`` is the expert (already shifted, see :func:`with_shift`); ``latents`` its start latents.
    Returns the output latents of the items sampled, in order (for the high expert: the low expert's start).
    """
    indices = range(len(items)) if indices is None else indices
    m = model.clone()
    if capture is not None:
        import comfy.patcher_extension
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                               capture.apply_model_wrapper)
    outs = []
    with torch.inference_mode():
        for i in indices:
            if capture is not None:
                capture.begin_item(i)
            outs.append(sample_expert(m, items[i], latents[i], config, expert, switch, step_callback))
    return outs
