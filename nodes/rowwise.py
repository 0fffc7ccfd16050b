"""A Wan block's ``torch.addcmul`` calls in one Triton pass each, bit for bit, on W4A4 models.

ComfyUI's Wan block (``WanAttentionBlock.forward``, both supported versions) builds the inputs of its self-attention
and feed-forward as ``torch.addcmul(e0, norm(x), 1 + e1)`` and updates the residual stream as
``torch.addcmul(x, y, e2)``, four calls per block (and one for the head's modulation) with the e's broadcast over
the tokens, which PyTorch's generic
elementwise kernel runs at 0.45-0.6x the bandwidth of ``kernels.addcmul`` (0.23x on 0.3.64's channels-first residual
stream; ``kernels/triton_rowwise.py`` has the numbers).
:class:`RowwiseAddcmul` is a keyed ``WrappersMP.APPLY_MODEL`` wrapper (like ``hook.py`` and ``chunking.py``): during
a large model call it runs ComfyUI's own forward under a ``TorchFunctionMode`` that answers exactly those
``torch.addcmul`` calls with ``kernels.addcmul`` (the same bits: tests compare whole samples with and without) and
passes every other call through untouched. ComfyUI's code is neither copied nor changed, and any ``addcmul`` of
another form (other dtypes, shapes, ``value=``, ``out=``, operands that need autograd: ComfyUI samples in inference
mode) is PyTorch's.

It stays out of: calls of fewer than ``MIN_TOKENS`` tokens (every torch call of the model goes through the mode, a
host cost that few tokens could expose, not measured; the kernel's gain is in bandwidth), CPU inputs, models compiled
with ComfyUI's ``torch.compile`` wrapper, and ``WAN_W4A4_ROWWISE=0`` (A/B measurements).
"""
from __future__ import annotations

import logging
import os

import torch

from .. import kernels
from .chunking import tokens_per_sample

ROWWISE_KEY = "wan_w4a4.rowwise_addcmul"  # wrapper key on the ModelPatcher
ENV = "WAN_W4A4_ROWWISE"  # "0" or "off": ComfyUI's torch.addcmul everywhere
COMPILE_KEY = "torch.compile"  # ComfyUI's set_torch_compile_wrapper key (comfy_api/torch_helpers)
MIN_TOKENS = 8192
log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def compiled(transformer_options: dict) -> bool:
    """This model call runs under ComfyUI's ``torch.compile`` wrapper (its APPLY_MODEL wrappers reach
    ``transformer_options["wrappers"]``, merged there by ``comfy/sampler_helpers.py``), or torch is compiling."""
    wrappers = transformer_options.get("wrappers", {})
    return any(COMPILE_KEY in per_type for per_type in wrappers.values()) or torch.compiler.is_compiling()


class _AddcmulMode(torch.overrides.TorchFunctionMode):
    """Answers ``torch.addcmul(a, b, c)`` with ``kernels.addcmul`` where that takes the call; counts what it took."""

    def __init__(self):
        super().__init__()
        self.taken = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.addcmul and not kwargs and len(args) == 3 and kernels.addcmul_reason(*args) is None:
            self.taken += 1
            return kernels.addcmul(*args)
        return func(*args, **(kwargs or {}))


class RowwiseAddcmul:
    """APPLY_MODEL wrapper: ComfyUI's forward of a large call with its broadcast ``addcmul`` calls in Triton."""

    def __init__(self, min_tokens: int = MIN_TOKENS):
        self.min_tokens = int(min_tokens)
        self.calls = 0  # model calls run under the mode
        self.taken = 0  # addcmul calls it answered (for tests and logs)

    def active(self, x: torch.Tensor, transformer_options: dict, patch_size) -> bool:
        if not enabled() or not x.is_cuda or compiled(transformer_options):
            return False
        return x.shape[0] * tokens_per_sample(x, patch_size) >= self.min_tokens

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        dm = getattr(executor.class_obj, "diffusion_model", None)
        if not self.active(x, transformer_options, getattr(dm, "patch_size", None)):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        mode = _AddcmulMode()
        with mode:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if not self.calls:
            log.info("W4A4: %d torch.addcmul calls of a %d-token model call ran in Triton (nodes/rowwise.py)",
                     mode.taken, x.shape[0] * tokens_per_sample(x, getattr(dm, "patch_size", None)))
        self.calls += 1
        self.taken += mode.taken
        return out

    def __repr__(self):
        return f"RowwiseAddcmul(min_tokens={self.min_tokens})"


def attach(model) -> None:
    """Add the wrapper to a ModelPatcher (replacing an earlier one)."""
    import comfy.patcher_extension as pe

    model.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, ROWWISE_KEY)
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, ROWWISE_KEY, RowwiseAddcmul())


def get(model) -> RowwiseAddcmul | None:
    import comfy.patcher_extension as pe

    wrappers = model.get_wrappers(pe.WrappersMP.APPLY_MODEL, ROWWISE_KEY)
    return wrappers[0] if wrappers else None
