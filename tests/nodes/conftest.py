"""The ``env`` fixture of the node tests: ComfyUI in-process with the test conditioning node, this
pack loaded as a custom node, the tiny experts and an RTN state for each in models/w4a4."""
from __future__ import annotations

import pytest

from w4a4_testlib import LENGTH, SEED, TEST_NODES_FILE, WIDTH, HEIGHT, Env, make_state


@pytest.fixture(scope="session")
def env(comfy_nodes, comfy_base_dir, tiny_wan_checkpoints) -> Env:
    from wan_w4a4.apps import runtime

    runtime.load_custom_node(TEST_NODES_FILE, comfy_nodes)
    runtime.load_pack_as_custom_node(comfy_nodes)
    pos, neg, latent = comfy_nodes.NODE_CLASS_MAPPINGS["WanW4A4TestI2VConditioning"]().build(
        seed=SEED, width=WIDTH, height=HEIGHT, length=LENGTH, text_tokens=16)
    models = comfy_base_dir / "models"
    e = Env(comfy_nodes, models, models / "w4a4", tiny_wan_checkpoints, pos, neg, latent)
    for expert in ("high", "low"):
        make_state(e.unet(expert), expert, e.w4a4_dir / f"tiny_{expert}.safetensors")
    return e
