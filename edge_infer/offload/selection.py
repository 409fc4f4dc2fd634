"""Which pages a decode step attends: the always-attended set, the top pages by bound up to a
budget, and the certificate of the attention mass the skipped pages could have held."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_infer.offload.bounds import group_max

SELECTIONS = ("bound", "oracle", "window")


@dataclass(frozen=True)
class SparsePolicy:
    """How a sparse decode step chooses pages.

    ``page``: tokens per page (a divisor of the block size); ``budget``: share of the sealed
    pages attended per layer and KV head (1.0: all, which is dense attention);
    ``dense_layers``: the first layers attend every page; ``threshold``: when the certificate
    of a query head exceeds it, ``grow`` more pages per KV head are fetched, until it does not
    or nothing is left (1.0 never fetches more); ``recent``: pages before the last sealed
    block that are always attended too; ``per_query``: rank pages per query head and take
    the union of each head's best (instead of ranking by the group's largest bound);
    ``select``: ``"bound"`` (Quest bounds, the real thing) or a quality reference,
    ``"oracle"`` (the pages of the most true attention mass: needs the exact scores, a dense
    pass) or ``"window"`` (the first pages and the most recent ones, StreamingLLM-style);
    ``prefetch``: where the pages come from a pool and disk, the pages per KV head ranked
    just after a step's selection that are read into the pool for the next step while this
    one computes (0: none).
    """

    # 32-token pages: at 8K tokens of real text they find more of the attention mass than
    # 64 or 256 under the same budget (benchmarks/offload.py)
    page: int = 32
    budget: float = 0.25
    dense_layers: int = 2
    threshold: float = 1.0
    grow: int = 4
    recent: int = 0
    per_query: bool = False
    select: str = "bound"
    # off: from one step to the next about a sixth of the selected pages change, and 8 pages
    # per KV head prefetched catch a third of them (8K, default model); on two cores the
    # thread's share of the GIL cost more than the misses it saved (benchmarks/offload.py)
    prefetch: int = 0

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, got {self.recent}")
        if self.page < 1:
            raise ValueError(f"page must be positive, got {self.page}")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.dense_layers < 0 or self.grow < 1:
            raise ValueError("dense_layers must be >= 0 and grow >= 1")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    def budget_pages(self, n_pages: int) -> int:
        """Pages attended per KV head out of ``n_pages`` sealed ones."""
        return min(n_pages, math.ceil(self.budget * n_pages))


def always_pages(n_pages: int, pages_per_block: int, recent: int = 0) -> np.ndarray:
    """bool ``[n_pages]``: the pages of the first block (attention sinks, the system prompt),
    of the last sealed block and the ``recent`` pages before it; the float16 tail is attended
    besides the pages."""
    mask = np.zeros(n_pages, dtype=bool)
    mask[:pages_per_block] = True
    last = (n_pages - 1) // pages_per_block * pages_per_block
    mask[max(0, last - recent) :] = True
    return mask


def select_pages(bounds_kv: np.ndarray, always: np.ndarray, budget: int) -> np.ndarray:
    """bool ``[n_kv, pages]``: per KV head, the ``always`` pages and then the pages of the
    highest bound (``bounds_kv`` ``[n_kv, pages]``) until ``budget`` pages are chosen."""
    n_kv, n = bounds_kv.shape
    selected = np.repeat(always[None], n_kv, axis=0)
    extra = budget - int(always.sum())
    if extra > 0:
        ranked = np.where(always[None], -np.inf, bounds_kv)
        top = np.argsort(-ranked, axis=1, kind="stable")[:, :extra]
        np.put_along_axis(selected, top, True, axis=1)
    return selected


def query_ranking(bounds_q: np.ndarray, n_kv: int, per_query: bool, always: np.ndarray):
    """``[n_kv, pages]``, higher first: the order in which a KV head takes pages. By the
    group's largest bound, or (``per_query``) by the best rank a page has among the group's
    query heads (ties by that largest bound), so that the pages taken first are the union of
    every query head's top pages even where one head's scores dwarf another's. ``always``
    pages are left out of the ranks (they are attended anyway)."""
    top = group_max(bounds_q, n_kv)
    if not per_query:
        return top
    n_q, n = bounds_q.shape
    ranked = np.where(always[None], -np.inf, bounds_q)
    order = np.argsort(-ranked, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(n)[None].repeat(n_q, axis=0), axis=1)
    best = rank.reshape(n_kv, n_q // n_kv, n).min(axis=1)
    # a page's best rank dominates; the bound (squashed into (0, 1)) only breaks ties
    return -best.astype(np.float64) + 0.5 / (1.0 + np.exp(-np.clip(top, -50, 50)))


def oracle_pages(mass_kv: np.ndarray, always: np.ndarray, budget: int) -> np.ndarray:
    """bool ``[n_kv, pages]``: the ``always`` pages and then, per KV head, the pages of the
    most true attention mass (``mass_kv`` ``[n_kv, pages]``) up to ``budget`` pages: the best
    any selection of that many pages can hold (a quality reference, it needs exact scores)."""
    return select_pages(mass_kv, always, budget)


def window_pages(n_kv: int, always: np.ndarray, budget: int) -> np.ndarray:
    """bool ``[n_kv, pages]``: the ``always`` pages (sinks, the last block) and then the most
    recent other pages up to ``budget`` pages, the same for every KV head (StreamingLLM-style
    sinks plus a recent window: a quality reference that reads nothing of the keys)."""
    newest_first = np.arange(always.shape[0], dtype=np.float64)
    return select_pages(np.repeat(newest_first[None], n_kv, axis=0), always, budget)


def page_mass(s: np.ndarray, page: int, sealed: int, n_kv: int) -> np.ndarray:
    """``[n_kv, pages]``: the softmax mass of each sealed page, summed over each KV head's
    query heads, from exact scores ``s`` ``[n_q, T]`` of every held token (the first
    ``sealed`` of them in pages of ``page``, the rest the tail)."""
    s = np.asarray(s, dtype=np.float64)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n_q = s.shape[0]
    n = -(-sealed // page)
    per_page = np.zeros((n_q, n * page))
    per_page[:, :sealed] = p[:, :sealed]
    return per_page.reshape(n_kv, n_q // n_kv, n, page).sum(axis=(1, 3))


def grow_selection(bounds_kv: np.ndarray, selected: np.ndarray, heads: np.ndarray, count: int):
    """``selected`` with, for each KV head where ``heads`` is True, the ``count`` skipped
    pages of the highest bound added."""
    out = selected.copy()
    ranked = np.where(selected, -np.inf, bounds_kv)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :count]
    for h in np.flatnonzero(heads):
        pick = order[h][np.isfinite(ranked[h, order[h]])]
        out[h, pick] = True
    return out


def next_pages(ranking_kv: np.ndarray, selected: np.ndarray, count: int) -> np.ndarray:
    """bool ``[n_kv, pages]``: per KV head, the ``count`` pages ranked best
    (``ranking_kv``, higher first) among those not ``selected``: the likeliest to be
    selected next step."""
    heads = np.ones(selected.shape[0], dtype=bool)
    return grow_selection(ranking_kv, selected, heads, count) & ~selected


def certificate(
    log_z: np.ndarray, bounds_q: np.ndarray, skipped_q: np.ndarray, sizes: np.ndarray
) -> np.ndarray:
    """The attention mass skipped pages could have held at most, per query head:
    ``U / (Z_S + U)`` with ``U = sum over skipped pages b of n_b * exp(u_b)``.

    ``log_z`` ``[n_q]``: log of ``Z_S``, the softmax total over what was attended (scores
    scaled as the bounds are); ``bounds_q`` ``[n_q, pages]``; ``skipped_q`` bool
    ``[n_q, pages]``; ``sizes`` ``[pages]``: tokens per page. Computed in the log domain.
    """
    terms = np.where(skipped_q, bounds_q + np.log(np.maximum(sizes, 1))[None], -np.inf)
    top = terms.max(axis=1)
    finite = np.isfinite(top)
    log_u = np.full(top.shape, -np.inf)
    shifted = np.exp(terms[finite] - top[finite, None]).sum(axis=1)
    log_u[finite] = top[finite] + np.log(shifted)
    with np.errstate(over="ignore"):
        return np.where(finite, 1.0 / (1.0 + np.exp(log_z - log_u)), 0.0)


def select_certified(
    policy: SparsePolicy,
    bounds_q: np.ndarray,
    n_kv: int,
    always: np.ndarray,
    sizes: np.ndarray,
    log_z_of: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, int]:
    """(selected ``[n_kv, pages]``, certificate ``[n_q]``, rounds of fetching more).

    Starts from :func:`select_pages` with the policy's budget (pages ranked by
    :func:`query_ranking`), then while some query head's
    certificate exceeds ``policy.threshold`` adds ``policy.grow`` pages to its KV head.
    ``log_z_of(selected)`` gives ``log Z_S`` per query head over the selected pages (and
    whatever is always attended besides them, such as the float16 tail).
    """
    n_q, n = bounds_q.shape
    g = n_q // n_kv
    bounds_kv = query_ranking(bounds_q, n_kv, policy.per_query, always)
    selected = select_pages(bounds_kv, always, policy.budget_pages(n))
    rounds = 0
    while True:
        cert = certificate(log_z_of(selected), bounds_q, ~np.repeat(selected, g, axis=0), sizes)
        over = cert.reshape(n_kv, g).max(axis=1) > policy.threshold
        over &= ~selected.all(axis=1)
        if not over.any():
            return selected, cert, rounds
        selected = grow_selection(bounds_kv, selected, over, policy.grow)
        rounds += 1


def spans_of(mask: np.ndarray, page: int, length: int) -> list[tuple[int, int]]:
    """Token ranges ``[start, end)`` of the True pages of ``mask``, adjacent pages merged,
    the last page cut at ``length``."""
    out: list[tuple[int, int]] = []
    for p in np.flatnonzero(mask):
        a, b = int(p) * page, min((int(p) + 1) * page, length)
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
