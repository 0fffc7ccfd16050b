"""The held-out generation metric records the sampling settings it was measured with
(``apps/mini_pictures.generation_metrics`` and ``make_all``), with synthetic videos: no ComfyUI, no sampling."""
from __future__ import annotations

import json

import torch
from wan_w4a4.apps import mini_pictures as pictures


def synthetic_rows(n: int = 2, frames: int = 5, px: int = 16):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        truth = torch.rand(frames, px, px, 3, generator=g)
        videos = {"truth": truth, "reference": (truth + 0.05).clamp(0, 1), "generated": (truth + 0.1).clamp(0, 1)}
        rows.append((f"scene {i}", videos["reference"][::4], videos["generated"][::4], videos))
    return rows


def test_generation_metrics_records_the_cfg_steps_and_sampler_it_was_given():
    m = pictures.generation_metrics(synthetic_rows(), seeds=[7, 8], steps=40, cfg=3.5, vae_name="linear VAE",
                                    device="cpu", sampler="uni_pc")
    assert (m["cfg"], m["sampling_steps"], m["sampler"], m["scene_seeds"]) == (3.5, 40, "uni_pc", [7, 8])
    # the metric itself: generated is 0.1 off (before clamping) -> about 20 dB, reference 0.05 off -> about 26 dB
    assert 19 < m["generated"]["mean_after_start_psnr_db"] < m["reference"]["mean_after_start_psnr_db"] < 27
    assert "held-out generation (2 scenes, 40 uni_pc steps, cfg 3.5" in pictures.results_markdown(
        {**minimal_log(), "generation": m}).lower()


def minimal_log() -> dict:
    ckpt = {"file": "x.safetensors", "bytes": 1, "sha256": "0" * 64}
    return {"environment": {"device": "cpu", "torch": "t", "comfyui": "c"}, "plan": {"warm": 1, "high": 1, "low": 1},
            "wall_s": 1.0, "config": {"batch": 1, "heldout_sigmas": 1, "frames": 5}, "data": {"videos_rendered": 1},
            "replay": "--x", "phases": {}, "heldout": {k: {"untrained": 2.0, "warm_start": 1.0, "trained": 0.5,
                                                            "ratio_trained_to_untrained": 0.25,
                                                            "per_sigma": {"untrained": [], "warm_start": [],
                                                                          "trained": []}}
                                                       for k in ("high", "low")},
            "curve": [{"global_step": 0, "loss": 1.0, "phase": "warm"}, {"global_step": 1, "loss": 0.5, "phase": "warm"}],
            "checkpoints": {"high": ckpt, "low": ckpt}}


def test_make_all_writes_the_cfg_it_sampled_with_into_the_log(tmp_path, monkeypatch):
    (tmp_path / "train_log.json").write_text(json.dumps(minimal_log()))
    seen = {}

    def fake_strip_rows(high, low, seeds, **kw):
        seen.update(kw)
        return synthetic_rows(len(seeds), frames=kw["frames"])

    monkeypatch.setattr(pictures, "strip_rows", fake_strip_rows)
    monkeypatch.setattr(pictures.sample, "load_expert", lambda path: object())
    pictures.make_all(tmp_path, n=1, steps=12, cfg=2.0, generation=2)
    gen = json.loads((tmp_path / "train_log.json").read_text())["generation"]
    assert seen["cfg"] == 2.0 and seen["steps"] == 12
    assert (gen["cfg"], gen["sampling_steps"], len(gen["scene_seeds"])) == (2.0, 12, 2)
