"""LoRAs on W4A4 experts through ComfyUI's own LoRA nodes (real ComfyUI, CPU, tiny Wan2.2 experts).

The LoRA files are written here with the key names real Wan LoRAs use, in three of the formats
ComfyUI maps for Wan: ``diffusion_model.<layer>.lora_down/lora_up/alpha`` (lightx2v style, with a
``diff_b`` bias diff), kohya ``lora_unet_<layer_with_underscores>`` and diffusers ``lora_A/lora_B``.
The W4A4 states here have smoothing and a rank-8 low-rank branch, so the fold's smoothing and rank
concatenation are exercised at model level; ``test_fold_layer_*`` checks the algebra per layer.
"""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.nodes import apply as apply_mod
from wan_w4a4.nodes import lora as lora_mod
from wan_w4a4.nodes import quant_layout
from wan_w4a4.nodes.hook import get_hook
from wan_w4a4.nodes.ops import NoDenseWeight, W4A4Linear, is_w4a4

from w4a4_testlib import CLIPS, EDGES, one_thread, quantizable_linears_of

pytestmark = pytest.mark.comfyui

RANK_A, RANK_B = 4, 8
SMOOTH_RANK = 8

# W4A4 (smoothing + rank-8 branch + RTN residual) on the random tiny experts, 4 steps, two experts,
# LoRA A (dW about half the weights) on every Linear of both experts. Measured final-latent SQNR:
# W4A4 vs BF16 29.8 dB; W4A4+LoRA vs BF16+LoRA 27.7 dB; the control - W4A4 re-made with the same recipe
# from the LoRA'd weights - 27.4 dB; BF16+LoRA vs BF16 16.0 dB (the LoRA matters). One model call:
# 46.7 / 47.0 dB (high / low) for the fold, 46.6 / 47.0 dB for the control. The LoRA'd model is a
# different, more sensitive network (its weights are larger), so the fair "as close as" is the
# control: the fold may not lose more than CONTROL_SLACK_DB to it, nor more than LORA_SQNR_SLACK_DB to
# the plain model. Checked to fail: fold without the smoothing (25.4 dB), without the shift
# correction (44.9 dB on one call), no fold at all (23.2 dB).
CONTROL_SLACK_DB = 1.0
LORA_SQNR_SLACK_DB = 3.0
LATENT_SQNR_FLOOR_DB = 20.0
LORA_EFFECT_MAX_SQNR_DB = 20.0  # BF16+LoRA vs BF16 must be far below the ~30 dB of the W4A4 error
# One model call (first sigma) of the high expert: W4A4 vs BF16 48.1 dB, with LoRA A 46.6 dB, with A and
# B (0.7) stacked 44.7 dB; BF16+A+B vs BF16 17.1 dB (about what a LoRA that went missing would give).
PREDICTION_SQNR_FLOOR_DB = 40.0
PREDICTION_EFFECT_MAX_SQNR_DB = 30.0


# ---------------------------------------------------------------------------------------------
# LoRA files and states
# ---------------------------------------------------------------------------------------------

def _factors(n, k, r, seed, dtype=torch.bfloat16):
    """(up [n, r], down [r, k]) with B @ A of std 0.04: at alpha = r / 2 as large as the tiny model's
    weights (std 0.02)."""
    g = torch.Generator().manual_seed(seed)
    sd = (0.02 / r ** 0.5) ** 0.5
    return ((torch.randn(n, r, generator=g) * sd).to(dtype), (torch.randn(r, k, generator=g) * sd).to(dtype))


def layer_shapes(model) -> dict[str, tuple[int, int]]:
    sd = model.model.diffusion_model.state_dict()
    return {n: tuple(sd[f"{n}.weight"].shape) for n in quantizable_linears_of(model)} | {
        "head.head": tuple(sd["head.head.weight"].shape)}


def write_lora_a(path, shapes):
    """lightx2v-style keys on every block Linear and on the (BF16) head, alpha = r / 2, plus a bias diff
    (``diff_b``) on a W4A4 layer and a norm-gain ``diff``."""
    t = {}
    for i, (name, (n, k)) in enumerate(sorted(shapes.items())):
        up, down = _factors(n, k, RANK_A, seed=100 + i)
        t[f"diffusion_model.{name}.lora_up.weight"] = up
        t[f"diffusion_model.{name}.lora_down.weight"] = down
        t[f"diffusion_model.{name}.alpha"] = torch.tensor(RANK_A / 2)
    n = shapes["blocks.0.self_attn.q"][0]
    g = torch.Generator().manual_seed(5)
    t["diffusion_model.blocks.0.self_attn.q.diff_b"] = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    # a norm-gain diff, as lightx2v LoRAs carry: a BF16 parameter, ComfyUI's normal path
    t["diffusion_model.blocks.0.self_attn.norm_q.diff"] = (torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)
    save_file(t, str(path))
    return path


def write_lora_b(path, shapes):
    """Kohya names on block 0, diffusers lora_A/lora_B on block 1; no alpha (scale 1)."""
    t = {}
    for i, (name, (n, k)) in enumerate(sorted(shapes.items())):
        if not name.startswith("blocks."):
            continue
        up, down = _factors(n, k, RANK_B, seed=200 + i)
        if name.startswith("blocks.0."):
            kk = "lora_unet_" + name.replace(".", "_")
            t[f"{kk}.lora_up.weight"], t[f"{kk}.lora_down.weight"] = up, down
        else:
            t[f"diffusion_model.{name}.lora_B.weight"], t[f"diffusion_model.{name}.lora_A.weight"] = up, down
    save_file(t, str(path))
    return path


def write_flux_lora(path):
    """A LoRA for another model (Flux key names): none of its keys map to a Wan model."""
    up, down = _factors(64, 64, 4, seed=9)
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}, str(path))
    return path


def make_smoothed_state(model, expert, path, tensors=None):
    """A W4A4 state with per-channel smoothing (random, 0.5..2) and a rank-8 SVD branch on each block
    Linear of ``model`` (of ``tensors`` - weights and biases by key - where given; the fingerprint is
    always the model's own)."""
    sd = model.model.diffusion_model.state_dict()
    src = tensors or sd
    names = quantizable_linears_of(model)
    params = {}
    with one_thread():  # a small SVD per layer
        for i, name in enumerate(names):
            w = src[f"{name}.weight"].float()
            g = torch.Generator().manual_seed(1000 + i)
            s = torch.exp(torch.rand(w.shape[1], generator=g) * 1.4 - 0.7)
            u, sv, vh = torch.linalg.svd(w * s[None, :], full_matrices=False)
            lr_down = (vh[:SMOOTH_RANK].T * sv[:SMOOTH_RANK]).to(torch.bfloat16)  # [K, R]
            lr_up = u[:, :SMOOTH_RANK].T.contiguous().to(torch.bfloat16)  # [R, N]
            params[name] = nm.from_float(w, src[f"{name}.bias"].float(), smooth=s, lr_down=lr_down, lr_up=lr_up,
                                         num_bins=len(CLIPS[expert]), clip=torch.tensor(CLIPS[expert]),
                                         act_unsigned=name.endswith("ffn.2"))
    meta = fmt.StateMeta(expert=expert, bin_edges=EDGES[expert], clip_policy="per-bin",
                         fingerprint=fmt.model_fingerprint(sd, names))
    fmt.save_state(path, params, meta, overwrite=True)
    return path


@pytest.fixture(scope="module")
def lenv(env):
    """env plus LoRA files in models/loras and smoothed W4A4 states in models/w4a4."""
    loras = env.models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    shapes = layer_shapes(env.unet("high"))
    write_lora_a(loras / "wan_lora_a.safetensors", shapes)
    write_lora_b(loras / "wan_lora_b.safetensors", shapes)
    write_flux_lora(loras / "flux_lora.safetensors")
    for expert in ("high", "low"):
        make_smoothed_state(env.unet(expert), expert, env.w4a4_dir / f"smooth_{expert}.safetensors")
    return env


def requantized_with_lora(env, bf16_lora, expert, state_name):
    """The control for "as close as": W4A4 made, with the same recipe, from the LoRA'd BF16 weights
    (LoRA merged into the block Linears by ComfyUI's own calculate_weight; the head's LoRA stays a patch)."""
    import uuid
    import comfy.lora
    sd = bf16_lora.model.diffusion_model.state_dict()
    names = set(quantizable_linears_of(bf16_lora))
    merged = {}
    for name in names:
        for t in ("weight", "bias"):
            key = f"{name}.{t}"
            merged[key] = comfy.lora.calculate_weight(bf16_lora.patches.get(f"diffusion_model.{key}", []),
                                                      sd[key].float().clone(), key)
    make_smoothed_state(bf16_lora, expert, env.w4a4_dir / state_name, merged)
    m = bf16_lora.clone()
    m.patches = {k: v for k, v in m.patches.items()
                 if k[len("diffusion_model."):].rpartition(".")[0] not in names}
    m.patches_uuid = uuid.uuid4()
    return env.apply(m, state_name)


def with_lora(env, model, name, strength=1.0):
    (m,) = env.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)
    return m


def w4a4(env, expert):
    return env.apply(env.unet(expert), f"smooth_{expert}.safetensors")


def predict(model, seed=0):
    """One model call (the first sigma), through ComfyUI's loading machinery: the prediction [B, C, T, H, W]."""
    import comfy.model_management
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 2, 8, 8, generator=g)
    sigma = torch.tensor([1.0, 1.0])
    ctx = torch.randn(2, 16, 4096, generator=g) * 0.1
    concat = torch.randn(2, 20, 2, 8, 8, generator=g) * 0.1
    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        return model.model.apply_model(x, sigma, c_concat=concat, c_crossattn=ctx).float()


def layer_of(model, name="blocks.0.self_attn.q"):
    m = model.get_model_object(f"diffusion_model.{name}")
    assert is_w4a4(m)
    return m


# ---------------------------------------------------------------------------------------------
# The fold, per layer
# ---------------------------------------------------------------------------------------------

def _lora_adapter(up, down, alpha=None, dora=None):
    from comfy.weight_adapter.lora import LoRAAdapter
    return LoRAAdapter(set(), (up, down, alpha, None, dora, None))


def _random_layer(n, k, unsigned, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    s = torch.exp(torch.rand(k, generator=g) * 2 - 1)
    with one_thread():
        u, sv, vh = torch.linalg.svd(w * s[None, :], full_matrices=False)
    p = nm.from_float(w, torch.randn(n, generator=g) * 0.01, smooth=s,
                      lr_down=(vh[:8].T * sv[:8]).to(torch.bfloat16), lr_up=u[:, :8].T.contiguous().to(torch.bfloat16),
                      num_bins=2, clip=torch.tensor([1.0, 0.9]), act_unsigned=unsigned)
    return p, g


@pytest.mark.parametrize("unsigned", [False, True])
def test_fold_layer_equals_w4a4_plus_delta(comfy_nodes, unsigned):
    """The folded layer computes W4A4(x) + dW x, dW = sum_i strength_i (alpha_i / r_i) B_i A_i, up to the
    bf16 rounding of the factors and of the branch's input and intermediate. Measured: relative error of
    the LoRA term 3.4e-3 (signed and unsigned; bf16 epsilon is 3.9e-3), of the effective weight
    2.3e-3 (the bf16 rounding of c A diag(s) and of the fp32 second LoRA's up factor)."""
    n, k = 192, 256
    p, g = _random_layer(n, k, unsigned, seed=3 + unsigned)
    layer = W4A4Linear(p, "blocks.0.ffn.2")
    up1, down1 = _factors(n, k, 4, seed=11)
    up2, down2 = _factors(n, k, 16, seed=12, dtype=torch.float32)
    patches = [(0.8, _lora_adapter(up1, down1, alpha=2.0), 1.0, None, None),
               (-1.3, _lora_adapter(up2, down2), 1.0, None, None)]
    dw = 0.8 * (2.0 / 4) * up1.double() @ down1.double() - 1.3 * up2.double() @ down2.double()
    x = torch.randn(64, k, generator=g).to(torch.bfloat16).float()
    if unsigned:  # post-GELU-like inputs, >= -0.17
        x = torch.nn.functional.gelu(x * 2, approximate="tanh")
    base = layer(x)
    assert torch.equal(base, nm.w4a4_linear(x, p))

    fold = lora_mod.fold_layer(layer, "blocks.0.ffn.2", patches, [])
    assert fold.rank == 20 and fold.down.dtype == torch.bfloat16 and (fold.bias is not None) == unsigned
    layer.set_lora(fold.down, fold.up, fold.bias, tag="t")
    out = layer(x)
    want = (x.double() @ dw.T)
    err = (out.double() - base.double() - want).norm() / want.norm()
    rel_w = ((layer.w4a4_params().effective_weight().double() - p.effective_weight().double() - dw).norm() / dw.norm())
    print(f"\nunsigned={unsigned}: LoRA term relative error {err:.2e}, effective weight {rel_w:.2e}")
    assert err < 6e-3, f"LoRA term relative error {err:.2e}"

    q = layer.w4a4_params()  # the folded params: base rank 8 + 20, 4-bit weights untouched
    assert q.rank == 28 and torch.equal(q.qweight, p.qweight) and torch.equal(q.lr_down[:, :8], p.lr_down)
    assert rel_w < 2 ** -8
    assert torch.equal(out, nm.w4a4_linear(x, q))  # the module runs exactly the numerics of its params

    # a bias diff (lightx2v's diff_b) is added in fp32, on top of the shift correction
    db = torch.randn(n, generator=g).to(torch.bfloat16)
    fold_b = lora_mod.fold_layer(layer, "blocks.0.ffn.2", patches, [(0.5, ("diff", (db,)), 1.0, None, None)])
    assert torch.equal(fold_b.bias, 0.5 * db.float() + fold.bias if unsigned else 0.5 * db.float())
    assert torch.equal(fold_b.down, fold.down) and torch.equal(fold_b.up, fold.up)

    layer.clear_lora()
    assert torch.equal(layer(x), base)
    # strength 0 contributes nothing: no fold at all
    assert lora_mod.fold_layer(layer, "blocks.0.ffn.2", [(0.0, _lora_adapter(up1, down1), 1.0, None, None)], []) is None


def _held(module) -> list[torch.Tensor]:
    """The tensors a W4A4 layer holds: its buffers, or (quantized-tensor storage) the static tensors,
    bias, clip table and the fold kept beside them."""
    if not module.w4a4_qt:
        return list(module.buffers())
    held = [*quant_layout.static_tensors(module.weight).values(), module.clip, module.bias, module._lora_bias]
    return [t for t in held + list(module._lora or ()) if t is not None]


def _storage_bytes(module) -> int:
    """Bytes the module's tensors hold (each storage once): what it costs on its device."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _held(module)}
    return sum(storages.values())


def test_fold_is_held_once_and_cleared_bit_for_bit(comfy_nodes):
    """The layer holds base + LoRA once and the base comes back bit for bit in storages of its own size;
    the state's tensors shared with the module are never written into. Buffers storage: joined buffers,
    no per-call copy. Quantized-tensor storage (ComfyUI 0.33): the fold beside the untouched static
    tensors, joined per call into exactly the same params."""
    n, k = 192, 256
    p, g = _random_layer(n, k, True, seed=5)
    originals = {f: getattr(p, f).clone() for f in ("lr_down", "lr_up", "bias")}
    layer = W4A4Linear(p, "blocks.0.ffn.2")
    before = _storage_bytes(layer)
    up1, down1 = _factors(n, k, 4, seed=21)
    fold = lora_mod.fold_layer(layer, "blocks.0.ffn.2", [(1.0, _lora_adapter(up1, down1), 1.0, None, None)], [])
    layer.set_lora(fold.down, fold.up, fold.bias, tag="a")
    assert layer.lora_rank == 4 and layer.base_rank == 8
    qt = layer.w4a4_qt
    # exactly the LoRA's own factors: the shift correction went into the bias, which stays one tensor
    # (quantized-tensor storage: the delta is held apart, the own bias untouched)
    extra = fold.bias.nbytes if qt else 0
    assert fold.bias is not None and _storage_bytes(layer) - before == fold.down.nbytes + fold.up.nbytes + extra
    q = layer.w4a4_params()
    assert layer.lora_bias_on and torch.equal(q.bias, p.bias + fold.bias)
    assert torch.equal(layer.own_bias(), p.bias) and layer.own_bias().device.type == "cpu"
    if qt:  # joined per call: the same tensors the buffers storage holds
        assert torch.equal(q.lr_down, torch.cat([p.lr_down, fold.down], 1))
        assert torch.equal(q.lr_up, torch.cat([p.lr_up, fold.up], 0))
        assert torch.equal(layer.lr_down, p.lr_down) and torch.equal(layer.bias, p.bias)
    else:
        assert q.lr_down is layer.lr_down and q.lr_up is layer.lr_up  # no per-call concatenation
    assert torch.equal(layer.lora_down, fold.down) and torch.equal(layer.lora_up, fold.up)
    # what is saved or exported is the layer without the LoRA
    sd = layer.state_dict()
    assert torch.equal(sd["lr_down"], p.lr_down) and torch.equal(sd["lr_up"], p.lr_up)
    assert torch.equal(sd["bias"], p.bias) and set(sd) == set(W4A4Linear(p, "x").state_dict())
    base = layer.w4a4_params(with_lora=False)
    assert all(torch.equal(getattr(base, f), getattr(p, f)) for f in ("lr_down", "lr_up", "bias"))
    assert base.lr_down.is_contiguous()
    # another fold replaces the first (not stacked on it)
    up2, down2 = _factors(n, k, 16, seed=22)
    fold2 = lora_mod.fold_layer(layer, "blocks.0.ffn.2", [(0.5, _lora_adapter(up2, down2), 1.0, None, None)], [])
    layer.set_lora(fold2.down, fold2.up, fold2.bias, tag="b")
    assert layer.lora_rank == 16 and torch.equal(layer.lr_down[:, :8], p.lr_down)
    assert _storage_bytes(layer) - before == fold2.down.nbytes + fold2.up.nbytes + extra
    assert torch.equal(layer.w4a4_params().bias, p.bias + fold2.bias)  # the new fold's delta, on the own bias
    layer.clear_lora()
    assert layer.lora_rank == 0 and layer.lora_down is None and not layer.lora_bias_on
    assert torch.equal(layer.lr_down, p.lr_down) and torch.equal(layer.lr_up, p.lr_up)
    assert layer.lr_down.is_contiguous() and _storage_bytes(layer) == before
    assert torch.equal(layer.bias, p.bias) and layer.own_bias() is layer.bias
    assert all(torch.equal(getattr(p, f), t) for f, t in originals.items())


def test_install_folds_keeps_no_second_copy(comfy_nodes):
    """install_folds returns its plan, but the plan's factors are views of the layers' joined buffers:
    the whole LoRA is not held twice on the device while a model loads."""
    import types
    n, k = 192, 256
    p, _ = _random_layer(n, k, False, seed=7)
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.blocks[0].ffn = torch.nn.ModuleList([W4A4Linear(p, "blocks.0.ffn.0")])
    up, down = _factors(n, k, 4, seed=31)
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=root), patches_uuid="u1",
                                    patches={"diffusion_model.blocks.0.ffn.0.weight":
                                             [(1.0, _lora_adapter(up, down), 1.0, None, None)]})
    plan = lora_mod.install_folds(patcher)
    layer, fold = root.blocks[0].ffn[0], plan["blocks.0.ffn.0"]
    assert layer.lora_rank == 4 and fold.rank == 4
    assert fold.down.untyped_storage().data_ptr() == layer.lora_down.untyped_storage().data_ptr()
    assert fold.up.untyped_storage().data_ptr() == layer.lora_up.untyped_storage().data_ptr()


def test_a_fold_wider_than_the_kernels_take_is_named_in_a_warning(comfy_nodes, monkeypatch, caplog):
    """A LoRA that widens a layer's branch beyond ``kernels.widest_rank`` of the load device sends that layer to the
    torch reference (the dispatcher's check): the fold says so when the model loads, with the widest layer."""
    import types
    n, k = 192, 256
    layers = {}
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.blocks[0].ffn = torch.nn.ModuleList()
    patches = {}
    for i, rank in enumerate((4, 24)):
        p, _ = _random_layer(n, k, False, seed=7 + i)
        layers[i] = W4A4Linear(p, f"blocks.0.ffn.{i}")
        root.blocks[0].ffn.append(layers[i])
        up, down = _factors(n, k, rank, seed=31 + i)
        patches[f"diffusion_model.blocks.0.ffn.{i}.weight"] = [(1.0, _lora_adapter(up, down), 1.0, None, None)]
    base = layers[0].base_rank
    seen = []
    monkeypatch.setattr(lora_mod.kernels, "widest_rank", lambda device: seen.append(device) or base + 16)
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=root), patches_uuid="u1",
                                    patches=patches, load_device=torch.device("cuda", 0))
    with caplog.at_level(logging.WARNING, logger=lora_mod.log.name):
        lora_mod.install_folds(patcher)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert seen == [torch.device("cuda", 0)] and len(warnings) == 1, warnings
    assert "1 W4A4 layers" in warnings[0] and f"at most rank {base + 16}" in warnings[0]
    assert f"blocks.0.ffn.1 has {base + 24}" in warnings[0] and "slow torch reference" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(lora_mod.kernels, "widest_rank", lambda device: base + 24)  # both fit: nothing to say
    assert lora_mod.warn_wide(torch.device("cuda"), {n: m for n, m in zip("ab", layers.values())}, "W4A4") == []
    monkeypatch.setattr(lora_mod.kernels, "widest_rank", lambda device: None)  # no Triton kernels there
    assert lora_mod.warn_wide(torch.device("cpu"), {"a": layers[1]}, "W4A4") == []
    assert lora_mod.warn_wide(None, {"a": layers[1]}, "W4A4") == []
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_install_folds_one_layer_at_a_time(comfy_nodes, monkeypatch):
    """After every layer is checked, each layer's fold is computed and installed before the next one's
    is computed: the device never holds the folds of all layers next to the joined buffers (at real size
    that would be a second 0.57 GiB at load)."""
    import types
    import weakref
    n, k = 192, 256
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.blocks[0].ffn = torch.nn.ModuleList([W4A4Linear(_random_layer(n, k, False, seed=8 + i)[0],
                                                         f"blocks.0.ffn.{i}") for i in range(3)])
    names = [f"blocks.0.ffn.{i}" for i in range(3)]
    patches = {f"diffusion_model.{name}.weight": [(1.0, _lora_adapter(*_factors(n, k, 4, seed=40 + i)), 1.0, None, None)]
               for i, name in enumerate(names)}
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=root), patches_uuid="u2",
                                    patches=patches)
    seen, computed = [], []
    real = lora_mod._fold_parts

    def held_by_a_layer(t) -> bool:
        return any(t is x for layer in root.blocks[0].ffn for x in (layer.lora_down, layer.lora_up))

    def spy(module, parts):
        # what was computed for earlier layers is installed, and no longer held apart (the buffers
        # storage copied it into the joined buffers; the quantized-tensor storage holds those tensors)
        seen.append(([layer.lora_rank for layer in root.blocks[0].ffn],
                     [ref() is None or held_by_a_layer(ref()) for pair in computed for ref in pair]))
        fold = real(module, parts)
        computed.append((weakref.ref(fold.down), weakref.ref(fold.up)))
        return fold

    monkeypatch.setattr(lora_mod, "_fold_parts", spy)
    plan = lora_mod.install_folds(patcher)
    assert [ranks for ranks, _ in seen] == [[0, 0, 0], [4, 0, 0], [4, 4, 0]]
    assert all(all(dead) for _, dead in seen)
    assert all(plan[name].rank == 4 for name in names)
    # a patch that cannot fold, on the last layer, stops the install before any layer changes
    lora_mod.clear_folds(root.blocks[0].ffn)
    patches[f"diffusion_model.{names[2]}.weight"].append((1.0, ("diff", (torch.zeros(n, k),)), 1.0, None, None))
    patcher.patches_uuid = "u3"
    with pytest.raises(lora_mod.W4A4LoraError, match=f"diff weight patch to W4A4 layer {names[2]}"):
        lora_mod.install_folds(patcher)
    assert [layer.lora_rank for layer in root.blocks[0].ffn] == [0, 0, 0]


def test_fold_layer_refuses_what_cannot_be_exact(comfy_nodes):
    p, _ = _random_layer(128, 128, False, seed=5)
    layer = W4A4Linear(p, "blocks.1.cross_attn.k")
    up, down = _factors(128, 128, 4, seed=1)
    cases = {
        "diff": ("diff", (torch.zeros(128, 128),)),
        "set": ("set", (torch.zeros(128, 128),)),
        "DoRA": _lora_adapter(up, down, dora=torch.ones(128, 1)),
    }
    for what, v in cases.items():
        with pytest.raises(lora_mod.W4A4LoraError, match=f"cannot apply a {what} weight patch to W4A4 layer "
                                                         f"blocks.1.cross_attn.k"):
            lora_mod.fold_layer(layer, "blocks.1.cross_attn.k", [(1.0, v, 1.0, None, None)], [], source="st")
    with pytest.raises(lora_mod.W4A4LoraError, match="scales the base weight"):
        lora_mod.fold_layer(layer, "blocks.1.cross_attn.k", [(1.0, _lora_adapter(up, down), 0.5, None, None)], [])


# ---------------------------------------------------------------------------------------------
# Through ComfyUI's LoRA nodes
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_w4a4_lora_as_close_to_bf16_lora_as_without(lenv, caplog):
    """The Wan2.2 I2V template with LoraLoaderModelOnly on both experts: W4A4+LoRA vs BF16+LoRA, against
    W4A4 vs BF16 and against the control (W4A4 re-made from the LoRA'd weights)."""
    env = lenv
    bf16 = {e: env.shifted(env.unet(e)) for e in ("high", "low")}
    q = {e: env.shifted(w4a4(env, e)) for e in ("high", "low")}
    bf16_l = {e: with_lora(env, bf16[e], "wan_lora_a.safetensors") for e in ("high", "low")}
    with caplog.at_level(logging.WARNING):
        q_l = {e: with_lora(env, q[e], "wan_lora_a.safetensors") for e in ("high", "low")}
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    control = {e: requantized_with_lora(env, bf16_l[e], e, f"merged_{e}.safetensors") for e in ("high", "low")}

    _, ref = env.two_expert(bf16["high"], bf16["low"])
    _, out = env.two_expert(q["high"], q["low"])
    _, ref_l = env.two_expert(bf16_l["high"], bf16_l["low"])
    _, out_c = env.two_expert(control["high"], control["low"])
    hook = get_hook(q_l["high"])
    hook.records.clear()
    _, out_l = env.two_expert(q_l["high"], q_l["low"])
    plain_db, lora_db = nm.sqnr_db(ref, out), nm.sqnr_db(ref_l, out_l)
    control_db, effect_db = nm.sqnr_db(ref_l, out_c), nm.sqnr_db(ref_l, ref)
    print(f"\nfinal latent SQNR: W4A4 vs BF16 {plain_db:.2f} dB, W4A4+LoRA vs BF16+LoRA {lora_db:.2f} dB, "
          f"W4A4 re-made from the LoRA'd weights vs BF16+LoRA {control_db:.2f} dB, BF16+LoRA vs BF16 {effect_db:.2f} dB")
    assert effect_db < LORA_EFFECT_MAX_SQNR_DB, "the LoRA barely changes the output: the test would prove nothing"
    assert plain_db > LATENT_SQNR_FLOOR_DB
    assert lora_db > control_db - CONTROL_SLACK_DB
    assert lora_db > plain_db - LORA_SQNR_SLACK_DB
    # One model call per expert, where W4A4 is much closer to BF16 and a wrong fold shows more.
    for e in ("high", "low"):
        ref_p, out_p, ctl_p = predict(bf16_l[e]), predict(q_l[e]), predict(control[e])
        p_db, c_db = nm.sqnr_db(ref_p, out_p), nm.sqnr_db(ref_p, ctl_p)
        print(f"{e} expert, one model call: W4A4+LoRA vs BF16+LoRA {p_db:.2f} dB, control {c_db:.2f} dB")
        assert p_db > c_db - CONTROL_SLACK_DB
    # the hook still bins the LoRA'd expert's steps
    assert [r.expert for r in hook.records] and all(r.expert == "high" and r.in_range for r in hook.records)
    # every block Linear got the LoRA's rank, and the W4A4 layer with a diff_b its bias diff
    layers = apply_mod.w4a4_layers(q_l["high"])
    assert lora_mod.active_lora_rank(layers) == {n: RANK_A for n in layers}
    from safetensors.torch import load_file
    diff_b = load_file(str(env.models_dir / "loras" / "wan_lora_a.safetensors"))[
        "diffusion_model.blocks.0.self_attn.q.diff_b"]
    q_layer = layers["blocks.0.self_attn.q"]
    joined_bias = q_layer.w4a4_params().bias
    assert q_layer.lora_bias_on and torch.equal(joined_bias, q_layer.own_bias().to(joined_bias.device)
                                                 + diff_b.float().to(joined_bias.device))
    assert not layers["blocks.0.self_attn.k"].lora_bias_on  # signed layer, no diff_b: no bias change


@pytest.mark.slow
def test_before_and_after_apply_and_checkpoint(lenv):
    """LoRA before Apply, after Apply, and on a loaded W4A4 checkpoint: the same model, bit for bit."""
    env = lenv
    after = with_lora(env, w4a4(env, "high"), "wan_lora_a.safetensors")
    before = env.apply(with_lora(env, env.unet("high"), "wan_lora_a.safetensors"), "smooth_high.safetensors")
    p_after, p_before = predict(after), predict(before)
    assert torch.equal(p_after, p_before)
    plain = predict(w4a4(env, "high"))
    assert not torch.equal(p_after, plain)

    env.node("WanW4A4SaveCheckpoint").save(w4a4(env, "high"), "lora_test/smooth_high_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("lora_test/smooth_high_ck.safetensors")
    # the W4A4 layers have no BF16 weight, yet ComfyUI's key mapping finds them (state-dict key, 0 bytes)
    import comfy.lora
    keys = comfy.lora.model_lora_keys_unet(ck.model, {})
    assert keys["lora_unet_blocks_0_self_attn_q"] == "diffusion_model.blocks.0.self_attn.q.weight"
    assert ck.model.diffusion_model.blocks[0].self_attn.q.state_dict()["weight"].numel() == 0
    p_ck = predict(with_lora(env, ck, "wan_lora_a.safetensors"))
    p_ck_plain = predict(ck)
    print(f"\ncheckpoint vs apply path, with LoRA: max |diff| {(p_ck - p_after).abs().max():.3g}; "
          f"LoRA effect {(p_after - plain).abs().max():.3g}")
    assert torch.equal(p_ck_plain, plain) and torch.equal(p_ck, p_after)


def test_key_mapping_while_the_w4a4_model_is_loaded(lenv):
    """A LoRA node run while the W4A4 clone is loaded (its object patches in the model) still maps
    every key - the case where the BF16 Linears are not in the module tree."""
    env = lenv
    q = w4a4(env, "high")
    predict(q)  # loaded: the W4A4 layers are in model.model now
    assert is_w4a4(q.model.diffusion_model.blocks[0].self_attn.q)
    out = with_lora(env, q, "wan_lora_b.safetensors")
    names = quantizable_linears_of(env.unet("high"))
    assert sorted(k[len("diffusion_model."):-len(".weight")] for k in out.patches) == sorted(names)


@pytest.mark.slow  # several LoRA'd two-expert runs
def test_stacking_strength_and_zero(lenv):
    env = lenv
    q = w4a4(env, "high")
    plain = predict(q)
    a = with_lora(env, q, "wan_lora_a.safetensors")
    ab = with_lora(env, a, "wan_lora_b.safetensors", 0.7)
    p_ab = predict(ab)
    layers = apply_mod.w4a4_layers(ab)
    assert lora_mod.active_lora_rank(layers) == {n: RANK_A + RANK_B for n in layers}
    p_a = predict(a)
    assert not torch.equal(p_a, p_ab) and not torch.equal(p_a, plain)

    bf = env.unet("high")
    bf_a = with_lora(env, bf, "wan_lora_a.safetensors")
    bf_ab = with_lora(env, bf_a, "wan_lora_b.safetensors", 0.7)
    r_plain, r_a, r_ab = predict(bf), predict(bf_a), predict(bf_ab)
    db = [nm.sqnr_db(r, p) for r, p in ((r_plain, plain), (r_a, p_a), (r_ab, p_ab))]
    effect = nm.sqnr_db(r_ab, r_plain)
    print(f"\nprediction SQNR vs BF16: plain {db[0]:.2f}, +A {db[1]:.2f}, +A+B(0.7) {db[2]:.2f} dB; "
          f"BF16+A+B vs BF16 {effect:.2f} dB")
    assert effect < PREDICTION_EFFECT_MAX_SQNR_DB
    assert min(db) > PREDICTION_SQNR_FLOOR_DB

    # strength 0: LoraLoader returns the model itself; a zero-strength patch set is folded to nothing
    assert with_lora(env, q, "wan_lora_a.safetensors", 0.0) is q
    zero = q.clone()
    adapters = a.patches
    zero.add_patches({k: v[0][1] for k, v in adapters.items()}, 0.0)
    assert zero.patches
    assert torch.equal(predict(zero), plain)
    assert lora_mod.active_lora_rank(apply_mod.w4a4_layers(zero)) == {}


def test_unpatch_restores_the_plain_model_without_reloading(lenv):
    import comfy.model_management
    env = lenv
    q = w4a4(env, "high")
    layer = layer_of(q)
    qweight, lr_down = layer.qweight.clone(), layer.lr_down.clone()
    plain = predict(q)
    lq = with_lora(env, q, "wan_lora_b.safetensors")
    p_l = predict(lq)
    assert layer.lora_rank == RANK_B and not torch.equal(p_l, plain)
    # back to the model without the LoRA node: same module objects, no state file read, bit for bit
    assert torch.equal(predict(q), plain)
    assert layer.lora_rank == 0 and not layer.lora_bias_on and layer_of(q) is layer
    assert torch.equal(layer.qweight, qweight) and torch.equal(layer.lr_down, lr_down)
    # and again with the LoRA (cached per patch set), then a full unload
    assert torch.equal(predict(lq), p_l)
    comfy.model_management.unload_all_models()
    assert layer.lora_rank == 0
    assert torch.equal(predict(q), plain)


def test_partial_lowvram_load(lenv):
    """A partial (lowvram) load: ComfyUI leaves the layers offloaded and hangs LowVramPatch objects on them;
    the folded LoRA is what runs, as in a full load."""
    import comfy.model_management
    env = lenv
    lq = with_lora(env, w4a4(env, "high"), "wan_lora_b.safetensors")  # block Linears only
    full = predict(lq)
    comfy.model_management.unload_all_models()
    lq.patch_model(torch.device("cpu"), lowvram_model_memory=1)
    try:
        layer = layer_of(lq)
        assert [type(f).__name__ for f in layer.weight_function] == ["LowVramPatch"]
        assert layer.lora_rank == RANK_B
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 2, 8, 8, generator=g)
        ctx = torch.randn(2, 16, 4096, generator=g) * 0.1
        concat = torch.randn(2, 20, 2, 8, 8, generator=g) * 0.1
        with torch.no_grad():
            low = lq.model.apply_model(x, torch.tensor([1.0, 1.0]), c_concat=concat, c_crossattn=ctx).float()
    finally:
        lq.unpatch_model(torch.device("cpu"))
    print(f"\nlowvram vs full load: max |diff| {(low - full).abs().max():.3g}")
    assert torch.equal(low, full)


def test_lora_for_another_model_warns(lenv, caplog):
    env = lenv
    q = w4a4(env, "high")
    plain = predict(q)
    with caplog.at_level(logging.WARNING):
        out = with_lora(env, q, "flux_lora.safetensors")
    assert any("lora key not loaded" in r.getMessage() for r in caplog.records)
    assert not out.patches
    assert torch.equal(predict(out), plain)


def test_unfoldable_patch_stops_with_a_clear_error(lenv):
    env = lenv
    q = w4a4(env, "high")
    plain = predict(q)
    bad = q.clone()
    assert bad.add_patches({"diffusion_model.blocks.0.self_attn.q.weight": ("diff", (torch.zeros(256, 256),))})
    with pytest.raises(ValueError, match="smooth_high.safetensors: cannot apply a diff weight patch to W4A4 layer "
                                         "blocks.0.self_attn.q"):
        predict(bad)
    assert torch.equal(predict(q), plain)  # the model without it still runs


def test_dense_weight_stand_in(lenv):
    """``layer.weight`` answers ComfyUI's shape/dtype questions and refuses to become a dense weight."""
    env = lenv
    layer = layer_of(w4a4(env, "high"))
    w = layer.weight
    if layer.w4a4_qt:  # ComfyUI 0.33: a QuantizedTensor of this pack's layout, the logical bf16 [N, K] weight
        assert quant_layout.is_w4a4_weight(w) and w.shape == (layer.out_features, layer.in_features)
        assert w.dtype == torch.bfloat16 and w.nbytes == layer.qweight.nbytes
        with pytest.raises(NotImplementedError, match="W4A4 weights are made by calibration"):
            w.requantize_from_float(torch.zeros(w.shape))  # what ComfyUI would do to bake a LoRA in
        # the weight-only effective weight is what kitchen's fallback ops see
        assert torch.equal(w.dequantize(), layer.w4a4_params().effective_weight().to(torch.bfloat16))
        return
    # by name: inside ComfyUI the pack is imported under its folder name (another class object)
    assert type(w).__name__ == NoDenseWeight.__name__ and w.shape == (layer.out_features, layer.in_features)
    with pytest.raises(AttributeError, match="blocks.0.self_attn.q has no BF16 weight"):
        w.to(torch.float32)


@pytest.mark.gpu
def test_fold_on_gpu_keeps_one_bias_on_the_device(comfy_nodes):
    """On CUDA (Triton kernels) a folded layer computes the reference's W4A4+LoRA; the own bias waits on
    the host, the device holds the joined factors and one bias, and clearing brings the device bias
    back bit for bit."""
    n, k = 384, 640
    p, g = _random_layer(n, k, True, seed=7)
    x = torch.nn.functional.gelu(torch.randn(300, k, generator=g) * 2, approximate="tanh").to(torch.bfloat16)
    layer = W4A4Linear(p, "blocks.0.ffn.2").cuda()
    base_out = layer(x.cuda())
    up1, down1 = _factors(n, k, 16, seed=31)
    db = torch.randn(n, generator=g).to(torch.bfloat16)
    fold = lora_mod.fold_layer(layer, "blocks.0.ffn.2", [(0.7, _lora_adapter(up1, down1), 1.0, None, None)],
                               [(1.0, ("diff", (db,)), 1.0, None, None)])
    assert fold.down.is_cuda and fold.bias.is_cuda
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer.set_lora(fold.down, fold.up, fold.bias, tag="g")
    del fold
    torch.cuda.synchronize()
    extra = n * 4 if layer.w4a4_qt else 0  # quantized-tensor storage: the fp32 delta is held apart
    assert torch.cuda.memory_allocated() - before <= (k + n) * 16 * 2 + extra + 4 * 512  # factors only, no 2nd bias
    own_dev = "cuda" if layer.w4a4_qt else "cpu"  # buffers storage: the own bias waits on the host
    assert layer.bias.is_cuda and layer.own_bias().device.type == own_dev and torch.equal(layer.own_bias().cpu(), p.bias)
    out = layer(x.cuda())
    ref = nm.w4a4_linear(x.float(), layer.w4a4_params(torch.device("cpu")), 0)  # the reference, same params
    kernel_db = nm.sqnr_db(ref, out.float().cpu())
    lora_db = nm.sqnr_db(ref, nm.w4a4_linear(x.float(), p, 0))  # how far the LoRA moves the output
    assert kernel_db >= 40 and lora_db < kernel_db - 10, (kernel_db, lora_db)
    layer.clear_lora()
    assert layer.bias.is_cuda and torch.equal(layer.bias.cpu(), p.bias) and not layer.lora_bias_on
    assert torch.equal(layer(x.cuda()), base_out)


def test_save_bakes_lora_on_bf16_layers_as_comfyui_does(lenv):
    """Save W4A4 checkpoint with a LoRA only on the BF16 head: the saved head is ComfyUI's own patched
    weight (calculate_weight + its stochastic rounding), computed without loading the model (ComfyUI
    0.33's dynamic VRAM refuses force_patch_weights); the quantized layers are saved as they are."""
    import comfy.lora
    env = lenv
    q = w4a4(env, "high")
    m = q.clone()
    key = "diffusion_model.head.head.weight"
    lora = with_lora(env, env.unet("high"), "wan_lora_a.safetensors")
    assert m.add_patches({key: lora.patches[key][0][1]}, 1.0) == [key]
    env.node("WanW4A4SaveCheckpoint").save(m, "lora_test/head_lora_ck", True)
    from safetensors.torch import load_file
    saved = load_file(str(env.models_dir / "w4a4" / "lora_test" / "head_lora_ck.safetensors"))
    base = q.model.diffusion_model.state_dict()["head.head.weight"]
    want = comfy.lora.calculate_weight(m.patches[key], base.float().clone(), key)
    got = saved["head.head.weight"]
    assert got.dtype == base.dtype and not torch.equal(got, base)
    assert (got.float() - want).abs().max() <= want.abs().max() * 2 ** -7  # bf16 rounding of the sum
    assert torch.equal(saved["blocks.0.self_attn.q.qweight"], layer_of(q).qweight)


def test_lowvram_slots_stay_empty_on_w4a4_layers_only(lenv):
    """ComfyUI's dynamic loader hangs a LoRA's LowVramPatch on ``<param>_lowvram_function`` (it would
    re-quantize the weight per cast); a W4A4 layer keeps that slot empty, its LoRA is folded. A BF16
    layer of the same custom operations keeps what ComfyUI puts there."""
    env = lenv
    env.node("WanW4A4SaveCheckpoint").save(w4a4(env, "high"), "lora_test/slots_ck", True)
    (ck,) = env.node("WanW4A4LoadModel").load("lora_test/slots_ck.safetensors")
    q_layer = ck.model.diffusion_model.blocks[0].self_attn.q
    head = ck.model.diffusion_model.head.head  # kept BF16 by the custom operations
    assert is_w4a4(q_layer) and not is_w4a4(head)
    marker = object()
    for layer in (q_layer, head):
        layer.weight_lowvram_function = marker
        layer.bias_lowvram_function = marker
    assert q_layer.weight_lowvram_function is None and q_layer.bias_lowvram_function is None
    assert head.weight_lowvram_function is marker and head.bias_lowvram_function is marker
    head.weight_lowvram_function = head.bias_lowvram_function = None
