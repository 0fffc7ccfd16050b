"""Text conditioning for the mini Wan2.2-I2V model, without umT5.

A fixed, seeded map from a caption to a ``[1, TEXT_LEN, 4096]`` context, the tensor ComfyUI's
``CLIPTextEncode`` puts in a Wan conditioning (ComfyUI fixes Wan's ``text_dim`` at 4096):

1. tokens: the caption lower-cased, split into runs of letters and digits, then an end token
   ``</s>`` (as T5 appends one); cut to ``TEXT_LEN`` tokens (the end token is kept).
2. token i -> ``word_vector(token) + POS_SCALE * position(i)``:
   - ``word_vector(w)``: 4096 standard normal values from numpy's legacy ``RandomState`` seeded
     with ``zlib.crc32(w)`` (a frozen stream: the same vector on every machine; any word has one,
     so prompts outside the training vocabulary still encode, they only mean nothing to the model);
   - ``position(i)``: the transformer sinusoid, ``sin(i / 10000^(2j/4096))`` at even and ``cos`` at
     odd features, so word order is visible to cross-attention.
3. positions after the end token are zeros (padding), so every context has the same length.

The empty caption (only ``</s>``) is the unconditional context that training drops captions to,
so classifier-free guidance works with ``encode_text("")`` as the negative prompt.
"""
from __future__ import annotations

import functools
import re
import zlib

import numpy as np
import torch

TEXT_DIM = 4096     # comfy/model_detection.py fixes Wan's text_dim at 4096
TEXT_LEN = 32       # tokens per context (our captions have at most ~26 words)
POS_SCALE = 0.5     # positional signal relative to the unit-variance word vectors
END_TOKEN = "</s>"

_WORD = re.compile(r"[a-z0-9]+")


def tokenize(caption: str, length: int = TEXT_LEN) -> list[str]:
    """Tokens of ``caption``, ending with ``END_TOKEN``, at most ``length`` of them."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    return _WORD.findall(caption.lower())[: length - 1] + [END_TOKEN]


@functools.lru_cache(maxsize=4096)
def _word_vector_np(word: str) -> np.ndarray:
    rng = np.random.RandomState(zlib.crc32(word.encode("utf-8")))
    return rng.standard_normal(TEXT_DIM).astype(np.float32)


def word_vector(word: str) -> torch.Tensor:
    """The fixed 4096-d vector of ``word`` (float32, ~unit variance per feature)."""
    return torch.from_numpy(_word_vector_np(word).copy())


def positions(length: int = TEXT_LEN) -> torch.Tensor:
    """Sinusoidal position signal, ``[length, 4096]`` (without ``POS_SCALE``)."""
    i = torch.arange(length, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, TEXT_DIM, 2, dtype=torch.float64) / TEXT_DIM)
    out = torch.zeros(length, TEXT_DIM, dtype=torch.float64)
    out[:, 0::2] = torch.sin(i * freq)
    out[:, 1::2] = torch.cos(i * freq)
    return out.float()


class TextEncoder:
    """Batched encoder that keeps its word table on ``device`` (for training loops).

    ``encode(captions)`` equals ``torch.cat([encode_text(c) for c in captions])``.
    """

    def __init__(self, device="cpu", length: int = TEXT_LEN):
        self.device = torch.device(device)
        self.length = length
        self.vocab: dict[str, int] = {}
        self.table = torch.zeros(0, TEXT_DIM, device=self.device)
        self.pos = positions(length).to(self.device) * POS_SCALE

    def _ids(self, tokens: list[str]) -> list[int]:
        new = [t for t in dict.fromkeys(tokens) if t not in self.vocab]
        if new:
            for t in new:
                self.vocab[t] = len(self.vocab)
            rows = torch.stack([word_vector(t) for t in new]).to(self.device)
            self.table = torch.cat([self.table, rows])
        return [self.vocab[t] for t in tokens]

    def encode(self, captions: list[str]) -> torch.Tensor:
        """``[B, length, 4096]`` float32 contexts on ``device``."""
        B, L = len(captions), self.length
        ids = torch.zeros(B, L, dtype=torch.long)
        mask = torch.zeros(B, L, 1)
        for b, text in enumerate(captions):
            toks = self._ids(tokenize(text, L))
            ids[b, : len(toks)] = torch.tensor(toks)
            mask[b, : len(toks)] = 1.0
        ids, mask = ids.to(self.device), mask.to(self.device)
        return (self.table[ids] + self.pos) * mask


def encode_text(caption: str, length: int = TEXT_LEN) -> torch.Tensor:
    """The context of ``caption``: float32 ``[1, length, 4096]`` on the CPU."""
    toks = tokenize(caption, length)
    out = torch.zeros(1, length, TEXT_DIM)
    out[0, : len(toks)] = torch.stack([word_vector(t) for t in toks]) + POS_SCALE * positions(length)[: len(toks)]
    return out


def text_conditioning(caption: str, length: int = TEXT_LEN) -> list:
    """A ComfyUI CONDITIONING for ``caption``: ``[[context [1, L, 4096], {"pooled_output": None}]]``,
    the form ``CLIPTextEncode`` returns for Wan's umT5."""
    return [[encode_text(caption, length), {"pooled_output": None}]]


__all__ = ["TEXT_DIM", "TEXT_LEN", "POS_SCALE", "END_TOKEN", "tokenize", "word_vector", "positions",
           "TextEncoder", "encode_text", "text_conditioning"]
