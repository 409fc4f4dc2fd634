"""Tests for the in-memory block pool and prefix matching."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edge_infer.cache_store import (
    BlockPool,
    KVFormat,
    blocks_for_prefix,
    common_prefix_len,
    default_budget_bytes,
    merge_blocks,
    split_into_blocks,
)
from edge_infer.cache_store import pool as pool_module
from tests.support.cache_store_helpers import assert_blocks_equal, assert_kv_equal, random_layers

FMT = KVFormat(4, 64, 16)


def _blocks(n_tokens: int, seed: int = 0):
    return split_into_blocks(random_layers(FMT, n_tokens, seed=seed), 0, 16)


# -- pool ------------------------------------------------------------------------------


def test_pool_accounting_and_lru_eviction() -> None:
    a, b, c = _blocks(16, 1), _blocks(16, 2), _blocks(16, 3)
    size = sum(x.nbytes for x in a)
    pool = BlockPool(budget_bytes=2 * size)
    pool.put("a", a)
    pool.put("b", b)
    pool.put("c", c)
    assert pool.bytes_used == 3 * size
    assert pool.agents() == ["a", "b", "c"] and len(pool) == 3 and "a" in pool
    pool.put("a", a)  # saved again: now most recently used
    assert pool.agents() == ["b", "c", "a"] and pool.bytes_used == 3 * size
    assert pool.evict_to_budget() == ["b"]
    assert pool.agents() == ["c", "a"] and pool.bytes_used == 2 * size
    assert pool.evict_to_budget() == []
    assert "b" not in pool and pool.remove("b") is None
    assert pool.evict_to_budget(budget_bytes=0) == ["c", "a"]
    assert pool.bytes_used == 0 and pool.agents() == []


def test_pool_replace_and_shared_blocks_counted_once() -> None:
    base = _blocks(32, 1)
    size = sum(x.nbytes for x in base)
    pool = BlockPool(10**9)
    pool.put("a", base)
    pool.put("fork", base[:1])  # a fork shares the first block object
    assert pool.bytes_used == size
    pool.put("a", base[1:])  # replacing drops the references of the old list
    assert pool.bytes_used == size
    pool.remove("fork")
    assert pool.bytes_used == base[1].nbytes
    pool.remove("a")
    assert pool.bytes_used == 0


def test_pool_is_thread_safe() -> None:
    blocks = [_blocks(16, i) for i in range(8)]
    size = blocks[0][0].nbytes
    pool = BlockPool(budget_bytes=3 * size)

    def work(t: int) -> None:
        for i in range(300):
            name = f"agent{(i + t) % 8}"
            pool.put(name, blocks[(i + t) % 8])
            pool.remove(f"agent{(i * 3) % 8}")
            pool.evict_to_budget()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.evict_to_budget()
    assert pool.bytes_used <= 3 * size
    left = pool.agents()
    assert pool.evict_to_budget(budget_bytes=0) == left
    assert pool.bytes_used == 0 and len(pool) == 0  # every reference was counted back


def test_default_budget(monkeypatch) -> None:
    avail = pool_module.available_memory_bytes()
    assert avail is None or avail > 0
    assert default_budget_bytes() > 0
    monkeypatch.setattr(pool_module, "available_memory_bytes", lambda: 8 << 30)
    assert default_budget_bytes() == 2 << 30 and default_budget_bytes(0.5) == 4 << 30
    monkeypatch.setattr(pool_module, "available_memory_bytes", lambda: None)
    assert default_budget_bytes() == 2 << 30


# -- prefix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a,b,n",
    [
        ([], [], 0),
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2], [1, 2, 3], 2),
        ([5, 2, 3], [1, 2, 3], 0),
        ([1, 2, 3], [1, 9, 3], 1),
    ],
)
def test_common_prefix_len_short(a, b, n) -> None:
    assert common_prefix_len(a, b) == n
    assert common_prefix_len(tuple(a), np.array(b, dtype=np.int64)) == n


def test_common_prefix_len_long() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50_000, 40_000).tolist()
    assert common_prefix_len(a, a) == 40_000
    assert common_prefix_len(a, a[:12_345]) == 12_345
    for cut in (0, 63, 64, 65, 1000, 39_999):
        b = list(a)
        b[cut] += 1
        assert common_prefix_len(a, b) == cut
        assert common_prefix_len(np.array(a), np.array(b)) == cut


def test_blocks_for_prefix() -> None:
    layers = random_layers(FMT, 40, seed=6)
    blocks = split_into_blocks(layers, 0, 16)
    assert blocks_for_prefix(blocks, 0) == []
    assert blocks_for_prefix(blocks, 16) == blocks[:1]
    assert blocks_for_prefix(blocks, 32) == blocks[:2]
    assert blocks_for_prefix(blocks, 100) == blocks
    cut = blocks_for_prefix(blocks, 21)
    assert cut[0] is blocks[0]
    assert (cut[1].start, cut[1].length, cut[1].sealed, cut[1].abstract) == (16, 5, False, None)
    for got, want in zip(merge_blocks(cut), layers, strict=True):
        assert_kv_equal(got.keys, want.slice(0, 21).keys)
        assert_kv_equal(got.values, want.slice(0, 21).values)
    tail = blocks_for_prefix(blocks, 35)
    assert_blocks_equal(tail[:2], blocks[:2])
    assert tail[2].length == 3 and not tail[2].sealed


def test_truncation_keeps_whole_sealed_quantized_blocks():
    from edge_infer.cache_store.blocks import tokens_to_block_end, truncation

    # inside the float16 tail: exact
    assert truncation(280, held=300, sealed=256, block_size=256, quantized=True) == (280, 256)
    # inside a sealed quantized block: back to the block start
    assert truncation(300, held=600, sealed=512, block_size=256, quantized=True) == (256, 256)
    # float16 blocks are exact wherever they are cut
    assert truncation(300, held=600, sealed=512, block_size=256, quantized=False) == (300, 256)
    assert truncation(-5, held=10, sealed=0, block_size=256, quantized=True) == (0, 0)
    assert truncation(50, held=10, sealed=0, block_size=256, quantized=True) == (10, 0)
    assert tokens_to_block_end(300, 256, True) == 212
    assert tokens_to_block_end(512, 256, True) == 256
    assert tokens_to_block_end(300, 256, False) > 1 << 20
