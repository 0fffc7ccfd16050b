"""Cond/uncond one at a time for large calls: half the activation memory of a CFG step, same math.

ComfyUI batches cond and uncond into one model call whenever its memory estimate fits, so a
480p x 81 Wan step runs 2 x 32 760 tokens at once. At that size the kernels are already at full
speed per token (H100, BF16: 3.11 s for one sample, 6.28 s for two), so batching buys nothing, while
every activation of the block - q, k, v, the FP32 copies ComfyUI's RoPE makes, the FFN hidden
state - exists twice. For a W4A4 expert those activations are most of the peak: its weights are a
quarter of BF16's. :class:`CondBatchSplit` (a keyed ``WrappersMP.APPLY_MODEL`` wrapper) runs such
a call as one model call per batched cond and concatenates the outputs.

It is exact: every row of a Wan forward depends only on its own inputs (attention is within a
sample), so each chunk's output equals the rows of the batched call up to kernel-level rounding
(different M may pick different GEMM tiles). It splits only along ComfyUI's own cond chunks
(``transformer_options["cond_or_uncond"]``), never inside one, slices every batched input (x, t,
``c_concat``, ``c_crossattn`` and any other tensor with the batch as its first dimension) and the
per-chunk lists, and leaves calls with ControlNet inputs, calls of one chunk and small calls
(fewer than ``min_tokens`` tokens in the whole batch, where batching does pay off) unchanged.
"""
from __future__ import annotations

import math

import torch

SPLIT_KEY = "wan_w4a4.cond_split"  # wrapper key on the ModelPatcher
# Split only above this many tokens per call: 480p x 81 with CFG (65 520) splits, 480p x 33 (28 080)
# and everything smaller stays batched (below ~32k tokens per GEMM the W4A4 kernels lose speed).
DEFAULT_MIN_TOKENS = 32768
MODES = ("auto", "batched", "split")  # node option: auto = split above DEFAULT_MIN_TOKENS


def tokens_per_sample(x: torch.Tensor, patch_size) -> int:
    """Transformer tokens of one sample of latent ``x`` [B, C, T, H, W] for a model with ``patch_size``."""
    return math.prod(x.shape[2:]) // max(1, math.prod(patch_size or (1,)))


def _slice(v, lo: int, hi: int, batch: int):
    """Rows lo:hi of a batched tensor; anything else (None, non-batched tensors, lists) unchanged."""
    if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch:
        return v[lo:hi]
    return v


class CondBatchSplit:
    """APPLY_MODEL wrapper that runs the batched conds of a large call one at a time."""

    def __init__(self, min_tokens: int = DEFAULT_MIN_TOKENS):
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self.min_tokens = int(min_tokens)
        self.calls_split = 0  # model calls it split (for tests and logs)

    def chunks(self, x: torch.Tensor, transformer_options: dict, patch_size, control) -> int:
        """How many calls to make of this one (1 = leave it alone)."""
        groups = transformer_options.get("cond_or_uncond") or []
        n = len(groups)
        if n < 2 or control is not None or x.shape[0] % n:
            return 1
        if x.shape[0] * tokens_per_sample(x, patch_size) < self.min_tokens:
            return 1
        return n

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        dm = getattr(executor.class_obj, "diffusion_model", None)
        n = self.chunks(x, transformer_options, getattr(dm, "patch_size", None), control)
        if n == 1:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        batch, rows = x.shape[0], x.shape[0] // n
        per_chunk_lists = {k: v for k, v in transformer_options.items()
                           if k in ("cond_or_uncond", "uuids") and isinstance(v, list) and len(v) == n}
        outs = []
        for i in range(n):
            lo, hi = i * rows, (i + 1) * rows
            to = dict(transformer_options)
            to.update({k: v[i:i + 1] for k, v in per_chunk_lists.items()})
            kw = {k: _slice(v, lo, hi, batch) for k, v in kwargs.items()}
            outs.append(executor(x[lo:hi], _slice(t, lo, hi, batch), _slice(c_concat, lo, hi, batch),
                                 _slice(c_crossattn, lo, hi, batch), None, to, **kw))
        self.calls_split += 1
        return torch.cat(outs)

    def __repr__(self):
        return f"CondBatchSplit(min_tokens={self.min_tokens})"


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is a cond-batch policy (callers check before loading anything)."""
    if mode not in MODES:
        raise ValueError(f"cond_batch {mode!r}: choose one of {', '.join(MODES)}")


def attach_split(model, mode: str = "auto") -> None:
    """Set the cond-batch policy of a ModelPatcher: ``auto`` (split calls of more than
    DEFAULT_MIN_TOKENS tokens), ``split`` (always split batched conds) or ``batched`` (ComfyUI's
    default: no wrapper)."""
    import comfy.patcher_extension as pe

    check_mode(mode)
    model.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, SPLIT_KEY)
    if mode == "batched":
        return
    model.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, SPLIT_KEY,
                               CondBatchSplit(DEFAULT_MIN_TOKENS if mode == "auto" else 0))


def get_split(model) -> CondBatchSplit | None:
    import comfy.patcher_extension as pe

    wrappers = model.get_wrappers(pe.WrappersMP.APPLY_MODEL, SPLIT_KEY)
    return wrappers[0] if wrappers else None
