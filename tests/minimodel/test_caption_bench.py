"""The caption variants of benchmarks/mini_caption.py (the script itself is a benchmark, not a test)."""
from __future__ import annotations

import pytest
from wan_w4a4.minimodel import data


def _without_motion(caption: str, bench) -> list[str]:
    motion = set(bench.OPPOSITE) | {"stays", "still", "slides", "spins", "while", "the", "camera", "pans"}
    return [w for w in caption.split() if w not in motion]


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("mini_caption")


def test_flipped_motions_change_only_the_motion_words(bench):
    scenes = [data.sample_scene(s) for s in data.heldout_seeds(40)]
    changed = 0
    for scene in scenes:
        flipped = bench.flip_motions(scene)
        assert bench.flip_motions(flipped) == scene  # an involution
        a, b = data.caption(scene), data.caption(flipped)
        assert a != b
        # what is left once the motion words are gone is the same sentence: shapes, colours, background
        assert _without_motion(a, bench) == _without_motion(b, bench)
        changed += scene.camera != ""
    assert changed > 0  # the sample has scenes with a camera pan, whose direction flips too
    s = next(x for x in scenes if x.shapes[0].motion == "slides")
    assert bench.flip_motions(s).shapes[0].direction == bench.OPPOSITE[s.shapes[0].direction]


def test_caption_variants(bench):
    scenes = [data.sample_scene(s) for s in data.heldout_seeds(3)]
    assert bench.captions(scenes, "true") == [data.caption(s) for s in scenes]
    assert bench.captions(scenes, "empty") == ["", "", ""]
    assert bench.captions(scenes, "another scene's") == [data.caption(scenes[i]) for i in (1, 2, 0)]
    with pytest.raises(ValueError, match="unknown caption variant"):
        bench.captions(scenes, "reversed")
