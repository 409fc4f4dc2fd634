"""KV caches of one sequence for the MLX backend, in the shared stored format.

As in the torch backend: the growing tail block is stored in float16, and a block that fills
is sealed (Hadamard-rotated and quantized to 4/8 bits once). Attention reads exactly what is
stored (rotated back) from mlx-lm's float cache, so exporting and importing blocks (to disk,
to the other backend) never changes what a later token attends to. One forward call must stay
inside one block; the backend splits calls to ensure it.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from edge_infer.cache_store.blocks import KVBlock, key_bounds, tokens_to_block_end, truncation
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV
from edge_infer.cache_store.rotation import hadamard

DEFAULT_BLOCK_SIZE = 256
_STEP = 256


class StoredKVCache(KVCache):
    """mlx-lm's float cache (what attention reads) plus the stored form of the same tokens.

    Attributes are not named ``bits``/``group_size``: mlx-lm would take that for its own
    quantized cache and attend to the quantized arrays directly.
    """

    def __init__(self, kv_bits: int, kv_group: int, block_size: int) -> None:
        super().__init__()
        self.kv_bits, self.kv_group, self.block_size = kv_bits, kv_group, block_size
        self.sealed = 0
        self._half: list[mx.array] | None = None  # keys, values float16 [1, n_kv, cap, D]
        self._quant: list[list[mx.array]] | None = None  # per K/V: packed, scales, biases

    # -- buffers ------------------------------------------------------------------------------
    def _reserve(self, shape: tuple[int, ...], end: int) -> None:
        cap = self._half[0].shape[2] if self._half is not None else 0
        if end <= cap:
            return
        new_cap = (end + _STEP - 1) // _STEP * _STEP
        n, d = shape[1], shape[3]

        def grow(old: mx.array | None, width: int, dtype: mx.Dtype) -> mx.array:
            new = mx.zeros((1, n, new_cap, width), dtype=dtype)
            if old is not None and self.offset:
                new[..., : self.offset, :] = old[..., : self.offset, :]
            return new

        old_half = self._half or [None, None]
        self._half = [grow(old_half[w], d, mx.float16) for w in range(2)]
        if self.kv_bits < 16:
            words, groups = d * self.kv_bits // 32, d // self.kv_group
            old_q = self._quant or [[None] * 3, [None] * 3]
            self._quant = [
                [
                    grow(q[0], words, mx.uint32),
                    grow(q[1], groups, mx.float16),
                    grow(q[2], groups, mx.float16),
                ]
                for q in old_q
            ]

    def _rotation(self, d: int, dtype: mx.Dtype) -> mx.array:
        return mx.array(hadamard(d)).astype(dtype)

    def _readable(self, parts: list[mx.array], dtype: mx.Dtype) -> mx.array:
        deq = mx.dequantize(
            parts[0],
            parts[1].astype(dtype),
            parts[2].astype(dtype),
            group_size=self.kv_group,
            bits=self.kv_bits,
        )
        return deq @ self._rotation(deq.shape[-1], dtype)

    def _seal(self, a: int, b: int) -> None:
        self.sealed = b
        if self.kv_bits == 16:  # float16 blocks are stored as they are
            return
        assert self._half is not None and self._quant is not None
        work = [self.keys, self.values]
        for w in range(2):
            x = self._half[w][..., a:b, :].astype(mx.float32)
            x = x @ self._rotation(x.shape[-1], mx.float32)
            packed, scales, biases = mx.quantize(x, group_size=self.kv_group, bits=self.kv_bits)
            parts = [packed, scales.astype(mx.float16), biases.astype(mx.float16)]
            for buf, p in zip(self._quant[w], parts, strict=True):
                buf[..., a:b, :] = p
            work[w][..., a:b, :] = self._readable(parts, work[w].dtype)

    # -- mlx-lm interface ---------------------------------------------------------------------
    def max_tokens_in_one_call(self) -> int:
        return tokens_to_block_end(self.offset, self.block_size, self.kv_bits < 16)

    def update_and_fetch(self, keys: mx.array, values: mx.array):  # noqa: ANN201 - mlx-lm API
        prev, end = self.offset, self.offset + keys.shape[2]
        if keys.shape[2] > self.max_tokens_in_one_call():
            raise ValueError("a forward call must not cross a KV block boundary")
        self._reserve(keys.shape, end)
        reads = []
        for w, x in enumerate((keys, values)):
            half = x.astype(mx.float16)
            self._half[w][..., prev:end, :] = half
            reads.append(half.astype(x.dtype))
        out = super().update_and_fetch(reads[0], reads[1])  # what this call attends to
        while self.sealed + self.block_size <= end:
            self._seal(self.sealed, self.sealed + self.block_size)
        return out

    def truncate(self, n: int) -> int:
        self.offset, self.sealed = truncation(
            n, self.offset, self.sealed, self.block_size, self.kv_bits < 16
        )
        return self.offset

    # -- export / import ------------------------------------------------------------------------
    def export(self, a: int, b: int, sealed: bool) -> LayerKV:
        out = []
        for w in range(2):
            if not sealed or self.kv_bits == 16:
                out.append(np.array(self._half[w][0, :, a:b]))
            else:
                p, s, z = (np.array(t[0, :, a:b]) for t in self._quant[w])
                out.append(
                    QuantizedKV(
                        packed=p.view(np.uint32),
                        scales=s,
                        biases=z,
                        bits=self.kv_bits,
                        group_size=self.kv_group,
                    )
                )
        return LayerKV(keys=out[0], values=out[1])

    def abstract(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        return key_bounds(np.array(self.keys[0, :, a:b].astype(mx.float32)))

    def load(self, lkv: LayerKV, a: int, b: int, quantized: bool, dtype: mx.Dtype) -> None:
        n_kv, _, d = (lkv.keys if isinstance(lkv.keys, np.ndarray) else lkv.keys.dequantize()).shape
        if self.offset != a:
            raise ValueError(f"block at {a} does not follow {self.offset} tokens")
        self._reserve((1, n_kv, b - a, d), b)
        reads = []
        for w, kv in enumerate((lkv.keys, lkv.values)):
            if not quantized:
                if not isinstance(kv, np.ndarray):
                    raise ValueError("expected float16 K/V for an unsealed or float16 block")
                half = mx.array(np.asarray(kv, dtype=np.float16))[None]
                self._half[w][..., a:b, :] = half
                reads.append(half.astype(dtype))
                continue
            layout = (self.kv_bits, self.kv_group)
            if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != layout:
                raise ValueError(f"blocks are not {self.kv_bits}-bit group {self.kv_group} K/V")
            parts = [
                mx.array(np.ascontiguousarray(kv.packed))[None],
                mx.array(kv.scales)[None],
                mx.array(kv.biases)[None],
            ]
            for buf, p in zip(self._quant[w], parts, strict=True):
                buf[..., a:b, :] = p
            reads.append(self._readable(parts, dtype))
        super().update_and_fetch(reads[0], reads[1])
        if b - a == self.block_size and b % self.block_size == 0:
            self.sealed = max(self.sealed, b)


class MLXCache:
    """One sequence's KV cache: one stored-format mlx-lm cache per layer."""

    def __init__(
        self,
        num_layers: int,
        kv_bits: int,
        group_size: int,
        dtype: mx.Dtype,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.bits, self.group_size, self.dtype = kv_bits, group_size, dtype
        self.block_size = block_size
        self.layers = [StoredKVCache(kv_bits, group_size, block_size) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Number of tokens held."""
        return int(self.layers[0].offset) if self.layers else 0

    @property
    def sealed_length(self) -> int:
        return self.layers[0].sealed if self.layers else 0

    def max_tokens_in_one_call(self) -> int:
        return self.layers[0].max_tokens_in_one_call()

    def truncate(self, n: int) -> int:
        """Keep at most the first ``n`` tokens (whole sealed blocks if cut inside one)."""
        kept = [c.truncate(n) for c in self.layers]
        return kept[0] if kept else 0

    def blocks(self, start: int = 0) -> list[KVBlock]:
        """Stored blocks from the block holding ``start`` on, as numpy arrays."""
        out, bs = [], self.block_size
        pos = start // bs * bs
        while pos < self.length:
            end = min(pos + bs, self.length)
            sealed = end <= self.sealed_length
            layers = [c.export(pos, end, sealed) for c in self.layers]
            abstract = [c.abstract(pos, end) for c in self.layers] if sealed else None
            out.append(KVBlock(pos, end - pos, layers, sealed=sealed, abstract=abstract))
            pos = end
        return out

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append stored blocks (as exported, from any backend) after the held tokens."""
        for block in blocks:
            if len(block.layers) != len(self.layers):
                raise ValueError(
                    f"expected {len(self.layers)} layers of KV, got {len(block.layers)}"
                )
            quantized = self.bits < 16 and block.sealed
            for c, lkv in zip(self.layers, block.layers, strict=True):
                c.load(lkv, block.start, block.end, quantized, self.dtype)
        mx.eval([c.state for c in self.layers])
