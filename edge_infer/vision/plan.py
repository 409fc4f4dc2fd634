"""Which views an image's encoder runs and which of their tokens reach the language model, in
prompt order, whatever framework runs the tower (plain numpy over scores and indices)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_infer.vision import dropping
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from edge_infer.vision.spec import VisionSpec

# runs views ``idx`` as one batch, keeps their features, returns per-layer token scores
RunViews = Callable[[list[int], tuple[int, ...]], dict[int, np.ndarray]]


@dataclass
class Plan:
    """``kept`` per view (in ``Pixels`` order) the kept token indices; ``order`` indices into
    the views' features flattened [views * tokens] (LLaVA-NeXT: the index views * tokens is
    ``image_newline``); ``total`` tokens without dropping; ``skipped`` views never run."""

    kept: list[np.ndarray]
    order: np.ndarray
    total: int
    skipped: int


def unpadded_region(
    image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Rows and columns of the tiles' token grid that hold the image, not LLaVA-NeXT's padding
    (rounded as transformers' ``unpad_image``)."""
    h, w = image_hw
    gh, gw = grid_hw
    if w / h > gw / gh:
        new_h = int(round(h * (gw / w), 7))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = int(round(w * (gh / h), 7))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad


def valid_tokens(spec: VisionSpec, px: Pixels) -> np.ndarray:
    """[views, tokens]: False where a LLaVA-NeXT tile's token lies in padding."""
    n_views, n = px.values.shape[0], spec.tokens_per_view
    valid = np.ones((n_views, n), dtype=bool)
    if spec.arch != "llava_next" or n_views == 1:
        return valid
    gh, gw = px.grid
    g = spec.tower.grid
    r0, r1, c0, c1 = unpadded_region(px.image_hw, (gh * g, gw * g))
    inside = np.zeros((gh * g, gw * g), dtype=bool)
    inside[r0:r1, c0:c1] = True
    valid[1:] = inside.reshape(gh, g, gw, g).transpose(0, 2, 1, 3).reshape(gh * gw, n)
    return valid


def tile_map(spec: VisionSpec, px: Pixels) -> np.ndarray | None:
    """The tile each base-view token's area falls in (None without tiles)."""
    if px.values.shape[0] == 1:
        return None
    side = int(round(spec.tokens_per_view**0.5))
    if spec.arch == "idefics3":
        return dropping.stretched_tile_map(px.grid[0], px.grid[1], (side, side))
    assert px.canvas_hw is not None
    return dropping.anyres_tile_map(px.image_hw, px.canvas_hw, px.values.shape[-1], (side, side))


def plan(
    spec: VisionSpec,
    px: Pixels,
    run_views: RunViews,
    method: str = "full",
    budget: Budget | None = None,
    mode: str = "spatial",
) -> Plan:
    """Run the base view first, then the tiles as one batch (HiRED sizes the tiles' budgets
    from the base view and never runs a tile whose budget is zero), and keep the tokens
    ``method`` picks. Every method batches the views alike, so ``rate=1`` is bit-identical."""
    if method not in dropping.METHODS:
        raise ValueError(f"unknown dropping method {method!r}; expected one of {dropping.METHODS}")
    budget = budget or Budget()
    n_views, n = px.values.shape[0], spec.tokens_per_view
    last = spec.layers_run - 1
    tiles = [i for i in range(n_views) if i != px.base]
    wanted = {"hired": (0, last), "cls-topk": (last,)}.get(method, ())
    base_scores = run_views([px.base], wanted)
    scores = np.full((n_views, n), -np.inf)
    if last in base_scores:
        scores[px.base] = base_scores[last][0]
    run, alloc = tiles, None
    # the budget is a share of the tokens full would pass (LLaVA-NeXT's unpadding cuts some),
    # except in HiRED's reference mode, which keeps the official count
    valid = valid_tokens(spec, px)
    if method == "hired":
        alloc = dropping.allocate_hired(
            base_scores[0][0],
            len(tiles),
            budget,
            mode=mode,
            tile_of_token=tile_map(spec, px),
            n=n,
            capacity=valid[tiles].sum(axis=1),
        )
        run = [i for i, k in zip(tiles, alloc.tiles, strict=True) if k > 0]
    if run:
        tile_scores = run_views(run, wanted[-1:])
        if last in tile_scores:
            scores[run] = tile_scores[last]
    if mode == "spatial" or method == "cls-topk":  # padding is picked last
        scores = np.where(valid, scores, -np.inf)
    if method == "full":
        kept = dropping.full(n_views, n)
    elif method == "uniform":
        kept = dropping.uniform(n_views, n, budget.rate, valid)
    elif method == "cls-topk":
        kept = dropping.cls_topk(scores, budget.rate, valid)
    else:
        assert alloc is not None
        ran = set(run)
        picked = dropping.select_hired(
            scores[px.base], [scores[i] if i in ran else None for i in tiles], alloc
        )
        kept = [np.zeros(0, dtype=np.int64)] * n_views
        for i, k in zip([px.base, *tiles], picked, strict=True):
            kept[i] = k
    skipped = len(tiles) - len(run)
    if spec.arch == "llava_next" and n_views > 1:
        order, total = packed_order(spec, px, kept)
    else:
        order = np.concatenate([i * n + np.asarray(k, dtype=np.int64) for i, k in enumerate(kept)])
        total = n_views * n
    return Plan(kept, order, total, skipped)


def packed_order(spec: VisionSpec, px: Pixels, kept: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """LLaVA-NeXT's order: the base view's kept tokens, then the tiles as one grid without its
    padding, row by row, each row that keeps a token ending in ``image_newline`` (index
    views * tokens). Returns the indices and the token count without dropping."""
    gh, gw = px.grid
    g = spec.tower.grid
    n = g * g
    newline = (gh * gw + 1) * n
    ids = (np.arange(gh * gw * n) + n).reshape(gh, gw, g, g).transpose(0, 2, 1, 3)
    ids = ids.reshape(gh * g, gw * g)
    mask = np.zeros((gh * gw, n), dtype=bool)
    for t in range(gh * gw):
        mask[t, kept[t + 1]] = True
    mask = mask.reshape(gh, gw, g, g).transpose(0, 2, 1, 3).reshape(gh * g, gw * g)
    r0, r1, c0, c1 = unpadded_region(px.image_hw, (gh * g, gw * g))
    ids, mask = ids[r0:r1, c0:c1], mask[r0:r1, c0:c1]
    rows = mask.any(axis=1)
    with_newline = np.concatenate([ids, np.full((ids.shape[0], 1), newline)], axis=1)
    keep = np.concatenate([mask, rows[:, None]], axis=1)
    order = np.concatenate([np.asarray(kept[0], dtype=np.int64), with_newline[keep]])
    return order, n + (r1 - r0) * (c1 - c0 + 1)
