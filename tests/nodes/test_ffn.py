"""The in-place GELU feed-forward of W4A4 models (``nodes/ffn.py``) in a real ComfyUI (CPU, tiny experts)."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.nodes import ffn

pytestmark = pytest.mark.comfyui

FFN_KEY = "diffusion_model.blocks.{}.ffn"


def _without_ffn_patches(model):
    m = model.clone()
    for k in [k for k in m.object_patches if k.endswith(".ffn")]:
        del m.object_patches[k]
    return m


def _ffn_patches(model):
    return sorted(k for k, v in model.object_patches.items() if type(v).__name__ == "InplaceGeluFFN")


@pytest.mark.slow  # W4A4 and BF16 two-expert runs
def test_applied_state_patches_every_w4a4_ffn_and_samples_the_same_bits(env):
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    low = env.apply(env.unet("low"), "tiny_low.safetensors")
    blocks = len(high.model.diffusion_model.blocks)
    assert _ffn_patches(high) == sorted(FFN_KEY.format(i) for i in range(blocks))
    ref_mid, ref = env.two_expert(env.shifted(_without_ffn_patches(high)), env.shifted(_without_ffn_patches(low)))
    mid, out = env.two_expert(env.shifted(high), env.shifted(low))
    assert torch.equal(mid, ref_mid) and torch.equal(out, ref)  # the same GELU kernel, in place


def test_bf16_model_is_untouched_after_the_w4a4_clone_ran(env):
    """The stand-in shares the FFN's children dictionary; after ComfyUI unpatches the W4A4 clone, the
    shared model has its own Sequential with the BF16 Linears again, whatever order patches went in."""
    base = env.unet("high")
    ref_h, ref_l = env.unet("high"), env.unet("low")
    _, ref = env.two_expert(env.shifted(ref_h), env.shifted(ref_l), steps=2)
    w4a4 = env.apply(base, "tiny_high.safetensors")
    env.two_expert(env.shifted(w4a4), env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors")), steps=2)
    _, again = env.two_expert(env.shifted(base), env.shifted(env.unet("low")), steps=2)
    assert torch.equal(again, ref)
    block = base.model.diffusion_model.blocks[0]
    assert type(block.ffn).__name__ != "InplaceGeluFFN" and ffn.is_gelu_ffn(block.ffn)
    assert type(block.ffn[0]).__name__ != "W4A4Linear" and isinstance(block.ffn[0].weight, torch.Tensor)


@pytest.mark.slow  # saves, loads and samples a W4A4 checkpoint
def test_loaded_checkpoint_gets_the_patch_too(env):
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    env.node("WanW4A4SaveCheckpoint").save(high, "ffn/tiny_high_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("ffn/tiny_high_ck.safetensors")
    assert len(_ffn_patches(ck)) == len(ck.model.diffusion_model.blocks)
    low = env.apply(env.unet("low"), "tiny_low.safetensors")
    _, ref = env.two_expert(env.shifted(_without_ffn_patches(ck)), env.shifted(low), steps=2)
    _, out = env.two_expert(env.shifted(ck), env.shifted(low), steps=2)
    assert torch.equal(out, ref)


def test_in_place_only_without_autograd():
    seq = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(16, 8))
    f = ffn.InplaceGeluFFN(seq)
    x = torch.randn(5, 8)
    out = f(x)  # grad on: the module's own GELU, so backward works
    out.sum().backward()
    assert torch.equal(out, seq(x))
    with torch.no_grad():
        assert torch.equal(f(x), seq(x))
    assert list(dict(f.named_parameters())) == list(dict(seq.named_parameters()))  # same names, same tensors


def test_only_the_wan_form_is_recognised():
    lin = torch.nn.Linear(4, 4)
    assert not ffn.is_gelu_ffn(torch.nn.Sequential(lin, torch.nn.GELU(), lin))  # exact GELU, not tanh
    assert not ffn.is_gelu_ffn(torch.nn.Sequential(lin, torch.nn.SiLU(), lin))
    assert not ffn.is_gelu_ffn(lin)
    with pytest.raises(ValueError, match="feed-forward"):
        ffn.InplaceGeluFFN(torch.nn.Sequential(lin))
    assert ffn.ffn_blocks(["blocks.3.ffn.0", "blocks.3.ffn.2", "blocks.1.ffn.2", "blocks.2.self_attn.q"]) == [1, 3]
