"""Quality-reference selections (oracle, sinks+window), per-query-head ranking and page mass
on small arrays."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from edge_infer.offload import (
    SparsePolicy,
    always_pages,
    group_max,
    oracle_pages,
    page_mass,
    query_ranking,
    select_pages,
    window_pages,
)


def _softmax_mass(s: np.ndarray, page: int, sealed: int, n_kv: int) -> np.ndarray:
    """Brute force: per KV head and page, the sum over its query heads of softmax mass."""
    n_q = s.shape[0]
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    g = n_q // n_kv
    out = np.zeros((n_kv, -(-sealed // page)))
    for qh in range(n_q):
        for t in range(sealed):
            out[qh // g, t // page] += p[qh, t]
    return out


def test_page_mass_sums_each_group_softmax_over_sealed_pages():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((6, 77)) * 3
    mass = page_mass(s, 8, 70, 2)  # 70 sealed tokens: 9 pages, the last one short
    np.testing.assert_allclose(mass, _softmax_mass(s, 8, 70, 2), rtol=1e-12, atol=1e-15)
    # the tail (7 tokens past the sealed ones) holds the rest of each head's unit mass
    assert np.all(mass.sum(axis=1) < 3) and mass.shape == (2, 9)


@pytest.mark.parametrize("seed", range(6))
def test_oracle_holds_the_most_mass_any_selection_of_its_size_can(seed):
    rng = np.random.default_rng(seed)
    n, n_kv = 10, 2
    mass = rng.dirichlet(np.full(n, 0.3), size=n_kv)
    always = always_pages(n, 2)  # pages 0, 1 and 8, 9
    for budget in range(0, n + 1):
        sel = oracle_pages(mass, always, budget)
        assert sel[:, always].all()
        assert (sel.sum(axis=1) == max(budget, int(always.sum()))).all()
        free = np.flatnonzero(~always)
        extra = max(0, budget - int(always.sum()))
        for h in range(n_kv):
            best = (
                max(mass[h, list(c)].sum() for c in combinations(free.tolist(), extra))
                + mass[h, always].sum()
            )
            assert mass[h, sel[h]].sum() == pytest.approx(best, abs=1e-12)


def test_window_takes_the_sinks_and_the_most_recent_pages():
    always = always_pages(12, 2)
    sel = window_pages(3, always, 7)
    assert sel.shape == (3, 12) and (sel == sel[0]).all()
    assert np.flatnonzero(sel[0]).tolist() == [0, 1, 7, 8, 9, 10, 11]
    # a budget below the always-attended set still attends all of it
    assert np.flatnonzero(window_pages(1, always, 1)[0]).tolist() == [0, 1, 10, 11]
    assert window_pages(2, always, 12).all()


def test_recent_pages_join_the_always_attended_set():
    assert np.flatnonzero(always_pages(12, 2, recent=3)).tolist() == [0, 1, 7, 8, 9, 10, 11]
    assert always_pages(5, 2, recent=9).all()
    with pytest.raises(ValueError, match="recent"):
        SparsePolicy(recent=-1)
    with pytest.raises(ValueError, match="select"):
        SparsePolicy(select="random")


def test_per_query_ranking_takes_every_query_heads_best_pages_first():
    # KV head 0 has two query heads: head 0's scores dwarf head 1's, so ranking by the
    # group's largest bound would give all of the budget to head 0's favourites
    b0 = np.array([0.0, 50, 49, 48, 47, 0, 0, 0])
    b1 = np.array([0.0, -9, -9, -9, -9, -1, -2, 0])
    bounds = np.stack([b0, b1])
    always = np.zeros(8, bool)
    by_max = select_pages(group_max(bounds, 1), always, 2)
    assert np.flatnonzero(by_max[0]).tolist() == [1, 2]
    ranking = query_ranking(bounds, 1, True, always)
    per_query = select_pages(ranking, always, 2)
    top1 = {1, int(np.argmax(b1))}  # each head's best page
    assert set(np.flatnonzero(per_query[0]).tolist()) == top1
    # with room for everything it is the same set; without per_query it is the group max
    assert select_pages(ranking, always, 8).all()
    assert np.array_equal(query_ranking(bounds, 1, False, always), group_max(bounds, 1))


@pytest.mark.parametrize("seed", range(4))
def test_per_query_selection_is_the_union_of_each_heads_top_pages(seed):
    rng = np.random.default_rng(seed)
    n_kv, g, n = 2, 3, 16
    bounds = rng.standard_normal((n_kv * g, n)) * rng.uniform(0.1, 10, size=(n_kv * g, 1))
    always = always_pages(n, 2)
    ranking = query_ranking(bounds, n_kv, True, always)
    for j in range(1, 4):
        for h in range(n_kv):
            union = set()
            for qh in range(h * g, (h + 1) * g):
                free = np.where(always, -np.inf, bounds[qh])
                union |= set(np.argsort(-free, kind="stable")[:j].tolist())
            budget = int(always.sum()) + len(union)
            sel = select_pages(ranking, always, budget)
            assert set(np.flatnonzero(sel[h] & ~always).tolist()) == union
