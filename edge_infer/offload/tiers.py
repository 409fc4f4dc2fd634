"""Tiers for offloaded layers' sealed KV: a shared host-memory pool under a byte budget, disk."""

from __future__ import annotations

import functools
import itertools
import logging
import mmap
import queue
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from edge_infer.cache_store.blocks import buffer_root
from edge_infer.cache_store.kv_format import QuantizedKV

Rows = tuple[np.ndarray, ...]
"""``(k_packed, k_scales, k_biases, v_packed, v_scales, v_biases)``."""

_owners = itertools.count()
log = logging.getLogger(__name__)
# spill writes start on mmap's granularity so each spilled block maps on its own
_SPILL_ALIGN = mmap.ALLOCATIONGRANULARITY
_MIN_SLOTS = 64  # the slab's first size (pages), when the budget has room for that many


@dataclass
class TierCounters:
    """What tiers served: one sequence's, or every sequence's of one pool."""

    hits: int = 0  # pages served from host memory
    misses: int = 0  # pages read from the disk tier
    bytes_ram: int = 0  # bytes of KV rows copied out of host memory
    bytes_disk: int = 0  # bytes of KV rows read from the disk tier
    evictions: int = 0  # pages dropped from the pool to make room
    spilled_bytes: int = 0  # bytes written to a spill file
    prefetched: int = 0  # pages the I/O thread read from the disk tier into the pool
    bytes_prefetched: int = 0  # bytes of KV rows it read

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


Tables = dict[int, np.ndarray]
"""One sequence's slab slots: per layer ``[n_kv, pages held]``, -1 where not in the pool."""


class HostPool:
    """Host memory for offloaded KV under a byte budget, shared by an engine's sequences:
    pinned blocks, and a slab of disk-tier pages (one slot per page of one KV head, LRU)."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes!r}")
        self.budget_bytes = int(budget_bytes)
        self.counters = TierCounters()
        # a prefetch thread gathers while the decode thread adds blocks; reentrant because a
        # weakref finalizer may release a sequence from inside a pool call of the same thread
        self._lock = threading.RLock()
        self._pinned = 0
        self._peak = 0
        self._pinned_by: dict[int, int] = {}
        self._cached_by: dict[int, int] = {}
        self._tables: dict[int, Tables] = {}  # owner -> its slot tables (shared, not copied)
        # the slab: per part [capacity, page, w]; its layout is set by the first page cached
        # (pages of another layout are served without caching) and reset once it is empty
        self._slab: Rows = ()
        self._kind: tuple[tuple[tuple[int, ...], str], ...] = ()
        self._page_nbytes = 0
        self._owner_of = np.empty(0, np.int64)  # -1: a free slot
        self._layer_of = np.empty(0, np.int64)
        self._head_of = np.empty(0, np.int64)
        self._page_of = np.empty(0, np.int64)
        self._used_at = np.empty(0, np.int64)  # the clock of its last gather
        self._n_used = 0
        self._clock = 0
        self._inserting = False
        self._reader: _Prefetcher | None = None

    def _prefetcher(self) -> _Prefetcher:
        """The pool's I/O thread (started on first use, stopped with the pool)."""
        with self._lock:
            if self._reader is None:
                self._reader = _Prefetcher()
                weakref.finalize(self, self._reader.close)
            return self._reader

    def wait_prefetch(self) -> None:
        """Return once every page asked of the I/O thread so far is read (or given up)."""
        if self._reader is not None:
            self._reader.wait()

    def _spare_slots(self, page_nbytes: int) -> int:
        """Slab slots a prefetch may fill: free ones and those the budget lets the slab
        grow by (``page_nbytes``: a page's bytes, for a slab not laid out yet). Never an
        occupied one: a guess must not push out a page that is being read."""
        size = self._page_nbytes or page_nbytes
        free = int((self._owner_of < 0).sum())
        return free + max(0, (self.budget_bytes - self._pinned) // size - len(self._owner_of))

    @property
    def held_bytes(self) -> int:
        return self._pinned + self._n_used * self._page_nbytes

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

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _room(self, extra: int = 0) -> int:
        """Slab slots the budget leaves beside the pinned bytes (and ``extra`` more)."""
        if not self._page_nbytes:
            return 0
        return max(0, self.budget_bytes - self._pinned - extra) // self._page_nbytes

    def _resize(self, capacity: int) -> None:
        """The slab with ``capacity`` slots (occupied slots beyond it evicted first)."""
        old = len(self._owner_of)
        if capacity < old:
            self._free(np.flatnonzero(self._owner_of[capacity:] >= 0) + capacity, evicted=True)
        keep = min(old, capacity)
        slab = []
        for part in self._slab:
            new = np.empty((capacity, *part.shape[1:]), part.dtype)
            new[:keep] = part[:keep]
            slab.append(new)
        self._slab = tuple(slab)
        for name in ("_owner_of", "_layer_of", "_head_of", "_page_of", "_used_at"):
            meta = np.full(capacity, -1, np.int64)
            meta[:keep] = getattr(self, name)[:keep]
            setattr(self, name, meta)

    def _make_room(self, nbytes: int) -> None:
        """Shrink the slab so ``nbytes`` more pinned bytes fit beside it (as far as it can)."""
        room = self._room(nbytes)
        if len(self._owner_of) > room:
            self._resize(room)

    def _free(self, slots: np.ndarray, evicted: bool) -> None:
        """Free ``slots`` and clear them in their owners' tables."""
        slots = slots[self._owner_of[slots] >= 0]  # a finalizer may have freed some meanwhile
        if not slots.size:
            return
        owners, layers = self._owner_of[slots], self._layer_of[slots]
        heads, pages = self._head_of[slots], self._page_of[slots]
        for owner, layer in set(zip(owners.tolist(), layers.tolist(), strict=True)):
            mine = (owners == owner) & (layers == layer)
            self._tables[owner][layer][heads[mine], pages[mine]] = -1
            self._cached_by[owner] -= int(mine.sum()) * self._page_nbytes
        self._owner_of[slots] = -1
        self._n_used -= len(slots)
        if evicted:
            self.counters.evictions += len(slots)

    def _forget(self, owner: int) -> None:
        """Free every slot of ``owner``; the slab goes once it is empty."""
        self._free(np.flatnonzero(self._owner_of == owner), evicted=False)
        if not self._n_used and not self._inserting:
            self._slab, self._kind, self._page_nbytes = (), (), 0
            self._resize(0)

    def _insert(
        self, owner: int, layer: int, heads: np.ndarray, pages: np.ndarray, rows: Rows, clock: int
    ) -> None:
        """Hold the fetched ``rows`` ([n, page, w] each) of (``heads``, ``pages``) of
        ``layer``: free slots first, then the least recently used ones (not those of this
        ``clock``); the first pages only when no more fit, none with another layout."""
        kind = tuple((r.shape[1:], r.dtype.str) for r in rows)
        if kind != self._kind:
            if self._n_used:
                return
            self._slab, self._kind = (), kind
            self._page_nbytes = sum(r[0].nbytes for r in rows)
            self._resize(0)
            self._slab = tuple(np.empty((0, *r.shape[1:]), r.dtype) for r in rows)
        n, room = len(pages), self._room()
        self._inserting = True
        try:
            free = np.flatnonzero(self._owner_of < 0)
            capacity = len(self._owner_of)
            if len(free) < n and capacity < room:
                self._resize(min(room, max(2 * capacity, self._n_used + n, _MIN_SLOTS)))
                free = np.flatnonzero(self._owner_of < 0)
            take = free[:n]
            if len(take) < n:
                # only pages no gather of the last step used may go: when a step reads more
                # than the pool holds, least-recently-used would evict each page just before
                # it is read again (a step reads the layers in the same order each time), so
                # what does not fit is served uncached and the pool keeps a stable part
                step = sum(len(tables) for tables in self._tables.values())
                old = np.flatnonzero((self._owner_of >= 0) & (self._used_at <= clock - step))
                k = min(n - len(take), len(old))
                if k < len(old):
                    old = old[np.argpartition(self._used_at[old], k - 1)[:k]] if k else old[:0]
                self._free(old, evicted=True)
                take = np.concatenate([take, old])
            m = len(take)
            if not m:
                return
            for part, r in zip(self._slab, rows, strict=True):
                part[take] = r[:m]
            self._owner_of[take] = owner
            self._layer_of[take] = layer
            self._head_of[take] = heads[:m]
            self._page_of[take] = pages[:m]
            self._used_at[take] = clock
            self._tables[owner][layer][heads[:m], pages[:m]] = take
            self._n_used += m
            self._cached_by[owner] = self._cached_by.get(owner, 0) + m * self._page_nbytes
            self._peak = max(self._peak, self.held_bytes)
        finally:
            self._inserting = False


class _Prefetcher:
    """A pool's I/O thread: reads the pages a sequence will likely attend next into the
    pool while the decode thread computes (numpy's copies release the GIL, so the page
    faults of the disk reads happen beside the computation). Only the newest request per
    (sequence, layer) is kept: a step that has moved on makes the older one moot."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._pending: dict[tuple[int, int], tuple[weakref.ref, np.ndarray]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="edge-infer-prefetch", daemon=True)
        self._thread.start()

    def submit(self, tiers: SequenceTiers, layer: int, selected: np.ndarray) -> None:
        key = (tiers._owner, layer)
        with self._lock:
            fresh = key not in self._pending
            self._pending[key] = (weakref.ref(tiers), selected)
        if fresh:
            self._queue.put(key)

    def wait(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                with self._lock:
                    ref, selected = self._pending.pop(key)
                tiers = ref()
                if tiers is not None:
                    tiers._prefetch_now(key[1], selected)
                del tiers
            except Exception:  # the step reads a page itself when it is not there: no loss
                log.exception("prefetching KV pages failed")
            finally:
                self._queue.task_done()


def _release(pool: HostPool, owner: int, spill: list[IO[bytes] | None]) -> None:
    """Give back everything ``owner`` holds in ``pool`` and close its spill file (no
    reference to the sequence itself, so a weakref finalizer can call it)."""
    with pool._lock:
        if owner in pool._tables:
            pool._forget(owner)
            pool._tables.pop(owner).clear()
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
    paged: Rows | None = None  # rows as [n_kv * pages, page, w], views made once
    units: _Units | None = None

    def pages(self, page: int) -> Rows:
        if self.paged is None:
            self.paged = tuple(r.reshape(-1, page, r.shape[2]) for r in self.rows)
        return self.paged

    def as_units(self, page: int) -> _Units | None:
        """The block's buffer in units that every page of every part spans whole, when
        all six parts lie in one buffer (a block or spill file): a page of all parts is
        then one take; None otherwise."""
        if self.units is None and not self.pinned:
            self.units = _units(self.rows, page) or _Units(np.empty(0), np.empty(0), np.empty(0), 0)
        return self.units if self.units is not None and self.units.size else None


@dataclass(frozen=True)
class _Units:
    buffer: np.ndarray  # the whole buffer as units of ``size`` bytes: [n, size] uint8
    first: np.ndarray  # [units of a page, all parts]: those of page 0, part after part
    steps: np.ndarray  # units from one page to the next, per unit of ``first``
    size: int
    places: tuple[int, ...] = ()  # the parts' offsets and the unit size: equal, same units


@functools.lru_cache(maxsize=256)
def _unit_places(offsets: tuple[int, ...], chunks: tuple[int, ...]):
    """(unit size, units of page 0, units per page step) of parts at ``offsets`` whose
    pages span ``chunks`` bytes: the same for a layer in every block file, so computed
    once (a resume maps hundreds of blocks)."""
    size = 64
    while size > 1 and any(x % size for x in (*offsets, *chunks)):
        size //= 2
    first = np.concatenate(
        [np.arange(c // size) + off // size for off, c in zip(offsets, chunks, strict=True)]
    )
    steps = np.concatenate([np.full(c // size, c // size) for c in chunks])
    first.flags.writeable = False
    steps.flags.writeable = False
    return size, first, steps


def _units(rows: Rows, page: int) -> _Units | None:
    root = buffer_root(rows[0])
    if root is None or any(buffer_root(r) is not root or not r.flags.c_contiguous for r in rows):
        return None
    try:
        whole = np.frombuffer(root, np.uint8)  # type: ignore[call-overload]
    except (TypeError, ValueError):  # not a buffer (a tensor's storage, say)
        return None
    start = whole.__array_interface__["data"][0]
    offsets = [r.__array_interface__["data"][0] - start for r in rows]
    if any(off < 0 or off + r.nbytes > len(whole) for off, r in zip(offsets, rows, strict=True)):
        return None
    chunks = tuple(page * r.shape[2] * r.itemsize for r in rows)
    size, first, steps = _unit_places(tuple(offsets), chunks)
    buffer = whole[: len(whole) // size * size].reshape(-1, size)
    return _Units(buffer, first, steps, size, (*offsets, *chunks, size))


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
        self._slots: Tables = {}  # the pool clears evicted pages in it
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
            self.pool._tables[self._owner] = self._slots
            if on_disk:
                block = _Block(start, rows, False, nbytes)
            else:
                block = self._hold(layer, start, rows, nbytes)
            blocks.append(block)
            new = np.full((layout.widths[0][0], self._pages_per_block), -1, np.int64)
            table = self._slots.get(layer)
            self._slots[layer] = new if table is None else np.concatenate([table, new], 1)

    def _hold(self, layer: int, start: int, rows: Rows, nbytes: int) -> _Block:
        """A RAM block: pinned in the pool, after shrinking the slab and spilling this
        sequence's oldest pinned blocks; spilled itself when the budget cannot take it."""
        pool = self.pool
        pool._make_room(nbytes)
        while self._pinned_order and pool.held_bytes + nbytes > pool.budget_bytes:
            _, old = self._pinned_order.popitem(last=False)
            old.rows = self._write_spill(old.rows)
            old.paged = old.units = None
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
        if not len(pages):
            return self._empty_rows(layer, 0)
        n_kv = self._layouts[layer].widths[0][0]
        if not 0 <= head < n_kv:
            raise ValueError(f"layer {layer}: head {head} is out of range ({n_kv} KV heads)")
        with self.pool._lock:
            return self._gather(layer, blocks, np.full(len(pages), head, np.int64), pages)

    def _selection(self, layer: int, selected: np.ndarray) -> tuple[list[_Block], np.ndarray]:
        """The layer's blocks and ``selected`` checked: bool ``[n_kv, n]``, n up to the pages
        held (ValueError naming the layer and the shape wanted)."""
        blocks = self._layer(layer)
        selected = np.asarray(selected)
        layout = self._layouts.get(layer)
        n_kv = layout.widths[0][0] if layout is not None else len(selected) if selected.ndim else 0
        held = len(blocks) * self._pages_per_block
        if (
            selected.dtype != np.bool_
            or selected.ndim != 2
            or selected.shape[0] != n_kv
            or selected.shape[1] > held
        ):
            raise ValueError(
                f"layer {layer}: selected must be a bool array [{n_kv}, <= {held}],"
                f" got {selected.dtype} {list(selected.shape)}"
            )
        return blocks, selected

    def gather_layer(self, layer: int, selected: np.ndarray) -> tuple[Rows, np.ndarray]:
        """Rows of the ``selected`` pages (bool ``[n_kv, n]``, n up to the pages held) of
        every KV head of ``layer``, head after head in page order: six contiguous arrays
        ``[selected.sum()*page, w]``, and the pages of each head ``[n_kv]``."""
        blocks, selected = self._selection(layer, selected)
        counts = selected.sum(1)
        heads, pages = np.nonzero(selected)
        if not len(pages):
            return self._empty_rows(layer, 0), counts
        with self.pool._lock:
            return self._gather(layer, blocks, heads, pages), counts

    def _gather(
        self, layer: int, blocks: list[_Block], heads: np.ndarray, pages: np.ndarray
    ) -> Rows:
        """Rows of (``heads``, ``pages``) in that order: from the slab, pinned blocks, or
        the disk tier (then put into the slab); the pool's lock is held."""
        pool, page, ppb = self.pool, self.page, self._pages_per_block
        n = len(pages)
        out = self._empty_rows(layer, n * page)
        paged_out = tuple(o.reshape(n, page, -1) for o in out)
        slots = self._slots[layer][heads, pages]
        block_of = pages // ppb
        pinned = np.fromiter((b.pinned for b in blocks), np.bool_, len(blocks))[block_of]
        clock = pool._tick()
        hit = slots >= 0
        n_slab = int(hit.sum())
        pool._used_at[slots[hit]] = clock
        missed = np.flatnonzero(~hit & ~pinned)
        fetched: Rows = ()
        if missed.size:
            # read and cached first, so that one take per part serves all the slab holds
            missed, fetched = self._read_blocks(blocks, heads, pages, missed, paged_out)
            pool._insert(self._owner, layer, heads[missed], pages[missed], fetched, clock)
            slots = self._slots[layer][heads, pages]
        in_slab = slots >= 0
        if in_slab.any():
            for o, part in zip(paged_out, pool._slab, strict=True):
                np.take(part, np.maximum(slots, 0), 0, o)  # the others are written below
        if missed.size and not in_slab[missed].all():
            for o, f in zip(paged_out, fetched, strict=True):
                o[missed] = f
        n_pinned = 0
        if pinned.any():
            at, rows = self._read_blocks(blocks, heads, pages, np.flatnonzero(pinned), paged_out)
            n_pinned = len(at)
            for o, r in zip(paged_out, rows, strict=True):
                o[at] = r
        hits, misses = n_slab + n_pinned, len(missed)
        page_bytes = self._layouts[layer].row_bytes * page
        reads = TierCounters(hits, misses, hits * page_bytes, misses * page_bytes)
        self._count(reads)
        return out

    def _read_blocks(
        self, blocks: list[_Block], heads: np.ndarray, pages: np.ndarray, at: np.ndarray, like: Rows
    ) -> tuple[np.ndarray, Rows]:
        """The pages ``at`` sorted by block, and their rows ([len(at), page, w] each, in that
        order), block by block: one take of all parts from a file's buffer, else one per
        part (a file view reads just those pages)."""
        ppb = self._pages_per_block
        block_of = pages[at] // ppb
        order = np.argsort(block_of, kind="stable")
        at, block_of = at[order], block_of[order]
        flat = heads[at] * ppb + pages[at] - block_of * ppb  # page of the block, all heads
        # all parts of a page side by side in one buffer, each part a view of its columns
        widths = [self.page * o.shape[2] * o.itemsize for o in like]
        joined = np.empty((len(at), sum(widths)), np.uint8)
        cols = np.cumsum([0, *widths])
        rows = tuple(
            joined[:, a:b].view(o.dtype).reshape(len(at), self.page, -1)
            for o, a, b in zip(like, cols[:-1], cols[1:], strict=True)
        )
        cuts = np.flatnonzero(block_of[1:] != block_of[:-1]) + 1
        bounds = [0, *cuts.tolist(), len(at)]
        starts = block_of[bounds[:-1]].tolist()
        runs = [(s, e, blocks[b]) for s, e, b in zip(bounds[:-1], bounds[1:], starts, strict=True)]
        units = [block.as_units(self.page) for _, _, block in runs]
        first = units[0]
        where = None
        if first is not None and all(u is not None and u.places == first.places for u in units):
            where = first.first + flat[:, None] * first.steps  # the same places in every file
        for (s, e, block), u in zip(runs, units, strict=True):
            if u is not None:
                w = where[s:e] if where is not None else u.first + flat[s:e, None] * u.steps
                u.buffer.take(w, 0, joined[s:e].reshape(*w.shape, u.size))
                continue
            for d, r in zip(rows, block.pages(self.page), strict=True):
                d[s:e] = r[flat[s:e]]
        return at, rows

    def prefetch(self, layer: int, selected: np.ndarray) -> None:
        """Ask the pool's I/O thread to read the ``selected`` pages (bool ``[n_kv, n]``, n up
        to the pages held) of ``layer`` that are on disk and not in the pool into it, as far
        as the pool has free room (it evicts nothing). Returns at once; a later gather finds
        them in the pool, or reads them itself when they are not there yet."""
        _, selected = self._selection(layer, selected)
        if selected.any():
            self.pool._prefetcher().submit(self, layer, selected.copy())

    def _prefetch_now(self, layer: int, selected: np.ndarray) -> None:
        """The I/O thread's part of :meth:`prefetch`: pick the pages under the pool's lock,
        read them without it, put those still wanted in under it again (within the free
        room there is then: gathers may have taken some meanwhile)."""
        pool, ppb = self.pool, self._pages_per_block
        with pool._lock:
            blocks, table = self._blocks.get(layer), self._slots.get(layer)
            layout = self._layouts.get(layer)
            if not blocks or table is None or layout is None or self._owner not in pool._tables:
                return
            n = min(selected.shape[1], table.shape[1])
            heads, pages = np.nonzero(selected[:, :n] & (table[:, :n] < 0))
            on_disk = ~np.fromiter((b.pinned for b in blocks), np.bool_, len(blocks))
            keep = on_disk[pages // ppb]
            heads, pages = heads[keep], pages[keep]
            page_bytes = layout.row_bytes * self.page
            spare = pool._spare_slots(page_bytes)
            heads, pages = heads[:spare], pages[:spare]
            held = list(blocks)
        if not len(pages):
            return
        like = tuple(r.reshape(1, self.page, -1) for r in self._empty_rows(layer, self.page))
        at, rows = self._read_blocks(held, heads, pages, np.arange(len(pages)), like)
        heads, pages = heads[at], pages[at]
        with pool._lock:
            blocks, table = self._blocks.get(layer), self._slots.get(layer)
            if not blocks or table is None or self._owner not in pool._tables:
                return
            same = np.array(
                [
                    i < len(blocks) and blocks[i] is held[i] and not blocks[i].pinned
                    for i in (pages // ppb).tolist()
                ],
                dtype=bool,
            )
            same &= pages < table.shape[1]
            same[same] &= table[heads[same], pages[same]] < 0  # a gather may have read it
            # only into room that is still free: _insert would evict to make more
            wanted = np.flatnonzero(same)[: pool._spare_slots(page_bytes)]
            if not len(wanted):
                return
            heads, pages = heads[wanted], pages[wanted]
            pool._insert(
                self._owner, layer, heads, pages, tuple(r[wanted] for r in rows), pool._clock
            )
            got = int((self._slots[layer][heads, pages] >= 0).sum())
            for c in (self.counters, pool.counters):
                c.prefetched += got
                c.bytes_prefetched += got * page_bytes

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
        page_bytes, n_kv = layout.row_bytes * page, layout.widths[0][0]
        counters = TierCounters()  # this call's reads, added to the pool's and ours
        with self.pool._lock:
            table = self._slots.get(layer, np.full((n_kv, 0), -1, np.int64))
            for i in range(a // bs, b // bs):
                block = blocks[i]
                t0 = i * bs - a
                dst = tuple(o[:, t0 : t0 + bs] for o in out)
                if block.pinned:
                    for d, r in zip(dst, block.rows, strict=True):
                        d[...] = r
                    counters.bytes_ram += block.nbytes
                    continue
                slots = table[:, i * ppb : (i + 1) * ppb]
                have = slots >= 0
                n_ram = int(have.sum())
                if not n_ram:
                    for d, r in zip(dst, block.rows, strict=True):
                        d[...] = r
                else:
                    for d, r, part in zip(dst, block.pages(page), self.pool._slab, strict=True):
                        d4 = d.reshape(d.shape[0], ppb, page, -1)
                        d4[have] = part[slots[have]]
                        d4[~have] = r[~have.ravel()]
                counters.bytes_ram += n_ram * page_bytes
                counters.bytes_disk += block.nbytes - n_ram * page_bytes
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
                table = self._slots.get(layer)
                if table is not None:
                    cut = keep * self._pages_per_block
                    gone = table[:, cut:]
                    self.pool._free(gone[gone >= 0], evicted=False)
                    self._slots[layer] = table[:, :cut].copy()

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
        """Bytes of this sequence's KV now in the pool (pinned blocks and cached pages)."""
        return self.pool._pinned_by.get(self._owner, 0) + self.pool._cached_by.get(self._owner, 0)

    def nbytes_disk(self) -> int:
        """Bytes of this sequence's blocks whose rows live on disk (block files or spill)."""
        return sum(b.nbytes for blocks in self._blocks.values() for b in blocks if not b.pinned)
