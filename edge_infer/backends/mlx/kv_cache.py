"""KV cache of one sequence for the MLX backend, in the shared stored format.

As in the torch backend, tokens live in blocks of ``block_size``. The open block is held in
float16; when it fills it is *sealed*: Hadamard-rotated (:mod:`edge_infer.cache_store.rotation`)
and quantized to 4 or 8 bits once, and its float16 rows are dropped. Only the stored form is
held, and attention (:mod:`edge_infer.backends.mlx.kv_attention`) reads it as it is: packed
sealed rows through ``mx.quantized_matmul``, the float16 tail directly. What a query attends
to is a function of positions only (blocks that ended before it quantized, its own block in
float16), so saving, restoring and moving blocks between backends never changes a later token.
One forward call stays inside one block (the backend splits calls to ensure it); the tokens
it stores are committed, and a full block sealed, by :meth:`MLXCache.advance` afterwards.

A sliding-window layer (``windows[i] > 0``) keeps in its quantized buffers only the sealed
blocks a later query can still see (its window and two blocks; row ``r`` holds token
``first + r``), as the torch cache does. The parts of older blocks leave those buffers as
numpy arrays ("hidden" parts, shared with the blocks :meth:`MLXCache.blocks` exports), so
that export, truncation to any earlier token and persistence stay complete; an owner that
holds the blocks elsewhere (or does not need them) frees them with
:meth:`MLXCache.release_hidden`.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from edge_infer.backends.mlx.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.blocks import KVBlock, key_bounds, tokens_to_block_end, truncation
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV, layer_bits
from edge_infer.cache_store.window import HiddenParts, cut_needs_released, unseen_before
from edge_infer.offload.index import SparseState
from edge_infer.offload.tiers import SequenceTiers

DEFAULT_BLOCK_SIZE = 256
TAIL_STEP = 64  # rows the float16 tail grows by: a short tail holds little more than itself

Parts = tuple[mx.array, mx.array, mx.array]
"""Quantized K or V rows: packed uint32, scales and biases float16 ``[n_kv, 1, T, ...]``."""


def _grown(old: mx.array | None, keep: int, shape: tuple[int, ...], dtype: mx.Dtype) -> mx.array:
    """A zeroed ``shape`` buffer with the first ``keep`` rows (axis 2) of ``old``."""
    if old is None or keep == 0:
        return mx.zeros(shape, dtype=dtype)
    rest = (*shape[:2], shape[2] - keep, shape[3])
    return mx.concatenate([old[:, :, :keep], mx.zeros(rest, dtype=dtype)], axis=2)


def _rows(x: mx.array, n: int) -> mx.array:
    """The first ``n`` rows (axis 2) of a buffer, without a slice when they are all of it."""
    return x if x.shape[2] == n else x[:, :, :n]


def _span(x: mx.array, a: int, b: int) -> mx.array:
    """Rows ``a..b`` (axis 2) of a buffer, without a slice when they are all of it."""
    return x if a == 0 and x.shape[2] == b else x[:, :, a:b]


def hadamard_rotate(x: mx.array, scale: float = 1.0) -> mx.array:
    """``scale * x @ H`` along the last axis, H the normalized Hadamard matrix of
    :mod:`edge_infer.cache_store.rotation` (symmetric, its own inverse)."""
    return mx.hadamard_transform(x, scale=scale / math.sqrt(x.shape[-1]))


class MLXCache:
    """Per layer: the sealed blocks' quantized K and V, and the open block's float16 rows.

    Buffers are ``[n_kv, 1, capacity, ...]``: the unit axis lets a KV head's group of query
    heads broadcast over its rows. The sealed part grows by whole blocks with an
    eighth of headroom (so a long prefill copies it a bounded number of times), but for a
    sliding-window layer's, which has a fixed number of rows (``windows``); the tail grows
    by :data:`TAIL_STEP` rows and is released when its block seals. With ``kv_bits=16`` every
    token stays float16 in the tail buffer, which then starts at token 0.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        kv_bits: int,
        group_size: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        windows: list[int] | None = None,
        bounded: bool = True,
    ) -> None:
        if kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16 (got {kv_bits})")
        if kv_bits < 16 and head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of group size {group_size}")
        if kv_bits < 16 and head_dim & (head_dim - 1):
            raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
        self.num_layers, self.n_kv, self.head_dim = num_layers, num_kv_heads, head_dim
        self.bits, self.group_size, self.block_size = kv_bits, group_size, block_size
        self._length = 0
        self._sealed = 0
        self._capacity = 0  # rows of the global layers' sealed buffers
        self._quant: list[list[list[mx.array]]] = [[[], []] for _ in range(num_layers)]
        self._tail: list[list[mx.array | None]] = [[None, None] for _ in range(num_layers)]
        # per layer, how many latest tokens a query sees (0 = all: a global layer)
        self.windows = list(windows) if windows is not None else [0] * num_layers
        if len(self.windows) != num_layers or min(self.windows, default=0) < 0:
            raise ValueError(f"windows must list {num_layers} sizes >= 0 (got {windows})")
        self.layer_bits = layer_bits(kv_bits, self.windows)
        # sliding-window layers hold sealed tokens first[i].. in their quantized buffers (a
        # fixed number of rows); the parts of older sealed blocks are "hidden": numpy arrays
        # by block start, unless released
        # (``bounded=False`` keeps every block in the buffers: the reference of tests)
        self._bounded = [bool(w) and kv_bits < 16 and bounded for w in self.windows]
        self._first = [0] * num_layers
        self._hidden = HiddenParts(block_size)

    # -- what attention reads ---------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens held (committed)."""
        return self._length

    @property
    def sealed_length(self) -> int:
        """Tokens in sealed blocks; quantized unless KV is float16."""
        return self._sealed

    @property
    def quantized(self) -> bool:
        """True when sealed blocks are stored quantized (4 or 8 bits)."""
        return self.bits < 16

    @property
    def tail_start(self) -> int:
        """The token held in the tail buffer's first row."""
        return self._sealed if self.quantized else 0

    def held_from(self, layer: int) -> int:
        """The first sealed token the layer's quantized buffers hold (0 but for a
        sliding-window layer whose window has passed earlier blocks)."""
        return min(self._first[layer], self._sealed)

    def sealed_rows(self, layer: int, start: int = 0) -> tuple[Parts, Parts] | None:
        """The layer's quantized K and V parts of sealed tokens ``start..``, or None if none
        are; ``start`` must not precede :meth:`held_from`."""
        if not self.quantized or self._sealed <= start:
            return None
        first = self._first[layer]
        if start < first:
            raise ValueError(f"layer {layer} no longer holds token {start} in its buffers")
        a, b = start - first, self._sealed - first
        k, v = (tuple(_span(t, a, b) for t in self._quant[layer][w]) for w in range(2))
        return k, v  # type: ignore[return-value]

    def tail_rows(self, layer: int, end: int) -> tuple[mx.array, mx.array] | None:
        """The layer's float16 K and V of tokens ``tail_start..end``, or None if none are."""
        n = end - self.tail_start
        if n <= 0:
            return None
        k, v = self._tail[layer]
        assert k is not None and v is not None
        return _rows(k, n), _rows(v, n)

    # -- writing ----------------------------------------------------------------------------
    def max_tokens_in_one_call(self) -> int:
        """How many tokens the next forward may take without crossing a block boundary."""
        return tokens_to_block_end(self._length, self.block_size, self.quantized)

    def update(self, layer: int, keys: mx.array, values: mx.array) -> None:
        """Store keys/values [1, n_kv, T, D] (rounded to float16) after the held tokens;
        attention then reads them with the held ones. :meth:`advance` commits them."""
        t = keys.shape[2]
        keys, values = (x.reshape(self.n_kv, 1, t, self.head_dim) for x in (keys, values))
        if t > self.max_tokens_in_one_call():
            raise ValueError("a forward call must not cross a KV block boundary")
        a = self._length - self.tail_start
        self._reserve_tail(layer, a + t)
        for w, x in enumerate((keys, values)):
            buf = self._tail[layer][w]
            assert buf is not None
            buf[:, :, a : a + t] = x.astype(mx.float16)

    def _reserve_tail(self, layer: int, rows: int) -> None:
        have = self._tail[layer][0]
        cap = 0 if have is None else have.shape[2]
        if rows <= cap:
            return
        if self.quantized:
            new_cap = min(-(-rows // TAIL_STEP) * TAIL_STEP, self.block_size)
        else:
            new_cap = self._headroom(rows)
        keep = self._length - self.tail_start
        shape = (self.n_kv, 1, new_cap, self.head_dim)
        self._tail[layer] = [_grown(x, keep, shape, mx.float16) for x in self._tail[layer]]

    def _headroom(self, rows: int) -> int:
        """Capacity for ``rows`` rows: whole blocks and an eighth more."""
        blocks = -(-rows // self.block_size)
        return (blocks + blocks // 8) * self.block_size

    def _reserve_sealed(self, rows: int, exact: bool = False) -> None:
        if rows <= self._capacity:
            return
        cap = -(-rows // self.block_size) * self.block_size if exact else self._headroom(rows)
        # fresh allocations of their own size: MLX would otherwise hand out cached buffers up
        # to twice as large, and the cache would hold that much more for as long as it lives
        mx.clear_cache()
        for i, layer in enumerate(self._quant):
            if self._bounded[i]:
                if not layer[0]:  # a fixed number of rows, allocated once
                    layer[:] = self._grown_parts(i, self._local_rows(i), 0)
                continue
            layer[:] = self._grown_parts(i, cap, self._sealed)
        self._capacity = cap
        mx.eval([t for layer in self._quant for parts in layer for t in parts])

    def _grown_parts(self, i: int, rows: int, keep: int) -> list[list[mx.array]]:
        """Layer ``i``'s K and V quantized parts with ``rows`` rows, the first ``keep`` of
        the held ones copied."""
        d, bits, g = self.head_dim, self.layer_bits[i], self.group_size
        specs = [(d * bits // 32, mx.uint32), (d // g, mx.float16), (d // g, mx.float16)]
        return [
            [
                _grown(
                    self._quant[i][w][j] if self._quant[i][w] else None,
                    keep,
                    (self.n_kv, 1, rows, width),
                    dtype,
                )
                for j, (width, dtype) in enumerate(specs)
            ]
            for w in range(2)
        ]

    def _local_rows(self, i: int) -> int:
        """Quantized rows a sliding-window layer needs: its window and two blocks (the
        block being sealed, and the one its oldest visible token may start inside)."""
        bs = self.block_size
        return (-(-self.windows[i] // bs) + 2) * bs

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens stored by :meth:`update` (after the call's attention is
        evaluated); seal the block they completed."""
        self._length += n
        if self._sealed + self.block_size > self._length:
            return
        while self._sealed + self.block_size <= self._length:
            self._seal()
        self._drop_unseen()
        mx.eval(self.arrays())

    def _seal(self) -> None:
        a, b = self._sealed, self._sealed + self.block_size
        if not self.quantized:  # float16 blocks are stored as they are
            self._sealed = b
            return
        self._reserve_sealed(b)
        for i in range(self.num_layers):
            if self._bounded[i]:  # room for the block: older rows no query sees go
                self._rebase(i, min(a, self._unseen_before(i, self._length)), a)
            r, q = a - self._first[i], b - self._first[i]
            for w in range(2):
                tail = self._tail[i][w]
                assert tail is not None
                x = hadamard_rotate(tail[:, :, : self.block_size].astype(mx.float32))
                for buf, part in zip(
                    self._quant[i][w],
                    quantize_kv(x, self.layer_bits[i], self.group_size),
                    strict=True,
                ):
                    buf[:, :, r:q] = part
            self._tail[i] = [None, None]  # the next block starts a new tail
        self._sealed = b

    def truncate(self, n: int) -> int:
        """Keep at most the first ``n`` tokens; returns how many are kept.

        Cutting inside a sealed block keeps only the whole sealed blocks before it: the cut
        block's tokens would have been float16, not quantized, so they must be recomputed.
        A sliding-window layer takes back the hidden blocks the new end sees again; if
        some were released, nothing is kept.
        """
        old_sealed = self._sealed
        length, sealed = truncation(n, self._length, old_sealed, self.block_size, self.quantized)
        bounded = [w if b else 0 for w, b in zip(self.windows, self._bounded, strict=True)]
        released = self._hidden.released
        if cut_needs_released(length, sealed, bounded, self._first, released, self.block_size):
            length = sealed = 0  # the window of the new end was released
        self._length, self._sealed = length, sealed
        self._hidden.cut(sealed)
        for i in range(self.num_layers):
            if self._bounded[i]:
                held_end = min(old_sealed, sealed)
                if self._first[i] > sealed:  # its rows are all cut away
                    self._first[i] = held_end = sealed
                self._rebase(i, min(sealed, self._unseen_before(i, length)), held_end)
        mx.eval(self.arrays())
        return self._length

    # -- sliding-window layers --------------------------------------------------------------
    def _unseen_before(self, i: int, length: int) -> int:
        return unseen_before(length, self.windows[i], self.block_size)

    def _drop_unseen(self) -> None:
        for i in range(self.num_layers):
            if self._bounded[i]:
                first = min(self._sealed, self._unseen_before(i, self._length))
                self._rebase(i, max(first, self._first[i]), self._sealed)

    def _rebase(self, i: int, first: int, held_end: int) -> None:
        """Make sliding-window layer ``i``'s buffers hold sealed tokens ``first..sealed``,
        given that they hold ``first[i]..held_end`` and every other block is hidden:
        blocks before ``first`` become hidden, later ones move in from the hidden ones."""
        old, bs = self._first[i], self.block_size
        held_end = max(held_end, old)
        if first == old and held_end == self._sealed:
            return
        if not self._quant[i][0]:
            self._quant[i][:] = self._grown_parts(i, self._local_rows(i), 0)
        if self._sealed - first > self._quant[i][0][0].shape[2]:
            raise ValueError(f"layer {i} cannot hold tokens {first}..{self._sealed}")
        for a in range(old, min(first, held_end), bs):  # leaving the buffers
            self._hidden.put(
                a, i, (self._export(i, 0, a, a + bs, True), self._export(i, 1, a, a + bs, True))
            )
        keep = max(old, first)
        if keep < held_end and first != old:  # the rows kept move to their new place
            n, src, dst = held_end - keep, keep - old, keep - first
            for w in range(2):
                for buf in self._quant[i][w]:
                    buf[:, :, dst : dst + n] = buf[:, :, src : src + n]
        self._first[i] = first
        for a in range(first, self._sealed, bs):  # coming back from the hidden parts
            if keep <= a < held_end:
                continue
            for w in range(2):
                kv = self._hidden.get(a, i, w)
                parts = (kv.packed, kv.scales, kv.biases)
                for buf, part in zip(self._quant[i][w], parts, strict=True):
                    buf[:, :, a - first : a - first + bs] = mx.array(part)[:, None]
            self._hidden.drop(a, i)

    def release_hidden(self, before: int | None = None) -> int:
        """Free the hidden parts of blocks before token ``before`` (all when None): the
        caller holds those blocks elsewhere or does not need them. Afterwards
        :meth:`blocks` cannot export them, and a truncation that would need them keeps
        nothing. Returns the bytes freed."""
        end = self._sealed if before is None else before // self.block_size * self.block_size
        return self._hidden.release(end)

    # -- memory -----------------------------------------------------------------------------
    def arrays(self) -> list[mx.array]:
        """Every array the cache holds."""
        out = [t for layer in self._quant for parts in layer for t in parts]
        return out + [t for layer in self._tail for t in layer if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: its buffers (their whole capacity) and its hidden parts."""
        return self.buffer_nbytes() + self.hidden_nbytes()

    def buffer_nbytes(self, layers: list[int] | None = None) -> int:
        """Bytes of the buffers of ``layers`` (all when None): quantized rows and tails."""
        total = 0
        for i in range(self.num_layers) if layers is None else layers:
            for w in range(2):
                parts = [*self._quant[i][w], self._tail[i][w]]
                total += sum(int(t.nbytes) for t in parts if t is not None)
        return total

    def hidden_nbytes(self) -> int:
        """Bytes of the hidden parts (sliding-window layers' blocks out of their window)."""
        return self._hidden.nbytes

    # -- export / import --------------------------------------------------------------------
    def blocks(self, start: int = 0) -> list[KVBlock]:
        """Stored blocks from the block holding ``start`` on: sealed (quantized, with key
        abstracts) and the float16 tail, as numpy arrays (copies, or the hidden parts
        themselves: those never change)."""
        out, bs = [], self.block_size
        pos = start // bs * bs
        while pos < self._length:
            end = min(pos + bs, self._length)
            sealed = end <= self._sealed
            layers = [
                LayerKV(
                    keys=self._export(i, 0, pos, end, sealed),
                    values=self._export(i, 1, pos, end, sealed),
                )
                for i in range(self.num_layers)
            ]
            abstract = None
            if sealed:
                abstract = [
                    key_bounds(self._readable_keys(i, pos, end)) for i in range(self.num_layers)
                ]
            out.append(KVBlock(pos, end - pos, layers, sealed=sealed, abstract=abstract))
            pos = end
        return out

    def _readable_keys(self, i: int, a: int, b: int) -> np.ndarray:
        """Keys of sealed tokens a..b as attention reads them, float32 [n_kv, b-a, D]."""
        if not self.quantized:
            t = self._tail[i][0]
            assert t is not None
            return np.array(t[:, 0, a:b].astype(mx.float32))
        if a < self._first[i]:
            kv = self._hidden.get(a, i, 0)
            parts = tuple(mx.array(x) for x in (kv.packed, kv.scales, kv.biases))
        else:
            parts = tuple(
                t[:, 0, a - self._first[i] : b - self._first[i]] for t in self._quant[i][0]
            )
        bits = self.layer_bits[i]
        return np.array(hadamard_rotate(dequantize_kv(*parts, bits, self.group_size)))

    def _export(self, i: int, w: int, a: int, b: int, sealed: bool) -> QuantizedKV | np.ndarray:
        if not sealed or not self.quantized:
            t = self._tail[i][w]
            assert t is not None
            off = self.tail_start
            return np.array(t[:, 0, a - off : b - off])
        if a < self._first[i]:
            return self._hidden.get(a, i, w)
        r, q = a - self._first[i], b - self._first[i]
        p, s, z = (np.array(t[:, 0, r:q]) for t in self._quant[i][w])
        bits = self.layer_bits[i]
        return QuantizedKV(
            packed=p.view(np.uint32), scales=s, biases=z, bits=bits, group_size=self.group_size
        )

    def offload(self, tiers: SequenceTiers, sparse: SparseState | None = None) -> None:
        """Not on MLX: its caches keep every layer in (unified) memory."""
        raise ValueError("offloading KV to host memory and disk needs the torch backend")

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append stored blocks (as exported, from any backend) after the held tokens.
        A sliding-window layer takes the sealed parts it will not attend to as hidden
        parts (the block's own arrays, no copy)."""
        pos, sealed_end = self._length, self._sealed
        held_end = self._sealed
        for block in blocks:
            if block.start != pos:
                raise ValueError(f"block at {block.start} does not follow {pos} tokens")
            if len(block.layers) != self.num_layers:
                raise ValueError(
                    f"expected {self.num_layers} layers of KV, got {len(block.layers)}"
                )
            if block.sealed and self.quantized and pos != sealed_end:
                raise ValueError(f"sealed block at {block.start} follows unsealed tokens")
            pos = block.end
            if block.sealed:
                sealed_end = pos
        quant = [b for b in blocks if b.sealed and self.quantized]
        rest = [b for b in blocks if not (b.sealed and self.quantized)]
        if quant:
            self._load_sealed(quant)
        for block in rest:
            for lkv in block.layers:
                for kv in (lkv.keys, lkv.values):
                    if not isinstance(kv, np.ndarray):
                        raise ValueError("expected float16 K/V for an unsealed or float16 block")
        if rest:
            for i in range(self.num_layers):  # room for all of them at once
                self._reserve_tail(i, rest[-1].end - self.tail_start)
        for block in rest:
            for i, lkv in enumerate(block.layers):
                a = block.start - self.tail_start
                for w, kv in enumerate((lkv.keys, lkv.values)):
                    half = mx.array(np.asarray(kv, dtype=np.float16))[:, None]
                    buf = self._tail[i][w]
                    assert buf is not None
                    buf[:, :, a : a + block.length] = half
            self._length = block.end
            if block.sealed:
                self._sealed = block.end
        for i in range(self.num_layers):
            if self._bounded[i]:
                first = min(self._sealed, self._unseen_before(i, self._length))
                self._rebase(i, max(first, self._first[i]), held_end)
        mx.eval(self.arrays())

    def _load_sealed(self, blocks: list[KVBlock]) -> None:
        """Quantized sealed blocks, contiguous from ``sealed_length``: one write per array
        (a sliding-window layer's parts are held as hidden parts until it rebases)."""
        a, b = blocks[0].start, blocks[-1].end
        self._reserve_sealed(b, exact=True)
        for i in range(self.num_layers):
            for blk in blocks:
                self._check_quantized(i, blk.layers[i].keys)
                self._check_quantized(i, blk.layers[i].values)
            if self._bounded[i]:
                for blk in blocks:
                    pair = (blk.layers[i].keys, blk.layers[i].values)
                    self._hidden.put(blk.start, i, pair)
                continue
            for w in range(2):
                kvs = [blk.layers[i].values if w else blk.layers[i].keys for blk in blocks]
                parts = (
                    np.concatenate([kv.packed for kv in kvs], axis=1),  # type: ignore[union-attr]
                    np.concatenate([kv.scales for kv in kvs], axis=1),  # type: ignore[union-attr]
                    np.concatenate([kv.biases for kv in kvs], axis=1),  # type: ignore[union-attr]
                )
                for buf, part in zip(self._quant[i][w], parts, strict=True):
                    buf[:, :, a:b] = mx.array(part)[:, None]
        self._length = self._sealed = b

    def _check_quantized(self, i: int, kv: QuantizedKV | np.ndarray) -> None:
        bits = self.layer_bits[i]
        if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != (bits, self.group_size):
            got = kv.bits if isinstance(kv, QuantizedKV) else 16
            raise ValueError(
                f"blocks are not {bits}-bit group {self.group_size} K/V in layer {i} "
                f"(got {got}-bit)"
            )
