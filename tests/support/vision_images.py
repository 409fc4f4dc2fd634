"""Synthetic test images and tiny tokenizers for checking image preprocessing."""

from __future__ import annotations

import numpy as np
from PIL import Image


def synthetic(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth gradient with noise (resampling filters differ on both), in ``mode``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-40, 40, size=(h, w, 3))
    rgb = np.clip(base + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def tiny_tokenizer(special: list[str]):
    """A word-level fast tokenizer that knows ``special`` tokens (transformers, tests only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{t: i + 1 for i, t in enumerate(special)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.add_special_tokens({"additional_special_tokens": special})
    return fast
