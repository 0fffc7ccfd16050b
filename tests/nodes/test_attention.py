"""The SDPA order of W4A4 models (``nodes/attention.py``) in a real ComfyUI (CPU, tiny experts).

The CPU cannot run cuDNN attention, so the tests check what can fail here: that ComfyUI calls the
override the way it is written for, with the arguments of a real Wan forward; that the calls it takes
compute ComfyUI's ``attention_pytorch`` bit for bit (``CudnnFirst.device_type`` moved to the CPU); and
that the modes attach, stack and come off as documented. The cuDNN kernel itself is checked on the GPU
(``test_gpu_attention.py``)."""
from __future__ import annotations

import pytest
import torch
from wan_w4a4.nodes import attention as attn

pytestmark = pytest.mark.comfyui


class Counting(attn.CudnnFirst):
    """CudnnFirst that takes CPU calls and counts what it took and passed on."""
    device_type = "cpu"
    min_elements = 0

    def __init__(self):
        self.taken = self.passed = 0

    def __deepcopy__(self, memo):  # ComfyUI 0.3.64 deep-copies model_options on clone: keep one counter
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        took = not args and self.takes(func, q, k, v, kwargs)
        self.taken += took
        self.passed += not took
        return super().__call__(func, q, k, v, heads, *args, **kwargs)


def _override(model):
    return model.model_options.get("transformer_options", {}).get(attn.OVERRIDE)


def test_taken_calls_are_comfyuis_attention_bit_for_bit(env):
    func = attn._pytorch_attention()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4 * 128, generator=g).bfloat16() for _ in range(3))
    over = Counting()
    out = over(func, q, k, v, heads=4, transformer_options={}, _inside_attn_wrapper=True)
    assert over.taken == 1 and torch.equal(out, func(q, k, v, heads=4))
    qh, kh, vh = (t.view(2, 300, 4, 128).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D], Wan's RoPE'd form
    out = over(func, qh, kh, vh, heads=4, skip_reshape=True, skip_output_reshape=True)
    assert over.taken == 2 and torch.equal(out, func(qh, kh, vh, heads=4, skip_reshape=True, skip_output_reshape=True))


def test_other_calls_go_to_comfyui(env):
    func = attn._pytorch_attention()
    q = torch.randn(1, 300, 512)
    over = Counting()
    mask = torch.zeros(300, 300)
    assert torch.equal(over(func, q, q, q, heads=4, mask=mask), func(q, q, q, heads=4, mask=mask))  # masked
    over.min_elements = attn.MIN_ELEMENTS
    small = q[:, :10]
    assert torch.equal(over(func, small, small, small, heads=4), func(small, small, small, heads=4))  # small
    basic = __import__("comfy.ldm.modules.attention").ldm.modules.attention.attention_basic.__wrapped__
    over(basic, q, q, q, heads=4)  # another attention function chosen at launch
    assert over.taken == 0 and over.passed == 3
    # what attention_pytorch would do otherwise (its own scale, grouped KV) or gets positionally stays ComfyUI's
    for kwargs in ({"scale": 0.5}, {"enable_gqa": True}):
        over(func, q, q, q, heads=4, **kwargs)
    over(func, q, q, q, 4, None)  # heads and mask given positionally
    assert over.taken == 0 and over.passed == 6
    monkey = Counting()
    import comfy.ldm.modules.attention as comfy_attention
    limit = comfy_attention.SDP_BATCH_LIMIT
    comfy_attention.SDP_BATCH_LIMIT = 1  # ComfyUI splits a batch of 2 then: left to it
    q2 = torch.cat([q, q])
    try:
        assert torch.equal(monkey(func, q2, q2, q2, heads=4), func(q2, q2, q2, heads=4))
    finally:
        comfy_attention.SDP_BATCH_LIMIT = limit
    assert monkey.taken == 0 and monkey.passed == 1
    plain = attn.CudnnFirst()  # the production class takes no CPU call
    assert not plain.takes(func, q, q, q, {})


def test_modes_attach_stack_and_come_off(env):
    base = env.unet("high")
    assert not attn.attach(base.clone(), "auto")  # auto: a CPU model keeps ComfyUI's order
    m = base.clone()
    assert attn.attach(m, "cudnn first") and isinstance(_override(m), attn.CudnnFirst)
    assert _override(base) is None  # the clone's own transformer_options
    again = m.clone()
    assert attn.attach(again, "cudnn first") and isinstance(_override(again), attn.CudnnFirst)
    assert not attn.attach(again, "comfy") and _override(again) is None

    def sage(f, *args, **kwargs):
        return f(*args, **kwargs)

    other = base.clone()
    other.model_options.setdefault("transformer_options", {})[attn.OVERRIDE] = sage
    assert not attn.attach(other, "auto") and _override(other) is sage  # auto leaves another override alone
    assert not attn.attach(other, "cudnn first") and _override(other) is sage  # never replaces another node's
    with pytest.raises(ValueError, match="attention must be one of"):
        attn.check_mode("flash")


def test_a_torch_without_backend_order_keeps_comfyuis_attention(env, monkeypatch):
    assert attn.can_order()  # the torch these tests run on has sdpa_kernel(set_priority=)
    monkeypatch.setattr(attn, "can_order", lambda: False)
    m = env.unet("high").clone()
    assert not attn.attach(m, "cudnn first") and _override(m) is None


def test_a_wan_forward_calls_it_and_samples_the_same_bits(env, monkeypatch):
    """Every attention call of a real two-expert Wan sampling reaches the override with arguments it
    takes, and computing them there gives ComfyUI's result bit for bit. ComfyUI picks PyTorch attention
    on CUDA; on the CPU it picks another one, so the test makes the choice ``--use-pytorch-cross-attention``
    makes."""
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.ldm.wan.model as wan

    monkeypatch.setattr(wan, "optimized_attention", comfy_attention.attention_pytorch)
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    low = env.apply(env.unet("low"), "tiny_low.safetensors")
    ref = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    overrides = []
    for m in (high, low):
        o = Counting()
        m.model_options.setdefault("transformer_options", {})[attn.OVERRIDE] = o
        overrides.append(o)
    out = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    blocks = len(high.model.diffusion_model.blocks)
    # self- and cross-attention (+ the image cross-attention of I2V) per block, per model call
    assert all(o.taken >= 2 * blocks and o.passed == 0 for o in overrides), [(o.taken, o.passed) for o in overrides]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_nodes_take_the_mode(env):
    (m,) = env.node("WanW4A4ApplyState").apply(env.unet("high"), "tiny_high.safetensors", attention="cudnn first")
    assert type(_override(m)).__name__ == "CudnnFirst"  # the pack as ComfyUI imported it (another module name)
    (m,) = env.node("WanW4A4ApplyState").apply(env.unet("high"), "tiny_high.safetensors")
    assert _override(m) is None  # auto on a CPU
    opts = env.node("WanW4A4ApplyState").INPUT_TYPES()["optional"]["attention"]
    assert opts[0] == list(attn.MODES) and opts[1]["default"] == "auto"
