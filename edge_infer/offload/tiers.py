"""Tiers for offloaded layers' sealed KV: a shared host-memory pool under a byte budget, disk."""

from __future__ import annotations

import itertools
import mmap
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from edge_infer.cache_store.kv_format import QuantizedKV

Rows = tuple[np.ndarray, ...]
"""``(k_packed, k_scales, k_biases, v_packed, v_scales, v_biases)``."""

EntryKey = tuple[int, int, int, int]
"""``(owner, layer, block start, kv head)`` of a pool entry."""

_owners = itertools.count()
# spill writes start on mmap's granularity so each spilled block maps on its own
_SPILL_ALIGN = mmap.ALLOCATIONGRANULARITY


@dataclass
class TierCounters:
    """What tiers served: one sequence's, or every sequence's of one pool."""

    hits: int = 0  # pages served from host memory
    misses: int = 0  # pages read from the disk tier
    bytes_ram: int = 0  # bytes of KV rows copied out of host memory
    bytes_disk: int = 0  # bytes of KV rows read from the disk tier
    evictions: int = 0  # pool entries dropped to make room
    spilled_bytes: int = 0  # bytes written to a spill file

    @property
    def hit_rate(self) -> float:
        seen = self.hits + self.misses
        return self.hits / seen if seen else 1.0

    def add_reads(self, reads: TierCounters) -> None:
        """Add the hits, misses and bytes of ``reads``."""
        self.hits += reads.hits
        self.misses += reads.misses
        self.bytes_ram += reads.bytes_ram
        self.bytes_disk += reads.bytes_disk


class _Entry:
    """The pages of one KV head of one disk-tier block that the pool holds, packed: only
    those pages take memory (a selection touches a few pages of every block, so entries
    the size of whole blocks would leave room for a fraction of what a step reads)."""

    __slots__ = ("rows", "slot", "nbytes", "page_nbytes")

    def __init__(self, like: Rows) -> None:
        self.rows = tuple(np.empty((0, *r.shape[1:]), r.dtype) for r in like)  # [n, page, w]
        self.slot = np.full(len(like[0]), -1, np.int64)  # page -> its row in ``rows``, or -1
        self.nbytes = 0
        self.page_nbytes = sum(r[0].nbytes for r in like)

    @property
    def present(self) -> np.ndarray:
        return self.slot >= 0

    def add(self, pages: np.ndarray, rows: Rows) -> None:
        """Hold ``pages`` (absent so far) with their rows ([len(pages), page, w] each)."""
        n = len(self.rows[0])
        self.rows = tuple(
            np.concatenate([old, new]) for old, new in zip(self.rows, rows, strict=True)
        )
        self.slot[pages] = np.arange(n, n + len(pages))
        self.nbytes += len(pages) * self.page_nbytes


class HostPool:
    """Host memory for offloaded KV under a byte budget, shared by an engine's sequences (LRU)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
        self.budget_bytes = int(budget_bytes)
        self.counters = TierCounters()
        # a prefetch thread gathers while the decode thread adds blocks; reentrant because a
        # weakref finalizer may release a sequence from inside a pool call of the same thread
        self._lock = threading.RLock()
        self._cache: OrderedDict[EntryKey, _Entry] = OrderedDict()  # least recently used first
        self._pinned = 0
        self._cached = 0
        self._peak = 0
        self._pinned_by: dict[int, int] = {}
        self._cached_by: dict[int, int] = {}

    @property
    def held_bytes(self) -> int:
        return self._pinned + self._cached

    @property
    def peak_bytes(self) -> int:
        return self._peak

    def _pin(self, owner: int, nbytes: int) -> None:
        self._pinned += nbytes
        self._pinned_by[owner] = self._pinned_by.get(owner, 0) + nbytes
        self._peak = max(self._peak, self.held_bytes)

    def _unpin(self, owner: int, nbytes: int) -> None:
        self._pinned -= nbytes
        self._pinned_by[owner] -= nbytes

    def _evict(self, need: int) -> None:
        """Drop least recently used entries until ``need`` more bytes fit (or none are left)."""
        while self._cache and self.held_bytes + need > self.budget_bytes:
            key, entry = self._cache.popitem(last=False)
            self._forget(key[0], entry)
            self.counters.evictions += 1

    def _grow(self, key: EntryKey, entry: _Entry, need: int) -> bool:
        """Make room for ``need`` more bytes of the held ``entry`` (most recently used),
        evicting other entries; False (and nothing evicted) when it cannot fit."""
        if self._pinned + entry.nbytes + need > self.budget_bytes:
            return False
        del self._cache[key]  # not a candidate for eviction itself
        self._evict(need)
        self._cache[key] = entry
        self._cached += need
        self._cached_by[key[0]] = self._cached_by.get(key[0], 0) + need
        self._peak = max(self._peak, self.held_bytes)
        return True

    def _forget(self, owner: int, entry: _Entry) -> None:
        self._cached -= entry.nbytes
        self._cached_by[owner] -= entry.nbytes

    def _insert(self, key: EntryKey, entry: _Entry) -> bool:
        """Hold ``entry`` if it fits after evicting unpinned entries; False (nothing evicted)
        when even an empty cache could not make room."""
        if self._pinned + entry.nbytes > self.budget_bytes:
            return False
        self._evict(entry.nbytes)
        self._cache[key] = entry
        self._cached += entry.nbytes
        self._cached_by[key[0]] = self._cached_by.get(key[0], 0) + entry.nbytes
        self._peak = max(self._peak, self.held_bytes)
        return True

    def _drop(self, owner: int, keep: Callable[[EntryKey], bool] = lambda key: False) -> None:
        """Drop the entries of ``owner`` that ``keep`` rejects."""
        # a snapshot: a finalizer run by the collector could touch the dict meanwhile
        for key in [k for k in self._cache if k[0] == owner and not keep(k)]:
            entry = self._cache.pop(key, None)
            if entry is not None:
                self._forget(owner, entry)


def _release(pool: HostPool, owner: int, spill: list[IO[bytes] | None]) -> None:
    """Give back everything ``owner`` holds in ``pool`` and close its spill file (no
    reference to the sequence itself, so a weakref finalizer can call it)."""
    with pool._lock:
        pool._drop(owner)
        pool._pinned -= pool._pinned_by.pop(owner, 0)
        pool._cached_by.pop(owner, None)
    if spill[0] is not None:
        spill[0].close()  # arrays mapped from it stay valid: the mappings outlive the file
        spill[0] = None


@dataclass(eq=False)
class _Block:
    start: int
    rows: Rows  # [n_kv, block_size, w] each: pool memory when pinned, else file views
    pinned: bool
    nbytes: int
    paged: dict[int, Rows] = field(default_factory=dict)  # head -> rows as [pages, page, w]

    def head(self, head: int, page: int) -> Rows:
        """One head's rows page by page (views, made once: gather runs per block per call)."""
        views = self.paged.get(head)
        if views is None:
            views = self.paged[head] = tuple(
                r[head].reshape(-1, page, r.shape[2]) for r in self.rows
            )
        return views


@dataclass(frozen=True)
class _Layout:
    widths: tuple[tuple[int, ...], ...]  # per part: (n_kv, w)
    dtypes: tuple[np.dtype, ...]
    bits: tuple[int, int]  # keys, values
    group_size: tuple[int, int]
    row_bytes: int  # one token of one head, all six parts


def _layout(rows: Rows, keys: QuantizedKV, values: QuantizedKV) -> _Layout:
    return _Layout(
        tuple((r.shape[0], r.shape[2]) for r in rows),
        tuple(r.dtype for r in rows),
        (keys.bits, values.bits),
        (keys.group_size, values.group_size),
        sum(r.shape[2] * r.dtype.itemsize for r in rows),
    )


class SequenceTiers:
    """One sequence's offloaded sealed KV, block by block: rows in the pool or on disk."""

    def __init__(
        self,
        pool: HostPool,
        layers: Sequence[int],
        block_size: int,
        page: int,
        spill_dir: str | Path | None = None,
    ) -> None:
        if block_size < 1 or page < 1 or block_size % page:
            raise ValueError(f"page={page} must divide block_size={block_size}")
        self.pool = pool
        self.layers = tuple(int(x) for x in layers)
        self.block_size = int(block_size)
        self.page = int(page)
        self._pages_per_block = self.block_size // self.page
        self._spill_dir = spill_dir
        self._owner = next(_owners)
        self._blocks: dict[int, list[_Block]] = {layer: [] for layer in self.layers}
        self._layouts: dict[int, _Layout] = {}
        self._pinned_order: OrderedDict[tuple[int, int], _Block] = OrderedDict()  # oldest first
        self._spill: list[IO[bytes] | None] = [None]
        self._finalizer = weakref.finalize(self, _release, pool, self._owner, self._spill)
        self.counters = TierCounters()  # this sequence's reads (the pool's count everyone's)

    # -- adding -------------------------------------------------------------------------

    def add_block(
        self, start: int, layer: int, keys: QuantizedKV, values: QuantizedKV, on_disk: bool
    ) -> None:
        """Hold the block at ``start`` of ``layer``: ``on_disk`` arrays are file views used
        in place; others are copied into the pool, pinned (or spilled when it is full)."""
        blocks = self._layer(layer)
        expected = blocks[-1].start + self.block_size if blocks else 0
        if start != expected:
            raise ValueError(
                f"layer {layer}: block at {start} does not follow (expected {expected})"
            )
        if keys.length != self.block_size or values.length != self.block_size:
            raise ValueError(
                f"layer {layer}: block at {start} holds {keys.length}/{values.length} tokens,"
                f" block_size is {self.block_size}"
            )
        rows = (keys.packed, keys.scales, keys.biases, values.packed, values.scales, values.biases)
        layout = _layout(rows, keys, values)
        if self._layouts.setdefault(layer, layout) != layout:
            raise ValueError(f"layer {layer}: block at {start} has another KV layout")
        nbytes = sum(r.nbytes for r in rows)
        with self.pool._lock:
            if not self._finalizer.alive:  # used again after release()
                self._finalizer = weakref.finalize(
                    self, _release, self.pool, self._owner, self._spill
                )
            if on_disk:
                block = _Block(start, rows, False, nbytes)
            else:
                block = self._hold(layer, start, rows, nbytes)
            blocks.append(block)

    def _hold(self, layer: int, start: int, rows: Rows, nbytes: int) -> _Block:
        """A RAM block: pinned in the pool, after evicting unpinned entries and spilling this
        sequence's oldest pinned blocks; spilled itself when the budget cannot take it."""
        pool = self.pool
        pool._evict(nbytes)
        while self._pinned_order and pool.held_bytes + nbytes > pool.budget_bytes:
            _, old = self._pinned_order.popitem(last=False)
            old.rows = self._write_spill(old.rows)
            old.paged.clear()
            old.pinned = False
            pool._unpin(self._owner, old.nbytes)
        if pool.held_bytes + nbytes > pool.budget_bytes:
            return _Block(start, self._write_spill(rows), False, nbytes)
        block = _Block(start, tuple(np.array(r, order="C") for r in rows), True, nbytes)
        pool._pin(self._owner, nbytes)
        self._pinned_order[(layer, start)] = block
        return block

    def _write_spill(self, rows: Rows) -> Rows:
        """Append ``rows`` to this sequence's spill file; read-only views of it."""
        if self._spill[0] is None:
            self._spill[0] = tempfile.TemporaryFile(dir=self._spill_dir)
        f = self._spill[0]
        base = f.seek(0, 2)
        offsets, pos = [], 0
        for r in rows:
            pos = -(-pos // 64) * 64  # aligned rows for the copies out
            offsets.append(pos)
            f.seek(base + pos)
            f.write(memoryview(np.ascontiguousarray(r)).cast("B"))
            pos += r.nbytes
        size = -(-pos // _SPILL_ALIGN) * _SPILL_ALIGN
        f.truncate(base + size)
        f.flush()
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ, offset=base)
        self.pool.counters.spilled_bytes += sum(r.nbytes for r in rows)
        return tuple(
            np.frombuffer(mapped, r.dtype, r.size, off).reshape(r.shape)
            for r, off in zip(rows, offsets, strict=True)
        )

    # -- reading ------------------------------------------------------------------------

    def _layer(self, layer: int) -> list[_Block]:
        blocks = self._blocks.get(layer)
        if blocks is None:
            raise ValueError(f"layer {layer} is not offloaded here (layers {list(self.layers)})")
        return blocks

    def _empty_rows(self, layer: int, n: int) -> Rows:
        layout = self._layouts.get(layer)
        if layout is None:
            return tuple(np.empty((n, 0), dt) for dt in (np.uint32, np.float16, np.float16) * 2)
        return tuple(
            np.empty((n, w), dt) for (_, w), dt in zip(layout.widths, layout.dtypes, strict=True)
        )

    def gather(self, layer: int, head: int, pages: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows of ``pages`` (strictly increasing page numbers; others are refused) of KV
        ``head`` of ``layer``: six contiguous arrays ``[len(pages)*page, w]``."""
        blocks = self._layer(layer)
        pages = np.asarray(pages)
        if pages.ndim != 1 or (pages.size and pages.dtype.kind not in "iu"):
            raise ValueError(f"layer {layer}: pages must be a 1-D integer array")
        pages = pages.astype(np.int64, copy=False)
        self._check_pages(layer, blocks, pages)
        page, ppb = self.page, self._pages_per_block
        out = self._empty_rows(layer, len(pages) * page)
        if not len(pages):
            return out
        n_kv = self._layouts[layer].widths[0][0]
        if not 0 <= head < n_kv:
            raise ValueError(f"layer {layer}: head {head} is out of range ({n_kv} KV heads)")
        row_bytes = self._layouts[layer].row_bytes * page
        blk_of = pages // ppb
        cuts = np.flatnonzero(blk_of[1:] != blk_of[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [len(pages)])).tolist()
        paged_out = tuple(o.reshape(len(pages), page, -1) for o in out)
        counters = TierCounters()  # this call's reads, added to the pool's and ours
        with self.pool._lock:
            for s, e in zip(bounds[:-1], bounds[1:], strict=True):
                b = int(blk_of[s])
                block = blocks[b]
                local = pages[s:e] - b * ppb
                dst = tuple(o[s:e] for o in paged_out)
                if block.pinned:
                    for d, r in zip(dst, block.head(head, page), strict=True):
                        np.take(r, local, 0, d, "clip")
                    counters.hits += e - s
                    counters.bytes_ram += (e - s) * row_bytes
                else:
                    hits = self._serve(layer, head, block, local, dst)
                    counters.hits += hits
                    counters.misses += e - s - hits
                    counters.bytes_ram += hits * row_bytes
                    counters.bytes_disk += (e - s - hits) * row_bytes
            self._count(counters)
        return out

    def _count(self, reads: TierCounters) -> None:
        self.counters.add_reads(reads)
        self.pool.counters.add_reads(reads)

    def _check_pages(self, layer: int, blocks: list[_Block], pages: np.ndarray) -> None:
        if not len(pages):
            return
        held = len(blocks) * self._pages_per_block
        bad = np.flatnonzero((pages < 0) | (pages >= held))
        if bad.size:
            raise ValueError(
                f"layer {layer}: page {int(pages[bad[0]])} is not held ({held} pages held)"
            )
        back = np.flatnonzero(np.diff(pages) <= 0)
        if back.size:
            i = int(back[0])
            raise ValueError(
                f"layer {layer}: pages must be strictly increasing"
                f" (page {int(pages[i + 1])} after {int(pages[i])})"
            )

    def _serve(self, layer: int, head: int, block: _Block, local: np.ndarray, dst: Rows) -> int:
        """Copy ``local`` pages of a disk-tier block into ``dst``, from its pool entry where
        present, else from disk (then kept in the entry); the number served from RAM."""
        pool = self.pool
        key = (self._owner, layer, block.start, head)
        entry = pool._cache.get(key)
        if entry is not None:
            pool._cache.move_to_end(key)
            slots = entry.slot[local]
            have = slots >= 0
            n_hit = int(have.sum())
        else:
            slots, have, n_hit = None, None, 0
        if n_hit == len(local):
            assert entry is not None and slots is not None
            for d, r in zip(dst, entry.rows, strict=True):
                np.take(r, slots, 0, d, "clip")
            return n_hit
        miss = local if have is None else local[~have]
        source = block.head(head, self.page)
        fetched = []
        for i, (d, r) in enumerate(zip(dst, source, strict=True)):
            # fancy indexing a file view reads just those pages' rows
            rows = r[miss]
            fetched.append(rows)
            if have is None or not n_hit:
                d[...] = rows
            else:
                assert entry is not None and slots is not None
                d[~have] = rows
                d[have] = entry.rows[i][slots[have]]
        if entry is None:
            entry = _Entry(source)
            if not pool._insert(key, entry):
                return n_hit  # no room: served, not cached
        if pool._grow(key, entry, len(miss) * entry.page_nbytes):
            entry.add(miss, tuple(fetched))
        return n_hit

    def read(self, layer: int, a: int, b: int) -> tuple[QuantizedKV, QuantizedKV]:
        """All heads of tokens ``[a, b)`` (block-aligned) as (keys, values); a streaming read:
        disk rows are not put into the pool, and the pool's LRU order is left alone."""
        blocks = self._layer(layer)
        bs, ppb, page = self.block_size, self._pages_per_block, self.page
        end = len(blocks) * bs
        if a % bs or b % bs or not 0 <= a <= b <= end:
            raise ValueError(
                f"layer {layer}: read [{a}, {b}) is not block-aligned within the {end} tokens held"
            )
        layout = self._layouts.get(layer)
        if layout is None:
            empty = QuantizedKV.quantize(np.zeros((1, 0, 64), np.float32))
            return empty, empty
        out = tuple(
            np.empty((n, b - a, w), dt)
            for (n, w), dt in zip(layout.widths, layout.dtypes, strict=True)
        )
        n_kv = layout.widths[0][0]
        head_bytes = layout.row_bytes * bs
        counters = TierCounters()  # this call's reads, added to the pool's and ours
        with self.pool._lock:
            for i in range(a // bs, b // bs):
                block = blocks[i]
                t0 = i * bs - a
                dst = tuple(o[:, t0 : t0 + bs] for o in out)
                if block.pinned:
                    for d, r in zip(dst, block.rows, strict=True):
                        d[...] = r
                    counters.bytes_ram += block.nbytes
                    continue
                for h in range(n_kv):
                    entry = self.pool._cache.get((self._owner, layer, block.start, h))
                    have = None if entry is None else entry.present
                    if have is None or not have.any():
                        for d, r in zip(dst, block.rows, strict=True):
                            d[h] = r[h]
                        counters.bytes_disk += head_bytes
                        continue
                    source = block.head(h, page)
                    assert entry is not None
                    for d, r, m in zip(dst, source, entry.rows, strict=True):
                        dh = d[h].reshape(ppb, page, -1)
                        dh[have] = m[entry.slot[have]]
                        dh[~have] = r[~have]
                    n_ram = int(have.sum())
                    counters.bytes_ram += n_ram * page * layout.row_bytes
                    counters.bytes_disk += (ppb - n_ram) * page * layout.row_bytes
            self._count(counters)
        (kb, vb), (kg, vg) = layout.bits, layout.group_size
        return QuantizedKV(*out[:3], kb, kg), QuantizedKV(*out[3:], vb, vg)

    # -- freeing ------------------------------------------------------------------------

    def truncate(self, tokens: int) -> None:
        """Keep the blocks that end at or before ``tokens``; free the rest."""
        keep = max(0, int(tokens)) // self.block_size
        with self.pool._lock:
            for layer, blocks in self._blocks.items():
                for block in blocks[keep:]:
                    if block.pinned:
                        self.pool._unpin(self._owner, block.nbytes)
                        del self._pinned_order[(layer, block.start)]
                del blocks[keep:]
            first_dropped = keep * self.block_size
            self.pool._drop(self._owner, lambda key: key[2] < first_dropped)

    def release(self) -> None:
        """Free this sequence's pool bytes and close its spill file; it holds nothing after."""
        with self.pool._lock:
            self._finalizer()
            for blocks in self._blocks.values():
                blocks.clear()
            self._pinned_order.clear()

    @property
    def length(self) -> int:
        """Sealed tokens held by every layer (the end of the last block)."""
        if not self.layers:
            return 0
        return min(len(blocks) for blocks in self._blocks.values()) * self.block_size

    def nbytes_ram(self) -> int:
        """Bytes of this sequence's entries now in the pool (pinned blocks and cached heads)."""
        return self.pool._pinned_by.get(self._owner, 0) + self.pool._cached_by.get(self._owner, 0)

    def nbytes_disk(self) -> int:
        """Bytes of this sequence's blocks whose rows live on disk (block files or spill)."""
        return sum(b.nbytes for blocks in self._blocks.values() for b in blocks if not b.pinned)
