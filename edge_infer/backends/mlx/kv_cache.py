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
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from edge_infer.backends.mlx.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.blocks import KVBlock, key_bounds, tokens_to_block_end, truncation
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV

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


def hadamard_rotate(x: mx.array, scale: float = 1.0) -> mx.array:
    """``scale * x @ H`` along the last axis, H the normalized Hadamard matrix of
    :mod:`edge_infer.cache_store.rotation` (symmetric, its own inverse)."""
    return mx.hadamard_transform(x, scale=scale / math.sqrt(x.shape[-1]))


class MLXCache:
    """Per layer: the sealed blocks' quantized K and V, and the open block's float16 rows.

    Buffers are ``[n_kv, 1, capacity, ...]``: the unit axis lets a KV head's group of query
    heads broadcast over its rows. The sealed part grows by whole blocks with an
    eighth of headroom (so a long prefill copies it a bounded number of times); the tail grows
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
        self._capacity = 0  # rows of the sealed buffers
        self._quant: list[list[list[mx.array]]] = [[[], []] for _ in range(num_layers)]
        self._tail: list[list[mx.array | None]] = [[None, None] for _ in range(num_layers)]

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

    def sealed_rows(self, layer: int) -> tuple[Parts, Parts] | None:
        """The layer's quantized K and V parts of the sealed tokens, or None if none are."""
        if not self.quantized or self._sealed == 0:
            return None
        k, v = (tuple(_rows(t, self._sealed) for t in self._quant[layer][w]) for w in range(2))
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
        d, bits, g = self.head_dim, self.bits, self.group_size
        specs = [(d * bits // 32, mx.uint32), (d // g, mx.float16), (d // g, mx.float16)]
        for layer in self._quant:
            for w in range(2):
                layer[w] = [
                    _grown(
                        layer[w][j] if layer[w] else None,
                        self._sealed,
                        (self.n_kv, 1, cap, width),
                        dtype,
                    )
                    for j, (width, dtype) in enumerate(specs)
                ]
        self._capacity = cap
        mx.eval([t for layer in self._quant for parts in layer for t in parts])

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens stored by :meth:`update` (after the call's attention is
        evaluated); seal the block they completed."""
        self._length += n
        if self._sealed + self.block_size > self._length:
            return
        while self._sealed + self.block_size <= self._length:
            self._seal()
        mx.eval(self.arrays())

    def _seal(self) -> None:
        a, b = self._sealed, self._sealed + self.block_size
        if not self.quantized:  # float16 blocks are stored as they are
            self._sealed = b
            return
        self._reserve_sealed(b)
        for i in range(self.num_layers):
            for w in range(2):
                tail = self._tail[i][w]
                assert tail is not None
                x = hadamard_rotate(tail[:, :, : self.block_size].astype(mx.float32))
                for buf, part in zip(
                    self._quant[i][w], quantize_kv(x, self.bits, self.group_size), strict=True
                ):
                    buf[:, :, a:b] = part
            self._tail[i] = [None, None]  # the next block starts a new tail
        self._sealed = b

    def truncate(self, n: int) -> int:
        """Keep at most the first ``n`` tokens; returns how many are kept.

        Cutting inside a sealed block keeps only the whole sealed blocks before it: the cut
        block's tokens would have been float16, not quantized, so they must be recomputed.
        """
        self._length, self._sealed = truncation(
            n, self._length, self._sealed, self.block_size, self.quantized
        )
        return self._length

    # -- memory -----------------------------------------------------------------------------
    def arrays(self) -> list[mx.array]:
        """Every array the cache holds."""
        out = [t for layer in self._quant for parts in layer for t in parts]
        return out + [t for layer in self._tail for t in layer if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays the cache holds (their whole capacity)."""
        return sum(int(a.nbytes) for a in self.arrays())

    # -- export / import --------------------------------------------------------------------
    def blocks(self, start: int = 0) -> list[KVBlock]:
        """Stored blocks from the block holding ``start`` on: sealed (quantized, with key
        abstracts) and the float16 tail, as numpy arrays (copies)."""
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
        parts = (t[:, 0, a:b] for t in self._quant[i][0])
        return np.array(hadamard_rotate(dequantize_kv(*parts, self.bits, self.group_size)))

    def _export(self, i: int, w: int, a: int, b: int, sealed: bool) -> QuantizedKV | np.ndarray:
        if not sealed or not self.quantized:
            t = self._tail[i][w]
            assert t is not None
            off = self.tail_start
            return np.array(t[:, 0, a - off : b - off])
        p, s, z = (np.array(t[:, 0, a:b]) for t in self._quant[i][w])
        return QuantizedKV(
            packed=p.view(np.uint32), scales=s, biases=z, bits=self.bits, group_size=self.group_size
        )

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append stored blocks (as exported, from any backend) after the held tokens."""
        pos, sealed_end = self._length, self._sealed
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
        mx.eval(self.arrays())

    def _load_sealed(self, blocks: list[KVBlock]) -> None:
        """Quantized sealed blocks, contiguous from ``sealed_length``: one write per array."""
        layout = (self.bits, self.group_size)
        a, b = blocks[0].start, blocks[-1].end
        self._reserve_sealed(b, exact=True)
        for i in range(self.num_layers):
            for w in range(2):
                kvs = [blk.layers[i].values if w else blk.layers[i].keys for blk in blocks]
                for kv in kvs:
                    if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != layout:
                        got = kv.bits if isinstance(kv, QuantizedKV) else 16
                        raise ValueError(
                            f"blocks are not {self.bits}-bit group {self.group_size} K/V "
                            f"(got {got}-bit)"
                        )
                parts = (
                    np.concatenate([kv.packed for kv in kvs], axis=1),
                    np.concatenate([kv.scales for kv in kvs], axis=1),
                    np.concatenate([kv.biases for kv in kvs], axis=1),
                )
                for buf, part in zip(self._quant[i][w], parts, strict=True):
                    buf[:, :, a:b] = mx.array(part)[:, None]
        self._length = self._sealed = b
