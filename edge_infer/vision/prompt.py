"""An image's place in the prompt: its placeholder text and the key its KV is reused under."""

from __future__ import annotations

import hashlib

from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels

IMAGE = "<image>"
FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"


def image_prompt(arch: str, px: Pixels, kept: list[int]) -> str:
    """Placeholder text for one image whose views keep ``kept`` tokens each (``Pixels`` order).

    LLaVA: one ``<image>`` per embedding (for LLaVA-NeXT, newlines included: pass the packed
    count as a single entry). Idefics3/SmolVLM: each tile tagged with its row and column, rows
    ending in a newline, then the global image, as its processor writes it.
    """
    if arch in ("llava", "llava_next"):
        return IMAGE * sum(kept)
    rows, cols = px.grid
    if (rows, cols) == (0, 0):
        return f"{FAKE}{GLOBAL}{IMAGE * kept[0]}{FAKE}"
    out = []
    for r in range(rows):
        for c in range(cols):
            out.append(f"{FAKE}<row_{r + 1}_col_{c + 1}>{IMAGE * kept[r * cols + c]}")
        out.append("\n")
    out.append(f"\n{FAKE}{GLOBAL}{IMAGE * kept[px.base]}{FAKE}")
    return "".join(out)


def image_key(px: Pixels, method: str, budget: Budget, mode: str = "spatial") -> str:
    """What a cached image's KV depends on: its pixels as the model sees them and the dropping.

    Placeholder token ids are the same for every image, so prefix reuse compares these keys.
    """
    h = hashlib.sha256()
    h.update(repr((px.values.shape, px.grid, px.base, px.image_hw)).encode())
    h.update(px.values.tobytes())
    rate, alpha = (1.0, 1.0) if method == "full" else (budget.rate, budget.alpha)
    h.update(repr((method, rate, alpha, mode if method == "hired" else "")).encode())
    return h.hexdigest()
