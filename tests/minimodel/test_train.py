"""Training of the mini Wan2.2-I2V model (apps/mini_train.py, conditioning.py, sample.py).

The key test, ``test_training_input_equals_comfyuis_model_input``, runs ComfyUI's own
WanImageToVideo -> ModelSamplingSD3 -> KSamplerAdvanced path and checks that the 36-channel input,
timestep and context ComfyUI hands the Wan transformer are what training builds.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from wan_w4a4.apps import mini_train as train
from wan_w4a4.minimodel import conditioning, data, text
from wan_w4a4.minimodel.arch import TINY, wan_state_dict_shapes, write_wan_checkpoint

FRAMES = 5  # 2 latent frames: keeps CPU tests fast


# ---- pure functions ------------------------------------------------------------------------------
def test_init_state_dict_is_wans_init_with_comfyui_keys():
    sd = train.init_state_dict(TINY, seed=0)
    shapes = wan_state_dict_shapes(TINY)
    assert list(sd) == list(shapes) and all(tuple(sd[k].shape) == s for k, s in shapes.items())
    assert (sd["head.head.weight"] == 0).all()
    assert sd["text_embedding.0.weight"].std() == pytest.approx(0.02, rel=0.05)
    a = math.sqrt(6 / (TINY.dim + TINY.dim))
    w = sd["blocks.0.self_attn.q.weight"]
    assert w.abs().max() <= a and w.abs().max() > 0.95 * a
    assert sd["blocks.1.modulation"].std() == pytest.approx(TINY.dim ** -0.5, rel=0.1)
    assert (sd["blocks.0.self_attn.norm_q.weight"] == 1).all() and (sd["blocks.0.ffn.0.bias"] == 0).all()
    again = train.init_state_dict(TINY, seed=0)
    assert all(torch.equal(v, again[k]) for k, v in sd.items())
    assert not torch.equal(sd["blocks.0.ffn.0.weight"], train.init_state_dict(TINY, seed=1)["blocks.0.ffn.0.weight"])


def test_timestep_ranges_split_at_the_boundary():
    ranges = train.phase_ranges(0.9)
    u = torch.linspace(0, 1, 1001)
    for lo, hi in ranges.values():
        u0, u1 = train.u_range((lo, hi), 8.0)
        sig = train.shift_sigma(u0 + (u1 - u0) * u, 8.0)
        assert sig.min() >= lo - 1e-6 and sig.max() <= hi + 1e-6
        assert sig.min() > 0
    assert train.shift_sigma(torch.tensor(train.u_range(ranges["high"], 8.0)[0]), 8.0) == pytest.approx(0.9)
    assert train.unshift_sigma(0.9, 8.0) == pytest.approx(0.9 / 1.7)  # u >= 0.529: half of uniform u is high-noise


def test_lr_schedule():
    cfg = train.TrainConfig(out="x", minutes=None, steps=3)
    lrs = [train.lr_at(i, 1000, cfg) for i in range(1000)]
    assert lrs[0] == pytest.approx(cfg.lr / cfg.warmup) and max(lrs) == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(0.1 * cfg.lr, rel=0.01)
    assert train.lr_at(0, 1, cfg) == pytest.approx(cfg.lr)


def test_config_validation():
    with pytest.raises(ValueError, match="chunk >= batch"):
        train.TrainConfig(out="x", batch=8, chunk=4)
    with pytest.raises(ValueError, match="phase_steps"):
        train.TrainConfig(out="x", phase_steps=(5, 0, 5))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        train.TrainConfig(out="x", frames=8)


def test_training_image_latent_is_what_wanimagetovideo_encodes():
    vae = data.LinearVideoVAE()
    video = data.render([data.sample_scene(s) for s in (1, 2)], frames=FRAMES)
    z = vae.encode_normalized(video)
    assert torch.equal(train.image_latent_from(z), conditioning.image_latent(vae, video[:, 0], FRAMES))


def test_training_input_layout():
    z = torch.randn(2, 16, 2, 4, 4)
    noise = torch.randn_like(z)
    sigma = torch.tensor([0.95, 0.3])
    mask = conditioning.start_mask(2, 4, 4)
    x, target = train.training_input(z, noise, sigma, mask)
    assert x.shape == (2, 36, 2, 4, 4)
    torch.testing.assert_close(x[1, :16], 0.3 * noise[1] + 0.7 * z[1])
    assert (x[:, 16:20, 0] == 1).all() and (x[:, 16:20, 1:] == 0).all()
    assert torch.equal(x[:, 20:, 0], z[:, :, 0]) and (x[:, 20:, 1:] == 0).all()
    assert torch.equal(target, noise - z)


# ---- against the real ComfyUI --------------------------------------------------------------------
@pytest.mark.comfyui
def test_shift_is_comfyuis(comfy_nodes):
    import comfy.model_sampling

    u = torch.linspace(0, 1, 11)
    torch.testing.assert_close(train.shift_sigma(u, 8.0), comfy.model_sampling.time_snr_shift(8.0, u))


@pytest.mark.slow  # renders a scene and samples the I2V graph through ComfyUI
@pytest.mark.comfyui
def test_training_input_equals_comfyuis_model_input(comfy_nodes, tmp_path):
    """Runs the standard I2V graph (WanImageToVideo with our VAE and text map, ModelSamplingSD3,
    KSamplerAdvanced with cfg, so cond and uncond) and compares what reaches the transformer with
    the training-time construction."""
    import comfy.samplers
    from wan_w4a4.apps import mini_sample as sample

    ckpt = write_wan_checkpoint(tmp_path / "tiny_wan.safetensors", TINY, seed=5)
    model = sample.with_shift(sample.load_expert(ckpt), 8.0)
    scene = data.sample_scene(data.heldout_seeds(1)[0])
    cap = data.caption(scene)
    video = data.render([scene], frames=FRAMES)[0]
    positive, negative, latent = conditioning.i2v_conditioning(cap, video[0], FRAMES)

    seen = []
    dm = model.model.diffusion_model
    handle = dm.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].detach().clone(), args[1].detach().clone(),
                                               kwargs["context"].detach().clone())), with_kwargs=True)
    try:
        steps = 3
        comfy_nodes.KSamplerAdvanced().sample(model, "enable", 0, steps, 2.0, "euler", "simple", positive,
                                              negative, latent, 0, steps, "disable")
    finally:
        handle.remove()
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)

    vae = data.LinearVideoVAE()
    image_z = conditioning.image_latent(vae, video[0][None], FRAMES)
    z = vae.encode_normalized(video[None])
    assert torch.equal(train.image_latent_from(z), image_z)
    mask = conditioning.start_mask(*image_z.shape[2:])
    contexts = [text.encode_text(cap)[0], text.encode_text("")[0]]
    rows = 0
    for i, (x, t, ctx) in enumerate(seen):
        atol = 1e-5 if x.dtype == torch.float32 else 1e-2
        assert x.shape[1:] == (36, *image_z.shape[2:])
        expected = conditioning.model_input(x[:, :16].float(), image_z.expand(x.shape[0], -1, -1, -1, -1), mask)
        torch.testing.assert_close(x.float(), expected, atol=atol, rtol=0)
        # training's own builder gives the same tensor from the same noisy latent
        x_t = x[:, :16].float()
        torch.testing.assert_close(
            conditioning.model_input(x_t, train.image_latent_from(z).expand(x.shape[0], -1, -1, -1, -1), mask),
            x.float(), atol=atol, rtol=0)
        torch.testing.assert_close(t.float(), torch.full_like(t.float(), 1000 * sigmas[i].item()), atol=1e-3, rtol=0)
        for row in ctx.float():
            assert any(torch.allclose(row, c, atol=atol) for c in contexts)
        rows += x.shape[0]
    assert rows == 2 * steps  # every step saw cond and uncond


@pytest.mark.comfyui
def test_split_step_matches_the_template(comfy_nodes, tmp_path):
    from wan_w4a4.apps import mini_sample as sample

    ckpt = write_wan_checkpoint(tmp_path / "tiny_wan.safetensors", TINY, seed=6)
    model = sample.with_shift(sample.load_expert(ckpt), 8.0)
    assert sample.split_step(model, 20) == 10  # the Wan2.2 I2V template: 10 of 20 steps high-noise
    assert sample.split_step(model, 4) == 2


@pytest.mark.comfyui
@pytest.mark.slow
def test_three_step_training_writes_loadable_checkpoints(comfy_nodes, tmp_path):
    from wan_w4a4.apps import mini_sample as sample

    # a time budget too small for more than one step per phase: exercises the speed probe and the plan
    cfg = train.TrainConfig(out=tmp_path / "run", arch=TINY, batch=1, minutes=0.01, frames=FRAMES, chunk=1,
                            reuse=1, heldout=1, heldout_sigmas=1, eval_points=1, probe_steps=2, pictures=False)
    log = train.train(cfg)
    assert log["plan"] == {"warm": 1, "high": 1, "low": 1}
    assert log["probe"]["step_s"] > 0 and log["probe"]["eval_s"] > 0
    with pytest.raises(FileExistsError, match="--force"):
        train.train(cfg)
    assert json.loads((cfg.out / "train_log.json").read_text())["plan"] == log["plan"]
    assert all(math.isfinite(c["loss"]) for c in log["curve"]) and len(log["curve"]) == 3
    for name in ("high", "low"):
        h = log["heldout"][name]
        assert all(math.isfinite(h[k]) for k in ("untrained", "warm_start", "trained"))
    experts = {}
    for name, fname in train.EXPERT_FILES.items():
        path = cfg.out / fname
        assert path.stat().st_size <= train.MAX_CHECKPOINT_BYTES
        model = sample.load_expert(path)  # ComfyUI's UNETLoader
        assert type(model.model.model_config).__name__ == "WAN21_T2V" and type(model.model).__name__ == "WAN21"
        dm = model.model.diffusion_model
        assert (dm.dim, dm.num_heads, dm.ffn_dim, len(dm.blocks), dm.in_dim) == (
            TINY.dim, TINY.num_heads, TINY.ffn_dim, TINY.num_layers, TINY.in_dim)
        from safetensors.torch import load_file
        saved = load_file(str(path))
        assert saved["head.head.weight"].dtype == torch.bfloat16
        torch.testing.assert_close(dm.state_dict()["head.head.weight"].float(), saved["head.head.weight"].float())
        experts[name] = model
    # the two experts sample through the standard two-stage graph
    scene = data.sample_scene(data.heldout_seeds(1)[0])
    video = data.render([scene], frames=FRAMES)[0]
    out = sample.generate(experts["high"], experts["low"], data.caption(scene), video[0], frames=FRAMES, steps=4)
    assert out.shape == (1, 16, 2, 16, 16) and torch.isfinite(out).all()
    vae = data.LinearVideoVAE()
    assert vae.latent_to_rgb(out).shape == (1, 2, 128, 128, 3)

    # the pictures and the card's results block
    from PIL import Image
    from wan_w4a4.apps import mini_pictures as pictures

    ref = vae.decode_normalized(vae.encode_normalized(video))
    strips = pictures.draw_strips([(data.caption(scene), ref, vae.latent_to_rgb(out)[0])], cfg.out / "strips.png")
    assert Image.open(strips).size[0] == pictures.LABEL_W + 2 * 128
    curve = pictures.draw_loss_curve(log, cfg.out / "loss_curve.png")
    assert Image.open(curve).size == (900, 420)
    card = cfg.out / "README.md"
    card.write_text(f"# card\n{pictures.CARD_BEGIN}\nold\n{pictures.CARD_END}\ntail\n")
    assert pictures.update_card(cfg.out)
    text_ = card.read_text()
    assert "old" not in text_ and text_.endswith("tail\n") and "| high-noise | t >= 900 |" in text_


def test_command_line_defaults():
    import argparse

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    cfg = train.config_from_args(p.parse_args(["--out", "o", "--device", "cpu"]))
    assert (cfg.minutes, cfg.steps, cfg.batch, cfg.chunk, cfg.reuse, cfg.arch) == (7.0, None, 4, 4, 1, train.MINI)
    assert (cfg.lr, cfg.decoder_seconds, cfg.decoder_steps) == (4e-4, 0.0, None)  # no decoder by default on CPU
    cfg = train.config_from_args(p.parse_args(["--out", "o", "--device", "cuda", "--phase-steps", "30,20,40"]))
    assert (cfg.minutes, cfg.phase_steps, cfg.batch, cfg.chunk, cfg.reuse) == (None, (30, 20, 40), 256, 2048, 8)
    assert (cfg.lr, cfg.ema, cfg.decoder_seconds, cfg.decoder_batch) == (6e-4, 0.998, 50.0, 32)
    assert train.plan_steps(cfg, None, 0.0, 0.0) == (30, 20, 40)
    cfg = train.config_from_args(p.parse_args(["--out", "o", "--steps", "100", "--arch", "tiny"]))
    assert train.plan_steps(cfg, None, 0.0, 0.0) == (30, 30, 40) and cfg.arch == TINY
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "o", "--steps", "10", "--minutes", "3"])


@pytest.mark.comfyui
@pytest.mark.slow
def test_continued_training_starts_from_the_given_experts(comfy_nodes, tmp_path):
    from safetensors import safe_open

    small = {"arch": TINY, "batch": 1, "frames": FRAMES, "chunk": 1, "reuse": 1, "heldout": 1, "heldout_sigmas": 1,
             "eval_points": 1, "pictures": False, "minutes": None}
    first = train.train(train.TrainConfig(out=tmp_path / "a", phase_steps=(1, 1, 1), **small))
    cfg = train.TrainConfig(out=tmp_path / "b", phase_steps=(0, 1, 2), init_experts=tmp_path / "a", **small)
    log = train.train(cfg)
    assert log["plan"] == {"warm": 0, "high": 1, "low": 2} and log["phases"]["warm"] is None
    prev = log["continued_from"]
    for name in ("high", "low"):
        assert prev["experts"][name]["sha256"] == first["checkpoints"][name]["sha256"]
        # the start column is the given expert's held-out loss, measured again on the same held-out set
        assert log["heldout"][name]["warm_start"] == pytest.approx(first["heldout"][name]["trained"], rel=1e-4)
        with safe_open(str(cfg.out / train.EXPERT_FILES[name]), framework="pt") as f:
            meta = json.loads(f.metadata()["wan_w4a4.continued_from"])
        assert meta["sha256"] == first["checkpoints"][name]["sha256"]
    assert prev["log"]["plan"] == first["plan"] and "--init-experts DIR0" in log["replay"]
    from wan_w4a4.apps import mini_pictures as pictures
    card = pictures.results_markdown(log)
    assert "Continued from the experts of an earlier run" in card and "| untrained | start | trained |" in card
    from PIL import Image
    assert Image.open(pictures.draw_loss_curve(log, tmp_path / "curve.png")).size == (900, 420)


def test_two_one_expert_runs_join_into_one_model(comfy_nodes, tmp_path):
    """``--expert high`` and ``--expert low`` (one per GPU) train one expert each from the same start and write the
    other unchanged; ``--join`` puts the two trained ones together, with each one's log, and checks its inputs."""
    import argparse

    from safetensors.torch import load_file

    small = {"arch": TINY, "batch": 1, "frames": FRAMES, "chunk": 1, "reuse": 1, "heldout": 1, "heldout_sigmas": 1,
             "eval_points": 1, "pictures": False, "minutes": None}
    start = tmp_path / "start"
    train.train(train.TrainConfig(out=start, phase_steps=(1, 1, 1), **small))
    logs = {}
    for name, plan in (("high", (0, 2, 0)), ("low", (0, 0, 3))):
        logs[name] = train.train(train.TrainConfig(out=tmp_path / name, phase_steps=plan, init_experts=start,
                                                   experts=(name,), **small))
        other = "low" if name == "high" else "high"
        assert logs[name]["phases"][other] is None and f"--expert {name}" in logs[name]["replay"]
        kept, given = (load_file(str(d / train.EXPERT_FILES[other])) for d in (tmp_path / name, start))
        assert all(torch.equal(kept[k], given[k]) for k in given)           # the other expert: as it started
        mine, before = (load_file(str(d / train.EXPERT_FILES[name])) for d in (tmp_path / name, start))
        assert not all(torch.equal(mine[k], before[k]) for k in before)      # this one trained
    p = argparse.ArgumentParser()
    train.add_arguments(p)
    out = tmp_path / "joined"
    train.run(p.parse_args(["--out", str(out), "--join", str(tmp_path / "high"), str(tmp_path / "low")]))
    with pytest.raises(ValueError, match="takes no --minutes"):  # joining trains nothing
        train.run(p.parse_args(["--out", str(tmp_path / "jx"), "--minutes", "3", "--join", str(tmp_path / "high"),
                                str(tmp_path / "low")]))
    joined = json.loads((out / "train_log.json").read_text())
    # one curve, as one run's: the low run's steps continue the high run's count
    steps = [c["global_step"] for c in joined["curve"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert "--join" in joined["replay"] and "--expert low" in joined["replay"]
    for name in ("high", "low"):
        fname = train.EXPERT_FILES[name]
        assert (out / fname).read_bytes() == (tmp_path / name / fname).read_bytes()
        assert joined["phases"][name]["steps"] == logs[name]["phases"][name]["steps"]
        assert joined["heldout"][name] == logs[name]["heldout"][name]
        assert joined["checkpoints"][name] == logs[name]["checkpoints"][name]
    assert [c["phase"] for c in joined["curve"]] == (["high"] * len(logs["high"]["curve"])
                                                      + ["low"] * len(logs["low"]["curve"]))
    assert joined["plan"] == {"warm": 0, "high": 2, "low": 3} and joined["config"]["experts"] == ["high", "low"]
    from wan_w4a4.apps import mini_pictures as pictures
    card = pictures.results_markdown(joined)
    assert "two runs" in card and "--expert high" in card and "--expert low" in card and "--join" in card
    assert "| high-noise |" in pictures.results_markdown(logs["high"])  # a one-expert run's own card
    # inputs are checked before anything is written, and nothing is overwritten without --force
    with pytest.raises(FileExistsError, match="train_log.json exists|safetensors exists"):
        train.join_expert_runs(tmp_path / "high", tmp_path / "low", out)
    with pytest.raises(ValueError, match="must come from a run of --expert low alone"):
        train.join_expert_runs(tmp_path / "high", tmp_path / "high", tmp_path / "j2")
    with pytest.raises(ValueError, match="trained the experts \\['high', 'low'\\]"):
        train.join_expert_runs(start, tmp_path / "low", tmp_path / "j2")
    (tmp_path / "low" / train.EXPERT_FILES["low"]).write_bytes(
        (start / train.EXPERT_FILES["low"]).read_bytes())                    # not the file its log wrote
    with pytest.raises(ValueError, match="not the checkpoint its train_log.json wrote"):
        train.join_expert_runs(tmp_path / "high", tmp_path / "low", tmp_path / "j2")
    assert not (tmp_path / "j2").exists()
    (tmp_path / "low" / train.EXPERT_FILES["low"]).write_bytes((out / train.EXPERT_FILES["low"]).read_bytes())
    # the two runs must agree on what the joined log states once
    other = tmp_path / "low_other"
    other.mkdir()
    (other / train.EXPERT_FILES["low"]).write_bytes((tmp_path / "low" / train.EXPERT_FILES["low"]).read_bytes())
    changed = json.loads((tmp_path / "low" / "train_log.json").read_text())
    changed["config"]["boundary"] = 0.8
    (other / "train_log.json").write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="differ in 'boundary'"):
        train.join_expert_runs(tmp_path / "high", other, tmp_path / "j2")
    # a decoder in --out (trained for other experts) is not left beside new experts without --force
    (tmp_path / "j3").mkdir()
    (tmp_path / "j3" / "decoder.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="decoder.safetensors exists"):
        train.join_expert_runs(tmp_path / "high", tmp_path / "low", tmp_path / "j3")
    assert sorted(p.name for p in (tmp_path / "j3").iterdir()) == ["decoder.safetensors"]
    again = train.join_expert_runs(tmp_path / "high", tmp_path / "low", out, overwrite=True)  # --force replaces
    assert again["checkpoints"] == joined["checkpoints"]
    # one expert alone continues an earlier run, and its plan gives the other expert nothing
    with pytest.raises(ValueError, match="needs init_experts"):
        train.TrainConfig(out=tmp_path / "x", arch=TINY, experts=("low",))
    with pytest.raises(ValueError, match="the other's phase must have 0 steps"):
        train.TrainConfig(out=tmp_path / "x", arch=TINY, phase_steps=(0, 1, 1), init_experts=start, experts=("low",))
    with pytest.raises(ValueError, match="each needs at least one step"):
        train.TrainConfig(out=tmp_path / "x", arch=TINY, phase_steps=(0, 0, 1), init_experts=start)
    cfg = train.TrainConfig(out=tmp_path / "x", arch=TINY, steps=70, minutes=None, init_experts=start,
                            experts=("low",))
    assert train.plan_steps(cfg, None, 0.0, 0.0) == (0, 0, 70)
    one = train.config_from_args(p.parse_args(["--out", "o", "--arch", "tiny", "--init-experts", str(start),
                                               "--steps", "7", "--expert", "high", "--device", "cuda"]))
    # one expert: no decoder or pictures of a half-trained pair unless asked for
    assert one.experts == ("high",) and not one.decoder_seconds and not one.pictures


def test_continued_training_checks_the_experts_before_it_starts(tmp_path):
    with pytest.raises(FileNotFoundError, match="no expert checkpoint"):
        train.TrainConfig(out=tmp_path / "b", init_experts=tmp_path / "none")
    bad = tmp_path / "bad"
    for fname in train.EXPERT_FILES.values():
        bad.mkdir(exist_ok=True)
        (bad / fname).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        train.TrainConfig(out=tmp_path / "b", init_experts=bad)
    tiny = tmp_path / "tiny"
    for fname in train.EXPERT_FILES.values():
        write_wan_checkpoint(tiny / fname, TINY)
    with pytest.raises(ValueError, match="is not the one being trained"):
        train.TrainConfig(out=tmp_path / "b", init_experts=tiny)  # the default architecture is MINI
    with pytest.raises(ValueError, match="warm start must have 0 steps"):
        train.TrainConfig(out=tmp_path / "b", arch=TINY, phase_steps=(1, 1, 1), init_experts=tiny)
    cfg = train.TrainConfig(out=tmp_path / "b", arch=TINY, steps=70, minutes=None, init_experts=tiny)
    assert train.plan_steps(cfg, None, 0.0, 0.0) == (0, 30, 40)  # the experts' 3 : 4, no warm start
    assert train.plan_steps(dataclasses.replace(cfg, init_experts=None), None, 0.0, 0.0) == (21, 21, 28)
    import argparse

    p = argparse.ArgumentParser()
    train.add_arguments(p)
    args = p.parse_args(["--out", "o", "--arch", "tiny", "--init-experts", str(tiny), "--steps", "7"])
    assert train.config_from_args(args).init_experts == tiny


def test_grown_blocks_are_spread_and_follow_their_copy():
    assert train.grown_block_sources(4, 6) == [0, 1, 1, 2, 3, 3]
    assert train.grown_block_sources(4, 4) == [0, 1, 2, 3]
    assert train.grown_block_sources(2, 3) == [0, 1, 1]
    assert train.grown_block_sources(2, 6) == [0, 0, 0, 1, 1, 1]
    assert train.can_grow(train.MINI, train.MINI6) and not train.can_grow(train.MINI6, train.MINI)
    assert not train.can_grow(TINY, train.MINI)  # another ffn width


@pytest.mark.comfyui
def test_a_grown_model_computes_what_the_trained_one_did(comfy_nodes):
    """Depth up-scaling (``--arch mini6 --init-experts`` a mini folder): the grown model's output equals the
    source model's, and its new blocks are trainable (their residual outputs get gradients)."""
    src = dataclasses.replace(TINY, num_layers=2)
    dst = dataclasses.replace(TINY, num_layers=3)
    small = train.build_model(src, seed=3)
    with torch.no_grad():  # a trained-looking model: Wan's init zeroes the head, which would hide any difference
        small.head.head.weight.normal_(0, 0.05)
    grown = train.build_model(dst, seed=9)
    state = train.grow_state_dict(small.state_dict(), src, dst)
    assert set(state) == set(grown.state_dict())
    grown.load_state_dict(state)
    assert (state["blocks.2.ffn.2.weight"] == 0).all() and (state["blocks.2.self_attn.o.bias"] == 0).all()
    assert torch.equal(state["blocks.2.ffn.0.weight"], state["blocks.1.ffn.0.weight"])
    assert not (state["blocks.1.ffn.2.weight"] == 0).all()
    torch.manual_seed(0)
    x = torch.randn(1, 36, 2, 8, 8)
    t = torch.tensor([700.0])
    ctx = torch.randn(1, 12, TINY.text_dim)
    with train.comfy_in_training():
        want = small(x, t, ctx)
        got = grown(x, t, ctx)
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got.square().mean().backward()
    assert grown.blocks[2].ffn[2].weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="cannot grow"):
        train.grow_state_dict(state, dst, src)


def test_every_architecture_fits_the_checkpoint_budget():
    header = 100_000  # generous: a checkpoint's JSON header is about 20 kB at these sizes
    for name, arch in train.ARCHS.items():
        n = sum(math.prod(shape) for shape in wan_state_dict_shapes(arch).values())
        assert 2 * n + header <= train.MAX_CHECKPOINT_BYTES, name  # bf16
    assert train.ARCHS["mini6"].num_layers == 6 and train.ARCHS["mini6"].dim == train.MINI.dim

