"""Save W4A4 checkpoint -> Load W4A4 Wan2.2 model round trip, the custom operations, Inspect."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.nodes.quant_layout import no_dense_weight

pytestmark = pytest.mark.comfyui


@pytest.mark.slow  # saves, loads and samples W4A4 checkpoints
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


def test_non_dynamic_copy_of_a_checkpoint_model(env):
    """ComfyUI 0.33 makes a non-dynamic copy of a model from its ``cached_patcher_init`` factory
    (TorchCompileModel, hook LoRAs, multi-GPU). A loaded W4A4 checkpoint carries one: the copy is a
    fresh model with the same layers, and samples bit for bit like the original."""
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    env.node("WanW4A4SaveCheckpoint").save(high, "copy/tiny_high_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("copy/tiny_high_ck.safetensors")
    if not hasattr(ck, "cached_patcher_init"):
        assert not hasattr(env.unet("high"), "cached_patcher_init")  # ComfyUI 0.3.64: no such protocol
        return
    factory, args = ck.cached_patcher_init[:2]
    fresh = factory(*args, disable_dynamic=True)
    assert fresh.model is not ck.model and type(fresh).__name__ == "ModelPatcher"
    copy = ck.clone(force_deepcopy=True)  # what clone(disable_dynamic=True) does under dynamic VRAM
    assert copy.model is not ck.model
    _, ref = env.two_expert(env.shifted(ck), env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors")), steps=2)
    _, out = env.two_expert(env.shifted(copy), env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors")), steps=2)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_torch_compile_model_node_on_w4a4(env):
    """ComfyUI's TorchCompileModel on both kinds of W4A4 model: the W4A4 layers run eagerly inside the
    compiled model (``ops.W4A4Core.w4a4_forward``), with the same output as without compile."""
    compile_node = env.nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]  # a V3 node in both versions
    low = env.shifted(env.apply(env.unet("low"), "tiny_low.safetensors"))
    high = env.apply(env.unet("high"), "tiny_high.safetensors")
    env.node("WanW4A4SaveCheckpoint").save(high, "compile/tiny_high_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("compile/tiny_high_ck.safetensors")
    for model in (high, ck):
        _, ref = env.two_expert(env.shifted(model), low, steps=2)
        (compiled,) = compile_node.execute(model, "inductor").result
        _, out = env.two_expert(env.shifted(compiled), low, steps=2)
        assert torch.allclose(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item()), (out - ref).abs().max()
