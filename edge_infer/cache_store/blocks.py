"""KV blocks: fixed runs of tokens for all layers; full ("sealed") blocks carry an abstract."""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV, kv_dequantize
from edge_infer.cache_store.rotation import rotate

CHAIN_START = "0" * 64
"""The token chain value before the first block."""

Abstract = list[tuple[np.ndarray, np.ndarray]]
"""Per layer ``(key_min, key_max)``, float16 ``[n_kv_heads, head_dim]``, over the keys as
attention reads them (see :func:`attention_keys`): a box in the stored, rotated domain would
not bound the scores of an unrotated query."""


def _round_down_f16(x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float16)
    over = y.astype(np.float32) > x
    return np.where(over, np.nextafter(y, np.float16(-np.inf)), y).astype(np.float16)


def _round_up_f16(x: np.ndarray) -> np.ndarray:
    y = x.astype(np.float16)
    under = y.astype(np.float32) < x
    return np.where(under, np.nextafter(y, np.float16(np.inf)), y).astype(np.float16)


def tokens_to_block_end(held: int, block_size: int, quantized: bool) -> int:
    """How many tokens a forward call may append without crossing a block boundary.

    Quantized caches seal (quantize) a block when it fills, and a query must see its own block
    in float16, so one call stays inside one block; float16 caches have no such limit.
    """
    return block_size - held % block_size if quantized else 1 << 30


def truncation(n: int, held: int, sealed: int, block_size: int, quantized: bool) -> tuple[int, int]:
    """(tokens kept, tokens still sealed) when a cache holding ``held`` tokens, the first
    ``sealed`` of them in sealed blocks, is cut to ``n``.

    Cutting inside a sealed quantized block keeps only the whole blocks before it: the cut
    block's tokens would have been float16 in its tail, so they must be computed again.
    """
    n = max(0, min(n, held))
    if n >= sealed:
        return n, sealed
    whole = n // block_size * block_size
    return (whole if quantized else n), whole


def key_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Channel-wise (min, max) over tokens of keys [n_kv, T, D], rounded outward to float16."""
    return _round_down_f16(keys.min(axis=1)), _round_up_f16(keys.max(axis=1))


def attention_keys(layer: LayerKV) -> np.ndarray:
    """A layer's keys as attention reads them, float32 ``[n_kv, T, D]``: quantized keys are
    stored rotated (``quantize(k @ H)``), so they are dequantized and rotated back; float16
    keys are stored as they are."""
    keys = kv_dequantize(layer.keys)
    return rotate(keys) if isinstance(layer.keys, QuantizedKV) else keys


def compute_abstract(layers: Sequence[LayerKV]) -> Abstract:
    """Channel-wise min and max of each layer's keys, as attention reads them, over the
    block's tokens.

    Values are rounded outward to float16 so that they always bound the keys.
    """
    out: Abstract = []
    for layer in layers:
        if layer.length == 0:
            raise ValueError("cannot compute the abstract of an empty block")
        out.append(key_bounds(attention_keys(layer)))
    return out


@dataclass(frozen=True, eq=False)
class KVBlock:
    """Tokens ``[start, start+length)`` of every layer.

    A sealed block is full (``length`` equals the store's block size), immutable, and has an
    ``abstract``; it is computed here if not given. Unsealed (tail) blocks have none.
    """

    start: int
    length: int
    layers: list[LayerKV]
    sealed: bool = False
    abstract: Abstract | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.length < 0:
            raise ValueError(f"bad block span start={self.start} length={self.length}")
        for i, layer in enumerate(self.layers):
            if layer.length != self.length:
                raise ValueError(f"layer {i} holds {layer.length} tokens, block says {self.length}")
        if not self.sealed and self.abstract is not None:
            raise ValueError("only sealed blocks carry an abstract")
        if self.sealed and self.abstract is None:
            object.__setattr__(self, "abstract", compute_abstract(self.layers))
        if self.abstract is not None and len(self.abstract) != len(self.layers):
            raise ValueError("abstract must have one (key_min, key_max) pair per layer")

    @property
    def end(self) -> int:
        """Absolute position one past the last token."""
        return self.start + self.length

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the KV arrays and the abstract."""
        n = sum(layer.nbytes for layer in self.layers)
        if self.abstract is not None:
            n += sum(int(lo.nbytes + hi.nbytes) for lo, hi in self.abstract)
        return n

    def slice(self, lo: int, hi: int) -> KVBlock:
        """Tokens ``[lo, hi)`` counted from the block's start; a strict part is unsealed."""
        if not 0 <= lo <= hi <= self.length:
            raise ValueError(f"slice [{lo}, {hi}) outside block of length {self.length}")
        if lo == 0 and hi == self.length:
            return self
        return KVBlock(self.start + lo, hi - lo, [layer.slice(lo, hi) for layer in self.layers])

    def truncate(self, n: int) -> KVBlock:
        """The first ``n`` tokens."""
        return self.slice(0, n)

    def seal(self) -> KVBlock:
        """This block marked sealed (with its abstract computed)."""
        return self if self.sealed else KVBlock(self.start, self.length, self.layers, sealed=True)


def split_into_blocks(layers: Sequence[LayerKV], start: int, block_size: int) -> list[KVBlock]:
    """Cut per-layer KV for tokens from absolute position ``start`` into blocks.

    Block boundaries fall on multiples of ``block_size``; full blocks are sealed.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not layers:
        return []
    total = layers[0].length
    blocks: list[KVBlock] = []
    pos = start
    while pos < start + total:
        end = min((pos // block_size + 1) * block_size, start + total)
        lo, hi = pos - start, end - start
        part = [layer if (lo, hi) == (0, total) else layer.slice(lo, hi) for layer in layers]
        blocks.append(KVBlock(pos, end - pos, part, sealed=end - pos == block_size))
        pos = end
    return blocks


def check_contiguous(blocks: Sequence[KVBlock]) -> None:
    """Raise ``ValueError`` unless each block starts where the previous one ends."""
    for prev, nxt in zip(blocks, blocks[1:], strict=False):
        if nxt.start != prev.end:
            raise ValueError(f"blocks not contiguous: {prev.end} then {nxt.start}")
        if nxt.n_layers != prev.n_layers:
            raise ValueError("blocks have different numbers of layers")


def merge_blocks(blocks: Sequence[KVBlock]) -> list[LayerKV]:
    """Per-layer KV of contiguous blocks joined along T."""
    if not blocks:
        return []
    check_contiguous(blocks)
    if len(blocks) == 1:
        return list(blocks[0].layers)
    return [LayerKV.concat([b.layers[i] for b in blocks]) for i in range(blocks[0].n_layers)]


def extend_blocks(
    blocks: Sequence[KVBlock], layers: Sequence[LayerKV], block_size: int
) -> list[KVBlock]:
    """``blocks`` followed by new tokens ``layers``; the unsealed tail grows (and may seal)."""
    if not layers or layers[0].length == 0:
        return list(blocks)
    if not blocks:
        return split_into_blocks(layers, 0, block_size)
    tail = blocks[-1]
    if tail.sealed:
        return [*blocks, *split_into_blocks(layers, tail.end, block_size)]
    grown = [LayerKV.concat([a, b]) for a, b in zip(tail.layers, layers, strict=True)]
    return [*blocks[:-1], *split_into_blocks(grown, tail.start, block_size)]


def token_chain(previous: str, ids: Sequence[int]) -> str:
    """A block's token identity: sha256 over the previous block's chain value (hex) and this
    block's token ids (little-endian int64), so it covers every id from position 0 on."""
    h = hashlib.sha256(bytes.fromhex(previous))
    h.update(np.asarray(ids, dtype="<i8").tobytes())
    return h.hexdigest()


def token_chains(token_ids: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[str]:
    """The chain value of each of the contiguous ``(start, length)`` spans from position 0;
    ValueError if the spans are not contiguous from 0 or run past ``token_ids``."""
    ids = np.asarray(token_ids, dtype=np.int64)
    out, prev, pos = [], CHAIN_START, 0
    for start, length in spans:
        if start != pos or length < 0 or start + length > len(ids):
            raise ValueError(f"span ({start}, {length}) does not follow {pos} in {len(ids)} ids")
        prev = token_chain(prev, ids[start : start + length])
        out.append(prev)
        pos = start + length
    return out


def buffer_root(arr: np.ndarray) -> object:
    """The buffer ``arr``'s memory belongs to (a file mapping, bytes, ...) through its chain
    of views, or None when an array in that chain owns its data."""
    while isinstance(arr.base, np.ndarray):
        arr = arr.base
    root = arr.base
    while isinstance(root, memoryview):
        root = root.obj
    return root


def maps_a_file(arr: np.ndarray) -> bool:
    """Whether ``arr``'s memory is a mapping of a file (a block read from disk without a
    copy: its pages come from the file when touched), not memory of its own."""
    return isinstance(buffer_root(arr), mmap.mmap)
