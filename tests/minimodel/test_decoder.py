"""The mini model's learned video decoder (minimodel/decoder.py) and how training, pictures, the demo and
the ComfyUI node use it (apps/mini_train.py, apps/mini_pictures.py, apps/demo.py, nodes/mini_nodes.py)."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from wan_w4a4.apps import mini_train as train
from wan_w4a4.minimodel import data
from wan_w4a4.minimodel import decoder as D

FRAMES = 5  # 2 latent frames: keeps CPU tests fast


def _latent(frames=FRAMES, seeds=(3_000_000_000,)):
    vae = data.LinearVideoVAE()
    video = data.render([data.sample_scene(s) for s in seeds], frames=frames)
    return vae, video, vae.encode_normalized(video)


def _trained_looking(seed=0) -> D.VideoDecoder:
    """A decoder whose output layer is not zero (as after training), so that it differs from the linear one."""
    torch.manual_seed(seed)
    dec = D.VideoDecoder()
    with torch.no_grad():
        dec.out.weight.normal_(0, 0.02)
    return dec.eval()


# ---- the module -----------------------------------------------------------------------------------
def test_untrained_decoder_is_the_linear_decoder_with_every_frame():
    vae, video, z = _latent()
    dec = D.VideoDecoder().eval()
    with torch.no_grad():
        out = dec(z)
    assert out.shape == video.shape == (1, FRAMES, 128, 128, 3)
    # zero output layer: exactly the linear decoding, each latent frame held for the frames it covers
    torch.testing.assert_close(out, D.hold_frames(vae.decode_normalized(z)), rtol=0, atol=1e-6)
    assert D.last_of_groups(out).shape == (1, 2, 128, 128, 3)
    with pytest.raises(ValueError, match="latent"):
        dec(z[:, :8])


def test_decoder_is_deterministic_and_uses_neighbours():
    _, _, z = _latent()
    a, b = _trained_looking(0), _trained_looking(0)
    with torch.no_grad():
        out = a(z)
        assert torch.equal(out, b(z)) and torch.equal(out, a(z))
        # a change in one latent pixel of latent frame 1 reaches the neighbouring 8x8 blocks (no seams by
        # construction) and the frames of latent frame 0 (temporal context): the linear decoder changes one block
        z2 = z.clone()
        z2[:, :, 1, 8, 8] += 3.0
        diff = (a(z2) - out).abs().amax(dim=-1)[0]                  # [T, H, W]
        lin = (D.hold_frames(data.LinearVideoVAE().decode_normalized(z2))
               - D.hold_frames(data.LinearVideoVAE().decode_normalized(z))).abs().amax(dim=-1)[0]
    assert lin[:, :64].amax() == 0 and lin[:, :, 72:].amax() == 0 and lin[0].amax() == 0  # one block, ...
    assert lin[1:, 64:72, 64:72].amax() > 0                                                # ... frames 1..4
    assert diff[1, 56:64, 64:72].amax() > 0 and diff[1, 64:72, 72:80].amax() > 0  # blocks above / right
    assert diff[0].amax() > 0  # frame 0 sees latent frame 1


def test_learned_vae_keeps_the_encoder_and_comfyuis_shapes():
    vae_lin, video, z = _latent()
    vae = D.LearnedVideoVAE(_trained_looking())
    raw = vae.encode(video[0])
    torch.testing.assert_close(raw, vae_lin.encode(video[0]), rtol=0, atol=0)
    assert vae.decode(raw).shape == (1, FRAMES, 128, 128, 3)        # VAEDecode: every frame
    pics = vae.latent_to_rgb(raw)
    assert pics.shape == (1, 2, 128, 128, 3)                          # one picture per latent frame
    torch.testing.assert_close(pics, vae.decode(raw)[:, ::data.TEMPORAL], rtol=0, atol=0)
    torch.testing.assert_close(vae.decode_normalized(z), pics, rtol=0, atol=1e-6)
    assert 0 <= pics.min() and pics.max() <= 1
    assert D.describe(vae) == "learned decoder" and D.describe(vae_lin) == "linear VAE"


# ---- the file -------------------------------------------------------------------------------------
def test_decoder_file_round_trip_no_silent_overwrite(tmp_path):
    _, _, z = _latent()
    dec = _trained_looking()
    path = tmp_path / D.DECODER_FILE
    info = D.save_decoder(dec, path, {"steps": 3})
    assert info["bytes"] == path.stat().st_size < D.MAX_DECODER_BYTES and len(info["sha256"]) == 64
    assert not [p for p in tmp_path.iterdir() if p.name != D.DECODER_FILE]  # no temp file left
    back = D.load_decoder(path)
    with torch.no_grad():
        assert torch.equal(back(z), dec(z))
    with pytest.raises(FileExistsError, match="overwrite"):
        D.save_decoder(dec, path)
    D.save_decoder(D.VideoDecoder(), path, overwrite=True)
    assert (D.load_decoder(path).out.weight == 0).all()


def _rewrite(path, tensors, meta):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=meta)


def test_decoder_file_validation_names_the_file_and_the_problem(tmp_path):
    good = tmp_path / "good.safetensors"
    D.save_decoder(D.VideoDecoder(), good)
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict

    bad = tmp_path / "bad.safetensors"
    _rewrite(bad, tensors, {**meta, "wan_w4a4.kind": "something else"})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*not a mini-model decoder"):
        D.load_decoder(bad)
    _rewrite(bad, tensors, {k: v for k, v in meta.items() if k != "wan_w4a4.decoder_config"})
    with pytest.raises(ValueError, match="decoder_config"):
        D.load_decoder(bad)
    _rewrite(bad, {**tensors, "out.bias": torch.zeros(4)}, meta)
    with pytest.raises(ValueError, match=r"out\.bias is F32 \(4,\), expected F32 \(3,\)"):
        D.load_decoder(bad)
    _rewrite(bad, {**tensors, "out.bias": tensors["out.bias"].half()}, meta)
    with pytest.raises(ValueError, match=r"out\.bias is F16"):
        D.load_decoder(bad)
    _rewrite(bad, {k: v for k, v in tensors.items() if k != "out.bias"}, meta)
    with pytest.raises(ValueError, match=r"missing \['out\.bias'\]"):
        D.load_decoder(bad)
    _rewrite(bad, {**tensors, "out.bias": torch.tensor([0.0, float("nan"), 0.0])}, meta)
    with pytest.raises(ValueError, match="out.bias has non-finite"):
        D.load_decoder(bad)
    _rewrite(bad, tensors, {**meta, "wan_w4a4.decoder_config": json.dumps({"stem": 8, "widths": [4, 4]})})
    with pytest.raises(ValueError, match="three positive widths"):
        D.load_decoder(bad)
    raw = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors"):
        D.load_decoder(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        D.load_decoder(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no decoder"):
        D.load_decoder(tmp_path / "none.safetensors")


def test_embedded_vae_picks_up_the_decoder_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(D, "embedded_decoder_path", lambda: tmp_path / D.DECODER_FILE)
    with caplog.at_level("WARNING"):
        vae = D.embedded_vae()
    assert type(vae) is data.LinearVideoVAE and "no learned decoder" in caplog.text
    D.save_decoder(_trained_looking(), tmp_path / D.DECODER_FILE)
    vae = D.embedded_vae()
    assert isinstance(vae, D.LearnedVideoVAE) and (vae.decoder.out.weight != 0).any()


@pytest.mark.comfyui
def test_minivae_node_hands_out_the_learned_decoder(comfy_nodes, tmp_path, monkeypatch):
    from wan_w4a4.nodes.mini_nodes import MiniVAE

    monkeypatch.setattr(D, "embedded_decoder_path", lambda: tmp_path / D.DECODER_FILE)
    assert type(MiniVAE().load()[0]) is data.LinearVideoVAE
    D.save_decoder(_trained_looking(), tmp_path / D.DECODER_FILE)
    assert isinstance(MiniVAE().load()[0], D.LearnedVideoVAE)


# ---- training pieces ------------------------------------------------------------------------------
def test_perturb_scales_per_sample():
    z = torch.zeros(64, 16, 2, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = D.perturb(z, 0.3, g)
    std = out.flatten(1).std(1)
    assert std.max() <= 0.3 * 1.2 and std.min() < 0.1 and std.max() > 0.2  # uniform in [0, 0.3]
    assert torch.equal(D.perturb(z, 0.0, g), z)


def test_seam_metric_sees_the_linear_decoders_block_seams():
    vae, video, z = _latent(frames=1, seeds=(3_000_000_001,))
    lin = D.hold_frames(vae.decode_normalized(z))
    assert D.seam_ratio(video) < 1.3 and D.seam_ratio(lin) > 2.0  # measured: about 1.06 and 3 over 16 scenes
    edge, inside = D.block_diffs(video)
    assert edge.shape == inside.shape == (1,)
    # a picture that is flat inside each 8 x 8 block and steps between blocks: seams only
    steps_ = torch.arange(16.0).repeat_interleave(8) / 16
    blocky = steps_.view(1, 1, 128, 1, 1).expand(1, 1, 128, 128, 3)
    edge, inside = D.block_diffs(blocky)
    assert inside.item() == 0 and edge.item() > 0


def test_seam_penalty_only_smooths_block_edges():
    vae, video, z = _latent(frames=1, seeds=(3_000_000_001,))
    lin = D.hold_frames(vae.decode_normalized(z)).requires_grad_(True)
    assert D.seam_penalty(video, video).item() == 0
    p = D.seam_penalty(lin, video)
    assert p.item() > 0.01
    p.backward()
    g = lin.grad[0, 0].abs().sum(-1)  # [H, W]
    near_edge = torch.zeros(128, dtype=torch.bool)
    near_edge[7::8] = True
    near_edge[8::8] = True
    # the inside term is held constant: only pixels beside a block edge get a gradient
    assert g[~near_edge][:, ~near_edge].sum() == 0 and g[near_edge].sum() > 0
    _, _, z2 = _latent(frames=1, seeds=(1,))
    dec = D.VideoDecoder()
    torch.testing.assert_close(D.decoder_loss(dec, z2, video, 0.0),
                               torch.nn.functional.mse_loss(dec(z2), video))
    assert D.decoder_loss(dec, z2, video, 1.0) > D.decoder_loss(dec, z2, video, 0.0)


@pytest.mark.slow
def test_decoder_steps_lower_the_loss_on_a_fixed_batch():
    # the untrained decoder is the linear one (its zero output layer): a few steps must already beat it,
    # so the gradient reaches every layer through the residual (measured: 0.00405 -> 0.00394 after 10 steps)
    _, video, z = _latent(frames=1, seeds=(1,))  # one frame: the same layers, a fifth of the work
    torch.manual_seed(0)
    dec = D.VideoDecoder()
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    first = D.decoder_loss(dec, z, video).item()
    for _ in range(10):
        loss = D.decoder_loss(dec, z, video)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert D.decoder_loss(dec, z, video).item() < 0.985 * first


def test_ema_follows_the_weights():
    model = torch.nn.Linear(3, 2)
    ema = train.Ema(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # first update: decay min(0.9, 1/10) = 0.1 -> 90 % of the new weights
    torch.testing.assert_close(ema.state["weight"], start + 0.9)
    for _ in range(200):
        ema.update()
    torch.testing.assert_close(ema.state["weight"], model.weight.detach(), rtol=0, atol=1e-6)
    assert ema.state["weight"] is not model.weight


# ---- the whole training entry point ---------------------------------------------------------------
@pytest.mark.comfyui
@pytest.mark.slow
def test_training_command_writes_every_file(comfy_nodes, tmp_path):
    out = tmp_path / "mini"
    argv = ["--out", str(out), "--arch", "tiny", "--device", "cpu", "--phase-steps", "1,1,1", "--batch", "1",
            "--frames", str(FRAMES), "--heldout", "1", "--heldout-sigmas", "1", "--decoder-steps", "2",
            "--decoder-batch", "1", "--generation", "1", "--sample-steps", "2", "--strips", "1"]
    assert train.main(argv) == 0
    names = {"high_noise.safetensors", "low_noise.safetensors", D.DECODER_FILE, "train_log.json",
             "loss_curve.png", "strips.png"}
    assert names <= {p.name for p in out.iterdir()}
    log = json.loads((out / "train_log.json").read_text())
    assert log["decoder"]["steps"] == 2 and log["decoder"]["file"]["bytes"] == (out / D.DECODER_FILE).stat().st_size
    assert "--decoder-steps 2" in log["replay"] and "--ema 0.998" in log["replay"]
    for k in ("learned_clean_psnr_db", "linear_clean_psnr_db", "learned_perturbed_psnr_db"):
        assert 5 < log["decoder"]["heldout"][k] < 60
    assert {p["weights"]["kept"] for p in log["phases"].values()} <= {"raw", "ema"}
    g = log["generation"]
    assert "pixel space (learned decoder)" in g["what"] and g["scene_seeds"] == [data.HELDOUT_SEED_BASE]
    for k in ("generated", "reference", "still"):
        assert len(g[k]["per_frame_psnr_db"]) == FRAMES
    assert set(g["seam_ratio_after_start"]) == {"truth", "reference", "generated"}
    assert log["decoder"]["heldout"]["linear_clean_seam_ratio"] > 1.5 > log["decoder"]["heldout"]["truth_seam_ratio"]
    # frame 0 of the still video is the reference's frame 0
    assert g["still"]["per_frame_psnr_db"][0] == g["reference"]["per_frame_psnr_db"][0]
    assert isinstance(D.load_decoder(out / D.DECODER_FILE), D.VideoDecoder)
    # refuses to replace the decoder (or anything) without --force
    with pytest.raises(FileExistsError, match="--force"):
        train.main(argv)


# ---- training latents sampled with the experts, and --decoder-only ---------------------------------
@pytest.mark.comfyui
def test_sample_latents_is_comfyuis_two_expert_sampler(comfy_nodes, tmp_path):
    """The decoder's training latents from a whole generation (start 0) are what ComfyUI's two
    KSamplerAdvanced make from the same start frame, caption and noise (apps/mini_sample.py)."""
    import comfy.sample
    import comfy.samplers
    from wan_w4a4.apps import mini_sample as sample
    from wan_w4a4.minimodel import conditioning, text
    from wan_w4a4.minimodel.arch import TINY, write_wan_checkpoint

    paths = {k: write_wan_checkpoint(tmp_path / f"{k}.safetensors", TINY, seed=s) for k, s in (("high", 3), ("low", 4))}
    steps = 4
    high, low = (sample.load_expert(paths[k]) for k in ("high", "low"))
    sigmas = comfy.samplers.calculate_sigmas(sample.with_shift(high).get_model_object("model_sampling"), "simple", steps)
    torch.testing.assert_close(torch.tensor(train.flow_sigmas(steps, 8.0)), sigmas.float(), atol=1e-6, rtol=0)

    vae, video, z = _latent()
    cap = data.caption(data.sample_scene(3_000_000_000))
    raw = sample.generate(high, low, cap, video[0, 0], frames=FRAMES, steps=steps, seed=11)
    noise = comfy.sample.prepare_noise(torch.zeros_like(z), 11)
    experts = {k: train.load_trained_expert(p) for k, p in paths.items()}
    mask = conditioning.start_mask(*z.shape[2:])
    ours = train.sample_latents(experts, z, noise, text.encode_text(cap), mask, train.flow_sigmas(steps, 8.0), 0,
                                0.9, "cpu")
    ref = vae.from_raw(raw.float())
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)
    # a later start begins at the true latent noised to that sigma: 0 steps left is the true latent
    torch.testing.assert_close(train.sample_latents(experts, z, noise, text.encode_text(cap), mask,
                                                    train.flow_sigmas(steps, 8.0), steps, 0.9, "cpu"), z)


def test_load_trained_expert_names_the_file_and_the_problem(tmp_path):
    from safetensors.torch import save_file
    from wan_w4a4.minimodel.arch import TINY, write_wan_checkpoint

    with pytest.raises(FileNotFoundError, match="no expert checkpoint"):
        train.load_trained_expert(tmp_path / "none.safetensors")
    bad = tmp_path / "noarch.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match=r"noarch\.safetensors: no wan_w4a4\.arch"):
        train.load_trained_expert(bad)
    good = write_wan_checkpoint(tmp_path / "tiny.safetensors", TINY, seed=1)
    from safetensors.torch import load_file
    state = load_file(str(good))
    state["head.head.weight"] = state["head.head.weight"][:1]
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"wan_w4a4.arch": TINY.to_json()})
    with pytest.raises(ValueError, match=r"wrong\.safetensors: tensor head\.head\.weight"):
        train.load_trained_expert(wrong)
    assert not train.load_trained_expert(good).training


def test_decoder_data_mixes_sampled_x0_and_perturbed_latents(tmp_path):
    """With experts, a ``decoder_sampled`` share of batches is sampled (stand-in experts here; the sampler
    itself is checked against ComfyUI above), the rest are x0 predictions or perturbed latents."""
    from wan_w4a4.minimodel import text

    class Const(torch.nn.Module):  # v = c everywhere
        def __init__(self, c):
            super().__init__()
            self.c = c

        def forward(self, x, t, ctx):
            return torch.full_like(x[:, :16], self.c)

    cfg = train.TrainConfig(out=tmp_path, frames=FRAMES, decoder_batch=1, sample_steps=3, decoder_sampled=0.5,
                            decoder_model_aug=0.5, boundary=0.9)
    vae = data.LinearVideoVAE()
    feed = train.DecoderData(cfg, vae, text.TextEncoder("cpu"), {"high": Const(0.3), "low": Const(-0.2)})
    for _ in range(24):
        z_in, frames = feed.next()
        assert z_in.shape == (1, 16, 2, 16, 16) and frames.shape == (1, FRAMES, 128, 128, 3)
        assert not torch.equal(z_in, vae.encode_normalized(frames))  # every kind changes the true latent
    assert feed.counts["sampled"] >= 6 and feed.counts["x0"] >= 2 and feed.counts["perturbed"] >= 2
    assert sum(feed.counts.values()) == 24
    alone = train.DecoderData(cfg, vae, text.TextEncoder("cpu"))
    alone.next()
    assert alone.counts == {"sampled": 0, "x0": 0, "perturbed": 1}


@pytest.mark.comfyui
@pytest.mark.slow
def test_decoder_only_trains_from_the_experts_in_out(comfy_nodes, tmp_path):
    from wan_w4a4.minimodel.arch import TINY, write_wan_checkpoint

    out = tmp_path / "mini"
    argv = ["--decoder-only", "--out", str(out), "--device", "cpu", "--frames", str(FRAMES), "--heldout", "1",
            "--decoder-steps", "2", "--decoder-batch", "1", "--sample-steps", "2", "--decoder-sampled", "1",
            "--no-pictures"]
    with pytest.raises(FileNotFoundError, match="experts in --out"):
        train.main(argv)
    for k, s in (("high", 1), ("low", 2)):
        write_wan_checkpoint(out / f"{k}_noise.safetensors", TINY, seed=s)
    experts_before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "train_log.json").write_text(json.dumps({"config": {"frames": FRAMES}, "plan": {"warm": 1},
                                                    "generation": {"old": 1}}))
    assert train.main(argv) == 0
    dec = D.load_decoder(out / D.DECODER_FILE)
    assert dec.out.weight.abs().sum() > 0  # trained: no longer the linear decoder
    log = json.loads((out / "train_log.json").read_text())
    assert log["plan"] == {"warm": 1} and "generation" not in log  # the experts' log kept, the stale metric gone
    d = log["decoder"]
    assert d["steps"] == 2 and d["batches"] == {"sampled": 2, "x0": 0, "perturbed": 0}
    assert d["file"]["bytes"] == (out / D.DECODER_FILE).stat().st_size
    assert "--decoder-only --decoder-steps 2" in d["replay"] and "--decoder-sampled 1" in d["replay"]
    assert all((out / n).read_bytes() == b for n, b in experts_before.items())  # experts untouched
    with pytest.raises(FileExistsError, match="--force"):
        train.main(argv)
    assert train.main([*argv, "--force", "--decoder-init", str(out / D.DECODER_FILE)]) == 0
    with pytest.raises(ValueError, match="17-frame"):
        (out / "train_log.json").write_text(json.dumps({"config": {"frames": 17}}))
        train.main([*argv, "--force"])
