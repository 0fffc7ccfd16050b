"""Wan2.2 I2V shapes, random checkpoints and the quantized layer list (minimodel/arch.py)."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wan_w4a4.minimodel.arch import (TINY, WAN22_I2V_A14B, WanArch, quantizable_linears,
                                     random_wan_state_dict, wan_state_dict_shapes, write_wan_checkpoint)


def test_a14b_size_and_heads():
    shapes = wan_state_dict_shapes(WAN22_I2V_A14B)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert round(params / 1e9, 2) == 14.29  # one expert of Wan2.2-I2V-A14B
    assert WAN22_I2V_A14B.num_heads == 40 and TINY.num_heads == 2
    assert not any(k.startswith("img_emb") for k in shapes)  # Wan2.2 I2V has no CLIP image branch


def test_validation_names_the_problem():
    with pytest.raises(ValueError, match="multiple of 128"):
        WanArch(dim=192, num_layers=1, ffn_dim=64)
    with pytest.raises(ValueError, match="num_layers"):
        WanArch(dim=128, num_layers=0, ffn_dim=64)


def test_from_shapes_round_trip():
    for arch in (TINY, WAN22_I2V_A14B, WanArch(dim=384, num_layers=3, ffn_dim=512)):
        assert WanArch.from_shapes(wan_state_dict_shapes(arch)) == arch
        assert WanArch.from_json(arch.to_json()) == arch


def test_quantizable_linears():
    names = quantizable_linears(TINY)
    assert len(names) == 10 * TINY.num_layers
    assert names[:3] == ["blocks.0.self_attn.q", "blocks.0.self_attn.k", "blocks.0.self_attn.v"]
    shapes = wan_state_dict_shapes(TINY)
    assert all(f"{n}.weight" in shapes for n in names)
    assert shapes["blocks.1.ffn.0.weight"] == (TINY.ffn_dim, TINY.dim)


def test_written_checkpoint_equals_state_dict(tmp_path):
    path = write_wan_checkpoint(tmp_path / "m.safetensors", TINY, seed=3, metadata={"role": "high"})
    sd, ref = load_file(str(path)), random_wan_state_dict(TINY, seed=3)
    assert sd.keys() == ref.keys()
    assert all(sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k]) for k in ref)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert WanArch.from_json(meta["wan_w4a4.arch"]) == TINY and meta["role"] == "high"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert not torch.equal(ref["blocks.0.ffn.0.weight"], random_wan_state_dict(TINY, seed=4)["blocks.0.ffn.0.weight"])


def test_init_kinds():
    sd = random_wan_state_dict(TINY, seed=0)
    assert torch.equal(sd["blocks.0.self_attn.norm_q.weight"], torch.ones(TINY.dim, dtype=torch.bfloat16))
    assert not sd["blocks.0.self_attn.q.bias"].any()
    assert 0.015 < sd["blocks.0.self_attn.q.weight"].float().std() < 0.025
    assert all(torch.isfinite(t.float()).all() for t in sd.values())


@pytest.mark.comfyui
@pytest.mark.parametrize("arch", [TINY, WAN22_I2V_A14B], ids=["tiny", "a14b"])
def test_shapes_match_comfyui_wan_model(comfy_nodes, arch):
    """Every key and shape equals the state dict of ComfyUI's own WanModel (built on meta)."""
    import comfy.ldm.wan.model
    import comfy.ops

    with torch.device("meta"):
        model = comfy.ldm.wan.model.WanModel(
            model_type="t2v", in_dim=arch.in_dim, dim=arch.dim, ffn_dim=arch.ffn_dim,
            num_heads=arch.num_heads, num_layers=arch.num_layers, out_dim=arch.out_dim,
            operations=comfy.ops.manual_cast, dtype=torch.bfloat16)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert wan_state_dict_shapes(arch) == ref
