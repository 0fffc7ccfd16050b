"""The mini model's text map (``text.py``) behind the CLIP interface ComfyUI's ``CLIPTextEncode`` calls,
so that code written for a real text encoder (CLIPLoader type "wan", umT5) runs unchanged on the mini
model: ``CLIPTextEncode.encode(clip, text)`` calls ``clip.tokenize(text)`` and then
``clip.encode_from_tokens_scheduled(tokens)``, and gets ``text.text_conditioning(text)``.
"""
from __future__ import annotations

from . import text as mini_text


class MiniCLIP:
    """A stand-in for ComfyUI's CLIP object with the mini model's seeded text map."""

    def __init__(self, length: int = mini_text.TEXT_LEN):
        self.length = length

    def tokenize(self, text: str, **kwargs) -> dict:
        # The map works on the caption itself; the "tokens" carry it to encode_from_tokens_scheduled.
        return {"mini_caption": text}

    def encode_from_tokens_scheduled(self, tokens: dict, **kwargs) -> list:
        return mini_text.text_conditioning(tokens["mini_caption"], self.length)
