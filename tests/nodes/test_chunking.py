"""Cond/uncond one at a time (``nodes/chunking.py``) in a real ComfyUI (CPU, tiny experts)."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.nodes import chunking
from wan_w4a4.nodes.hook import HOOK_KEY

pytestmark = pytest.mark.comfyui


def _apply(env, expert, cond_batch):
    (m,) = env.node("WanW4A4ApplyState").apply(env.unet(expert), f"tiny_{expert}.safetensors", cond_batch)
    return env.shifted(m)


@pytest.mark.slow  # two two-expert runs
def test_split_gives_the_batched_result(env):
    """Forced split (every CFG call in two) samples the same video as ComfyUI's batched calls: each row
    of the W4A4 forward depends only on its own sample. Equality is to fp32 rounding, not a
    tolerance on quantization: both runs quantize the same rows with the same numerics."""
    batched = {e: _apply(env, e, "batched") for e in ("high", "low")}
    split = {e: _apply(env, e, "split") for e in ("high", "low")}
    assert chunking.get_split(batched["high"]) is None
    _, ref = env.two_expert(batched["high"], batched["low"])
    _, out = env.two_expert(split["high"], split["low"])
    for e in ("high", "low"):
        assert chunking.get_split(split[e]).calls_split >= 1, e
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # The timestep hook wraps the split: one record (and one bin write) per step for the whole call.
    import comfy.patcher_extension as pe
    (hook,) = split["high"].get_wrappers(pe.WrappersMP.APPLY_MODEL, HOOK_KEY)
    recs = [r for r in hook.records if r.run == hook.run]
    assert recs and all(r.batch == 2 for r in recs)
    assert len({r.sigma for r in recs}) == len(recs)


def test_auto_leaves_small_calls_batched(env):
    high, low = (_apply(env, e, "auto") for e in ("high", "low"))
    env.two_expert(high, low)
    assert chunking.get_split(high).calls_split == 0  # 2 x 8 tokens is far below the threshold


@pytest.mark.slow  # two two-expert runs
def test_split_works_on_a_bf16_model_too(env):
    """The wrapper is generic (the benchmark's like-for-like BF16 reference uses it)."""
    ref_h, ref_l = env.shifted(env.unet("high")), env.shifted(env.unet("low"))
    _, ref = env.two_expert(ref_h, ref_l)
    h, l = env.shifted(env.unet("high")), env.shifted(env.unet("low"))
    for m in (h, l):
        chunking.attach_split(m, "split")
    _, out = env.two_expert(h, l)
    assert chunking.get_split(h).calls_split >= 1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_chunks_policy():
    s = chunking.CondBatchSplit(min_tokens=100)
    x = torch.zeros(2, 16, 3, 8, 8)  # 3*8*8/4 = 48 tokens per sample
    opts = {"cond_or_uncond": [1, 0]}
    assert s.chunks(x, opts, (1, 2, 2), None) == 1  # 96 tokens < 100
    x = torch.zeros(2, 16, 5, 8, 8)  # 80 per sample, 160 in all
    assert s.chunks(x, opts, (1, 2, 2), None) == 2
    assert s.chunks(x, opts, (1, 2, 2), control={"x": 1}) == 1  # ControlNet inputs are not sliced
    assert s.chunks(x, {"cond_or_uncond": [0]}, (1, 2, 2), None) == 1  # one cond: nothing to split
    assert s.chunks(torch.zeros(4, 16, 5, 8, 8), opts, (1, 2, 2), None) == 2  # latent batch 2 per cond
    with pytest.raises(ValueError, match="min_tokens"):
        chunking.CondBatchSplit(-1)


def test_bad_mode_is_refused(env):
    with pytest.raises(ValueError, match="cond_batch 'sometimes'"):
        env.node("WanW4A4ApplyState").apply(env.unet("high"), "tiny_high.safetensors", "sometimes")
