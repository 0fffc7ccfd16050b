"""The fixed caption -> 4096-d context map (minimodel/text.py)."""
from __future__ import annotations

import pytest
import torch

from wan_w4a4.minimodel import data, text

CAPTION = "a red striped square slides left over a blue and white checkered background"


def test_tokenize():
    assert text.tokenize("A Red, square -- slides LEFT!") == ["a", "red", "square", "slides", "left", "</s>"]
    assert text.tokenize("") == ["</s>"]
    long = text.tokenize(" ".join(["w"] * 100))
    assert len(long) == text.TEXT_LEN and long[-1] == "</s>"


def test_word_vectors_are_fixed():
    # numpy's legacy RandomState stream is frozen, so these values hold on every machine
    v = text.word_vector("red")
    assert v.shape == (text.TEXT_DIM,) and v.dtype == torch.float32
    assert v[:4].tolist() == pytest.approx([-0.50775313, -0.45794827, 0.11340332, 0.98953491], abs=1e-6)
    assert torch.equal(v, text.word_vector("red"))
    assert 0.9 < v.std() < 1.1
    assert abs(torch.nn.functional.cosine_similarity(v, text.word_vector("blue"), dim=0)) < 0.1


def test_encode_text_shape_determinism_and_padding():
    a = text.encode_text(CAPTION)
    assert a.shape == (1, text.TEXT_LEN, text.TEXT_DIM) and a.dtype == torch.float32
    assert torch.equal(a, text.encode_text(CAPTION))
    n = len(text.tokenize(CAPTION))
    assert (a[0, n:] == 0).all() and (a[0, :n].abs().sum(-1) > 0).all()
    expected = text.word_vector("red") + text.POS_SCALE * text.positions()[1]
    torch.testing.assert_close(a[0, 1], expected)


def test_captions_differ_and_order_matters():
    a = text.encode_text("a red square")
    assert not torch.equal(a, text.encode_text("a blue square"))
    assert not torch.equal(a, text.encode_text("square red a"))
    empty = text.encode_text("")
    assert (empty[0, 1:] == 0).all() and (empty[0, 0] != 0).any()


def test_batched_encoder_matches_single():
    caps = [data.caption(data.sample_scene(s)) for s in range(6)] + [""]
    enc = text.TextEncoder()
    batch = enc.encode(caps)
    assert batch.shape == (len(caps), text.TEXT_LEN, text.TEXT_DIM)
    torch.testing.assert_close(batch, torch.cat([text.encode_text(c) for c in caps]), atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode(caps[:2]), batch[:2], atol=0, rtol=0)  # vocabulary grows stably


def test_comfyui_conditioning_format():
    cond = text.text_conditioning(CAPTION)
    assert isinstance(cond, list) and len(cond) == 1
    tensor, extra = cond[0]
    assert torch.equal(tensor, text.encode_text(CAPTION)) and extra == {"pooled_output": None}
