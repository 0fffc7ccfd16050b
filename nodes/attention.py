"""Which PyTorch SDPA backend a W4A4 model's attention tries first.

ComfyUI runs ``torch.nn.functional.scaled_dot_product_attention`` inside
``sdpa_kernel(priority, set_priority=True)`` (``comfy/ops.py``). ComfyUI 0.3.64 lists cuDNN attention
first; 0.33 lists FlashAttention first. On Hopper at Wan2.2's shapes that order decides the step
time: one W4A4 model call at 480p x 81 spends 1474 ms in cuDNN's sm90 attention kernel on 0.3.64 and
2387 ms in PyTorch's FlashAttention-2 kernel on 0.33 (H200, ``benchmarks/RESULTS.md``), which made
every configuration slower on 0.33 although the pack's own kernels got faster.

ComfyUI leaves a per-model hook for this: ``transformer_options["optimized_attention_override"]``,
called by its attention wrapper as ``override(func, q, k, v, heads, ...)`` on both versions (what
``ModelPatcher.set_model_optimized_attention`` sets on 0.33). :class:`CudnnFirst` answers the calls it
can answer exactly as ComfyUI's ``attention_pytorch`` would, with cuDNN attention first in the order:
large, unmasked CUDA attention with default scale; every other call (masks, grouped KV, small inputs,
another attention function such as sage or xformers chosen at launch) goes to ComfyUI's function.

Modes (the nodes' ``attention`` input): ``auto`` puts cuDNN first on NVIDIA Hopper GPUs (compute capability
9.x, where it was measured faster) and leaves ComfyUI's order elsewhere; ``cudnn first`` does it on any GPU;
``comfy`` never does. In every mode a model that already carries another override (an attention node placed
before) keeps it, and a torch that cannot order backends keeps ComfyUI's attention.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

MODES = ("auto", "comfy", "cudnn first")
OVERRIDE = "optimized_attention_override"
# ComfyUI 0.33's comfy/ops.py runs smaller inputs outside its priority context ("for small inputs
# cudnn attention seems slower"); the same bound keeps those calls on ComfyUI's path.
MIN_ELEMENTS = 1024 * 128


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"attention must be one of {', '.join(MODES)}, not {mode!r}")


def hopper(device) -> bool:
    """Whether ``device`` is an NVIDIA GPU of compute capability 9.x (H100, H200; not ROCm, whose MI300 also
    reports 9.x and has no cuDNN)."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] == 9)


def can_order() -> bool:
    """Whether this torch can set an SDPA backend order (``sdpa_kernel(..., set_priority=True)``, torch 2.6+),
    checked as ComfyUI's ``comfy/ops.py`` checks it."""
    import inspect

    try:
        from torch.nn.attention import sdpa_kernel
    except ImportError:
        return False
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def cudnn_order():
    """SDPA backends with cuDNN first, then ComfyUI's others in their order."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
            SDPBackend.MATH]


def sdpa_heads(q, k, v, heads: int, skip_reshape: bool = False, skip_output_reshape: bool = False, order=None):
    """ComfyUI's ``attention_pytorch`` for one unmasked batch: [B, L, H*D] in and out (or [B, H, L, D]
    with the skips), SDPA under ``sdpa_kernel(order, set_priority=True)`` when ``order`` is given."""
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if order is None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(order, set_priority=True):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                                                   is_causal=False)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


def _pytorch_attention():
    """ComfyUI's ``attention_pytorch`` as its wrapper passes it to an override (unwrapped)."""
    from comfy.ldm.modules import attention

    f = attention.attention_pytorch
    return getattr(f, "__wrapped__", f)


class CudnnFirst:
    """An ``optimized_attention_override``: cuDNN attention first for the calls it takes (see the
    module doc), ComfyUI's own function for the rest."""

    device_type = "cuda"  # cuDNN attention is CUDA's
    min_elements = MIN_ELEMENTS

    def takes(self, func, q, k, v, kwargs) -> bool:
        from comfy.ldm.modules import attention

        return (func is _pytorch_attention() and isinstance(q, torch.Tensor) and q.device.type == self.device_type
                and kwargs.get("mask") is None and kwargs.get("scale") is None and not kwargs.get("enable_gqa")
                and q.shape[0] <= attention.SDP_BATCH_LIMIT and q.nelement() >= self.min_elements
                and k.shape == v.shape and k.shape[:-2] == q.shape[:-2] and k.shape[-1] == q.shape[-1])

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if args or not self.takes(func, q, k, v, kwargs):
            return func(q, k, v, heads, *args, **kwargs)
        return sdpa_heads(q, k, v, heads, kwargs.get("skip_reshape", False), kwargs.get("skip_output_reshape", False),
                          order=cudnn_order())


def attach(model, mode: str = "auto") -> bool:
    """Set the attention order of ModelPatcher ``model`` (see the module doc); True if cuDNN goes first."""
    check_mode(mode)
    options = dict(model.model_options.get("transformer_options", {}))  # the clone's own, never a shared dict
    model.model_options["transformer_options"] = options
    current = options.get(OVERRIDE)
    if isinstance(current, CudnnFirst):  # a clone of a model this already ran on
        del options[OVERRIDE]
        current = None
    if mode == "comfy" or (mode == "auto" and not hopper(model.load_device)):
        return False
    if current is not None:  # another node chose this model's attention: keep it, in any mode
        if mode == "cudnn first":
            log.warning("attention 'cudnn first': the model already has another attention override (%s); "
                        "it is kept", getattr(current, "__name__", type(current).__name__))
        return False
    if not can_order():
        log.warning("attention '%s': this torch cannot order SDPA backends (torch 2.6+ needed); ComfyUI's "
                    "attention is kept", mode)
        return False
    options[OVERRIDE] = CudnnFirst()
    return True
