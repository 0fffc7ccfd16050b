"""Smoke tests against a real ComfyUI: tiny Wan2.2 I2V experts through UNETLoader, ModelSamplingSD3
and two KSamplerAdvanced stages split at the I2V expert boundary (t = 900), on the CPU.

Conditioning comes from the test-only node in tests/comfy_custom_nodes (random text context and
image latent, set as WanImageToVideo sets them), so no text encoder or VAE is needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wan_w4a4.minimodel.arch import TINY
from wan_w4a4.apps import runtime

from api_graphs import two_expert_graph

pytestmark = pytest.mark.comfyui

TEST_NODES_FILE = Path(__file__).parent / "comfy_custom_nodes" / "wan_w4a4_test_nodes.py"
BOUNDARY_T = 900  # Wan2.2 I2V: the high-noise expert runs while the model timestep is >= 900
STEPS, CFG, SHIFT, SEED = 4, 3.5, 8.0, 7
WIDTH, HEIGHT, LENGTH = 64, 64, 5  # latent [1, 16, 2, 8, 8]: 32 tokens


def high_noise_steps(model, steps: int, scheduler: str = "simple") -> int:
    """How many of ``steps`` start at a model timestep >= BOUNDARY_T (the high expert's share)."""
    import comfy.samplers

    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
    timesteps = sampling.timestep(sigmas[:-1])
    return int((timesteps >= BOUNDARY_T).sum())


def record_timesteps(model, seen: list):
    """A clone of ``model`` that appends each model timestep it is called with to ``seen``."""
    import comfy.patcher_extension

    def wrapper(executor, x, t, *args, **kwargs):
        seen.extend(executor.class_obj.model_sampling.timestep(t).flatten().tolist())
        return executor(x, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "wan_w4a4_test", wrapper)
    return m


def test_tiny_checkpoint_detected_as_wan(comfy_nodes, tiny_wan_checkpoints):
    (model,) = comfy_nodes.UNETLoader().load_unet(tiny_wan_checkpoints["high"].name, "default")
    dm = model.model.diffusion_model
    assert type(model.model.model_config).__name__ == "WAN21_T2V"  # as Wan2.2-I2V-A14B is
    assert type(model.model).__name__ == "WAN21"
    assert (dm.dim, dm.num_heads, dm.ffn_dim, len(dm.blocks), dm.in_dim) == (
        TINY.dim, TINY.num_heads, TINY.ffn_dim, TINY.num_layers, TINY.in_dim)
    assert dm.img_emb is None


def test_pack_loads_as_custom_node(comfy_nodes):
    """ComfyUI's own loader imports this repository and registers every node it exports."""
    pack = runtime.load_pack_as_custom_node(comfy_nodes)
    assert Path(pack.__file__).resolve() == runtime.REPO_ROOT / "__init__.py"
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert comfy_nodes.NODE_CLASS_MAPPINGS[name] is cls


def test_two_expert_sampling(comfy_nodes, tiny_wan_checkpoints):
    nodes = comfy_nodes
    runtime.load_custom_node(TEST_NODES_FILE, nodes)
    positive, negative, latent = nodes.NODE_CLASS_MAPPINGS["WanW4A4TestI2VConditioning"]().build(
        seed=SEED, width=WIDTH, height=HEIGHT, length=LENGTH, text_tokens=16)

    experts, seen = {}, {"high": [], "low": []}
    for name in ("high", "low"):
        (m,) = nodes.UNETLoader().load_unet(tiny_wan_checkpoints[name].name, "default")
        (m,) = nodes.NODE_CLASS_MAPPINGS["ModelSamplingSD3"]().patch(m, SHIFT)
        experts[name] = record_timesteps(m, seen[name])

    split = high_noise_steps(experts["high"], STEPS)
    assert 0 < split < STEPS, f"4 steps at shift 8 should cross t=900 mid-way, got split {split}"

    sampler = nodes.KSamplerAdvanced()
    common = dict(noise_seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="simple",
                  positive=positive, negative=negative)
    (mid,) = sampler.sample(experts["high"], "enable", latent_image=latent, start_at_step=0,
                            end_at_step=split, return_with_leftover_noise="enable", **common)
    (out,) = sampler.sample(experts["low"], "disable", latent_image=mid, start_at_step=split,
                            end_at_step=10000, return_with_leftover_noise="disable", **common)

    x0, x1, x2 = latent["samples"], mid["samples"], out["samples"]
    assert x1.shape == x2.shape == x0.shape == (1, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    assert torch.isfinite(x1).all() and torch.isfinite(x2).all()
    assert not torch.equal(x1, x0) and not torch.equal(x2, x1), "a stage left the latent unchanged"
    # Each expert ran its steps, on its side of the boundary (cfg > 1: cond and uncond in one batch).
    assert len(seen["high"]) == split * 2 and min(seen["high"]) >= BOUNDARY_T
    assert len(seen["low"]) == (STEPS - split) * 2 and max(seen["low"]) < BOUNDARY_T


@pytest.mark.slow  # the session's server starts ComfyUI in a new process
def test_headless_server_runs_two_expert_graph(comfy_server, wan_checkpoint_factory):
    """The same two-expert graph posted to a real server, which also loads this pack from its
    custom_nodes/ folder; checks the pack imported cleanly and the graph produced a finite latent."""
    from safetensors.torch import load_file

    for name, seed in (("high", 1), ("low", 2)):
        wan_checkpoint_factory(comfy_server.models_dir, f"tiny_wan_{name}.safetensors", seed=seed)
    info = comfy_server.request("/object_info/KSamplerAdvanced")
    assert "KSamplerAdvanced" in info

    # 4 steps at shift 8: timesteps 1000, 960 | 889, 727 -> the high expert takes 2 (t >= 900)
    graph = two_expert_graph("smoke", width=WIDTH, height=HEIGHT, length=LENGTH, seed=SEED, steps=STEPS,
                             cfg=CFG, shift=SHIFT, split=2)
    entry = comfy_server.run_prompt(graph)

    # ComfyUI lists each custom node it imported as "<time> seconds[ (IMPORT FAILED)]: <path>"
    imports = [line for line in comfy_server.log().splitlines() if line.endswith("custom_nodes/ComfyUI-WanW4A4")]
    assert imports and all("IMPORT FAILED" not in line for line in imports), comfy_server.log()[-3000:]
    saved = entry["outputs"]["8"]["latents"][0]
    path = comfy_server.base_dir / "output" / saved["subfolder"] / saved["filename"]
    samples = load_file(str(path))["latent_tensor"]
    assert samples.shape == (1, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    assert torch.isfinite(samples).all() and samples.abs().sum() > 0
