"""The feed-forward of a W4A4 Wan block with its GELU computed in place: one FFN-hidden tensor fewer.

A Wan block's FFN is ``[Linear(dim, ffn_dim), GELU(tanh), Linear(ffn_dim, dim)]``. ComfyUI runs it as
``ffn.2(gelu(ffn.0(u)))``: 0.33's ``WanFeedForward`` through ``comfy.ops.linear_input_act``, which folds
the GELU into the down-projection's quantizer only for ComfyUI's own INT8 layout and otherwise calls
``linear(gelu(x))`` with ``x`` still referenced, so the hidden state exists twice (before and after
GELU) while ffn.2 runs; 0.3.64's ``nn.Sequential`` holds both during the GELU. At 480p x 81 one hidden
state of one sample is 32 760 x 13 824 x 2 bytes = 0.84 GiB. In a W4A4 expert, whose weights are a
quarter of BF16's, that second copy is a large part of the step's peak (benchmarks/RESULTS.md).

:class:`InplaceGeluFFN` runs ``ffn.2(gelu_(ffn.0(u)))``: the same GELU kernel, written over ffn.0's
fresh output, so the result is bit-identical (the test compares it). It is installed as a ModelPatcher
object patch of ``blocks.<i>.ffn`` on W4A4 models only, and only where the FFN has exactly that form.

It shares the children *dictionary* of the FFN it stands in for (``_modules``), not just the children:
object patches of ``blocks.<i>.ffn.0`` / ``.ffn.2`` (the W4A4 layers of an applied state) and their
restoration then land in the one dictionary whatever order ComfyUI applies and restores them in, and
module names, state-dict keys and device moves stay those of the original FFN.
"""
from __future__ import annotations

import re

import torch

FFN_PATH = re.compile(r"^blocks\.(\d+)\.ffn\.[02]$")


class InplaceGeluFFN(torch.nn.Module):
    """``ffn[2](gelu_tanh_(ffn[0](x)))`` over the children of ``ffn`` (see the module doc)."""

    def __init__(self, ffn: torch.nn.Sequential):
        super().__init__()
        if not is_gelu_ffn(ffn):
            raise ValueError(f"not a [Linear, GELU(tanh), Linear] feed-forward: {type(ffn).__name__}")
        self._modules = ffn._modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._modules["0"](x)
        if torch.is_grad_enabled() and y.requires_grad:  # autograd needs GELU's input: no in-place
            y = self._modules["1"](y)
        else:
            torch.ops.aten.gelu_(y, approximate="tanh")
        return self._modules["2"](y)


def is_gelu_ffn(module) -> bool:
    """Is ``module`` a Wan feed-forward [Linear, GELU(tanh), Linear] (ComfyUI's or our stand-in)?"""
    mods = getattr(module, "_modules", None)
    # by name too: inside ComfyUI the pack is imported under its folder name, and tests import it as wan_w4a4
    ours = type(module).__name__ == InplaceGeluFFN.__name__
    if not (isinstance(module, torch.nn.Sequential) or ours) or mods is None or list(mods) != ["0", "1", "2"]:
        return False
    act = mods["1"]
    return isinstance(act, torch.nn.GELU) and act.approximate == "tanh"


def ffn_blocks(layer_names) -> list[int]:
    """Indices of the blocks whose ffn.0 or ffn.2 is among ``layer_names`` (the W4A4 layers)."""
    return sorted({int(m.group(1)) for n in layer_names if (m := FFN_PATH.match(n))})


def attach_inplace_gelu(patcher, layer_names, prefix: str = "diffusion_model.") -> int:
    """Object-patch the FFN of every block with a W4A4 ffn.0 or ffn.2 of ``patcher`` (a ModelPatcher).
    Returns how many were patched; FFNs of another form are left to ComfyUI."""
    dm = patcher.model.diffusion_model
    n = 0
    for i in ffn_blocks(layer_names):
        key = f"{prefix}blocks.{i}.ffn"
        # while another clone of the shared model is loaded, its stand-in sits in the tree: the
        # original is in the (shared) backup; either holds the same children dictionary
        current = patcher.object_patches_backup.get(key, dm.blocks[i].ffn)
        if is_gelu_ffn(current):
            patcher.add_object_patch(key, InplaceGeluFFN(current))
            n += 1
    return n
