"""Host-memory pool and disk tier for offloaded KV: exact rows, the byte budget, counters, spill."""

from __future__ import annotations

import gc
import hashlib
import mmap
import threading
from pathlib import Path

import numpy as np
import pytest

from edge_infer.cache_store.block_codec import block_from_bytes, block_to_bytes
from edge_infer.cache_store.blocks import KVBlock, compute_abstract
from edge_infer.cache_store.kv_format import KVFormat, LayerKV, QuantizedKV
from edge_infer.offload import HostPool, SequenceTiers, TierCounters

N_KV, D, BS, PAGE, N_LAYERS = 2, 64, 32, 8, 4
LAYERS = (1, 3)
PPB = BS // PAGE
ROW_BYTES = 2 * (D * 4 // 32 * 4 + 2 * (D // 64) * 2)  # one token of one head: K and V rows
ENTRY = BS * ROW_BYTES  # a head of a block
PAGE_BYTES = PAGE * ROW_BYTES  # one slab slot: a page of a head
BLOCK = N_KV * ENTRY  # one layer of a block, all heads


def _qkv(rng: np.random.Generator, n_kv: int = N_KV, t: int = BS) -> QuantizedKV:
    return QuantizedKV.quantize(rng.standard_normal((n_kv, t, D)).astype(np.float32))


class _Files:
    """Sealed block files written by the store's block writer, mapped read-only."""

    def __init__(self, root: Path, n_blocks: int, seed: int = 0, n_kv: int = N_KV) -> None:
        rng = np.random.default_rng(seed)
        self.paths: list[Path] = []
        self.blocks: list[KVBlock] = []
        self._maps: list[mmap.mmap] = []
        for i in range(n_blocks):
            layers = [LayerKV(_qkv(rng, n_kv), _qkv(rng, n_kv)) for _ in range(N_LAYERS)]
            block = KVBlock(i * BS, BS, layers, sealed=True, abstract=compute_abstract(layers))
            path = root / f"block{seed}-{i}.safetensors"
            path.write_bytes(block_to_bytes(block, KVFormat(4, 64, BS)))
            with open(path, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps.append(m)
            self.paths.append(path)
            self.blocks.append(block_from_bytes(m))

    def layer(self, i: int, layer: int) -> LayerKV:
        return self.blocks[i].layers[layer]

    def digests(self) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in self.paths]


class _Seq:
    """A SequenceTiers and the blocks it was given, to compare against."""

    def __init__(self, pool: HostPool, spill_dir: Path | None = None, page: int = PAGE) -> None:
        self.tiers = SequenceTiers(pool, LAYERS, BS, page, spill_dir)
        self.page = page
        self.held: dict[int, list[LayerKV]] = {layer: [] for layer in LAYERS}

    def add(self, layer: int, kv: LayerKV, on_disk: bool) -> None:
        start = len(self.held[layer]) * BS
        self.tiers.add_block(start, layer, kv.keys, kv.values, on_disk)
        self.held[layer].append(kv)

    def add_all(self, kv: LayerKV | None, files: _Files | None, i: int, on_disk: bool) -> None:
        for layer in LAYERS:
            self.add(layer, files.layer(i, layer) if files else kv, on_disk)

    def expected(self, layer: int, head: int, pages: np.ndarray) -> list[np.ndarray]:
        joined = LayerKV.concat(self.held[layer])
        out = []
        for q in (joined.keys, joined.values):
            for part in (q.packed, q.scales, q.biases):
                rows = part[head].reshape(-1, self.page, part.shape[2])[pages]
                out.append(rows.reshape(-1, part.shape[2]))
        return out

    def check_gather(self, layer: int, head: int, pages: np.ndarray) -> None:
        got = self.tiers.gather(layer, head, pages)
        want = self.expected(layer, head, pages)
        assert len(got) == 6
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.flags.c_contiguous
            np.testing.assert_array_equal(g, w)

    def check_read(self, layer: int, a: int, b: int) -> None:
        keys, values = self.tiers.read(layer, a, b)
        joined = LayerKV.concat(self.held[layer]).slice(a, b)
        for got, want in ((keys, joined.keys), (values, joined.values)):
            assert (got.bits, got.group_size) == (want.bits, want.group_size)
            for part in ("packed", "scales", "biases"):
                np.testing.assert_array_equal(getattr(got, part), getattr(want, part))

    def truncate(self, tokens: int) -> None:
        self.tiers.truncate(tokens)
        for layer in LAYERS:
            del self.held[layer][max(0, tokens) // BS :]


def _ram_block(rng: np.random.Generator) -> LayerKV:
    return LayerKV(_qkv(rng), _qkv(rng))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> _Files:
    return _Files(tmp_path_factory.mktemp("blocks"), 6)


def _page_sets(rng: np.random.Generator, n_pages: int) -> list[np.ndarray]:
    return [
        np.arange(n_pages),
        np.array([], np.int64),
        np.array([0]),
        np.array([n_pages - 1]),
        *(np.sort(rng.choice(n_pages, rng.integers(1, n_pages), replace=False)) for _ in range(6)),
    ]


@pytest.mark.parametrize("budget", [0, ENTRY, 3 * BLOCK, 1 << 30])
def test_gather_equals_the_original_rows_from_ram_disk_and_spill(files, tmp_path, budget):
    rng = np.random.default_rng(1)
    pool = HostPool(budget)
    seq = _Seq(pool, tmp_path)
    for i in range(6):
        if i % 2:
            seq.add_all(_ram_block(rng), None, i, on_disk=False)
        else:
            seq.add_all(None, files, i, on_disk=True)
        assert pool.held_bytes <= budget
    assert seq.tiers.length == 6 * BS
    for _ in range(2):  # the second round is served from the pool where it fits
        for pages in _page_sets(rng, 6 * PPB):
            for layer in LAYERS:
                for head in range(N_KV):
                    seq.check_gather(layer, head, pages)
                    assert pool.held_bytes <= budget
    for layer in LAYERS:
        seq.check_read(layer, 0, 6 * BS)
        seq.check_read(layer, 2 * BS, 4 * BS)
        seq.check_read(layer, BS, BS)
    assert seq.tiers.nbytes_ram() == pool.held_bytes
    assert seq.tiers.nbytes_ram() + seq.tiers.nbytes_disk() >= 6 * len(LAYERS) * BLOCK
    if budget == 0:
        assert pool.peak_bytes == 0 and pool.counters.hits == 0
        assert pool.counters.spilled_bytes == 3 * len(LAYERS) * BLOCK


def test_gather_refuses_pages_out_of_order_or_out_of_range(files):
    seq = _Seq(HostPool(1 << 20))
    seq.add_all(None, files, 0, on_disk=True)
    with pytest.raises(
        ValueError, match="layer 1: pages must be strictly increasing \\(page 3 after 3"
    ):
        seq.tiers.gather(1, 0, np.array([1, 3, 3]))
    with pytest.raises(ValueError, match="layer 3: .*page 2 after 3"):
        seq.tiers.gather(3, 0, np.array([3, 2]))
    with pytest.raises(ValueError, match=f"layer 1: page {PPB} is not held"):
        seq.tiers.gather(1, 0, np.array([0, PPB]))
    with pytest.raises(ValueError, match="layer 1: page -1 is not held"):
        seq.tiers.gather(1, 0, np.array([-1]))
    with pytest.raises(ValueError, match="layer 1: head 2 is out of range"):
        seq.tiers.gather(1, 2, np.array([0]))
    with pytest.raises(ValueError, match="layer 2 is not offloaded"):
        seq.tiers.gather(2, 0, np.array([0]))


def test_add_block_names_layer_and_start(files):
    rng = np.random.default_rng(0)
    tiers = SequenceTiers(HostPool(1 << 20), LAYERS, BS, PAGE)
    kv = files.layer(0, 1)
    with pytest.raises(ValueError, match="layer 1: block at 32 does not follow \\(expected 0\\)"):
        tiers.add_block(BS, 1, kv.keys, kv.values, on_disk=True)
    tiers.add_block(0, 1, kv.keys, kv.values, on_disk=True)
    with pytest.raises(ValueError, match="layer 1: block at 0 does not follow \\(expected 32\\)"):
        tiers.add_block(0, 1, kv.keys, kv.values, on_disk=True)
    short = _qkv(rng, t=BS // 2)
    with pytest.raises(ValueError, match="layer 3: block at 0 holds 16/16 tokens"):
        tiers.add_block(0, 3, short, short, on_disk=False)
    wide = _qkv(rng, n_kv=3)
    with pytest.raises(ValueError, match="layer 1: block at 32 has another KV layout"):
        tiers.add_block(BS, 1, wide, wide, on_disk=False)
    with pytest.raises(ValueError, match="layer 0 is not offloaded"):
        tiers.add_block(0, 0, kv.keys, kv.values, on_disk=True)
    with pytest.raises(ValueError, match="page=5 must divide block_size=32"):
        SequenceTiers(HostPool(0), LAYERS, BS, 5)
    with pytest.raises(ValueError, match="layer 1: read \\[8, 32\\) is not block-aligned"):
        tiers.read(1, 8, BS)
    with pytest.raises(ValueError, match="layer 1: read \\[0, 64\\) is not block-aligned"):
        tiers.read(1, 0, 2 * BS)


def test_second_gather_hits_and_counters_add_up(files):
    pool = HostPool(1 << 30)
    seq = _Seq(pool)
    for i in range(3):
        seq.add_all(None, files, i, on_disk=True)
    pages = np.array([0, 2, 5, 11])
    seq.check_gather(1, 0, pages)
    c = pool.counters
    assert (c.hits, c.misses, c.bytes_ram, c.bytes_disk) == (0, 4, 0, 4 * PAGE * ROW_BYTES)
    assert c.hit_rate == 0.0
    seq.check_gather(1, 0, pages)
    assert (c.hits, c.misses, c.bytes_ram) == (4, 4, 4 * PAGE * ROW_BYTES)
    # one slab slot per page read, held (and counted) page by page
    assert pool.held_bytes == 4 * PAGE_BYTES == seq.tiers.nbytes_ram()
    seq.check_gather(1, 0, np.array([1, 2]))  # page 1 new, page 2 held: both kinds in a call
    assert (c.hits, c.misses) == (5, 5)
    assert c.bytes_ram + c.bytes_disk == 10 * PAGE * ROW_BYTES
    assert c.hit_rate == 0.5
    assert TierCounters().hit_rate == 1.0
    before = (c.bytes_ram, c.bytes_disk, pool.held_bytes)
    seq.check_read(3, 0, 3 * BS)  # streaming read: counted as disk, nothing cached
    assert (c.bytes_ram, pool.held_bytes) == (before[0], before[2])
    assert c.bytes_disk == before[1] + 3 * BLOCK
    seq.check_read(1, 0, BS)  # block 0 head 0 holds pages 0..2 in the pool
    assert c.bytes_ram == before[0] + 3 * PAGE * ROW_BYTES
    assert c.bytes_disk == before[1] + 3 * BLOCK + BLOCK - 3 * PAGE * ROW_BYTES
    assert (c.hits, c.misses) == (5, 5)  # reads are not page hits or misses


def test_eviction_is_least_recently_used(tmp_path):
    three = _Files(tmp_path, 1, seed=3, n_kv=3)
    pool = HostPool(2 * PAGE_BYTES)  # room for two pages
    tiers = SequenceTiers(pool, [1], BS, PAGE)
    kv = three.layer(0, 1)
    tiers.add_block(0, 1, kv.keys, kv.values, on_disk=True)
    p = np.array([0])
    c = pool.counters
    for head in (0, 1, 0, 2):  # head 0 touched again: head 1 is the oldest when 2 comes
        tiers.gather(1, head, p)
    assert (c.hits, c.misses, c.evictions) == (1, 3, 1)
    tiers.gather(1, 0, p)
    assert c.hits == 2
    tiers.gather(1, 1, p)
    assert (c.misses, c.evictions) == (4, 2)  # head 1 had gone; head 2 (older than 0) goes now
    tiers.gather(1, 0, p)
    assert c.hits == 3
    assert pool.held_bytes == 2 * PAGE * ROW_BYTES == pool.peak_bytes
    tiers.gather(1, 0, np.array([0, 1]))  # head 0's page 1 comes: head 1 (the oldest) goes
    assert (c.hits, c.misses, c.evictions) == (4, 5, 3)
    assert pool.held_bytes == 2 * PAGE * ROW_BYTES


def test_spill_keeps_the_data_and_the_budget(tmp_path):
    rng = np.random.default_rng(5)
    pool = HostPool(2 * BLOCK)
    seq = _Seq(pool, tmp_path)
    for i in range(4):
        seq.add_all(_ram_block(rng), None, i, on_disk=False)
        assert pool.held_bytes <= pool.budget_bytes
    # the two newest layer-blocks stay pinned, the six before went to the spill file
    assert pool.counters.spilled_bytes == 6 * BLOCK
    assert seq.tiers.nbytes_ram() == 2 * BLOCK and seq.tiers.nbytes_disk() == 6 * BLOCK
    c = pool.counters
    seq.check_gather(3, 0, np.array([3 * PPB]))  # newest: pinned, a hit
    assert (c.hits, c.misses) == (1, 0)
    seq.check_gather(3, 0, np.array([2 * PPB]))  # pinned before the newest came, then spilled
    assert (c.hits, c.misses) == (1, 1)
    for layer in LAYERS:
        seq.check_read(layer, 0, 4 * BS)
        for head in range(N_KV):
            seq.check_gather(layer, head, np.arange(4 * PPB))
    assert list(tmp_path.iterdir()) == []  # the spill file is anonymous
    seq.tiers.release()
    assert pool.held_bytes == 0


def test_pinned_blocks_of_other_sequences_are_not_spilled(tmp_path):
    rng = np.random.default_rng(6)
    pool = HostPool(BLOCK)
    a, b = _Seq(pool, tmp_path), _Seq(pool, tmp_path)
    a.add(1, _ram_block(rng), on_disk=False)
    b.add(1, _ram_block(rng), on_disk=False)  # no room and nothing of b's own to spill
    assert a.tiers.nbytes_ram() == BLOCK and b.tiers.nbytes_ram() == 0
    assert pool.counters.spilled_bytes == BLOCK
    a.check_gather(1, 1, np.arange(PPB))
    b.check_gather(1, 1, np.arange(PPB))


def test_block_files_are_unchanged_after_gathers_and_reads(files):
    before = files.digests()
    pool = HostPool(ENTRY)
    seq = _Seq(pool)
    for i in range(6):
        seq.add_all(None, files, i, on_disk=True)
    rng = np.random.default_rng(7)
    for pages in _page_sets(rng, 6 * PPB):
        seq.check_gather(3, 1, pages)
    seq.check_read(1, 0, 6 * BS)
    assert files.digests() == before
    assert not files.layer(0, 1).keys.packed.flags.writeable


def test_truncate_and_release_free_the_pool(files):
    rng = np.random.default_rng(8)
    pool = HostPool(1 << 30)
    seq = _Seq(pool)
    for i in range(4):
        seq.add_all(None if i < 2 else _ram_block(rng), files if i < 2 else None, i, i < 2)
    for head in range(N_KV):
        seq.check_gather(1, head, np.arange(4 * PPB))
    assert pool.held_bytes == 2 * BLOCK + 2 * len(LAYERS) * BLOCK
    seq.truncate(3 * BS + 5)  # the block at 96 ends after the cut
    assert seq.tiers.length == 3 * BS
    assert pool.held_bytes == 2 * BLOCK + len(LAYERS) * BLOCK
    seq.truncate(BS)
    assert pool.held_bytes == BLOCK  # layer 1's cached heads of block 0
    seq.check_gather(1, 0, np.arange(PPB))
    seq.add(1, _ram_block(rng), on_disk=False)  # grows again from the cut
    seq.tiers.release()
    assert pool.held_bytes == 0 and seq.tiers.length == 0 and seq.tiers.nbytes_disk() == 0
    kv = _ram_block(rng)
    seq.tiers.add_block(0, 1, kv.keys, kv.values, on_disk=False)
    assert pool.held_bytes == BLOCK
    dropped = _Seq(pool)
    dropped.add_all(_ram_block(rng), None, 0, on_disk=False)
    assert pool.held_bytes == BLOCK + 2 * BLOCK
    del dropped
    gc.collect()
    assert pool.held_bytes == BLOCK  # the finalizer gave the dropped sequence's bytes back


@pytest.mark.parametrize("budget", [0, ENTRY // 2, ENTRY, 3 * ENTRY, 3 * BLOCK])
def test_budget_holds_under_random_operations(files, tmp_path, budget):
    rng = np.random.default_rng(budget)
    pool = HostPool(budget)
    seqs = [_Seq(pool, tmp_path) for _ in range(3)]
    gathered = 0
    for _ in range(150):
        seq = seqs[rng.integers(len(seqs))]
        op = rng.random()
        n = len(seq.held[LAYERS[0]])
        if op < 0.35 and n < 6:
            on_disk = bool(rng.random() < 0.5)
            seq.add_all(None if on_disk else _ram_block(rng), files, n, on_disk)
        elif op < 0.75 and n:
            pages = np.sort(rng.choice(n * PPB, rng.integers(0, n * PPB + 1), replace=False))
            seq.check_gather(LAYERS[rng.integers(2)], int(rng.integers(N_KV)), pages)
            gathered += len(pages)
        elif op < 0.85 and n:
            a, b = np.sort(rng.integers(0, n + 1, 2)) * BS
            seq.check_read(LAYERS[rng.integers(2)], int(a), int(b))
        elif op < 0.95:
            seq.truncate(int(rng.integers(0, n * BS + 1)))
        else:
            seq.tiers.release()
            seq.held = {layer: [] for layer in LAYERS}
        assert pool.held_bytes <= budget
        assert pool.held_bytes == sum(s.tiers.nbytes_ram() for s in seqs)
        assert pool.peak_bytes <= budget
    c = pool.counters
    assert c.hits + c.misses == gathered
    assert gathered > 0


def test_concurrent_gathers_share_the_pool(files):
    pool = HostPool(3 * ENTRY)
    seqs = [_Seq(pool) for _ in range(2)]
    for seq in seqs:
        for i in range(6):
            seq.add_all(None, files, i, on_disk=True)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                pages = np.sort(rng.choice(6 * PPB, 5, replace=False))
                seqs[seed % 2].check_gather(LAYERS[seed % 2], int(rng.integers(N_KV)), pages)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.held_bytes <= pool.budget_bytes
    assert pool.counters.hits + pool.counters.misses == 4 * 40 * 5


def _check_gather_layer(seq: _Seq, layer: int, selected: np.ndarray) -> None:
    rows, counts = seq.tiers.gather_layer(layer, selected)
    np.testing.assert_array_equal(counts, selected.sum(1))
    assert len(rows) == 6
    want = [
        np.concatenate(parts)
        for parts in zip(
            *(seq.expected(layer, h, np.flatnonzero(selected[h])) for h in range(N_KV)),
            strict=True,
        )
    ]
    for g, w in zip(rows, want, strict=True):
        assert g.dtype == w.dtype and g.flags.c_contiguous
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("budget", [0, 3 * PAGE_BYTES, ENTRY, 3 * BLOCK, 1 << 30])
def test_gather_layer_equals_the_heads_gathered_one_by_one(files, tmp_path, budget):
    rng = np.random.default_rng(11)
    pool = HostPool(budget)
    seq = _Seq(pool, tmp_path)
    for i in range(5):
        seq.add_all(_ram_block(rng) if i == 4 else None, files, i, on_disk=i < 4)
    n = 5 * PPB
    selections = [
        np.ones((N_KV, n), bool),
        np.zeros((N_KV, n), bool),
        np.ones((N_KV, n - PPB), bool),  # fewer pages than held: the rest unselected
        np.stack([np.zeros(n, bool), np.ones(n, bool)]),  # an empty head
        *(rng.random((N_KV, n)) < rng.random() for _ in range(12)),
    ]
    for _ in range(2):  # again, from the pool where it fits
        for selected in selections:
            for layer in LAYERS:
                _check_gather_layer(seq, layer, selected)
                assert pool.held_bytes <= budget
    c = pool.counters
    assert c.hits + c.misses == 2 * len(LAYERS) * sum(int(s.sum()) for s in selections)
    assert seq.tiers.nbytes_ram() == pool.held_bytes
    if budget == 1 << 30:  # all fits: each disk page was read once
        assert c.misses == len(LAYERS) * N_KV * 4 * PPB
        misses = c.misses
        _check_gather_layer(seq, 3, np.ones((N_KV, n), bool))
        assert c.misses == misses
    with pytest.raises(ValueError, match="layer 1: selected must be a bool array \\[2, <= 20\\]"):
        seq.tiers.gather_layer(1, np.ones((N_KV, n + 1), bool))
    with pytest.raises(ValueError, match="layer 3: selected must be a bool array"):
        seq.tiers.gather_layer(3, np.ones((N_KV + 1, n), bool))
    with pytest.raises(ValueError, match="layer 3: selected must be a bool array"):
        seq.tiers.gather_layer(3, np.ones((N_KV, n), np.int64))


def test_gather_layer_hits_after_the_first_sweep_and_counts_pages(files):
    pool = HostPool(1 << 30)
    seq = _Seq(pool)
    for i in range(3):
        seq.add_all(None, files, i, on_disk=True)
    selected = np.zeros((N_KV, 3 * PPB), bool)
    selected[0, [0, 5, 9]] = selected[1, [1, 5]] = True
    _check_gather_layer(seq, 1, selected)
    c = pool.counters
    assert (c.hits, c.misses, c.bytes_disk) == (0, 5, 5 * PAGE_BYTES)
    assert pool.held_bytes == 5 * PAGE_BYTES
    selected[1, 2] = True
    _check_gather_layer(seq, 1, selected)
    assert (c.hits, c.misses, c.bytes_ram) == (5, 6, 5 * PAGE_BYTES)
    assert seq.tiers.counters.hit_rate == c.hit_rate == 5 / 11


def test_pinning_a_block_shrinks_the_slab_within_the_budget(tmp_path):
    rng = np.random.default_rng(12)
    files = _Files(tmp_path, 2, seed=12)
    pool = HostPool(BLOCK + 4 * PAGE_BYTES)
    seq = _Seq(pool, tmp_path)
    for i in range(2):
        seq.add_all(None, files, i, on_disk=True)
    _check_gather_layer(seq, 1, np.ones((N_KV, 2 * PPB), bool))
    room = (BLOCK + 4 * PAGE_BYTES) // PAGE_BYTES
    assert pool.held_bytes == room * PAGE_BYTES  # the rest served, not cached
    assert pool.counters.evictions == 0  # a call's pages do not evict each other
    seq.add(1, _ram_block(rng), on_disk=False)  # pinned: only four pages stay beside it
    assert seq.tiers.nbytes_disk() == 4 * BLOCK  # not spilled
    assert pool.held_bytes == BLOCK + 4 * PAGE_BYTES
    assert pool.counters.evictions == room - 4
    _check_gather_layer(seq, 1, np.ones((N_KV, 3 * PPB), bool))
    assert pool.held_bytes <= pool.budget_bytes
    seq.check_read(1, 0, 3 * BS)


def test_pages_of_another_layout_are_served_without_caching(files, tmp_path):
    pool = HostPool(1 << 30)
    a, b = _Seq(pool), _Seq(pool, page=2 * PAGE)  # the first to cache sets the slab's pages
    for seq in (a, b):
        seq.add_all(None, files, 0, on_disk=True)
    a.check_gather(1, 0, np.arange(PPB))
    held = pool.held_bytes
    assert held == PPB * PAGE_BYTES
    for _ in range(2):
        b.check_gather(1, 0, np.arange(PPB // 2))
    assert pool.held_bytes == held and b.tiers.counters.hits == 0
    a.tiers.release()
    assert pool.held_bytes == 0
    b.check_gather(1, 0, np.arange(PPB // 2))  # the slab was emptied: b's pages now
    b.check_gather(1, 0, np.arange(PPB // 2))
    assert b.tiers.counters.hits == PPB // 2
    b.check_read(1, 0, BS)


def test_disk_tier_arrays_in_separate_buffers_are_read_part_by_part(files):
    rng = np.random.default_rng(13)
    pool = HostPool(ENTRY)
    seq = _Seq(pool)
    seq.add_all(None, files, 0, on_disk=True)  # one file: all parts of a page in one take
    seq.add_all(_ram_block(rng), None, 1, on_disk=True)  # six arrays of their own
    for _ in range(2):
        _check_gather_layer(seq, 1, rng.random((N_KV, 2 * PPB)) < 0.6)
        seq.check_read(3, 0, 2 * BS)


def test_prefetch_puts_disk_pages_into_the_pool_for_the_next_gather(files, tmp_path):
    rng = np.random.default_rng(21)
    pool = HostPool(1 << 30)
    seq = _Seq(pool, tmp_path)
    for i in range(4):
        seq.add_all(_ram_block(rng) if i == 3 else None, files, i, on_disk=i < 3)
    n = 4 * PPB
    ahead = np.zeros((N_KV, n), bool)
    ahead[0, [1, 4, 13]] = ahead[1, [0, 2, 3]] = True  # 13: a pinned (RAM) block's page
    seq.tiers.prefetch(1, ahead)
    pool.wait_prefetch()
    c = pool.counters
    assert (c.prefetched, c.bytes_prefetched) == (5, 5 * PAGE_BYTES)
    assert seq.tiers.counters.prefetched == 5
    assert (c.hits, c.misses) == (0, 0)  # reading ahead is neither
    _check_gather_layer(seq, 1, ahead)
    assert (c.hits, c.misses) == (6, 0)  # the five prefetched and the pinned page
    seq.tiers.prefetch(1, ahead)  # all there already: nothing read
    pool.wait_prefetch()
    assert c.prefetched == 5
    _check_gather_layer(seq, 3, ahead)  # another layer: not prefetched
    assert c.misses == 5


def test_prefetch_fills_only_free_room_and_evicts_nothing(files):
    pool = HostPool(4 * PAGE_BYTES)
    seq = _Seq(pool)
    for i in range(3):
        seq.add_all(None, files, i, on_disk=True)
    first = np.zeros((N_KV, 3 * PPB), bool)
    first[0, [0, 1, 2]] = True
    _check_gather_layer(seq, 1, first)  # 3 of the 4 slots
    ahead = np.zeros_like(first)
    ahead[1, [5, 6, 7]] = True
    seq.tiers.prefetch(1, ahead)
    pool.wait_prefetch()
    c = pool.counters
    assert c.prefetched == 1 and c.evictions == 0  # one free slot, the first page asked
    assert pool.held_bytes == 4 * PAGE_BYTES <= pool.budget_bytes
    _check_gather_layer(seq, 1, first | ahead)
    assert c.hits == 4  # the three gathered before, the one prefetched


class _HeldRead:
    """Holds the pool's I/O thread between its read of the files and its insert into the
    pool, so that a test can change the pool meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tiers: SequenceTiers) -> None:
        self.reading, self.go = threading.Event(), threading.Event()
        read = tiers._read_blocks

        def held(*args):
            out = read(*args)
            if threading.current_thread().name == "edge-infer-prefetch":
                self.reading.set()
                assert self.go.wait(10)
            return out

        monkeypatch.setattr(tiers, "_read_blocks", held)


def test_prefetch_of_blocks_replaced_while_read_is_dropped(files, monkeypatch):
    pool = HostPool(1 << 30)
    seq = _Seq(pool)
    for i in range(3):
        seq.add_all(None, files, i, on_disk=True)
    hold = _HeldRead(monkeypatch, seq.tiers)
    seq.tiers.prefetch(3, np.ones((N_KV, 3 * PPB), bool))
    assert hold.reading.wait(10)
    seq.truncate(BS)  # blocks 1 and 2 go; others take their place
    seq.add_all(None, files, 4, on_disk=True)
    seq.add_all(None, files, 5, on_disk=True)
    hold.go.set()
    pool.wait_prefetch()
    # only the first block's pages went in: the others were read from files no longer held
    assert pool.counters.prefetched == N_KV * PPB
    c = pool.counters
    _check_gather_layer(seq, 3, np.ones((N_KV, 3 * PPB), bool))
    assert (c.hits, c.misses) == (N_KV * PPB, 2 * N_KV * PPB)


def test_prefetch_takes_only_room_still_free_after_its_read(files, monkeypatch):
    pool = HostPool(6 * PAGE_BYTES)
    seq = _Seq(pool)
    for i in range(3):
        seq.add_all(None, files, i, on_disk=True)
    hold = _HeldRead(monkeypatch, seq.tiers)
    ahead = np.zeros((N_KV, 3 * PPB), bool)
    ahead[0, :4] = True
    seq.tiers.prefetch(1, ahead)  # room for all four when it looks
    assert hold.reading.wait(10)
    mine = np.zeros_like(ahead)
    mine[1, :4] = True
    _check_gather_layer(seq, 1, mine)  # meanwhile a step takes four of the six slots
    hold.go.set()
    pool.wait_prefetch()
    c = pool.counters
    assert c.evictions == 0 and c.prefetched == 2
    assert pool.held_bytes == 6 * PAGE_BYTES
    _check_gather_layer(seq, 1, mine)  # the step's pages are all still there
    assert c.hits == 4


def test_prefetch_beside_gathers_keeps_rows_and_budget(files, tmp_path):
    rng = np.random.default_rng(22)
    pool = HostPool(60 * PAGE_BYTES)  # of the 80 pages held: room some of the time
    seq = _Seq(pool, tmp_path)
    for i in range(5):
        seq.add_all(None, files, i, on_disk=True)
    digests = files.digests()
    n = 5 * PPB
    for step in range(40):
        for layer in LAYERS:
            _check_gather_layer(seq, layer, rng.random((N_KV, n)) < 0.2)
            seq.tiers.prefetch(layer, rng.random((N_KV, n)) < 0.2)
            assert pool.held_bytes <= pool.budget_bytes
        if step % 10 == 9:
            seq.truncate(4 * BS)
            seq.add_all(None, files, 4, on_disk=True)
    pool.wait_prefetch()
    assert pool.peak_bytes <= pool.budget_bytes
    assert pool.counters.prefetched > 0
    assert files.digests() == digests


def test_prefetch_refuses_what_is_not_a_selection(files):
    seq = _Seq(HostPool(1 << 20))
    seq.add_all(None, files, 0, on_disk=True)
    bad = "layer 1: selected must be a bool array \\[2, <= 4\\], got"
    with pytest.raises(ValueError, match=bad + " bool \\[4\\]"):
        seq.tiers.prefetch(1, np.ones(PPB, bool))
    with pytest.raises(ValueError, match=bad + " bool \\[3, 4\\]"):
        seq.tiers.prefetch(1, np.ones((N_KV + 1, PPB), bool))
    with pytest.raises(ValueError, match=bad + " bool \\[2, 5\\]"):
        seq.tiers.prefetch(1, np.ones((N_KV, PPB + 1), bool))
    with pytest.raises(ValueError, match=bad + " int64"):
        seq.tiers.prefetch(1, np.ones((N_KV, PPB), np.int64))
    with pytest.raises(ValueError, match="layer 2 is not offloaded here"):
        seq.tiers.prefetch(2, np.ones((N_KV, PPB), bool))
