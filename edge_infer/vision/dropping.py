"""Early visual-token dropping: which of an image's tokens reach the language model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("full", "hired", "uniform", "cls-topk")
HIRED_MODES = ("spatial", "reference")


@dataclass(frozen=True)
class Budget:
    """``rate`` (r): share of an image's tokens kept; ``alpha``: share of it for the base view."""

    rate: float = 0.2
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"visual budget rate must be in [0, 1], got {self.rate}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"visual budget alpha must be in [0, 1], got {self.alpha}")


@dataclass(frozen=True)
class Allocation:
    """Tokens each partition may keep: ``base`` for the whole-image view, ``tiles`` per tile."""

    base: int
    tiles: np.ndarray

    @property
    def skip(self) -> np.ndarray:
        """Tiles that keep nothing: their vision-encoder pass can be skipped."""
        return self.tiles == 0

    @property
    def total(self) -> int:
        return self.base + int(self.tiles.sum())


def total_budget(n_partitions: int, n: int, rate: float) -> int:
    """``B = floor(N_p * n * r)``, as HiRED computes it (Python float, then truncation)."""
    return int(n_partitions * n * rate)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores in their original order (ties: lower index first)."""
    scores = np.asarray(scores)
    k = max(0, min(int(k), scores.shape[-1]))
    picked = np.argsort(-scores, kind="stable")[:k]
    return np.sort(picked).astype(np.int64)


def group_scores(scores: np.ndarray, grid_h: int, grid_w: int, factor: int) -> np.ndarray:
    """Sum per-patch scores over each ``factor`` x ``factor`` group that becomes one LLM token.

    The groups follow pixel shuffle's order (Idefics3/SmolVLM): row-major over blocks.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape[-1] != grid_h * grid_w or grid_h % factor or grid_w % factor:
        raise ValueError(
            f"scores of {scores.shape[-1]} patches do not form a {grid_h}x{grid_w} grid "
            f"divisible by {factor}"
        )
    lead = scores.shape[:-1]
    g = scores.reshape(*lead, grid_h // factor, factor, grid_w // factor, factor)
    return g.sum(axis=(-3, -1)).reshape(*lead, (grid_h // factor) * (grid_w // factor))


def anyres_tile_map(
    image_hw: tuple[int, int],
    canvas_hw: tuple[int, int],
    tile: int,
    base_grid: tuple[int, int],
) -> np.ndarray:
    """For each base-view token, the tile (row-major) covering its centre, or -1 for none.

    LLaVA-NeXT geometry: the base view squashes the whole image; the high-resolution copy is
    resized to fit ``canvas_hw`` keeping its aspect, centred on zero padding, and cut into
    ``tile`` x ``tile`` tiles.
    """
    h, w = image_hw
    ch, cw = canvas_hw
    scale = min(cw / w, ch / h)
    new_h, new_w = min(int(np.ceil(h * scale)), ch), min(int(np.ceil(w * scale)), cw)
    pad_y, pad_x = (ch - new_h) // 2, (cw - new_w) // 2
    gh, gw = base_grid
    v = (np.arange(gh) + 0.5) / gh
    u = (np.arange(gw) + 0.5) / gw
    y = pad_y + v * new_h
    x = pad_x + u * new_w
    rows = np.minimum((y // tile).astype(np.int64), ch // tile - 1)
    cols = np.minimum((x // tile).astype(np.int64), cw // tile - 1)
    return (rows[:, None] * (cw // tile) + cols[None, :]).reshape(-1)


def stretched_tile_map(rows: int, cols: int, base_grid: tuple[int, int]) -> np.ndarray:
    """For each base-view token, the tile covering it when the image is stretched onto a grid
    of ``rows`` x ``cols`` tiles (Idefics3/SmolVLM: the global image is the base view)."""
    gh, gw = base_grid
    r = np.floor((np.arange(gh) + 0.5) / gh * rows).astype(np.int64)
    c = np.floor((np.arange(gw) + 0.5) / gw * cols).astype(np.int64)
    return (r[:, None] * cols + c[None, :]).reshape(-1)


def share(budget: int, weights: np.ndarray, cap: int) -> np.ndarray:
    """Split ``budget`` integer units in proportion to integer ``weights``, none above ``cap``.

    Largest remainders settle the rounding and what a capped share cannot take goes to the
    others, so the whole budget is spent while there is room. All-zero weights split evenly.
    """
    weights = np.asarray(weights, dtype=np.int64)
    alloc = np.zeros(len(weights), dtype=np.int64)
    remaining = int(budget)
    active = np.ones(len(weights), dtype=bool)
    while remaining > 0 and active.any():
        w = np.where(active, weights, 0)
        if w.sum() == 0:
            w = active.astype(np.int64)
        total = int(w.sum())
        base, frac = np.divmod(w * remaining, total)
        extra = remaining - int(base.sum())
        order = np.argsort(-frac, kind="stable")
        base[order[:extra]] += 1
        give = np.minimum(base, cap - alloc)
        alloc += give
        remaining -= int(give.sum())
        active &= alloc < cap
    return alloc


def allocate_hired(
    first_base: np.ndarray,
    n_tiles: int,
    budget: Budget,
    *,
    mode: str = "spatial",
    tile_of_token: np.ndarray | None = None,
    n: int | None = None,
    capacity: np.ndarray | None = None,
) -> Allocation:
    """HiRED's partition stage: how many tokens the base view and each tile keep.

    ``first_base`` scores the base view's ``n`` tokens at the encoder's first layer (CLS-row
    attention, or received attention for encoders without CLS). ``reference`` reproduces the
    official code: a tile's area is the flat slice ``[i*n/G, (i+1)*n/G)`` of the base tokens and
    shares are truncated in float32 (the official code also reads the grid as (width, height);
    a flat slice does not depend on the grid's shape, so that swap changes nothing here).
    ``spatial`` (default) counts the marked tokens inside the region each tile covers
    (``tile_of_token``), spends the whole budget by largest remainders, and hands what tiles
    cannot take back to the base view, so ``rate=1`` keeps everything. ``capacity`` (spatial
    only) is how many of each tile's tokens the language model would see without dropping
    (LLaVA-NeXT's unpadding cuts some): the budget is then ``r`` of what full would pass, not of
    the padded grid, and no tile is given more than it holds.
    """
    first_base = np.asarray(first_base, dtype=np.float64)
    n = first_base.shape[-1] if n is None else n
    if mode not in HIRED_MODES:
        raise ValueError(f"unknown HiRED mode {mode!r}; expected one of {HIRED_MODES}")
    if mode == "reference" or capacity is None:
        cap = np.full(n_tiles, n, dtype=np.int64)
        b_total = total_budget(n_tiles + 1, n, budget.rate)
    else:
        cap = np.asarray(capacity, dtype=np.int64)
        if cap.shape != (n_tiles,) or (cap < 0).any() or (cap > n).any():
            raise ValueError(f"tile capacity must be {n_tiles} counts in [0, {n}], got {cap}")
        b_total = int((n + int(cap.sum())) * budget.rate)
    b_full = min(int(b_total * budget.alpha), n)
    b_sub = min(b_total - b_full, int(cap.sum()))
    if n_tiles == 0:  # a single view (LLaVA-1.5): one top-k over the whole budget
        return Allocation(min(b_total, n), np.zeros(0, dtype=np.int64))
    marked = np.zeros(first_base.shape[-1], dtype=bool)
    marked[top_k(first_base, int(n * (1 - budget.alpha)))] = True
    if mode == "reference":
        tiles = np.zeros(n_tiles, dtype=np.int64)
        if b_sub > 0:
            if n % n_tiles:
                raise ValueError(f"reference HiRED needs n={n} divisible by {n_tiles} tiles")
            counts = marked.reshape(n_tiles, -1).sum(axis=1)
            if counts.sum() > 0:
                ratio = counts.astype(np.float32) / np.float32(counts.sum())
                tiles = np.minimum((ratio * np.float32(b_sub)).astype(np.int64), n)
        return Allocation(b_full, tiles)
    if tile_of_token is None:
        raise ValueError("spatial HiRED needs the tile covering each base-view token")
    tile_of_token = np.asarray(tile_of_token)
    inside = tile_of_token >= 0
    counts = np.bincount(tile_of_token[marked & inside], minlength=n_tiles)[:n_tiles]
    tiles = share(b_sub, counts, cap)
    base = min(n, b_full + (b_total - b_full - int(tiles.sum())))
    return Allocation(base, tiles)


def select_hired(
    final_base: np.ndarray,
    final_tiles: list[np.ndarray | None],
    allocation: Allocation,
) -> list[np.ndarray]:
    """HiRED's selection stage: top tokens by final-layer score, base view first, then tiles.

    A tile with a zero budget may pass ``None`` (it was never encoded).
    """
    kept = [top_k(final_base, allocation.base)]
    for scores, k in zip(final_tiles, allocation.tiles, strict=True):
        if k == 0:
            kept.append(np.zeros(0, dtype=np.int64))
        elif scores is None:
            raise ValueError("a tile with a non-zero budget needs its final-layer scores")
        else:
            kept.append(top_k(scores, int(k)))
    return kept


def hired(
    first_base: np.ndarray,
    final: np.ndarray,
    budget: Budget,
    *,
    mode: str = "spatial",
    tile_of_token: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Both HiRED stages for ``final`` scores of shape [1 + tiles, n], base view first."""
    final = np.asarray(final)
    alloc = allocate_hired(
        first_base, final.shape[0] - 1, budget, mode=mode, tile_of_token=tile_of_token
    )
    return select_hired(final[0], list(final[1:]), alloc)


def even_split(total: int, parts: int, cap: int) -> np.ndarray:
    """``total`` units over ``parts`` partitions as evenly as possible, earlier ones first."""
    return share(total, np.ones(parts, dtype=np.int64), cap)


def full(n_partitions: int, n: int) -> list[np.ndarray]:
    """No dropping: every token of every partition."""
    return [np.arange(n, dtype=np.int64) for _ in range(n_partitions)]


def baseline_split(n_partitions: int, n: int, rate: float, valid: np.ndarray | None) -> np.ndarray:
    """Tokens each partition keeps under a baseline: ``rate`` of all tokens split evenly, or,
    given ``valid`` [partitions, n] (the tokens the language model would see without
    dropping), ``rate`` of the valid ones split in proportion to each partition's share."""
    if valid is None:
        return even_split(total_budget(n_partitions, n, rate), n_partitions, n)
    counts = np.asarray(valid, dtype=bool).sum(axis=1).astype(np.int64)
    return share(int(int(counts.sum()) * rate), counts, counts)


def uniform(
    n_partitions: int, n: int, rate: float, valid: np.ndarray | None = None
) -> list[np.ndarray]:
    """Baseline: evenly spaced tokens in each partition (among its ``valid`` ones if given)."""
    kept = []
    for p, k in enumerate(baseline_split(n_partitions, n, rate, valid)):
        pool = np.arange(n, dtype=np.int64) if valid is None else np.flatnonzero(valid[p])
        idx = np.floor((np.arange(k) + 0.5) * len(pool) / max(int(k), 1)).astype(np.int64)
        kept.append(pool[np.minimum(idx, len(pool) - 1)] if k else np.zeros(0, dtype=np.int64))
    return kept


def cls_topk(final: np.ndarray, rate: float, valid: np.ndarray | None = None) -> list[np.ndarray]:
    """Baseline: the top final-layer scores in each partition (``valid`` as for uniform)."""
    final = np.asarray(final)
    n_partitions, n = final.shape
    ks = baseline_split(n_partitions, n, rate, valid)
    if valid is not None:
        final = np.where(valid, final, -np.inf)
    return [top_k(final[p], int(k)) for p, k in enumerate(ks)]
