"""W4A4 layers inside ComfyUI: the module that replaces a Wan Linear, the per-model bin selector,
and the custom operations that build W4A4 layers straight from a self-contained checkpoint.

Two ways in, one layer behaviour (``W4A4Core``):

- ``W4A4Linear``: a leaf module holding one layer's ``numerics.W4A4Params`` tensors as its own
  buffers. ``apply.py`` swaps it in with ``ModelPatcher.add_object_patch`` (applied on load,
  reverted on unload; the BF16 model underneath is never touched).
- ``make_w4a4_ops(layers, selector)``: a ``comfy.ops.manual_cast`` subclass for
  ``load_diffusion_model_state_dict(..., {"custom_operations": ops})`` whose Linear becomes a W4A4
  layer when its key has W4A4 tensors (the BF16 weight is never allocated) and is ComfyUI's usual
  Linear otherwise - the ComfyUI-GGUF pattern.

Memory management (``comfy/model_patcher.py``): ModelPatcher moves or offloads modules that have
direct parameters or a ``comfy_cast_weights`` attribute. Both classes have the attribute, so in
lowvram / partial loads ComfyUI may leave a W4A4 layer on the offload device; ``forward`` then
copies that layer's tensors to the input's device for this call only (like ``cast_bias_weight``).

LoRAs (``lora.py``): ComfyUI's LoRA patches on a W4A4 layer are folded, exactly, into extra rank of the
BF16 low-rank branch (the 4-bit weights are never touched). While a LoRA is installed the layer's
``lr_down``/``lr_up`` buffers *are* the joined factors [L1 | A'] / [L2 ; B'], its first ``base_rank``
columns / rows the layer's own: the extra GPU memory is the LoRA's own size, with no per-call copy.
Clearing copies the base back out, bit for bit; the state dict and ``w4a4_params(with_lora=False)``
show the base only. A bias delta (LoRA ``diff_b``, the shift correction) is added to the ``bias`` buffer
once; the layer's own bias is backed up on the host meanwhile, as ComfyUI backs up the weights it
patches on the offload device, so that the device holds one bias per layer.
For ComfyUI's LoRA key mapping (``comfy.lora.model_lora_keys_unet`` and ``ModelPatcher.add_patches``
read ``model.state_dict()`` keys) a W4A4 layer lists an empty ``weight`` entry in its state dict, and
``layer.weight`` is a ``NoDenseWeight`` stand-in that explains itself when used as a tensor.

The bin index: every W4A4 layer of one patched model shares a ``BinSelector``; the timestep hook
(``hook.py``) sets it once per model call with an in-place fill of a 0-d int64 tensor, and each layer
hands that device tensor to the kernel, which reads ``clip[bin]`` on the device: no host-device
sync per layer.
"""
from __future__ import annotations

import logging
import sys

import torch

from .. import kernels
from ..kernels import format as fmt
from ..kernels import numerics as nm
from . import quant_layout as ql

log = logging.getLogger(__name__)

# W4A4Params fields that are tensors (the format module's table, in its order); bias may be None.
TENSOR_FIELDS = fmt.FIELDS
# The state-dict entry ``<layer>.weight`` of a W4A4 layer: no bytes (module sizes stay right), only the
# key, which ComfyUI's LoRA key mapping and ``add_patches`` look for.
_WEIGHT_KEY_PLACEHOLDER = torch.empty(0, dtype=torch.bfloat16)


class NoDenseWeight:
    """``layer.weight`` of a W4A4 layer. ComfyUI's ``get_key_weight`` reads ``getattr(layer, "weight")``
    when it registers a LoRA for offloaded (lowvram) layers; the LoRA itself reaches the layer through
    ``lora.py``. Anything that uses it as a tensor gets an error that says why there is none."""

    __slots__ = ("layer", "shape")

    def __init__(self, layer: str, shape: tuple[int, int]):
        self.layer, self.shape = layer, tuple(shape)

    def __getattr__(self, name):
        raise AttributeError(
            f"W4A4 layer {self.layer or '?'} has no BF16 weight (something asked for weight.{name}): its LoRAs "
            f"are folded into the low-rank branch at load time, but weights cannot be baked into 4-bit layers "
            f"(save nodes, force_patch_weights, hook LoRAs, model merging)")

    def __repr__(self):
        return f"NoDenseWeight({self.layer!r}, shape={self.shape})"


class BinSelector:
    """The current timestep bin of one patched model: a 0-d int64 tensor per device.

    ``set(b)`` fills every device copy in place (an asynchronous device write, queued behind the
    work already on the stream); ``index(device)`` returns the tensor the kernels read. ``value``
    is the host-side copy, for logs and tests.
    """

    def __init__(self, num_bins: int):
        if num_bins < 1:
            raise ValueError(f"BinSelector needs at least one bin, got {num_bins}")
        self.num_bins = int(num_bins)
        self.value = 0
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def set(self, b: int) -> None:
        b = int(b)
        if not 0 <= b < self.num_bins:
            raise IndexError(f"bin {b} outside 0..{self.num_bins - 1}")
        if b == self.value:
            return
        self.value = b
        for t in self._per_device.values():
            t.fill_(b)

    def index(self, device: torch.device) -> torch.Tensor:
        t = self._per_device.get(device)
        if t is None:
            t = torch.full((), self.value, dtype=torch.int64, device=device)
            self._per_device[device] = t
        return t

    def __repr__(self):
        return f"BinSelector(bin={self.value} of {self.num_bins})"


def _comfy_mm():
    """comfy.model_management when running inside ComfyUI, else None (plain torch copies)."""
    return sys.modules.get("comfy.model_management")


def _tensors_to(tensors: dict, device: torch.device) -> dict:
    """Copy a layer's tensors to ``device`` for one forward (lowvram: the module stays offloaded)."""
    mm = _comfy_mm()
    if mm is None:
        return {k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in tensors.items()}
    stream = mm.get_offload_stream(device)
    non_blocking = mm.device_supports_non_blocking(device)
    out = {k: (mm.cast_to(v, device=device, non_blocking=non_blocking, stream=stream) if v is not None else None)
           for k, v in tensors.items()}
    mm.sync_stream(device, stream)
    return out


def _compiler_disable(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _lowvram_slot(attr: str):
    """``weight_lowvram_function``/``bias_lowvram_function``: ComfyUI's dynamic loader hangs a LoRA's
    ``LowVramPatch`` there (``ModelPatcherDynamic.load``) and ``cast_bias_weight`` would then dequantize,
    patch and re-quantize the weight. On a W4A4 layer the LoRA is folded instead (``lora.py``), so the
    slot stays empty there; on a BF16 layer of the custom operations it works as usual."""
    key = "_w4a4_" + attr

    def get(self):
        return self.__dict__.get(key)

    def set_(self, value):
        self.__dict__[key] = None if is_w4a4(self) else value

    return property(get, set_)


class W4A4Core:
    """Behaviour shared by ``W4A4Linear`` and the custom-ops Linear: holds the tensors of one W4A4 layer
    and runs the dispatcher.

    Two ways to hold them, chosen once per layer by feature detection (``quant_layout.available``):

    - *quantized-tensor* (ComfyUI with ``comfy.quant_ops``): ``weight`` is a QuantizedTensor of the
      static tensors, ``bias`` the fp32 bias and ``clip`` the clip table, all three plain attributes
      (no parameters, no buffers), so ComfyUI's loaders neither patch them as dense weights nor keep
      them in its shared buffer backups; its dynamic VRAM streams ``weight`` and ``bias`` like its own
      quantized formats. A folded LoRA lives beside them (``_lora``), on the device the layer runs on.
    - *buffers* (ComfyUI 0.3.64): every ``numerics.W4A4Params`` field is a buffer and ``weight`` is a
      ``NoDenseWeight``; a folded LoRA is joined into the ``lr_down``/``lr_up`` buffers.

    Either way ``state_dict()`` lists the same keys (the params fields plus an empty ``weight``).
    """

    comfy_cast_weights = False  # lets ModelPatcher offload the layer in lowvram mode (see module doc)
    w4a4_name: str = ""
    bin_selector: BinSelector | None = None
    w4a4_qt = False  # quantized-tensor storage (see the class doc)

    weight_lowvram_function = _lowvram_slot("weight_lowvram_function")
    bias_lowvram_function = _lowvram_slot("bias_lowvram_function")

    def _install_w4a4(self, p: nm.W4A4Params, name: str = "", selector: BinSelector | None = None) -> None:
        for field in TENSOR_FIELDS + ("weight",):
            self._parameters.pop(field, None)
            self._buffers.pop(field, None)
            self.__dict__.pop(field, None)
        self.w4a4_qt = ql.available()
        if self.w4a4_qt:
            self.__dict__.update(weight=ql.from_params(p), bias=p.bias, clip=p.clip)
        else:
            for field in TENSOR_FIELDS:
                self.register_buffer(field, getattr(p, field))
        self.in_features, self.out_features = p.in_features, p.out_features
        self.act_unsigned, self.act_shift = bool(p.act_unsigned), float(p.act_shift)
        self.w4a4_name = name
        self.bin_selector = selector
        self.weight_function, self.bias_function = [], []
        self.base_rank = p.rank
        self.lora_tag = None
        self.lora_bias_on, self._base_bias = False, None
        self._lora = None  # quantized-tensor storage: (down [K, r], up [r, N]) or None
        self._lora_bias = None  # quantized-tensor storage: fp32 bias delta [N] or None
        self._on_device = {}  # quantized-tensor storage: clip table copies per device

    def __getattr__(self, name):
        d = self.__dict__
        if name in ql.STATIC_FIELDS and ql.is_w4a4_weight(d.get("weight")):
            return ql.static_tensors(d["weight"])[name]
        if name == "weight" and "qweight" in d.get("_buffers", {}):
            return NoDenseWeight(self.w4a4_name, (self.out_features, self.in_features))
        return super().__getattr__(name)

    def _own_tensors(self) -> dict[str, torch.Tensor | None]:
        """The layer's own tensors under the ``numerics.W4A4Params`` field names (without a LoRA)."""
        if self.w4a4_qt:
            return {**ql.static_tensors(self.weight), "clip": self.clip, "bias": self.bias}
        t = {f: getattr(self, f) for f in TENSOR_FIELDS}
        if self.lora_rank:  # the layer's own branch (views, no copy): a LoRA is not part of the layer
            t["lr_down"], t["lr_up"] = t["lr_down"][:, :self.base_rank], t["lr_up"][:self.base_rank]
        if self.lora_bias_on:
            t["bias"] = self._base_bias
        return t

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if is_w4a4(self):
            for field, t in self._own_tensors().items():
                destination.pop(prefix + field, None)
                if t is not None:
                    destination[prefix + field] = t if keep_vars else t.detach()
            destination[prefix + "weight"] = _WEIGHT_KEY_PLACEHOLDER

    def _apply(self, fn, *args, **kwargs):
        # Module.to / cuda / cpu move parameters and buffers; the quantized-tensor storage keeps its
        # tensors as plain attributes, which must move with the module (ComfyUI's non-dynamic loaders
        # move whole modules).
        out = super()._apply(fn, *args, **kwargs)
        if self.w4a4_qt:
            d = self.__dict__
            for key in ("weight", "bias", "clip", "_lora_bias"):
                if isinstance(d.get(key), torch.Tensor):
                    d[key] = fn(d[key])
            if d.get("_lora") is not None:
                d["_lora"] = tuple(fn(t) for t in d["_lora"])
            d["_on_device"] = {}
        return out

    # --- the folded LoRA (lora.py computes it; ModelPatcher callbacks install and clear it) ---------

    lora_tag = None  # what the installed fold was computed for (the ModelPatcher's patches_uuid)
    base_rank = 0  # columns of lr_down (rows of lr_up) that are the layer's own low-rank branch
    lora_bias_on = False  # the ``bias`` buffer includes a LoRA's bias delta; the own bias is _base_bias
    _base_bias = None  # the layer's own bias (host copy) while lora_bias_on; None if it has no bias

    def set_lora(self, down: torch.Tensor | None, up: torch.Tensor | None, bias: torch.Tensor | None, tag,
                 device: torch.device | None = None) -> None:
        """Install a folded LoRA (or clear it with Nones), replacing the one installed.

        Buffers storage: the factors are joined to the branch once, here, rather than per call: the
        layer then holds the base branch once (inside the joined buffers) and forwards allocate nothing
        extra. The buffers move with the module (``.to``, ComfyUI's offloading). A bias delta (fp32 [N])
        is added to the ``bias`` buffer once; the own bias waits on the host (a plain attribute, so module
        moves leave it there) and comes back, bit for bit, when the delta goes. Neither delta is ever saved.

        Quantized-tensor storage: the static tensors may be streamed by ComfyUI (their resident copy is
        never refreshed), so the fold is kept beside them, on ``device`` (the device the layer runs on;
        default: where its weight is), and joined to the branch per call (``w4a4_params``)."""
        if (down is None) != (up is None):
            raise ValueError("lora_down and lora_up go together")
        if down is not None and (down.shape[0] != self.in_features or up.shape != (down.shape[1], self.out_features)
                                 or down.dtype != torch.bfloat16 or up.dtype != torch.bfloat16):
            raise ValueError(f"W4A4 layer {self.w4a4_name}: LoRA factors {tuple(down.shape)} {down.dtype} / "
                             f"{tuple(up.shape)} {up.dtype} do not fit a {self.out_features}x{self.in_features} layer")
        if bias is not None and (bias.shape != (self.out_features,) or bias.dtype != torch.float32):
            raise ValueError(f"W4A4 layer {self.w4a4_name}: LoRA bias delta {tuple(bias.shape)} {bias.dtype}")
        if self.w4a4_qt:
            dev = device if device is not None else self.weight.device
            self._lora = None if down is None else (down.to(dev), up.to(dev))
            self._lora_bias = None if bias is None else bias.to(dev)
            self.lora_bias_on = bias is not None
            self.lora_tag = tag
            return
        r = self.base_rank
        if down is not None or self.lora_rank:
            l1, l2 = self.lr_down[:, :r], self.lr_up[:r]
            if down is None:
                # clone, not contiguous(): lr_up[:r] is already contiguous and would keep the joined storage
                l1, l2 = l1.clone(memory_format=torch.contiguous_format), l2.clone()
            else:
                l1 = torch.cat([l1, down.to(l1.device)], dim=1)
                l2 = torch.cat([l2, up.to(l2.device)], dim=0)
            # Replace (never write into) the buffers: a state's own tensors may be shared with this module.
            self._buffers["lr_down"], self._buffers["lr_up"] = l1, l2
        if bias is not None or self.lora_bias_on:
            own, dev = self.own_bias(), self.qweight.device
            if bias is None:
                self._buffers["bias"] = None if own is None else own.to(dev)
                self.lora_bias_on, self._base_bias = False, None
            else:
                # The same fp32 sum the reference adds (numerics: y + bias); the own bias goes to the
                # host, so the device holds one bias of this layer, not two.
                bias = bias.to(dev)
                self._buffers["bias"] = bias if own is None else own.to(dev) + bias
                self.lora_bias_on, self._base_bias = True, None if own is None else own.to("cpu")
        self.lora_tag = tag

    def clear_lora(self) -> None:
        self.set_lora(None, None, None, None)

    def own_bias(self) -> torch.Tensor | None:
        """The layer's own bias, without a LoRA's delta (on the host while a delta is installed)."""
        if self.w4a4_qt:
            return self.bias
        return self._base_bias if self.lora_bias_on else self.bias

    @property
    def lora_rank(self) -> int:
        if self.w4a4_qt:
            return 0 if self._lora is None else self._lora[0].shape[1]
        lr = self.__dict__.get("_buffers", {}).get("lr_down")  # None on a custom-ops Linear kept in BF16
        return 0 if lr is None else lr.shape[1] - self.base_rank

    @property
    def lora_down(self) -> torch.Tensor | None:
        """The installed LoRA's down factor [K, r] (a view), or None."""
        if self.w4a4_qt:
            return None if self._lora is None else self._lora[0]
        return self.lr_down[:, self.base_rank:] if self.lora_rank else None

    @property
    def lora_up(self) -> torch.Tensor | None:
        """The installed LoRA's up factor [r, N] (a view), or None."""
        if self.w4a4_qt:
            return None if self._lora is None else self._lora[1]
        return self.lr_up[self.base_rank:] if self.lora_rank else None

    def _joined(self, t: dict, device: torch.device) -> dict:
        """Quantized-tensor storage: ``t`` (the own tensors, on ``device``) with the folded LoRA joined in:
        the same [L1 | A'] / [L2 ; B'] and own + delta bias that the buffers storage holds."""
        if self._lora is not None:
            down, up = (x.to(device, non_blocking=True) for x in self._lora)
            t["lr_down"] = torch.cat([t["lr_down"], down], dim=1)
            t["lr_up"] = torch.cat([t["lr_up"], up], dim=0)
        if self._lora_bias is not None:
            delta = self._lora_bias.to(device, non_blocking=True)
            t["bias"] = delta if t["bias"] is None else t["bias"].to(device) + delta
        return t

    def _qt_params(self, tensors: dict, device: torch.device, with_lora: bool = True) -> nm.W4A4Params:
        """Quantized-tensor storage: ``W4A4Params`` from the static tensors and bias on ``device``, with the
        clip table there and (``with_lora``) the folded LoRA joined in."""
        tensors = {**tensors, "clip": self._clip_on(device)}
        if with_lora:
            tensors = self._joined(tensors, device)
        return nm.W4A4Params(**tensors, act_unsigned=self.act_unsigned, act_shift=self.act_shift)

    def _clip_on(self, device: torch.device) -> torch.Tensor:
        clip = self.clip
        if clip.device == device:
            return clip
        cached = self._on_device.get(device)
        if cached is None or cached[0] is not clip:
            cached = (clip, clip.to(device))
            self._on_device[device] = cached
        return cached[1]

    def w4a4_params(self, device: torch.device | None = None, with_lora: bool = True) -> nm.W4A4Params:
        """This layer as ``W4A4Params`` (the module's own tensors, or copies on ``device``); with its
        folded LoRA (joined into the branch and the bias) unless ``with_lora`` is False."""
        if self.w4a4_qt:
            tensors = self._own_tensors()
            del tensors["clip"]  # _qt_params takes the cached copy on the device
            if device is not None and self.weight.device != device:
                tensors = _tensors_to(tensors, device)
            return self._qt_params(tensors, tensors["qweight"].device, with_lora)
        tensors = {f: getattr(self, f) for f in TENSOR_FIELDS}
        if not with_lora:
            if self.lora_rank:
                tensors["lr_down"] = tensors["lr_down"][:, :self.base_rank].contiguous()
                tensors["lr_up"] = tensors["lr_up"][:self.base_rank].contiguous()
            own = self.own_bias()
            tensors["bias"] = None if own is None else own.to(self.qweight.device)
        if device is not None and self.qweight.device != device:
            tensors = _tensors_to(tensors, device)
        return nm.W4A4Params(**tensors, act_unsigned=self.act_unsigned, act_shift=self.act_shift)

    def _check_weight_functions(self) -> None:
        """ModelPatcher puts a ``LowVramPatch`` for this layer's own weight/bias keys into
        ``weight_function``/``bias_function`` when it offloads the layer (lowvram); those patches are
        the ones ``lora.py`` folded, so they are skipped here. Anything else cannot run on 4-bit weights."""
        own = (f"diffusion_model.{self.w4a4_name}.weight", f"diffusion_model.{self.w4a4_name}.bias")
        other = [f for f in list(self.weight_function) + list(self.bias_function) if getattr(f, "key", None) not in own]
        if other:
            raise RuntimeError(f"W4A4 layer {self.w4a4_name or '?'}: ComfyUI attached weight functions "
                               f"({', '.join(type(f).__name__ for f in other[:3])}) that need a dense weight, "
                               f"which a 4-bit layer does not have; LoRAs reach W4A4 layers by folding, "
                               f"other weight wrappers are not supported")

    @property
    def num_bins(self) -> int:
        return self.clip.shape[0]

    def _streamed(self, device: torch.device) -> bool:
        """ComfyUI's dynamic VRAM holds this layer (a virtual VRAM range ``_v``) and must bring it to ``device``."""
        return self.w4a4_qt and hasattr(self, "_v") and device.type != "cpu" and self.weight.device != device

    def held_tensors(self, device: torch.device) -> list[torch.Tensor] | None:
        """The tensors ``w4a4_forward`` reads on ``device`` that outlive the call, the bin index among them (a CUDA
        graph of the forward reads them again at every replay: ``graphs.py``), or None where the forward would copy
        them there for this call only (an offloaded layer) or where ComfyUI's dynamic VRAM has not yet placed them
        (no ``_v_weight``)."""
        if self.weight_function or self.bias_function:
            return None
        if self.w4a4_qt:
            if self._streamed(device):
                weight, bias = self.__dict__.get("_v_weight"), self.__dict__.get("_v_bias")
                if not ql.is_w4a4_weight(weight):
                    return None
            else:
                weight, bias = self.weight, self.bias
            tensors = [*ql.static_tensors(weight).values(), bias, self._clip_on(device), *(self._lora or ()),
                       self._lora_bias]
        else:
            tensors = [getattr(self, f) for f in TENSOR_FIELDS]
        if self.bin_selector is not None:
            tensors.append(self.bin_selector.index(device))
        tensors = [t for t in tensors if t is not None]
        return tensors if all(t.device == device for t in tensors) else None

    # torch.compile (ComfyUI's TorchCompileModel node) compiles the rest of the model and calls this
    # eagerly: the Triton kernels are already fused, and tracing the dispatcher would only add graph
    # breaks and recompiles (checked on the CPU: same output with and without compile).
    @_compiler_disable
    def w4a4_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_function or self.bias_function:
            self._check_weight_functions()
        device = x.device
        selector = self.bin_selector
        index = selector.index(device) if selector is not None else 0
        if not self._streamed(device):
            return kernels.w4a4_linear(x, self.w4a4_params(device), index)
        # Dynamic VRAM: ComfyUI faults the weight and bias into VRAM (or a cast buffer) and hands them back
        # as they are stored: the weight's own dtype keeps it quantized, the bias's keeps it fp32.
        import comfy.ops

        bias_dtype = self.bias.dtype if self.bias is not None else None
        weight, bias, stream = comfy.ops.cast_bias_weight(self, x, dtype=self.weight.dtype, device=device,
                                                          bias_dtype=bias_dtype, offloadable=True)
        try:
            return kernels.w4a4_linear(x, self._qt_params({**ql.static_tensors(weight), "bias": bias}, device), index)
        finally:
            comfy.ops.uncast_bias_weight(self, weight, bias, stream)

    def w4a4_repr(self) -> str:
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.base_rank}{lora}, "
                f"bins={self.num_bins}, unsigned={self.act_unsigned}, bias={self.own_bias() is not None}"
                + (", storage=QuantizedTensor" if self.w4a4_qt else ""))


class W4A4Linear(W4A4Core, torch.nn.Module):
    """A Wan Linear replaced by its W4A4 form: ``y = w4a4_linear(x, params, bin)`` in x's dtype."""

    def __init__(self, params: nm.W4A4Params, name: str = "", selector: BinSelector | None = None):
        torch.nn.Module.__init__(self)
        self._install_w4a4(params, name, selector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w4a4_forward(x)

    def extra_repr(self) -> str:
        return self.w4a4_repr()


def is_w4a4(module) -> bool:
    # Duck-typed: inside ComfyUI the pack is imported under its folder name, and tests may import the
    # same classes as ``wan_w4a4``; both copies' layers must be recognised.
    return callable(getattr(module, "w4a4_params", None)) and getattr(module, "qweight", None) is not None


def w4a4_modules(root: torch.nn.Module, prefix: str = "") -> dict[str, W4A4Core]:
    """name -> W4A4 layer of a module tree (names relative to ``root``)."""
    return {(prefix + n): m for n, m in root.named_modules() if is_w4a4(m)}


def layer_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's saved tensors, as ``comfy.model_management.module_size`` counts them."""
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def make_w4a4_ops(layers: dict[str, nm.W4A4Params], selector: BinSelector, source: str = "checkpoint"):
    """Custom operations for ``load_diffusion_model_state_dict`` that build the W4A4 layers of
    ``layers`` (module path inside the diffusion model -> params) without allocating their BF16 weights.

    The layers are consumed as the state dict is loaded; ``unclaimed(ops)`` lists those that found
    no Linear (a checkpoint for another architecture).
    """
    import comfy.ops

    pending = dict(layers)

    class W4A4Ops(comfy.ops.manual_cast):
        class Linear(W4A4Core, comfy.ops.manual_cast.Linear):
            comfy_cast_weights = True  # the manual_cast behaviour for the layers that stay BF16

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # Like torch.nn.Linear, minus the allocation: the weight is created in
                # _load_from_state_dict once we know whether this layer is quantized.
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self._factory = {"device": device, "dtype": dtype}
                self._has_bias = bias
                self.weight = None
                self.bias = None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                name = prefix[:-1]
                p = pending.pop(name, None)
                if p is not None:
                    if (p.out_features, p.in_features) != (self.out_features, self.in_features):
                        error_msgs.append(f"{source}: W4A4 layer {name} is {p.out_features}x{p.in_features}, "
                                          f"the model expects {self.out_features}x{self.in_features}")
                        return
                    self._install_w4a4(p, name, selector)
                    self.comfy_cast_weights = False
                    return
                # A BF16 layer: exactly torch.nn.Linear's allocation and load.
                self.weight = torch.nn.Parameter(torch.empty((self.out_features, self.in_features), **self._factory),
                                                 requires_grad=False)
                if self._has_bias:
                    self.bias = torch.nn.Parameter(torch.empty(self.out_features, **self._factory),
                                                   requires_grad=False)
                super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                              unexpected_keys, error_msgs)

            def forward(self, *args, **kwargs):
                if is_w4a4(self):
                    return self.w4a4_forward(*args, **kwargs)
                return super().forward(*args, **kwargs)

            def extra_repr(self):
                if is_w4a4(self):
                    return self.w4a4_repr()
                return super().extra_repr()

    W4A4Ops.pending = pending
    return W4A4Ops


def unclaimed(ops) -> list[str]:
    """Layers of ``make_w4a4_ops`` that no Linear of the loaded model took."""
    return sorted(ops.pending)
