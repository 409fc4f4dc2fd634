"""Page boxes, Quest bounds, page selection and the skipped-mass certificate on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.offload import (
    PageIndex,
    SparsePolicy,
    always_pages,
    certificate,
    group_max,
    grow_selection,
    next_pages,
    page_bounds,
    page_count,
    quest_bounds,
    scores,
    select_certified,
    select_pages,
    spans_of,
    true_max_scores,
)


def _keys(n_kv=2, t=96, d=32, seed=0) -> np.ndarray:
    """Gaussian keys with one large outlier channel, as small models' keys have."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n_kv, t, d)).astype(np.float32)
    k[:, :, 3] = k[:, :, 3] * 8 + 20
    return k


def test_page_bounds_hold_every_key_of_their_page():
    k = _keys(t=90)  # a short last page
    lo, hi = page_bounds(k, 32)
    assert lo.shape == hi.shape == (2, 3, 32) and lo.dtype == np.float16
    assert page_count(90, 32) == 3
    for p in range(3):
        part = k[:, p * 32 : (p + 1) * 32]
        assert np.all(lo[:, p].astype(np.float32) <= part.min(axis=1))
        assert np.all(hi[:, p].astype(np.float32) >= part.max(axis=1))
    np.testing.assert_allclose(hi[:, 2], k[:, 64:].max(axis=1), rtol=2e-3)
    with pytest.raises(ValueError, match="empty"):
        page_bounds(k[:, :0], 32)


@pytest.mark.parametrize("seed", range(5))
def test_quest_bound_is_never_below_the_true_max_score(seed):
    k = _keys(seed=seed)
    q = np.random.default_rng(seed + 9).standard_normal((6, 32)).astype(np.float32) * 3
    for page in (8, 32, 96):
        lo, hi = page_bounds(k, page)
        bound, exact = quest_bounds(q, lo, hi), true_max_scores(q, k, page)
        assert bound.shape == exact.shape == (6, page_count(96, page))
        assert np.all(bound >= exact - 1e-5 * np.abs(exact))
    # a one-token page's box is the key itself (up to float16 rounding): the bound is tight
    lo, hi = page_bounds(k, 1)
    tight = quest_bounds(q, lo, hi)
    assert np.all(tight >= scores(q, k) - 1e-4)
    np.testing.assert_allclose(tight, scores(q, k), atol=0.05)


def test_all_pages_budget_selects_everything_and_always_set_is_kept():
    rng = np.random.default_rng(1)
    bounds = rng.standard_normal((3, 16))
    always = always_pages(16, 4)
    assert always.tolist() == [True] * 4 + [False] * 8 + [True] * 4
    assert select_pages(bounds, always, 16).all()
    policy = SparsePolicy(page=64, budget=1.0)
    assert policy.budget_pages(16) == 16
    for budget in range(0, 17):
        sel = select_pages(bounds, always, budget)
        assert sel[:, always].all()
        assert (sel.sum(axis=1) == max(budget, 8)).all()
        # the extra pages are the ones of the highest bounds
        if budget > 8:
            for h in range(3):
                chosen = bounds[h, sel[h] & ~always]
                left = bounds[h, ~sel[h]]
                assert left.size == 0 or chosen.min() >= left.max()
    # a single block: its pages are both first and last
    assert always_pages(3, 4).all()


def test_certificate_is_never_below_the_skipped_mass():
    rng = np.random.default_rng(2)
    page, n_kv = 16, 2
    for trial in range(20):
        k = _keys(n_kv=n_kv, t=128, d=32, seed=trial)
        q = rng.standard_normal((4, 32)).astype(np.float32) * rng.uniform(0.5, 4)
        lo, hi = page_bounds(k, page)
        bounds = quest_bounds(q, lo, hi)
        sel = select_pages(group_max(bounds, n_kv), always_pages(8, 2), 5)
        s = scores(q, k).astype(np.float64)
        attended = np.repeat(np.repeat(sel, page, axis=1), 2, axis=0)
        total = np.exp(s).sum(axis=1)
        skipped = np.where(attended, 0, np.exp(s)).sum(axis=1) / total
        log_z = np.log(np.where(attended, np.exp(s), 0).sum(axis=1))
        cert = certificate(log_z, bounds, ~np.repeat(sel, 2, axis=0), np.full(8, page))
        assert np.all(cert >= skipped - 1e-9) and np.all(cert <= 1)
    # nothing skipped: nothing could be missed
    assert np.all(certificate(np.zeros(4), bounds, np.zeros((4, 8), bool), np.full(8, 16)) == 0)


def test_certified_selection_fetches_pages_until_under_the_threshold():
    k = _keys(n_kv=1, t=256, d=32, seed=3)
    q = np.random.default_rng(4).standard_normal((2, 32)).astype(np.float32)
    lo, hi = page_bounds(k, 16)
    bounds = quest_bounds(q, lo, hi)
    s = scores(q, k)

    def log_z_of(sel):
        mask = np.repeat(np.repeat(sel, 16, axis=1), 2, axis=0)
        return np.log(np.where(mask, np.exp(s.astype(np.float64)), 0).sum(axis=1))

    always = always_pages(16, 4)
    sizes = np.full(16, 16)
    loose = SparsePolicy(page=16, budget=0.25, threshold=1.0)
    sel, cert, rounds = select_certified(loose, bounds, 1, always, sizes, log_z_of)
    assert rounds == 0 and sel.sum() == 8
    strict = SparsePolicy(page=16, budget=0.25, threshold=0.01, grow=2)
    sel2, cert2, rounds2 = select_certified(strict, bounds, 1, always, sizes, log_z_of)
    assert rounds2 > 0 and (sel2 >= sel).all()
    assert cert2.max() <= 0.01 or sel2.all()
    grown = grow_selection(group_max(bounds, 1), sel, np.array([True]), 3)
    assert grown.sum() == sel.sum() + 3


def test_spans_merge_adjacent_pages():
    mask = np.array([1, 1, 0, 1, 0, 0, 1], bool)
    assert spans_of(mask, 32, 200) == [(0, 64), (96, 128), (192, 200)]


def test_page_index_grows_and_truncates():
    index = PageIndex(2, 32)
    k = _keys(t=128)
    index.extend(0, k[:, :64])
    index.extend(0, k[:, 64:])
    assert index.tokens(0) == 128 and index.tokens(1) == 0
    lo, hi = index.bounds(0)
    ref_lo, ref_hi = page_bounds(k, 32)
    assert np.array_equal(lo, ref_lo) and np.array_equal(hi, ref_hi)
    index.truncate(70)
    assert index.tokens(0) == 64
    with pytest.raises(ValueError, match="whole pages"):
        index.extend(0, k[:, :10])
    with pytest.raises(ValueError, match="no pages"):
        index.bounds(1)


def test_policy_rejects_bad_settings():
    for bad in ({"page": 0}, {"budget": 0.0}, {"budget": 1.5}, {"threshold": 2.0}):
        with pytest.raises(ValueError):
            SparsePolicy(**bad)
    with pytest.raises(ValueError, match="prefetch must be >= 0, got -1"):
        SparsePolicy(prefetch=-1)


def test_next_pages_are_the_best_ranked_outside_the_selection():
    rng = np.random.default_rng(5)
    ranking = rng.standard_normal((3, 40))
    always = always_pages(40, 8)
    selected = select_pages(ranking, always, 20)
    ahead = next_pages(ranking, selected, 6)
    assert not (ahead & selected).any()
    np.testing.assert_array_equal(ahead.sum(axis=1), [6, 6, 6])
    for h in range(3):  # each is ranked above every page left out of both
        left = ~(ahead[h] | selected[h])
        assert ranking[h, ahead[h]].min() >= ranking[h, left].max()
    # what the selection grows to next: exactly the pages prefetched
    grown = select_pages(ranking, always, 26)
    np.testing.assert_array_equal(grown & ~selected, ahead)
    # fewer pages left than asked: all of them; none asked: none
    full = select_pages(ranking, always, 37)
    np.testing.assert_array_equal(next_pages(ranking, full, 6), ~full)
    assert not next_pages(ranking, selected, 0).any()
