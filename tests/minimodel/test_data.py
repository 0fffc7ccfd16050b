"""The procedural video generator, its captions and the linear video VAE (minimodel/data.py)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from wan_w4a4.minimodel import data

SEEDS = [0, 1, 2, 3, 4]


def _scene(*shapes, camera="", distance=0.0, bg=("white", "gray")):
    return data.Scene(seed=0, shapes=tuple(shapes), background="striped", bg_colors=bg, bg_period=32.0,
                      bg_angle=0.3, camera=camera, camera_distance=distance)


def _red_square(motion="stays still", direction="", amount=0.0, x=64.0, y=64.0, texture="solid"):
    return data.Shape("square", "red", texture, motion, direction, x, y, 18.0, 0.0, amount)


def _red_mask(frames: torch.Tensor) -> torch.Tensor:
    r, g, b = frames.unbind(-1)
    return (r > 0.75) & (g < 0.3) & (b < 0.3)


def _centroid(mask: torch.Tensor):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return xs.float().mean().item(), ys.float().mean().item()


# ---- scenes and rendering ------------------------------------------------------------------------
def test_scene_sampling_is_deterministic():
    for s in SEEDS:
        assert data.sample_scene(s) == data.sample_scene(s)
    assert len({data.caption(data.sample_scene(s)) for s in range(20)}) == 20


def test_render_shape_range_and_determinism():
    scenes = [data.sample_scene(s) for s in SEEDS[:3]]
    a = data.render(scenes, frames=5)
    b = data.render(scenes, frames=5)
    assert a.shape == (3, 5, data.HEIGHT, data.WIDTH, 3) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a[0], a[1])
    assert (a[:, -1] - a[:, 0]).abs().mean() > 0.01  # things move
    # batching does not change a video
    assert torch.equal(data.render(scenes[1:2], frames=5)[0], a[1])


def test_frames_must_be_one_plus_4k():
    assert data.latent_frames(17) == 5 and data.latent_frames(1) == 1
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        data.render([data.sample_scene(0)], frames=16)


def test_heldout_seeds_are_disjoint_from_training():
    held = data.heldout_seeds(1000)
    assert min(held) >= data.TRAIN_SEED_LIMIT and max(held) < 2**32
    assert len(set(held)) == 1000


def test_the_caption_and_start_frame_fix_the_whole_motion():
    """Amounts are fixed per motion, so two scenes with the same caption and the same first frame are the same
    video; every sliding or bouncing shape's path stays inside the picture; and a seed still draws the scene (and
    caption) it drew when the amounts were drawn too, since the held-out set must stay the same scenes."""
    amounts = {"slides": data.SLIDE_PX, "bounces": data.BOUNCE_PX, "spins": data.SPIN_RAD,
               "grows": data.SCALE, "shrinks": data.SCALE, "stays still": 0.0}
    seen = set()
    for s in [*range(300), *data.heldout_seeds(100)]:
        scene = data.sample_scene(s)
        assert scene.camera_distance == (data.PAN_PX if scene.camera else 0.0)
        traj, cam = data.trajectories(scene)
        for shape, path in zip(scene.shapes, traj):
            assert shape.amount == amounts[shape.motion], (s, shape)
            seen.add(shape.motion)
            r = shape.radius * path[:, 3].max()
            if shape.motion in ("slides", "bounces"):  # world = screen for the shape's own path
                assert path[:, 0].min() - r >= 0 and path[:, 0].max() + r <= data.WIDTH, (s, shape)
                assert path[:, 1].min() - r >= 0 and path[:, 1].max() + r <= data.HEIGHT, (s, shape)
    assert seen == set(amounts)
    # captions of the first data version (git history): the random stream still takes every draw
    assert data.caption(data.sample_scene(1)) == (
        "a blue striped circle shrinks and a white striped star bounces over a purple and black dotted background "
        "while the camera pans left")
    assert data.caption(data.sample_scene(data.heldout_seeds(1)[0])) == (
        "a purple square bounces over a green and yellow wavy background while the camera pans right")


# ---- captions ------------------------------------------------------------------------------------
def test_caption_names_every_parameter():
    for s in range(40):
        scene = data.sample_scene(s)
        cap = data.caption(scene)
        for sh in scene.shapes:
            assert f"{sh.color} " in cap and f" {sh.kind} " in cap and sh.motion in cap
            if sh.texture != "solid":
                assert f"{sh.texture} {sh.kind}" in cap
            if sh.motion in ("slides", "spins"):
                assert f"{sh.motion} {sh.direction}" in cap
        assert f"{scene.bg_colors[0]} and {scene.bg_colors[1]} {scene.background} background" in cap
        assert ("camera pans" in cap) == bool(scene.camera)
        if scene.camera:
            assert cap.endswith(f"the camera pans {scene.camera}")


def test_caption_grammar():
    cap = data.caption(_scene(dataclasses.replace(_red_square(), color="orange")))
    assert cap.startswith("an orange square stays still over a white and gray striped background")


def test_spinning_discs_are_textured():
    # a plain disc turning is invisible: the generator textures it so the caption stays true
    for s in range(300):
        for sh in data.sample_scene(s).shapes:
            if sh.motion == "spins" and sh.kind in ("circle", "ring"):
                assert sh.texture != "solid"


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_slides_move_the_way_the_caption_says(direction):
    video = data.render([_scene(_red_square("slides", direction, 40.0))], frames=5)[0]
    (x0, y0), (x1, y1) = _centroid(_red_mask(video[0])), _centroid(_red_mask(video[-1]))
    dx, dy = data.DIRECTIONS[direction]
    assert (x1 - x0, y1 - y0) == pytest.approx((40 * dx, 40 * dy), abs=1.5)


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_camera_pan_moves_the_picture_the_other_way(direction):
    video = data.render([_scene(_red_square(), camera=direction, distance=30.0)], frames=5)[0]
    (x0, y0), (x1, y1) = _centroid(_red_mask(video[0])), _centroid(_red_mask(video[-1]))
    dx, dy = data.DIRECTIONS[direction]
    assert (x1 - x0, y1 - y0) == pytest.approx((-30 * dx, -30 * dy), abs=1.5)


def test_bounce_grow_shrink():
    video = data.render([_scene(_red_square("bounces", amount=30.0, y=100.0))], frames=9)[0]
    ys = [_centroid(_red_mask(f))[1] for f in video]
    assert ys[0] == pytest.approx(100, abs=1) and ys[-1] == pytest.approx(100, abs=1)
    assert min(ys) == pytest.approx(70, abs=1.5)  # up is -y
    for motion, sign in (("grows", 1), ("shrinks", -1)):
        video = data.render([_scene(_red_square(motion, amount=1.6))], frames=5)[0]
        area = _red_mask(video).flatten(1).sum(1).float()
        assert sign * (area[-1] - area[0]) > 0.5 * area[0]


def test_spin_turns_clockwise_on_screen():
    # a triangle points up at angle 0; a clockwise quarter turn (as we see it) makes it point right
    tri = data.Shape("triangle", "red", "solid", "spins", "clockwise", 64.0, 64.0, 24.0, 0.0, 0.5 * math.pi)
    video = data.render([_scene(tri)], frames=5)[0]
    ys, xs = torch.nonzero(_red_mask(video[0]), as_tuple=True)
    assert 64 - ys.min().item() > 1.5 * (ys.max().item() - 64)      # apex up
    ys, xs = torch.nonzero(_red_mask(video[-1]), as_tuple=True)
    assert xs.max().item() - 64 > 1.5 * (64 - xs.min().item())      # apex right
    ccw = dataclasses.replace(tri, direction="counterclockwise")
    ys, xs = torch.nonzero(_red_mask(data.render([_scene(ccw)], frames=5)[0, -1]), as_tuple=True)
    assert 64 - xs.min().item() > 1.5 * (xs.max().item() - 64)      # apex left


# ---- the linear VAE ------------------------------------------------------------------------------
def test_encode_matrix_is_orthonormal():
    m = data.encode_matrix()
    assert m.shape == (16, 192)
    torch.testing.assert_close(m.double() @ m.double().T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)


def test_vae_shapes_and_round_trip():
    vae = data.LinearVideoVAE()
    video = data.render([data.sample_scene(7)], frames=9)[0]            # [9, 128, 128, 3]
    raw = vae.encode(video)
    assert raw.shape == (1, 16, 3, 16, 16)
    z = vae.encode_normalized(video[None])
    torch.testing.assert_close(vae.from_raw(raw), z, atol=1e-5, rtol=0)
    # decode -> encode is the identity on latents (the decoder is the encoder's pseudo-inverse)
    zr = torch.randn(2, 16, 3, 4, 4) * 0.3
    frames = vae.decode_normalized(zr)                                  # [2, 3, 32, 32, 3]
    assert frames.shape == (2, 3, 32, 32, 3)
    inside = frames.clamp(0.02, 0.98).eq(frames).all()
    if inside:  # no clamping happened, so the round trip is exact
        rep = frames.repeat_interleave(torch.tensor([1, 4, 4]), dim=1)
        torch.testing.assert_close(vae.encode_normalized(rep), zr, atol=1e-4, rtol=0)
    # ComfyUI-style decode repeats each latent frame over the frames it covers
    assert vae.decode(raw).shape == (1, 9, 128, 128, 3)
    assert vae.latent_to_rgb(raw).shape == (1, 3, 128, 128, 3)


def test_vae_reconstruction_is_close_to_the_frames():
    vae = data.LinearVideoVAE()
    video = data.render([data.sample_scene(s) for s in SEEDS[:2]], frames=5)
    rec = vae.decode(vae.encode(video))
    # low-pass per 8x8 block: close in PSNR, not exact
    mse = (rec[:, :1] - video[:, :1]).square().mean()
    assert 10 * torch.log10(1 / mse) > 18


def test_grey_encodes_to_zero_and_first_frame_video():
    vae = data.LinearVideoVAE()
    clip = data.render([data.sample_scene(3)], frames=5)[0]
    video = data.first_frame_video(clip[0], 9)
    assert video.shape == (9, 128, 128, 3) and torch.equal(video[0], clip[0]) and (video[1:] == 0.5).all()
    z = vae.encode_normalized(video)
    assert (z[:, 1:] == 0).all()
    assert torch.equal(z[:, :1], vae.encode_normalized(clip)[:, :1])


def test_latents_have_unit_scale():
    vae = data.LinearVideoVAE()
    z = vae.encode_normalized(data.render([data.sample_scene(s) for s in range(100, 106)], frames=1))
    std = z.std(dim=(0, 2, 3, 4))
    assert (std > 0.4).all() and (std < 2.0).all(), std
    assert z.mean().abs() < 0.5


@pytest.mark.comfyui
def test_vae_constants_are_comfyuis_wan21_latent_format(comfy_nodes):
    import comfy.latent_formats

    fmt = comfy.latent_formats.Wan21()
    torch.testing.assert_close(fmt.latents_mean.flatten(), torch.tensor(data.WAN21_LATENTS_MEAN), atol=0, rtol=0)
    torch.testing.assert_close(fmt.latents_std.flatten(), torch.tensor(data.WAN21_LATENTS_STD), atol=0, rtol=0)
    vae = data.LinearVideoVAE()
    video = data.render([data.sample_scene(5)], frames=5)
    raw = vae.encode(video[0])
    torch.testing.assert_close(fmt.process_in(raw), vae.encode_normalized(video), atol=1e-5, rtol=0)
