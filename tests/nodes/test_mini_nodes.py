"""The mini-model helper nodes: conditioning, VAE and start frames as the example workflow wires them."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfyui


def test_mini_conditioning_through_wan_image_to_video(env):
    image, caption = env.node("WanW4A4MiniScene").make(3_000_000_007)
    assert image.shape == (1, 128, 128, 3) and 0 <= image.min() and image.max() <= 1
    assert isinstance(caption, str) and caption
    (pos,) = env.node("WanW4A4MiniTextEncode").encode("ignored", caption=caption)
    (neg,) = env.node("WanW4A4MiniTextEncode").encode("")
    assert pos[0][0].shape == neg[0][0].shape == (1, 32, 4096) and not torch.equal(pos[0][0], neg[0][0])
    (vae,) = env.node("WanW4A4MiniVAE").load()
    from comfy_extras.nodes_wan import WanImageToVideo
    p, n, latent = WanImageToVideo.execute(positive=pos, negative=neg, vae=vae, width=128, height=128, length=17,
                                           batch_size=1, start_image=image).result
    assert latent["samples"].shape == (1, 16, 5, 16, 16)
    assert p[0][1]["concat_latent_image"].shape == (1, 16, 5, 16, 16)
    (frames,) = env.nodes.VAEDecode().decode(vae, latent)
    assert frames.shape == (17, 128, 128, 3)


def test_mini_expert_loader(env):
    from wan_w4a4.apps.mini_sample import EMBEDDED_DIR, EMBEDDED_FILES
    loader = env.node("WanW4A4MiniLoadExpert")
    if not (EMBEDDED_DIR / EMBEDDED_FILES["high"]).is_file():
        with pytest.raises(FileNotFoundError, match="mini model's high expert is missing"):
            loader.load("high")
        pytest.skip("the trained mini model is not in minimodel/ yet")
    from wan_w4a4.apps.mini_train import expert_arch
    (m,) = loader.load("high")
    blocks = expert_arch(EMBEDDED_DIR / EMBEDDED_FILES["high"]).num_layers  # the header's, as trained
    assert type(m.model).__name__ == "WAN21" and len(m.model.diffusion_model.blocks) == blocks == 6
