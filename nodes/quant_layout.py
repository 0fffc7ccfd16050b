"""A W4A4 layer's static tensors as one comfy-kitchen ``QuantizedTensor`` (ComfyUI with ``comfy.quant_ops``).

ComfyUI 0.33 moves quantized weights with its own machinery when a layer's ``weight`` is a kitchen
``QuantizedTensor`` (``comfy/quant_ops.py``; the layouts it ships are registered the same way):

- dynamic VRAM (``ModelPatcherDynamic`` in ``comfy/model_patcher.py``) sizes a layer from ``weight`` and
  ``bias``, pins them on the host and streams them into its virtual VRAM range through
  ``comfy.ops.cast_bias_weight``, with every tensor field of the params travelling along
  (``QuantizedTensor.__tensor_flatten__``, ``comfy/memory_management.py``);
- its memory estimates read ``weight.dtype``/``shape``/``numel`` - a QuantizedTensor answers with the
  logical [N, K] bf16 weight it stands for.

So on such a ComfyUI a W4A4 layer's ``weight`` is ``QuantizedTensor(qweight, "WanW4A4Layout",
W4A4LayoutParams(...))``: qweight as the data, ``wscale`` as the layout's scale, ``wfactor``, ``smooth``,
``lr_down`` and ``lr_up`` as further tensor fields, the activation grid as plain fields. What changes
while a model runs stays out of it, because a copy that is already resident in VRAM is never
refreshed: the clip table and the current bin (``ops.BinSelector``) live on the layer, and so does a
folded LoRA (``lora.py``).

The layout computes nothing for ComfyUI: the layer's own forward hands these tensors to
``kernels.w4a4_linear`` (with the clip table and bin), which is the only W4A4 matmul. ``dequantize``
(what kitchen falls back to for an op it has no handler for) gives the weight-only effective weight
``numerics.W4A4Params.effective_weight``; ``quantize`` raises, since W4A4 weights come from calibration.
Nothing here is imported on a ComfyUI without ``comfy.quant_ops`` (0.3.64): the layers keep their
tensors as buffers there (``ops.py``).
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from ..kernels import numerics as nm

LAYOUT_NAME = "WanW4A4Layout"
# numerics.W4A4Params fields held by the QuantizedTensor (data first, then the params' tensor fields).
STATIC_FIELDS = ("qweight", "wscale", "wfactor", "smooth", "lr_down", "lr_up")


def _quant_ops():
    """ComfyUI's ``comfy.quant_ops`` if it has kitchen's QuantizedTensor extension point, else None."""
    qo = sys.modules.get("comfy.quant_ops")
    if qo is None and "comfy.model_management" in sys.modules:  # only a ComfyUI that is already running
        try:
            import comfy.quant_ops as qo  # noqa: PLC0415 - ComfyUI is imported lazily everywhere in the pack
        except ImportError:
            return None
    if not all(hasattr(qo, n) for n in ("QuantizedTensor", "QuantizedLayout", "register_layout_class")):
        return None
    return qo


def available() -> bool:
    """True when W4A4 weights are QuantizedTensors here (feature detection, never a version string)."""
    return _layout() is not None


_LAYOUT = []  # (QuantizedTensor, layout class, params class) once registered


def _layout():
    """(QuantizedTensor, layout class, params class), registered once per process; None without the
    extension point (or before ComfyUI is imported: W4A4 layers made outside ComfyUI keep buffers)."""
    if _LAYOUT:
        return _LAYOUT[0]
    qo = _quant_ops()
    if qo is None:
        return None
    from comfy_kitchen.tensor.base import BaseLayoutParams  # noqa: PLC0415 - present whenever quant_ops is

    @dataclasses.dataclass(frozen=True)
    class W4A4LayoutParams(BaseLayoutParams):
        """``scale`` is wscale [N] fp32; the other tensor fields as in ``numerics.W4A4Params``."""

        wfactor: torch.Tensor = None
        smooth: torch.Tensor = None
        lr_down: torch.Tensor = None
        lr_up: torch.Tensor = None
        act_unsigned: bool = False
        act_shift: float = 0.0

        def _tensor_fields(self) -> list[str]:
            return ["scale", "wfactor", "smooth", "lr_down", "lr_up"]

    class WanW4A4Layout(qo.QuantizedLayout):
        """Packed 4-bit residual + row scales + group factors, smoothing and a BF16 low-rank branch."""

        Params = W4A4LayoutParams
        MIN_SM_VERSION = None

        @classmethod
        def quantize(cls, tensor, **kwargs):
            raise NotImplementedError(
                "W4A4 weights are made by calibration (the 'Calibrate W4A4' node or `python -m wan_w4a4 "
                "calibrate`), not from a float tensor; LoRAs on W4A4 layers are folded into the low-rank "
                "branch instead of re-quantized")

        @classmethod
        def dequantize(cls, qdata, params):
            return to_params(qdata, params).effective_weight().to(params.orig_dtype)

        @classmethod
        def get_plain_tensors(cls, qtensor):
            p = qtensor._params
            return (qtensor._qdata, p.scale, p.wfactor, p.smooth, p.lr_down, p.lr_up)

        @classmethod
        def state_dict_tensors(cls, qdata, params):
            return dict(zip(STATIC_FIELDS, (qdata, params.scale, params.wfactor, params.smooth,
                                            params.lr_down, params.lr_up)))

    qo.register_layout_class(LAYOUT_NAME, WanW4A4Layout)
    _LAYOUT.append((qo.QuantizedTensor, WanW4A4Layout, W4A4LayoutParams))
    return _LAYOUT[0]


def is_w4a4_weight(t) -> bool:
    """A QuantizedTensor of this layout (by name: the pack may be imported twice under two names)."""
    return getattr(t, "_layout_cls", None) == LAYOUT_NAME


def from_params(p: nm.W4A4Params):
    """The QuantizedTensor of ``p``'s static tensors (no copies)."""
    qt_cls, _, params_cls = _layout()
    params = params_cls(scale=p.wscale, orig_dtype=torch.bfloat16, orig_shape=(p.out_features, p.in_features),
                        wfactor=p.wfactor, smooth=p.smooth, lr_down=p.lr_down, lr_up=p.lr_up,
                        act_unsigned=bool(p.act_unsigned), act_shift=float(p.act_shift))
    return qt_cls(p.qweight, LAYOUT_NAME, params)


def to_params(qdata: torch.Tensor, params, clip: torch.Tensor | None = None, bias: torch.Tensor | None = None
              ) -> nm.W4A4Params:
    """``numerics.W4A4Params`` from a QuantizedTensor's parts (views, no copies); clip defaults to one bin of 1."""
    if clip is None:
        clip = torch.ones(1, dtype=torch.float32, device=qdata.device)
    return nm.W4A4Params(qweight=qdata, wscale=params.scale, wfactor=params.wfactor, smooth=params.smooth,
                         lr_down=params.lr_down, lr_up=params.lr_up, clip=clip, bias=bias,
                         act_unsigned=params.act_unsigned, act_shift=params.act_shift)


def static_tensors(weight) -> dict[str, torch.Tensor]:
    """name -> tensor of a W4A4 QuantizedTensor, under the ``numerics.W4A4Params`` field names."""
    p = weight._params
    return dict(zip(STATIC_FIELDS, (weight._qdata, p.scale, p.wfactor, p.smooth, p.lr_down, p.lr_up)))


def no_dense_weight(layer) -> bool:
    """True when ``layer.weight`` holds no dense BF16 weight: absent, the buffers storage's stand-in, or a
    W4A4 QuantizedTensor (its data is the packed 4-bit residual)."""
    w = getattr(layer, "weight", None)
    return not isinstance(w, torch.Tensor) or (is_w4a4_weight(w) and w.nbytes == w._qdata.nbytes
                                               and w._qdata.dtype == torch.uint8)
