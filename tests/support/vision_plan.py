"""How many image tokens the dropping plan keeps for an image on a VLM directory (tests'
expectation, from the plan itself rather than a number written down)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np


def kept_tokens(vlm: Path, image, method: str, rate: float, alpha: float = 0.5) -> tuple[int, int]:
    """(tokens kept, tokens before dropping) for ``image`` (a path or PIL image): the plan
    run with random attention scores (how many are kept does not depend on which)."""
    from edge_infer.vision.dropping import Budget
    from edge_infer.vision.plan import plan
    from edge_infer.vision.preprocess import ImageSpec, preprocess
    from edge_infer.vision.spec import VisionSpec

    spec = VisionSpec.from_dir(vlm)
    px = preprocess(image, ImageSpec.from_dir(vlm))
    rng = np.random.default_rng(0)

    def run_views(views: list[int], layers: tuple[int, ...]) -> dict[int, np.ndarray]:
        return {layer: rng.random((len(views), spec.tokens_per_view)) for layer in layers}

    p = plan(spec, px, run_views, method, Budget(rate, alpha))
    return sum(len(k) for k in p.kept), p.total


def png_data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
