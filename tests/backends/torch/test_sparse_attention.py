"""Decode attention over selected pages: an all-pages selection is dense attention bit for
bit, a partial one is exact attention over what it selects, and the step log keeps its
promises (always-attended pages, certificates) on the default model."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from edge_infer.backends.torch.kv_attention import attend_new_tokens
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.cache_store.block_codec import block_from_bytes, block_to_bytes
from edge_infer.cache_store.kv_format import KVFormat
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.offload import (
    SparsePolicy,
    SparseState,
    always_pages,
    oracle_pages,
    page_mass,
    query_ranking,
    quest_bounds,
    scores,
    select_pages,
    window_pages,
)
from tests.support.cache_store_helpers import assert_blocks_equal
from tests.support.kv_caches import filled_cache, one_token
from tests.support.sparse_runs import decode, real_ids

needs_kernel = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="the CPU attention kernel cannot be built here"
)


def _sparse(cache: TorchKVCache, **policy) -> SparseState:
    state = SparseState.new(SparsePolicy(**policy), cache.num_layers, record=True)
    cache.sparse = state
    return state


def _reference(cache: TorchKVCache, layer: int, q, k, v, selected, page):
    """Plain torch: softmax over the selected sealed rows, the tail and the new token."""
    keys, values = cache.readable(layer, cache.length)
    keys = torch.cat([keys, k[:, None].half().float()], dim=1)
    values = torch.cat([values, v[:, None].half().float()], dim=1)
    n_q, d = q.shape
    g = n_q // cache.n_kv
    sealed = cache.sealed_length
    out = torch.empty_like(q)
    for h in range(cache.n_kv):
        rows = np.repeat(selected[h], page)[:sealed]
        keep = torch.from_numpy(np.concatenate([rows, np.ones(keys.shape[1] - sealed, bool)]))
        s = q[h * g : (h + 1) * g] @ keys[h, keep].T / d**0.5
        out[h * g : (h + 1) * g] = torch.softmax(s, dim=-1) @ values[h, keep]
    return out


@needs_kernel
@pytest.mark.parametrize("n", [255, 700, 1100])
def test_all_pages_is_dense_bit_for_bit_and_a_budget_attends_its_pages(n):
    n_q, n_kv, dim, group = 9, 3, 64, 64
    dense, sparse = (filled_cache(4, n, n_kv, dim, group, seed=2) for _ in range(2))
    q, k, v = one_token(dense, n_q)
    for layer in range(2):
        want = attend_new_tokens([dense], layer, q[None], k[None], v[None])
        _sparse(sparse, page=32, budget=1.0, dense_layers=0)
        got = attend_new_tokens([sparse], layer, q[None], k[None], v[None])
        assert torch.equal(got, want)
        # in a batch, next to a dense sequence, each row is still its own
        both = attend_new_tokens(
            [dense, sparse],
            layer,
            q[None].repeat(2, 1, 1),
            k[None].repeat(2, 1, 1),
            v[None].repeat(2, 1, 1),
        )
        assert torch.equal(both[0], want[0]) and torch.equal(both[1], want[0])
        state = _sparse(sparse, page=32, budget=0.25, dense_layers=0)
        got = attend_new_tokens([sparse], layer, q[None], k[None], v[None])[0]
        if sparse.sealed_length == 0:
            assert torch.equal(got, want[0]) and not state.log
            continue
        (rec,) = state.log
        assert rec.selected.shape == (n_kv, sparse.sealed_length // 32)
        ref = _reference(sparse, layer, q, k, v, rec.selected, 32)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_without_the_kernel_plain_torch_attends_the_same_pages(monkeypatch):
    monkeypatch.setenv("EDGE_INFER_KERNELS", "off")
    cache = filled_cache(4, 1100, 3, 64, 64, seed=3)
    q, k, v = one_token(cache, 9)
    state = _sparse(cache, page=64, budget=0.25, dense_layers=0)
    got = attend_new_tokens([cache], 1, q[None], k[None], v[None])[0]
    (rec,) = state.log
    assert not rec.selected.all()
    torch.testing.assert_close(got, _reference(cache, 1, q, k, v, rec.selected, 64))


@needs_kernel
def test_truncating_a_cache_drops_the_pages_past_the_cut():
    cache = filled_cache(4, 800, 3, 64, 64)
    state = _sparse(cache, page=64, budget=0.5, dense_layers=0)
    q, k, v = one_token(cache, 9)
    attend_new_tokens([cache], 0, q[None], k[None], v[None])
    assert state.index.tokens(0) == 768
    cache.truncate(300)
    assert state.index.tokens(0) == 256
    attend_new_tokens([cache], 0, q[None], k[None], v[None])
    assert state.log[-1].selected.shape == (3, 4)


@pytest.fixture(scope="module")
def prefilled(default_model):
    """The default model after 1100 tokens of real text (four sealed blocks and a tail)."""
    from edge_infer.backends.torch.backend import TorchBackend

    backend = TorchBackend(default_model, device="cpu", kv_bits=4)
    ids = real_ids(default_model.tokenizer, 1100)
    cache = backend.new_cache()
    logits = backend.forward(ids, cache)
    return backend, cache.blocks(), int(logits[-1].argmax())


def _restored(backend, blocks):
    cache = backend.new_cache()
    cache.append_blocks(blocks)
    return cache


@needs_kernel
@pytest.mark.slow
def test_all_pages_budget_decodes_the_dense_greedy_tokens(prefilled):
    backend, blocks, first = prefilled
    dense_tokens, dense_logits = decode(backend, _restored(backend, blocks), first, 128)
    cache = _restored(backend, blocks)
    cache.sparse = SparseState.new(SparsePolicy(page=32, budget=1.0), len(blocks[0].layers))
    tokens, logits = decode(backend, cache, first, 128)
    assert np.array_equal(tokens, dense_tokens)
    assert np.array_equal(logits, dense_logits)


@needs_kernel
@pytest.mark.slow
def test_always_attended_pages_and_certificates_over_a_recorded_run(prefilled):
    backend, blocks, first = prefilled
    n_layers = len(blocks[0].layers)
    cache = _restored(backend, blocks)
    # 32 pages, 16 of them always attended: 4 more chosen by bound
    policy = SparsePolicy(page=32, budget=0.625, dense_layers=2)
    cache.sparse = SparseState.new(policy, n_layers, record=True, measure=True)
    decode(backend, cache, first, 6)
    log = cache.sparse.log
    sparse_layers = {rec.layer for rec in log if rec.certificate is not None}
    assert sparse_layers == set(range(2, n_layers))  # the first two layers attend densely
    per_block = 256 // 32
    for rec in log:
        if rec.layer < 2:
            continue
        n_pages = rec.selected.shape[1]
        last = (n_pages - 1) // per_block * per_block
        assert rec.selected[:, :per_block].all() and rec.selected[:, last:].all()
        assert (rec.selected.sum(axis=1) == policy.budget_pages(n_pages)).all()
        assert np.all(rec.certificate >= rec.skipped_mass - 1e-9)
        assert np.all(rec.skipped_mass >= 0) and np.all(rec.certificate <= 1)


@needs_kernel
def test_oracle_window_and_per_query_selections_attend_what_their_functions_choose():
    cache = filled_cache(4, 1100, 3, 64, 64, seed=5)  # 1024 sealed: 32 pages of 32
    q, k, v = one_token(cache, 9)
    keys, _ = cache.readable(1, cache.length)
    new = k.half().float().numpy()[:, None]
    s = scores(q.numpy(), np.concatenate([keys.numpy(), new], axis=1))
    always = always_pages(32, 8, recent=2)

    for select, per_query in (("oracle", False), ("window", False), ("bound", True)):
        state = _sparse(
            cache,
            page=32,
            budget=0.75,
            dense_layers=0,
            recent=2,
            select=select,
            per_query=per_query,
        )
        got = attend_new_tokens([cache], 1, q[None], k[None], v[None])[0]
        (rec,) = state.log
        if select == "oracle":
            want = oracle_pages(page_mass(s, 32, 1024, 3), always, 24)
        elif select == "window":
            want = window_pages(3, always, 24)
        else:
            lo, hi = state.index.bounds(1)
            bounds = quest_bounds(q.numpy(), lo, hi)
            want = select_pages(query_ranking(bounds, 3, True, always), always, 24)
        assert np.array_equal(rec.selected, want) and rec.selected[:, always].all()
        assert (rec.selected.sum(axis=1) == 24).all()
        torch.testing.assert_close(got, _reference(cache, 1, q, k, v, rec.selected, 32))


# -- offloaded layers: the pages come from the tiers (host memory under a budget, disk) ------


def _offloaded(backend, blocks, budget_bytes: int, page: int = 32, first_layer: int = 2):
    """A cache of the default model whose layers from ``first_layer`` on live in tiers of a
    pool of ``budget_bytes``, holding ``blocks``."""
    from edge_infer.offload import HostPool, SequenceTiers

    cache = backend.new_cache()
    pool = HostPool(budget_bytes)
    layers = range(first_layer, cache.num_layers)
    cache.offload(SequenceTiers(pool, layers, cache.block_size, page))
    cache.append_blocks(blocks)
    return cache, pool


def _mapped(blocks, folder):
    """The sealed blocks written to block files and mapped back (the disk tier uses such
    files in place), the unsealed tail as it is."""
    out = []
    for i, block in enumerate(blocks):
        if not block.sealed:
            out.append(block)
            continue
        fmt = KVFormat(4, block.layers[0].keys.group_size, block.length)
        path = folder / f"block{i}.safetensors"
        path.write_bytes(block_to_bytes(block, fmt))
        with open(path, "rb") as f:
            out.append(block_from_bytes(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)))
    return out


@needs_kernel
@pytest.mark.slow
def test_offloaded_cache_decodes_as_the_resident_one_within_its_budget(prefilled, tmp_path):
    backend, blocks, first = prefilled
    n_layers = len(blocks[0].layers)
    policy = SparsePolicy(page=32, budget=0.5, prefetch=8)
    resident = _restored(backend, blocks)
    resident.sparse = SparseState.new(policy, n_layers, record=True)
    want_tokens, want_logits = decode(backend, resident, first, 40)
    kv_bytes = sum(b.nbytes for b in blocks)
    cache, pool = _offloaded(backend, blocks, kv_bytes // 8)
    cache.sparse = SparseState.new(policy, n_layers, record=True)
    tokens, logits = decode(backend, cache, first, 40)
    # the same pages selected, the same bytes attended: bit for bit
    assert np.array_equal(tokens, want_tokens) and np.array_equal(logits, want_logits)
    for a, b in zip(resident.sparse.log, cache.sparse.log, strict=True):
        assert np.array_equal(a.selected, b.selected)
    assert pool.peak_bytes <= pool.budget_bytes
    counters = pool.counters
    assert counters.hits + counters.misses > 0 and counters.bytes_disk > 0
    # what it exports (to save) is what the resident cache exports
    assert_blocks_equal(resident.blocks(), cache.blocks())
    # blocks on disk and a pool with room: the pages ranked next are prefetched, and
    # change nothing
    roomy, pool = _offloaded(backend, _mapped(blocks, tmp_path), kv_bytes)
    roomy.sparse = SparseState.new(policy, n_layers)
    tokens, logits = decode(backend, roomy, first, 40)
    assert np.array_equal(tokens, want_tokens) and np.array_equal(logits, want_logits)
    pool.wait_prefetch()
    assert pool.counters.prefetched > 0 and pool.peak_bytes <= pool.budget_bytes


@needs_kernel
@pytest.mark.slow
def test_offloaded_cache_prefills_and_decodes_densely_as_the_resident_one(prefilled):
    backend, blocks, first = prefilled
    ids = np.arange(300, 300 + 200)  # a prefill chunk over the offloaded layers' pages
    resident = _restored(backend, blocks)
    want = backend.forward(ids, resident)
    cache, pool = _offloaded(backend, blocks, 0)  # nothing held: every read streams
    got = backend.forward(ids, cache)
    assert np.array_equal(got, want)
    want_tokens, want_logits = decode(backend, resident, first, 8)
    tokens, logits = decode(backend, cache, first, 8)
    assert np.array_equal(tokens, want_tokens) and np.array_equal(logits, want_logits)
    assert pool.peak_bytes == 0
    # the tokens sealed on the way went to the tiers (spilled: the budget is zero)
    assert cache.tiers is not None and cache.tiers.length == cache.sealed_length


@needs_kernel
def test_a_live_cache_offloads_its_sealed_blocks_and_answers_the_same():
    from edge_infer.offload import HostPool, SequenceTiers

    cache = filled_cache(4, 1100, 3, 64, 64, seed=3)
    twin = filled_cache(4, 1100, 3, 64, 64, seed=3)
    twin.offload(SequenceTiers(HostPool(1 << 20), [1], twin.block_size, 32))
    assert twin.offloaded_layers() == [1]
    for layer in range(2):
        q, k, v = one_token(cache, 9, seed=layer)
        for c in (cache, twin):
            c.reserve_next()
        want = attend_new_tokens([cache], layer, q[None], k[None], v[None])
        got = attend_new_tokens([twin], layer, q[None], k[None], v[None])
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="already offloaded"):
        twin.offload(SequenceTiers(HostPool(0), [0], twin.block_size, 32))


@needs_kernel
@pytest.mark.slow
def test_batched_decoding_mixes_offloaded_and_resident_caches(prefilled):
    backend, blocks, first = prefilled
    n_layers = len(blocks[0].layers)
    policy = SparsePolicy(page=32, budget=0.5)

    def caches():
        resident = _restored(backend, blocks)
        offloaded, _ = _offloaded(backend, blocks, 1 << 20)
        offloaded.sparse = SparseState.new(policy, n_layers)
        return [resident, offloaded]

    alone = [decode(backend, c, first, 6)[1] for c in caches()]
    together = caches()
    tokens = [first, first]
    for step in range(6):
        logits = backend.forward_batch(tokens, together)
        for b in range(2):
            assert np.array_equal(logits[b], alone[b][step])
        tokens = [int(x.argmax()) for x in logits]
