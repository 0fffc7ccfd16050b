"""W4A4 states on ComfyUI models: validate, apply as ModelPatcher patches, load, save.

- ``apply_w4a4_state(model, layers, meta)``: a clone of ``model`` whose quantized Linears are object
  patches (``add_object_patch("diffusion_model.<layer>", W4A4Linear)``) plus the timestep hook.
  ``model`` itself - and ``model.model``, which every clone shares - is never modified, and every
  check runs before the clone is made.
- ``load_w4a4_checkpoint(path)``: a self-contained checkpoint through ComfyUI's own
  ``load_diffusion_model_state_dict`` with the W4A4 custom operations, so the BF16 weights of the
  quantized layers never exist in memory.
- ``checkpoint_tensors(model)``: what ``Save W4A4 checkpoint`` writes.

Both kinds of W4A4 model carry three keyed ModelPatcher callbacks (key ``hook.HOOK_KEY``). Two let ComfyUI's
LoRA nodes reach the W4A4 layers: ON_LOAD folds the loading patcher's LoRA patches into the layers' low-rank
branch, ON_DETACH drops them again (``lora.py``). A second ON_DETACH frees the blocks' CUDA graphs (``graphs.py``,
installed as ComfyUI block replacements) and then the kernels' replay workspaces when ComfyUI unloads the model
(``kernels.release_workspaces``).

The patched clone gets a fresh ``patches_uuid``: when it replaces a loaded clone of the same BF16
model on the GPU (or the other way round), ComfyUI then unloads and reloads the weights instead of
assuming they are in place - object patches of whole modules are otherwise left on the wrong device.
Its ``size`` is corrected to the quantized size so that ComfyUI's memory planning sees what it loads.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import uuid

import torch

from .. import kernels
from ..calibration import capture
from ..kernels import format as fmt
from ..kernels import numerics as nm
from . import attention as attn
from . import chunking, ffn, graphs, lora, rowwise
from .hook import HOOK_KEY, TimestepBinHook, attach_hook
from .ops import BinSelector, W4A4Linear, is_w4a4, layer_bytes, make_w4a4_ops, unclaimed

log = logging.getLogger(__name__)

ATTACHMENT = "wan_w4a4"  # ModelPatcher attachment key: the W4A4Info of a patched model
PREFIX = "diffusion_model."


class W4A4StateError(ValueError):
    """A W4A4 state or checkpoint does not fit the model (or cannot be used); names file and problem."""

    def __init__(self, source, problem: str, hint: str | None = None):
        self.source, self.problem, self.hint = str(source), problem, hint
        super().__init__(f"{self.source}: {problem}" + (f"\nHint: {hint}" if hint else ""))


@dataclasses.dataclass
class W4A4Info:
    """What a patched model carries (attachment ``ATTACHMENT``): where its W4A4 layers came from."""

    meta: fmt.StateMeta
    source: str
    layers: tuple[str, ...]  # module paths inside the diffusion model
    kind: str  # "state" (object patches on a BF16 model) or "checkpoint" (loaded with custom ops)


def w4a4_info(model) -> W4A4Info | None:
    return model.get_attachment(ATTACHMENT)


def w4a4_layers(model) -> dict[str, torch.nn.Module]:
    """name -> W4A4 layer of a ModelPatcher, from its object patches and from the model itself.

    Clones share one model: while another clone is loaded, *its* W4A4 object patches sit in the
    shared modules, with the originals in ``object_patches_backup`` (shared by all clones). Such a
    module is not this patcher's: only W4A4 modules the model was built with (a checkpoint loaded
    with custom operations) count."""
    found = {}
    for key, obj in model.object_patches.items():
        if key.startswith(PREFIX) and is_w4a4(obj):
            found[key[len(PREFIX):]] = obj
    for name, m in model.model.diffusion_model.named_modules():
        key = PREFIX + name
        if is_w4a4(m) and key not in model.object_patches and key not in model.object_patches_backup:
            found[name] = m
    return found


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _fingerprint_dtype_ok(w) -> bool:
    return type(w) in (torch.Tensor, torch.nn.Parameter) and w.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _expert_name(expert: str) -> str:
    return {"high": "high-noise", "low": "low-noise"}.get(expert, repr(expert))


def _kind_error(source: str, meta: fmt.StateMeta, model_source: dict) -> W4A4StateError:
    """The state was calibrated from another kind of file than the one the MODEL was loaded from."""
    expert = _expert_name(meta.expert)
    state_family, model_family = meta.source_family, fmt.source_family(model_source.get("kind"))
    what = {"fp8_scaled": "an fp8_scaled one", fmt.PLAIN: "a bf16/fp16 one",
            "fp8": f"a bf16/fp16 file held in {model_source.get('weight_dtype')} without scales (UNETLoader "
                   "weight_dtype fp8_*)"}
    if state_family == "fp8_scaled":
        hint = (f"load the {expert} expert's fp8_scaled file (e.g. wan2.2_i2v_{meta.expert}_noise_14B_fp8_scaled"
                ".safetensors) in this UNETLoader, with weight_dtype default, or calibrate a state from the file "
                "loaded now")
    else:
        hint = (f"load the {expert} expert's BF16/FP16 file (e.g. wan2.2_i2v_{meta.expert}_noise_14B_fp16"
                ".safetensors) with weight_dtype default, or calibrate a state from the file loaded now "
                "(calibration reads fp8_scaled files too)")
    return W4A4StateError(
        source, f"the state was calibrated from the {state_family} {expert} expert; the model connected to Apply "
        f"is {what.get(model_family, 'one holding ' + str(model_source.get('weight_dtype')))}", hint)


def check_state_fits(model, layers: dict[str, nm.W4A4Params], meta: fmt.StateMeta, source: str) -> int:
    """Raise W4A4StateError unless ``layers`` can replace Linears of ``model``; returns the bytes
    of the Linears they replace. Reads only shapes and a 256-value sample per layer.

    The fingerprint is compared with the one of the same weights calibration read (``capture.layer_weight``:
    an fp8_scaled file's dequantized). When they differ and the model was loaded from another kind of file
    than the state records (``meta.source``: fp8_scaled, or plain BF16/FP16 weights), the error says so."""
    if w4a4_layers(model):
        info = w4a4_info(model)
        raise W4A4StateError(source, "this MODEL already has W4A4 layers"
                             + (f" (from {info.source})" if info else ""),
                             "connect the BF16 model from UNETLoader, not an already quantized one")
    missing, not_linear, shapes, replaced = [], [], [], 0
    for name, p in layers.items():
        try:
            m = model.get_model_object(PREFIX + name)
        except AttributeError:
            missing.append(name)
            continue
        w = getattr(m, "weight", None)
        if not capture.is_linear(m) or w is None:
            not_linear.append(f"{name} ({type(m).__name__})")
            continue
        if tuple(w.shape) != (p.out_features, p.in_features):
            shapes.append(f"{name}: state {p.out_features}x{p.in_features}, model {w.shape[0]}x{w.shape[1]}")
            continue
        replaced += sum(t.nelement() * t.element_size() for t in m.state_dict().values())
    other = "the state was made for another model architecture (e.g. Wan2.2 5B vs 14B, or a T2V model)"
    if missing:
        raise W4A4StateError(source, f"{len(missing)} of its {len(layers)} layers do not exist in this model "
                             f"(first: {', '.join(missing[:3])})", other)
    if not_linear:
        raise W4A4StateError(source, f"these layers are not Linear layers in this model: {', '.join(not_linear[:3])}",
                             other)
    if shapes:
        raise W4A4StateError(source, f"{len(shapes)} of its layers have other shapes than the model's "
                             f"({'; '.join(shapes[:3])})", other)
    if meta.fingerprint:
        _check_fingerprint(model, layers, meta, source)
    return replaced


def _check_fingerprint(model, layers: dict, meta: fmt.StateMeta, source: str) -> None:
    model_source, name = capture.weight_source(model, layers)
    kind = model_source.get("kind")
    family = fmt.source_family(kind)
    sample = capture.stored_layer_weight(model, name).data
    if kind == "fp8_scaled" or _fingerprint_dtype_ok(sample):  # as calibration fingerprinted it
        fp = fmt.model_fingerprint_like(meta.fingerprint, capture.FingerprintWeights(model, layers), layers)
    elif meta.source_family != fmt.PLAIN and family != meta.source_family:  # e.g. fp8 without scales
        raise _kind_error(source, meta, model_source)
    else:
        log.warning("%s: cannot verify that this state belongs to this model: its weights are %s (%s); "
                    "load the model with weight_dtype 'default' to have it checked", source,
                    model_source.get("weight_dtype"), type(sample).__name__)
        return
    if fp == meta.fingerprint:
        return
    if family != meta.source_family:
        raise _kind_error(source, meta, model_source)
    if kind == "fp16" and fmt.fingerprint_version(fp) == 1:
        # an older state's fingerprint; fp16 copies of BF16 weights do not always reproduce it
        log.warning("%s: cannot verify that this state belongs to this model: ComfyUI holds its "
                    "weights in fp16 and the state has a version-1 fingerprint", source)
        return
    raise W4A4StateError(
        source, f"the state was calibrated on another model: it is for the {meta.expert!r} expert "
        f"with fingerprint {meta.fingerprint}, this MODEL's fingerprint is {fp}",
        f"connect it to the UNETLoader of the {meta.expert!r} expert it was made from "
        f"(high-noise and low-noise states are not interchangeable)")


# ---------------------------------------------------------------------------------------------
# Apply / load
# ---------------------------------------------------------------------------------------------

def _callbacks():
    import comfy.patcher_extension
    return comfy.patcher_extension.CallbacksMP


def fold_weight_patches(patcher, *args) -> None:
    """ON_LOAD: fold the patcher's LoRA patches on W4A4 layers into their low-rank branch (``lora.py``).

    ModelPatcher applies weight patches through module parameters; a W4A4 layer has none, so without
    this a LoRA on it would be skipped without a word. Patches that cannot be folded exactly stop the
    load with an error naming the layer and patch type.
    """
    info = w4a4_info(patcher)
    lora.install_folds(patcher, source=info.source if info is not None else "W4A4 model")


def clear_folded_patches(patcher, unpatch_all=True, *args) -> None:
    """ON_DETACH: an unpatched model's W4A4 layers are the plain quantized ones again."""
    if unpatch_all:
        lora.clear_folds(w4a4_layers(patcher).values())


def release_kernel_workspaces(patcher, unpatch_all=True, *args) -> None:
    """ON_DETACH: when ComfyUI unloads a W4A4 model, the memory the kernels keep between its layer calls goes with it
    (``kernels.release_workspaces``); a model still loaded records its few-token calls again on its next call.
    Only on an unload: ``LoadedModel.model_unload`` detaches with ``unpatch_all`` True, while a clone that is dropped
    (``ModelPatcher.__del__``) or replaced by another clone of its model detaches with False, and the loaded model's
    workspaces are still in use then."""
    if unpatch_all:
        graphs.drop(patcher)  # before the workspaces: its graphs' launches point into them
        kernels.release_workspaces()


def _add_callbacks(model) -> None:
    """The load and unload callbacks of a W4A4 model: LoRA folding (``lora.py``) and the kernels' workspaces."""
    cb = _callbacks()
    for kind in (cb.ON_LOAD, cb.ON_DETACH):
        model.remove_callbacks_with_key(kind, HOOK_KEY)
    for kind, fn in ((cb.ON_LOAD, fold_weight_patches), (cb.ON_DETACH, clear_folded_patches),
                     (cb.ON_DETACH, release_kernel_workspaces)):
        model.add_callback_with_key(kind, HOOK_KEY, fn)


def _hook_for(meta: fmt.StateMeta, source: str) -> tuple[TimestepBinHook, BinSelector]:
    selector = BinSelector(meta.num_bins)
    return TimestepBinHook(meta.expert, meta.bin_edges, selector, source=os.path.basename(source),
                           handover=meta.handover), selector


def apply_w4a4_state(model, layers: dict[str, nm.W4A4Params], meta: fmt.StateMeta, source: str = "W4A4 state",
                     cond_batch: str = "auto", attention: str = "auto"):
    """A clone of ``model`` (a ModelPatcher of a BF16 Wan expert) running ``layers`` in W4A4, with
    the cond-batch policy ``cond_batch`` (``chunking.attach_split``) and the SDPA order ``attention``
    (``attention.attach``).

    Raises W4A4StateError (naming ``source``) before anything is cloned if the state does not fit.
    """
    chunking.check_mode(cond_batch)
    attn.check_mode(attention)
    replaced = check_state_fits(model, layers, meta, source)
    hook, selector = _hook_for(meta, source)
    modules = {name: W4A4Linear(p, name, selector) for name, p in layers.items()}
    m = model.clone()
    for name, module in modules.items():
        m.add_object_patch(PREFIX + name, module)
    ffn.attach_inplace_gelu(m, layers)
    rowwise.attach(m)
    graphs.attach(m)
    attach_hook(m, hook)
    chunking.attach_split(m, cond_batch)
    attn.attach(m, attention)
    _add_callbacks(m)
    m.set_attachments(ATTACHMENT, W4A4Info(meta, source, tuple(layers), "state"))
    m.size = max(0, model.model_size() - replaced + sum(layer_bytes(x) for x in modules.values()))
    m.patches_uuid = uuid.uuid4()  # see the module doc
    log.info("%s: %d layers in W4A4 on a clone of the %r expert (%d bins), %.1f -> %.1f MB", source, len(modules),
             meta.expert, meta.num_bins, model.model_size() / 2**20, m.size / 2**20)
    return m


def placeholder_state_dict(layers: dict[str, nm.W4A4Params], rest: dict[str, torch.Tensor]) -> dict:
    """``rest`` plus a meta-device BF16 ``<layer>.weight`` per W4A4 layer: ComfyUI's model detection
    and dtype choice read these shapes (``blocks.0.ffn.0.weight`` gives ffn_dim) exactly as from a
    BF16 checkpoint; no memory is allocated for them."""
    sd = dict(rest)
    for name, p in layers.items():
        sd[f"{name}.weight"] = torch.empty((p.out_features, p.in_features), dtype=torch.bfloat16, device="meta")
    return sd


def load_w4a4_checkpoint(path, model_options: dict | None = None, cond_batch: str = "auto", attention: str = "auto",
                         disable_dynamic: bool = False):
    """A ModelPatcher for a self-contained W4A4 checkpoint (see the module doc).

    ``disable_dynamic``: a plain ModelPatcher even where ComfyUI streams with dynamic VRAM. ComfyUI
    0.33 asks a model's ``cached_patcher_init`` factory for one when it needs a non-dynamic copy
    (TorchCompileModel, hook LoRAs, multi-GPU; ``ModelPatcher.clone``): the loaded model carries this
    function as that factory, as ComfyUI's own loaders do."""
    import inspect

    import comfy.sd

    chunking.check_mode(cond_batch)  # before reading gigabytes
    attn.check_mode(attention)

    layers, rest, meta = fmt.load_checkpoint(path)
    hook, selector = _hook_for(meta, path)
    ops = make_w4a4_ops(layers, selector, source=os.path.basename(path))
    sd = placeholder_state_dict(layers, rest)
    del rest
    options = dict(model_options or {})
    options["custom_operations"] = ops
    load = comfy.sd.load_diffusion_model_state_dict
    dynamic_arg = "disable_dynamic" in inspect.signature(load).parameters  # ComfyUI 0.33+
    try:
        model = load(sd, model_options=options, **({"disable_dynamic": disable_dynamic} if dynamic_arg else {}))
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        # ComfyUI's model detection indexes the state dict (KeyError: the missing key) and load_state_dict
        # names the mismatched tensor (RuntimeError): pass that on with the file's name
        what = f"missing tensor {e.args[0]!r}" if isinstance(e, KeyError) and e.args else f"{type(e).__name__}: {e}"
        raise W4A4StateError(path, f"ComfyUI cannot build the model from the checkpoint's non-quantized "
                             f"tensors ({what})", "the checkpoint is damaged or for another model; "
                             "re-save it with Save W4A4 checkpoint") from e
    if model is None:
        raise W4A4StateError(path, "ComfyUI did not recognise the model in this checkpoint",
                             "it should hold a Wan2.2 diffusion model; re-save it with Save W4A4 checkpoint")
    left = unclaimed(ops)
    if left:
        raise W4A4StateError(path, f"{len(left)} W4A4 layers found no Linear in the detected model "
                             f"(first: {', '.join(left[:3])})", "the checkpoint is damaged or for another model")
    attach_hook(model, hook)
    chunking.attach_split(model, cond_batch)
    attn.attach(model, attention)
    ffn.attach_inplace_gelu(model, layers)
    rowwise.attach(model)
    graphs.attach(model)
    _add_callbacks(model)
    model.set_attachments(ATTACHMENT, W4A4Info(meta, str(path), tuple(layers), "checkpoint"))
    if hasattr(model, "cached_patcher_init"):
        model.cached_patcher_init = (load_w4a4_checkpoint, (str(path), model_options, cond_batch, attention))
    return model


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def checkpoint_tensors(model) -> tuple[dict[str, nm.W4A4Params], dict[str, torch.Tensor], fmt.StateMeta]:
    """(W4A4 layers, the other tensors under their keys, meta) of a patched model, on the CPU.

    Weight patches on BF16 layers (a LoRA on the head, say) are baked in as ComfyUI computes them
    (``comfy.lora.calculate_weight`` on the unpatched weight, rounded back with the same stochastic
    rounding and seed as ``ModelPatcher.patch_weight_to_device``). The model is not loaded for this:
    ComfyUI 0.33's dynamic VRAM refuses ``force_patch_weights``, and the CPU copies are what is saved.
    """
    info = w4a4_info(model)
    quantized = w4a4_layers(model)
    if info is None or not quantized:
        raise W4A4StateError("Save W4A4 checkpoint", "this MODEL has no W4A4 layers",
                             "connect the output of 'Apply W4A4 state' or 'Load W4A4 Wan2.2 model'")
    on_quantized = sorted({k for k in model.patches if k.startswith(PREFIX)
                           and k[len(PREFIX):].rpartition(".")[0] in quantized})
    if on_quantized:
        raise W4A4StateError("Save W4A4 checkpoint", f"weight patches (a LoRA?) target W4A4 layers, e.g. "
                             f"{on_quantized[0]}; they cannot be saved into 4-bit weights",
                             "save the checkpoint before applying the LoRA")
    dm = model.model.diffusion_model
    scaled = _fp8_scaled_linears(model, dm, quantized)
    rest = {}
    for key, t in dm.state_dict().items():
        owner, _, field = key.rpartition(".")
        if owner in quantized or (owner in scaled and field != "bias"):
            continue
        rest[key] = _patched_tensor(model, PREFIX + key, t)
        if rest[key].dtype in capture.FP8_DTYPES:  # 0.3.64 holds an fp8_scaled base's biases in fp8 too
            rest[key] = rest[key].float()  # exact
    for name, w in scaled.items():
        rest[f"{name}.weight"] = _patched_tensor(model, f"{PREFIX}{name}.weight", w, torch.float32)
    layers = {name: m.w4a4_params(torch.device("cpu"), with_lora=False) for name, m in quantized.items()}
    return layers, rest, info.meta


def _fp8_scaled_linears(model, dm, quantized) -> dict[str, torch.Tensor]:
    """name -> dequantized float32 weight of the BF16-kept Linears stored fp8_scaled (an fp8_scaled base:
    text/time embeddings, head). ComfyUI keeps such a layer's scale beside its fp8 weight in a form each
    version reads differently (0.3.64: ``scale_weight`` plus a file-wide ``scaled_fp8`` marker; 0.33:
    ``weight_scale`` plus ``comfy_quant``), so a checkpoint holds the dequantized weight instead, in float32:
    exactly fp8 x scale, which ComfyUI casts to its compute dtype as it does any stored weight (at 14B these
    Linears hold about 0.23 G parameters, 0.9 GB in float32)."""
    out = {}
    for name, mod in dm.named_modules():
        if name in quantized or not capture.is_linear(mod) or getattr(mod, "weight", None) is None:
            continue
        sw = capture.stored_weight(mod, capture.unpatched(model, f"{PREFIX}{name}.weight", mod.weight))
        if sw.kind == "fp8_scaled":
            out[name] = capture.dequantize(sw)
        elif sw.kind not in capture.FLOAT_KINDS.values():
            raise W4A4StateError("Save W4A4 checkpoint", f"layer {name} is stored as {sw.kind} ({sw.dtype}), "
                                 "which a W4A4 checkpoint cannot hold",
                                 "load the expert from its BF16/FP16 or fp8_scaled file")
    return out


def _patched_tensor(model, key: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The CPU tensor of ``key`` with the patcher's weight patches applied, as ComfyUI applies them, in
    ``dtype`` (default: the tensor's own; ``t`` is then the tensor in the tree, else the weight itself)."""
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    import comfy.utils

    base = (capture.unpatched(model, key, t) if dtype is None else t).detach()
    dtype = dtype or base.dtype
    if key not in model.patches:
        return base.to("cpu", dtype, copy=True)
    out = comfy.lora.calculate_weight(model.patches[key], base.to("cpu", torch.float32, copy=True), key)
    to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed  # moved in 0.33
    return comfy.float.stochastic_rounding(out, dtype, seed=to_seed(key))


def save_w4a4_checkpoint(model, path, overwrite: bool = False) -> str:
    layers, rest, meta = checkpoint_tensors(model)
    fmt.save_checkpoint(path, layers, rest, meta, overwrite=overwrite)
    return str(path)
