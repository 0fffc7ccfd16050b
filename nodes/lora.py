"""LoRAs on W4A4 layers: ComfyUI's LoRA patches folded exactly into the BF16 low-rank branch.

A W4A4 layer computes (``kernels/numerics.py``), with x^ = (x + shift) / s::

    y = W4A4(x^) + bf16(bf16(x^) @ L1) @ L2 + bias

A LoRA adds dW = c * B @ A to the dense weight (A "down" [r, K], B "up" [N, r], c = strength * alpha / r,
exactly ComfyUI's ``LoRAAdapter``). Since x = x^ * s - shift::

    dW x = (dW diag(s)) x^ - shift * dW 1

so the branch grows by r columns, L1' = [L1 | (c * A diag(s))^T] and L2' = [L2 | B^T], and for the
shifted (unsigned, post-GELU) layers the bias gets - shift * dW 1, computed from the bf16 factors the
branch applies so that the two cancel. The 4-bit weights are untouched; the result equals
W4A4(x) + dW x up to the bf16 rounding of the factors and of the branch's inputs (c goes into the
down factor, which is rounded anyway, so a bf16 LoRA's up factor is kept exactly). Several LoRAs stack
as more columns. Bias patches (the ``diff_b`` of lightx2v LoRAs) are added to the bias in fp32; the layer
holds the sum as its bias, its own bias kept on the host until the LoRA goes (``ops.W4A4Core.set_lora``).

How it reaches the layer: ``LoraLoader``/``LoraLoaderModelOnly`` register their patches on the
ModelPatcher as usual (all key formats ComfyUI maps for Wan). ModelPatcher cannot apply them to a
layer without a dense weight, so a W4A4 model carries two keyed callbacks (``apply.py``):

- ON_LOAD (after every load, with the model's object patches in place): :func:`install_folds` folds the
  loading patcher's patches into each W4A4 layer of the model (cleared where it has none), cached by
  the patcher's ``patches_uuid``. Clones share the layer modules, and ComfyUI reloads when
  ``patches_uuid`` differs, so each load sets the state of the patcher that runs.
- ON_DETACH (``unpatch_all``): :func:`clear_folds`, so unpatching restores the plain quantized layers.

Other patch types on a W4A4 layer (a dense ``diff``, ``set``, LoHa, LoKr, OFT, DoRA, model merging)
cannot be folded exactly: loading stops with an error that names the layer and the patch type. LoRA
factors whose shapes do not fit the layer are skipped with an error log, as ComfyUI does.
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from .. import kernels
from .ops import w4a4_modules

log = logging.getLogger(__name__)

PREFIX = "diffusion_model."


class W4A4LoraError(ValueError):
    """A weight patch on a W4A4 layer that cannot be folded; the message names source, layer and type."""


@dataclasses.dataclass
class LayerFold:
    """What one W4A4 layer gets from its patches."""

    down: torch.Tensor | None  # bf16 [K, r]
    up: torch.Tensor | None  # bf16 [r, N]
    bias: torch.Tensor | None  # fp32 [N]
    loras: int  # LoRA patches folded

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[1]

    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in (self.down, self.up, self.bias) if t is not None)


def patch_type(v) -> str:
    """A readable name for one ModelPatcher patch value (as stored in ``patcher.patches[key]``)."""
    if isinstance(v, list):
        return "nested (model merge)"
    name = getattr(v, "name", None)
    if name is not None and not isinstance(v, tuple):
        if name == "lora" and _lora_parts(v)[4] is not None:
            return "DoRA"
        return {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT",
                "boft": "BOFT"}.get(name, str(name))
    if isinstance(v, tuple):
        return "diff" if len(v) == 1 else str(v[0])
    return type(v).__name__


def _lora_parts(v):
    """(up, down, alpha, mid, dora_scale, reshape) of a ComfyUI LoRAAdapter."""
    return tuple(v.weights)


def _is_lora(v) -> bool:
    # Duck-typed on comfy.weight_adapter.LoRAAdapter (name "lora", weights of 6).
    return getattr(v, "name", None) == "lora" and len(getattr(v, "weights", ())) == 6


def _diff_payload(v):
    """The tensor of a plain ``diff`` patch, or None if ``v`` is another type."""
    if isinstance(v, tuple) and len(v) == 1:
        return v[0]
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "diff":
        return v[1][0]
    return None


def _unsupported(source: str, key: str, what: str, why: str) -> W4A4LoraError:
    return W4A4LoraError(
        f"{source}: cannot apply a {what} weight patch to W4A4 layer {key[len(PREFIX):].rpartition('.')[0]} "
        f"({key}): {why}.\nHint: only LoRA up/down patches (with alpha and strength) and bias diffs fold exactly "
        f"into a 4-bit layer; to use this patch, run this expert in BF16 (without the W4A4 state).")


def _check_plain(source: str, key: str, entry) -> None:
    strength, v, strength_model, offset, function = entry
    if strength_model != 1.0:
        raise _unsupported(source, key, patch_type(v), f"it scales the base weight by {strength_model} "
                           f"(a model-merge patch), which 4-bit weights cannot follow")
    if offset is not None:
        raise _unsupported(source, key, patch_type(v), f"it targets a slice {offset} of the weight")
    if function is not None:
        raise _unsupported(source, key, patch_type(v), "it carries a weight function")


@dataclasses.dataclass
class _Parts:
    """One layer's checked patches, before any tensor math: (c, up, down) per LoRA, scaled bias diffs."""

    loras: list
    biases: list


def _check_layer(module, name: str, weight_patches, bias_patches, source: str) -> _Parts | None:
    """Check one W4A4 layer's patches (raising ``W4A4LoraError`` for any that cannot fold) and pick the
    contributing ones, without computing anything; None when nothing contributes."""
    n, k = module.out_features, module.in_features
    wkey, bkey = f"{PREFIX}{name}.weight", f"{PREFIX}{name}.bias"
    loras, biases = [], []
    for entry in weight_patches:
        _check_plain(source, wkey, entry)
        strength, v = entry[0], entry[1]
        if strength == 0:
            continue  # contributes exactly nothing (ComfyUI's own path adds 0 * dW)
        if not _is_lora(v) or patch_type(v) != "LoRA":
            raise _unsupported(source, wkey, patch_type(v), "there is no dense weight to add it to, and it has no "
                               "exact low-rank form")
        up, down, alpha, mid, dora, reshape = _lora_parts(v)
        if mid is not None or reshape is not None:
            raise _unsupported(source, wkey, "LoCon (mid / reshape)", "a Linear layer has no use for it")
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != n or down.shape[1] != k or up.shape[1] != down.shape[0]:
            # ComfyUI logs "ERROR lora <key> ..." and leaves the weight as it was; do the same.
            log.error("%s: LoRA for %s does not fit the layer (up %s, down %s, layer %dx%d); not applied",
                      source, wkey, tuple(up.shape), tuple(down.shape), n, k)
            continue
        r = down.shape[0]
        loras.append((float(strength) * (float(alpha) / r if alpha is not None else 1.0), up, down))
    for entry in bias_patches:
        _check_plain(source, bkey, entry)
        strength, v = entry[0], entry[1]
        if strength == 0:
            continue
        diff = _diff_payload(v)
        if diff is None:
            raise _unsupported(source, bkey, patch_type(v), "only additive bias diffs are supported on W4A4 layers")
        if tuple(diff.shape) != (n,):
            log.warning("%s: bias diff for %s has shape %s, the layer has %d outputs; not applied",
                        source, bkey, tuple(diff.shape), n)
            continue
        biases.append((float(strength), diff))
    return _Parts(loras, biases) if (loras or biases) else None


def _fold_parts(module, parts: _Parts) -> LayerFold:
    """The fold of checked patches, on the layer's device."""
    dev = module.qweight.device
    s = module.smooth.float()
    bias = None
    for strength, diff in parts.biases:
        d = strength * diff.to(dev, torch.float32)
        bias = d if bias is None else bias + d
    down_t = up_t = None
    if parts.loras:
        # c A diag(s) as [K, r] and B^T as [r, N] (exact for a bf16/fp16 LoRA)
        down_t = torch.cat([(down.to(dev, torch.float32) * (c * s)[None, :]).T for c, _, down in parts.loras],
                           dim=1).to(torch.bfloat16).contiguous()
        up_t = torch.cat([up.to(dev, torch.float32).T for _, up, _ in parts.loras], dim=0).to(torch.bfloat16).contiguous()
        if module.act_shift:
            # The branch sees x^ = (x + shift) / s, so for x = 0 it adds (shift / s) @ L1' @ L2'; cancel
            # that with the factors as rounded (fp64 product, the kernels' inv_s).
            x0 = float(module.act_shift) * torch.reciprocal(s).double()
            corr = -(up_t.double().T @ (down_t.double().T @ x0))
            corr = corr.float()
            bias = corr if bias is None else bias + corr
    return LayerFold(down_t, up_t, bias, len(parts.loras))


def fold_layer(module, name: str, weight_patches, bias_patches, source: str = "W4A4") -> LayerFold | None:
    """The fold of one W4A4 layer's patches (ModelPatcher entries ``(strength, value, strength_model,
    offset, function)`` for ``<layer>.weight`` and ``<layer>.bias``), on the layer's device, or None
    when nothing contributes (no patches, or all of strength 0)."""
    parts = _check_layer(module, name, weight_patches, bias_patches, source)
    return None if parts is None else _fold_parts(module, parts)


def install_folds(patcher, source: str = "W4A4") -> dict[str, LayerFold | None]:
    """Fold ``patcher``'s weight patches into the W4A4 layers now in its model (ON_LOAD), replacing what
    another patcher of the same model left there. Layers already folded for this ``patches_uuid`` are
    kept. Every layer is checked before any is changed. Returns name -> fold for the layers it set."""
    modules = w4a4_modules(patcher.model.diffusion_model)
    tag = patcher.patches_uuid
    # Under ComfyUI's dynamic VRAM the layers' own tensors stay on the host and are streamed per call;
    # the fold is kept where the layer runs (``ops.W4A4Core.set_lora``).
    dynamic = getattr(patcher, "is_dynamic", lambda: False)()
    device = patcher.load_device if dynamic else None
    checked = {}
    for name, m in modules.items():
        if m.lora_tag is not None and m.lora_tag == tag:
            continue
        wp = patcher.patches.get(f"{PREFIX}{name}.weight", [])
        bp = patcher.patches.get(f"{PREFIX}{name}.bias", [])
        checked[name] = _check_layer(m, name, wp, bp, source) if (wp or bp) else None
    # Then fold and install one layer at a time: the device holds at most one layer's fold next to the
    # joined buffers, never a second copy of the whole LoRA while the model loads.
    plan = {}
    for name, parts in checked.items():
        m = modules[name]
        if parts is None:
            m.set_lora(None, None, None, tag)
            plan[name] = None
            continue
        fold = _fold_parts(m, parts)
        m.set_lora(fold.down, fold.up, fold.bias, tag, device=device)
        # The layer copied the factors into its joined branch: the plan keeps views of those.
        fold.down, fold.up = m.lora_down, m.lora_up
        plan[name] = fold
    folded = {n: f for n, f in plan.items() if f is not None}
    if folded:
        log.info("%s: LoRA folded into %d W4A4 layers (%d patches, +%d rank max, %.1f MB)", source, len(folded),
                 sum(f.loras for f in folded.values()), max(f.rank for f in folded.values()),
                 sum(f.nbytes() for f in folded.values()) / 2**20)
        warn_wide(getattr(patcher, "load_device", None), {n: modules[n] for n in folded}, source)
    return plan


def warn_wide(device, modules: dict, source: str) -> list[str]:
    """Warn, once per fold, about layers whose branch (own rank plus the LoRAs') is wider than the Triton kernels take
    on ``device`` (``kernels.widest_rank``): the dispatcher runs them on the slow torch reference. Returns their
    names."""
    widest = kernels.widest_rank(torch.device(device)) if device is not None else None
    if widest is None:
        return []
    wide = {n: m.base_rank + m.lora_rank for n, m in modules.items() if m.base_rank + m.lora_rank > widest}
    if wide:
        name, rank = max(wide.items(), key=lambda item: item[1])
        log.warning("%s: with the LoRA, %d W4A4 layers have a low-rank branch wider than the kernels take on %s "
                    "(at most rank %d; %s has %d), so they run on the slow torch reference. A LoRA of lower rank "
                    "keeps them on the kernels (kernels/README.md, session 30).", source, len(wide), device, widest,
                    name, rank)
    return sorted(wide)


def clear_folds(modules) -> None:
    """Drop the folded LoRAs of W4A4 layers (the plain quantized layers, bit for bit)."""
    for m in modules:
        if m.lora_tag is not None or m.lora_down is not None or m.lora_bias_on:
            m.clear_lora()


def active_lora_rank(modules) -> dict[str, int]:
    """name -> folded LoRA rank, for layers that have one (diagnostics and tests)."""
    return {n: m.lora_rank for n, m in modules.items() if m.lora_rank}
