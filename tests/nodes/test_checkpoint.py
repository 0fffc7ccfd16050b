"""Save W4A4 checkpoint -> Load W4A4 Wan2.2 model round trip, the custom operations, Inspect."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.nodes.quant_layout import no_dense_weight

pytestmark = pytest.mark.comfyui


def test_save_load_round_trip_matches_apply(env):
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    low = env.apply(env.unet("low"), "tiny_low.safetensors")
    save = env.node("WanW4A4SaveCheckpoint")
    paths = {}
    for expert, m in (("high", high), ("low", low)):
        out = save.save(m, f"roundtrip/tiny_{expert}_ck", True)
        paths[expert] = out["result"][0]
        assert paths[expert].endswith(f"roundtrip/tiny_{expert}_ck.safetensors")
    with pytest.raises(FileExistsError):
        save.save(high, "roundtrip/tiny_high_ck", False)  # never a silent overwrite

    load = env.node("WanW4A4LoadModel")
    assert "roundtrip/tiny_high_ck.safetensors" in load.INPUT_TYPES()["required"]["ckpt_name"][0]
    assert "roundtrip/tiny_high_ck.safetensors" not in env.node("WanW4A4ApplyState").INPUT_TYPES()["required"]["state_name"][0]
    loaded = {e: load.load(f"roundtrip/tiny_{e}_ck.safetensors")[0] for e in ("high", "low")}

    # The quantized Linears were built from the W4A4 tensors; no BF16 weight was ever allocated.
    q = loaded["high"].model.diffusion_model.blocks[0].ffn[2]
    assert q.qweight.dtype == torch.uint8 and no_dense_weight(q)
    assert q.act_unsigned
    assert loaded["high"].model.diffusion_model.head.head.weight.shape == (64, 256)  # BF16 rest loaded
    assert loaded["high"].model_size() == high.model_size()

    ref_mid, ref = env.two_expert(env.shifted(high), env.shifted(low), steps=2)
    mid, out = env.two_expert(env.shifted(loaded["high"]), env.shifted(loaded["low"]), steps=2)
    assert torch.equal(mid, ref_mid) and torch.equal(out, ref)  # same layers, same numerics, bit for bit


def test_wrong_kind_is_explained(env):
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    env.node("WanW4A4SaveCheckpoint").save(high, "kind_ck", True)
    with pytest.raises(ValueError, match="not a state") as info:
        env.node("WanW4A4ApplyState").apply(env.unet("high"), "kind_ck.safetensors")
    assert "Load W4A4 Wan2.2 model" in str(info.value)
    with pytest.raises(ValueError, match="not a\\s+self-contained checkpoint") as info:
        env.node("WanW4A4LoadModel").load("tiny_high.safetensors")
    assert "Apply W4A4 state" in str(info.value)


def test_inspect_heatmap_and_summary(env):
    out = env.node("WanW4A4InspectState").inspect("tiny_high.safetensors", "tiny_low.safetensors")
    image, text = out["result"]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert image.shape[1] > 100 and image.shape[2] > 400
    assert "high expert - tiny_high.safetensors" in text and "low expert - tiny_low.safetensors" in text
    assert "20 W4A4 layers, 4 timestep bins" in text and "20 W4A4 layers, 3 timestep bins" in text
    assert "bin 3 (t 925..900): clip mean 0.850" in text
    (only_high,) = env.node("WanW4A4InspectState").inspect("tiny_high.safetensors", "(none)")["result"][:1]
    assert only_high.shape[1] < image.shape[1]
