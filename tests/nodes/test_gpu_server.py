"""The two-expert W4A4 graph through ComfyUI's real launcher (``main.py``) on a CUDA GPU, the way users
run it: default flags (on ComfyUI 0.33 that is dynamic VRAM: comfy-aimdo streams the weights), then
``--disable-dynamic-vram`` and ``--lowvram``, each with and without a LoRA on both experts.

Wan2.2-I2V-shaped random experts (dim 1024, 4 blocks) and RTN W4A4 states are made here, with a
lightx2v-style LoRA (every block Linear, plus a bias diff). Each server runs the same five prompts; the
latents must agree across the launch modes (the same W4A4 numerics whichever way ComfyUI moves the
weights), W4A4 must stay near BF16, the LoRA must change the result, and a re-run of a LoRA'd expert
(its second load) must keep the LoRA.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_w4a4.kernels import format as fmt
from wan_w4a4.kernels import numerics as nm
from wan_w4a4.minimodel.arch import WanArch, quantizable_linears, write_wan_checkpoint

from api_graphs import two_expert_graph

pytestmark = [pytest.mark.gpu, pytest.mark.comfyui, pytest.mark.slow]

ARCH = WanArch(dim=1024, num_layers=4, ffn_dim=2816)
EDGES = {"high": (1000.0, 950.0, 900.0), "low": (900.0, 450.0, 0.0)}
LORA_RANK = 16
# 4 steps at shift 8: t = 1000, 960 | 889, 727: the high expert takes 2 (t >= 900)
GRAPH = dict(width=128, height=128, length=9, steps=4, cfg=3.5, shift=8.0, split=2)
MODES = {"default": (), "disable-dynamic-vram": ("--disable-dynamic-vram",), "lowvram": ("--lowvram",)}
# W4A4 (RTN, no calibration) vs BF16 over four steps on random experts; measured on the H200 (see
# benchmarks/RESULTS.md); a broken layer gives noise (about 0 dB).
W4A4_VS_BF16_FLOOR_DB = 10.0


def _rtn_state(ckpt: Path, expert: str, dst: Path) -> None:
    sd = load_file(str(ckpt))
    names = quantizable_linears(WanArch.from_shapes(sd))
    clips = torch.tensor([1.0, 0.9])
    params = {n: nm.from_float(sd[f"{n}.weight"].float(), sd[f"{n}.bias"].float(), num_bins=2, clip=clips,
                               act_unsigned=n.endswith("ffn.2")) for n in names}
    meta = fmt.StateMeta(expert=expert, bin_edges=EDGES[expert], clip_policy="per-bin",
                         fingerprint=fmt.model_fingerprint(sd, names))
    fmt.save_state(dst, params, meta, overwrite=True)


def _lora(ckpt: Path, dst: Path, seed: int) -> None:
    """lightx2v key names on every block Linear (alpha = rank), and a diff_b on one W4A4 layer."""
    sd = load_file(str(ckpt))
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name in quantizable_linears(WanArch.from_shapes(sd)):
        n, k = sd[f"{name}.weight"].shape
        scale = (0.02 / LORA_RANK ** 0.5) ** 0.5
        t[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(n, LORA_RANK, generator=g) * scale).bfloat16()
        t[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(LORA_RANK, k, generator=g) * scale).bfloat16()
        t[f"diffusion_model.{name}.alpha"] = torch.tensor(float(LORA_RANK))
    t["diffusion_model.blocks.0.self_attn.q.diff_b"] = (torch.randn(ARCH.dim, generator=g) * 0.02).bfloat16()
    save_file(t, str(dst))


def _prompts(graph: dict = GRAPH) -> list[tuple[str, dict]]:
    """(name, API graph): BF16, W4A4, W4A4 + LoRA (twice: the second run reloads the LoRA'd experts)."""
    out = []
    for name, w4a4, lora, seed in (("bf16", False, False, 7), ("w4a4", True, False, 7), ("w4a4_lora", True, True, 7),
                                   ("w4a4_lora_again", True, True, 8), ("bf16_lora_again", False, True, 8)):
        g = two_expert_graph(name, seed=seed, high="gpu_wan_high.safetensors", low="gpu_wan_low.safetensors", **graph)
        models = {"high": ["2", 0], "low": ["3", 0]}
        for expert, node, sampling in (("high", "10", "4"), ("low", "11", "5")):
            if w4a4:
                g[node] = {"class_type": "WanW4A4ApplyState",
                           "inputs": {"model": models[expert], "state_name": f"gpu_{expert}.safetensors"}}
                models[expert] = [node, 0]
            if lora:
                g[node + "1"] = {"class_type": "LoraLoaderModelOnly",
                                 "inputs": {"model": models[expert], "lora_name": f"gpu_lora_{expert}.safetensors",
                                            "strength_model": 1.0}}
                models[expert] = [node + "1", 0]
            g[sampling]["inputs"]["model"] = models[expert]
        out.append((name, g))
    return out


def _saved(server, entry) -> torch.Tensor:
    saved = entry["outputs"]["8"]["latents"][0]
    return load_file(str(server.base_dir / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_models")
    files = {}
    for expert, seed in (("high", 11), ("low", 12)):
        ck = write_wan_checkpoint(root / f"gpu_wan_{expert}.safetensors", ARCH, seed=seed)
        _rtn_state(ck, expert, root / f"gpu_{expert}.safetensors")
        _lora(ck, root / f"gpu_lora_{expert}.safetensors", seed=seed + 100)
        files[expert] = ck
    return root


def _install(server, root: Path) -> None:
    for f in root.glob("gpu_wan_*.safetensors"):
        shutil.copy(f, server.models_dir / "diffusion_models")
    for sub, pattern in (("w4a4", "gpu_high.safetensors"), ("w4a4", "gpu_low.safetensors"),
                         ("loras", "gpu_lora_*.safetensors")):
        (server.models_dir / sub).mkdir(exist_ok=True)
        for f in root.glob(pattern):
            shutil.copy(f, server.models_dir / sub)


def _run_mode(start_server, root: Path, mode: str, tmp_path: Path) -> dict:
    with start_server(tmp_path / mode, *MODES[mode], cpu=False) as server:
        _install(server, root)
        latents = {name: _saved(server, server.run_prompt(g, timeout=600)) for name, g in _prompts()}
        return {"latents": latents, "log": server.log()}


@pytest.mark.parametrize("mode", ["disable-dynamic-vram", "lowvram"])
def test_w4a4_graph_in_main_py_on_gpu(start_comfy_server, comfyui, gpu_models, tmp_path, mode):
    if mode == "disable-dynamic-vram" and "--disable-dynamic-vram" not in (comfyui / "comfy" / "cli_args.py").read_text():
        pytest.skip("this ComfyUI has no dynamic VRAM to disable (its main.py knows no --disable-dynamic-vram)")
    default = _default_run(start_comfy_server, gpu_models, tmp_path)
    other = _run_mode(start_comfy_server, gpu_models, mode, tmp_path)
    for name, want in default["latents"].items():
        got = other["latents"][name]
        db = nm.sqnr_db(want.float(), got.float())
        print(f"{mode} vs default, {name}: {'identical' if torch.equal(got, want) else f'{db:.1f} dB'}")
        if name.startswith("w4a4"):
            # the same layers, the same kernels, the same fold: bit for bit, however ComfyUI moved the weights
            assert torch.equal(got, want), f"{name}: {mode} differs from the default launch ({db:.1f} dB)"
        # BF16 is ComfyUI's own path: with a LoRA its dynamic loader patches in bf16 per cast, the legacy
        # one in fp32 once (measured on the H200: 61 dB apart), so BF16 latents are only printed.


_DEFAULT: dict = {}


def _default_run(start_comfy_server, root, tmp_path) -> dict:
    """The default launch, run once per test session and checked on its own."""
    if not _DEFAULT:
        res = _run_mode(start_comfy_server, root, "default", tmp_path)
        log, lat = res["log"], res["latents"]
        dynamic = "DynamicVRAM support detected and enabled" in log
        print(f"default launch: dynamic VRAM {'on' if dynamic else 'off'}")
        if _has_quant_ops():  # ComfyUI 0.33+: dynamic VRAM is the default on NVIDIA
            assert dynamic, log[-3000:]
            staged = [int(m) for m in re.findall(r"prepared for dynamic VRAM loading\. (\d+)MB Staged", log)]
            # W4A4 experts are streamed (staged), not force-loaded whole
            assert staged and max(staged) > 0, log[-3000:]
            assert "has no BF16 weight" not in log
        db = nm.sqnr_db(lat["bf16"].float(), lat["w4a4"].float())
        print(f"W4A4 vs BF16: {db:.1f} dB")
        assert db > W4A4_VS_BF16_FLOOR_DB and not torch.equal(lat["bf16"], lat["w4a4"])
        lora_db = nm.sqnr_db(lat["bf16_lora_again"].float(), lat["w4a4_lora_again"].float())
        print(f"W4A4+LoRA vs BF16+LoRA (second load of the LoRA'd experts): {lora_db:.1f} dB")
        assert lora_db > W4A4_VS_BF16_FLOOR_DB  # a LoRA lost on reload lands far from BF16+LoRA
        assert not torch.equal(lat["w4a4_lora"], lat["w4a4"])  # the LoRA is applied
        _DEFAULT.update(res)
    return _DEFAULT


def test_w4a4_graph_default_launch_on_gpu(start_comfy_server, gpu_models, tmp_path):
    _default_run(start_comfy_server, gpu_models, tmp_path)


def _has_quant_ops() -> bool:
    from wan_w4a4.apps.runtime import find_comfyui
    root = find_comfyui()
    return root is not None and (Path(root) / "comfy" / "quant_ops.py").is_file()


def test_calibrate_node_in_main_py_on_gpu(start_comfy_server, gpu_models, tmp_path):
    """The Calibrate node through 0.33's real launcher (dynamic VRAM on by default): it captures on the
    streamed BF16 experts, writes both states and hands back W4A4 models that sample in the same prompt
    (on 0.33 this failed right after capture before W4A4 weights became QuantizedTensors)."""
    with start_comfy_server(tmp_path / "calibrate", cpu=False) as server:
        for f in gpu_models.glob("gpu_wan_*.safetensors"):
            shutil.copy(f, server.models_dir / "diffusion_models")
        bf16 = dict(_prompts())["bf16"]
        g = two_expert_graph("calibrated", seed=7, high="gpu_wan_high.safetensors", low="gpu_wan_low.safetensors",
                             **GRAPH)
        g["20"] = {"class_type": "WanW4A4Calibrate", "inputs": {
            "model_high": ["2", 0], "model_low": ["3", 0], "positive": ["1", 0], "negative": ["1", 1],
            "latent": ["1", 2], "seed": 0, "runs": 1, "steps": GRAPH["steps"], "cfg": GRAPH["cfg"],
            "shift": GRAPH["shift"], "boundary": 900.0, "bins": 2, "rank": 8, "clip_grid": "1, 0.9",
            "clip_policy": "per_bin", "gptq": True, "name": "gpu_cal", "overwrite": True, "rows_per_bin": 64,
            "alphas": "0.5"}}
        g["4"]["inputs"]["model"], g["5"]["inputs"]["model"] = ["20", 0], ["20", 1]
        calibrated = _saved(server, server.run_prompt(g, timeout=600))
        ref = _saved(server, server.run_prompt(bf16, timeout=600))
        log = server.log()
    assert all((server.models_dir / "w4a4" / f"gpu_cal_{e}.safetensors").is_file() for e in ("high", "low"))
    if _has_quant_ops():
        assert "DynamicVRAM support detected and enabled" in log
    db = nm.sqnr_db(ref.float(), calibrated.float())
    print(f"calibrated W4A4 vs BF16: {db:.1f} dB")
    assert db > W4A4_VS_BF16_FLOOR_DB and not torch.equal(ref, calibrated)


# 5 latent frames of 32 x 32 tokens, cond and uncond in one call: 10 240 tokens, above nodes/rowwise.py's MIN_TOKENS
ROWWISE_GRAPH = dict(GRAPH, width=512, height=512, length=17, steps=2, split=1)


def test_blocks_addcmul_in_main_py_on_gpu(start_comfy_server, gpu_models, tmp_path, monkeypatch):
    """The blocks' torch.addcmul calls in Triton (nodes/rowwise.py) under the real launcher's defaults: the server
    says it ran them, and the W4A4 latent is bit for bit the one of a server started with WAN_W4A4_ROWWISE=0."""
    graph = dict(_prompts(ROWWISE_GRAPH))["w4a4"]
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("WAN_W4A4_ROWWISE", setting)
        with start_comfy_server(tmp_path / f"rowwise_{setting}", cpu=False) as server:
            _install(server, gpu_models)
            runs[setting] = (_saved(server, server.run_prompt(graph, timeout=600)), server.log())
    (on, log_on), (off, log_off) = runs["1"], runs["0"]
    said = "ran in Triton (nodes/rowwise.py)"
    assert said in log_on, log_on[-3000:]
    assert said not in log_off
    assert torch.equal(on, off)


# 8 steps at shift 8: t = 1000, 982, 960, 930 | 889, 828, 727, 533. Per expert the first call faults the weights in
# (dynamic VRAM), the second captures the blocks, the others replay them; the high expert's last step is in its
# second bin (EDGES), so a replay reads a bin the capture did not see.
GRAPHS_GRAPH = dict(GRAPH, steps=8, split=4)


def test_block_graphs_in_main_py_on_gpu(start_comfy_server, gpu_models, comfyui, tmp_path, monkeypatch):
    """The Wan blocks as CUDA graphs (nodes/graphs.py) under the real launcher's defaults (dynamic VRAM on 0.33,
    cudaMallocAsync) and the pack's (WAN_W4A4_BLOCK_GRAPHS=auto: on under dynamic VRAM; on ComfyUI 0.3.64, which has
    none, set to 1): the server says it replayed them, and every W4A4 latent, with and without a LoRA and with the
    LoRA'd experts run twice, is bit for bit the one of a server started with WAN_W4A4_BLOCK_GRAPHS=0."""
    prompts = [(name, graph) for name, graph in _prompts(GRAPHS_GRAPH) if name.startswith("w4a4")]
    dynamic_vram = "disable-dynamic-vram" in (comfyui / "comfy" / "cli_args.py").read_text()
    runs = {}
    for setting in ("auto" if dynamic_vram else "1", "0"):
        monkeypatch.setenv("WAN_W4A4_BLOCK_GRAPHS", setting)
        with start_comfy_server(tmp_path / f"graphs_{setting}", cpu=False) as server:
            _install(server, gpu_models)
            latents = {name: _saved(server, server.run_prompt(graph, timeout=600)) for name, graph in prompts}
            runs[setting] = (latents, server.log())
    (on, log_on), (off, log_off) = runs["auto" if dynamic_vram else "1"], runs["0"]
    assert "Wan blocks replayed as CUDA graphs" in log_on, log_on[-3000:]
    assert "could not be captured" not in log_on, log_on[-3000:]
    assert "CUDA graphs" not in log_off
    for name, want in off.items():
        assert torch.equal(on[name], want), f"{name}: {nm.sqnr_db(want.float(), on[name].float()):.1f} dB"
