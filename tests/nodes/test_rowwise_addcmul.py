"""A W4A4 model's ``torch.addcmul`` calls answered by ``kernels.addcmul`` (``nodes/rowwise.py``), in a real ComfyUI on
the CPU. The Triton kernel itself is tested on the GPU (tests/kernels/test_rowwise_kernel.py,
tests/nodes/gpu_comfy_check.py); here a stand-in takes every call whose operands have the kernel's form
(``triton_rowwise.form_reason``, whatever the device; the tiny CPU models' fp32 in place of the 16-bit dtypes) and
records it, which shows which of ComfyUI's calls reach the kernel and that the samples keep their bits."""
from __future__ import annotations

import sys

import pytest
import torch

pytestmark = pytest.mark.comfyui


def _pack_module(env, name: str):
    """The module ``name`` of the pack as ComfyUI loaded it (under its folder's name, not ``wan_w4a4``)."""
    package = type(env.node("WanW4A4ApplyState")).__module__.rsplit(".", 2)[0]
    return sys.modules[f"{package}.{name}"]


@pytest.fixture
def stand_in(env, monkeypatch):
    rw = _pack_module(env, "nodes.rowwise")
    form_reason = rw.kernels._rowwise_module()[0].form_reason  # the pack's kernels/triton_rowwise.py (no Triton)
    taken = []

    def form(a, b, c):  # the tiny CPU models run in fp32: the form, with their dtype in place of the 16-bit ones
        return form_reason(a, b, c, dtypes=(b.dtype,) if isinstance(b, torch.Tensor) else ())

    def addcmul(a, b, c):
        taken.append(tuple(tuple(t.shape) for t in (a, b, c)))
        return torch.addcmul(a, b, c)

    monkeypatch.setattr(rw.kernels, "addcmul_reason", form)
    monkeypatch.setattr(rw.kernels, "addcmul", addcmul)
    monkeypatch.setattr(rw.RowwiseAddcmul, "active", lambda self, x, options, patch_size: rw.enabled())
    return rw, taken


def test_apply_and_load_attach_it(env):
    rw = _pack_module(env, "nodes.rowwise")
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    assert isinstance(rw.get(high), rw.RowwiseAddcmul)
    assert rw.get(env.unet("high")) is None  # the BF16 model is left alone
    env.node("WanW4A4SaveCheckpoint").save(high, "rowwise/tiny_high_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("rowwise/tiny_high_ck.safetensors")
    assert isinstance(rw.get(ck), rw.RowwiseAddcmul)


@pytest.mark.slow  # W4A4 two-expert runs, with and without
def test_four_calls_per_block_reach_it_and_the_samples_keep_their_bits(env, stand_in, monkeypatch):
    rw, taken = stand_in
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    low = env.apply(env.unet("low"), "tiny_low.safetensors")
    blocks = len(high.model.diffusion_model.blocks)
    mid, out = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    calls = rw.get(high).calls + rw.get(low).calls
    # per model call: each block's two modulations (e row, normalised x, 1 + e row) and two residual updates (x, y,
    # e row), and the head's modulation, all in ComfyUI's own forward; every call's third operand is an e row
    assert calls > 0 and len(taken) == (4 * blocks + 1) * calls, (len(taken), blocks, calls)
    modulations = [s for s in taken if s[0][1] == 1]
    assert len(modulations) == (2 * blocks + 1) * calls
    assert all(s[2][1] == 1 and s[1][1] > 1 for s in taken)
    monkeypatch.setenv("WAN_W4A4_ROWWISE", "0")
    n = len(taken)
    ref_mid, ref = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    assert len(taken) == n
    assert torch.equal(mid, ref_mid) and torch.equal(out, ref)


def test_when_it_stays_out(env, monkeypatch):
    rw = _pack_module(env, "nodes.rowwise")
    w = rw.RowwiseAddcmul(min_tokens=1000)
    x = torch.zeros(1, 16, 4, 20, 26)  # 4 x 10 x 13 = 520 tokens per sample at patch (1, 2, 2)
    assert not w.active(x, {}, (1, 2, 2))  # CPU
    cuda_like = type("T", (), {"is_cuda": True, "shape": (2, 16, 4, 20, 26)})()
    assert w.active(cuda_like, {}, (1, 2, 2))  # 1040 tokens in the call
    assert not w.active(type("T", (), {"is_cuda": True, "shape": (1, 16, 4, 20, 26)})(), {}, (1, 2, 2))
    assert not w.active(cuda_like, {"wrappers": {"apply_model": {"torch.compile": [object()]}}}, (1, 2, 2))
    monkeypatch.setenv("WAN_W4A4_ROWWISE", "off")
    assert not w.active(cuda_like, {}, (1, 2, 2))
