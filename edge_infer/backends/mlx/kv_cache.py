"""KV caches of one sequence for the MLX backend, in the shared stored format.

Keys and values are stored as the cache format says (Hadamard-rotated 4/8-bit affine with
float16 scales and biases, or float16), and attention reads exactly what is stored, rotated
back, from mlx-lm's float cache. Exporting and importing blocks (to disk, to the other
backend) therefore never changes what a later token attends to.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV
from edge_infer.cache_store.rotation import hadamard

_STEP = 256


class StoredKVCache(KVCache):
    """mlx-lm's float cache for attention, plus the stored form of the same tokens."""

    def __init__(self, bits: int, group_size: int) -> None:
        super().__init__()
        self.kv_bits, self.kv_group = bits, group_size  # not "bits": mlx-lm reads that
        self._stored: list[list[mx.array]] | None = None  # [keys parts, values parts]

    # -- stored form ------------------------------------------------------------------
    def _encode(self, x: mx.array) -> tuple[list[mx.array], mx.array]:
        """x [1, n_kv, T, D] -> (stored parts, what attention reads)."""
        if self.kv_bits == 16:
            half = x.astype(mx.float16)
            return [half], half.astype(x.dtype)
        rot = mx.array(hadamard(x.shape[-1])).astype(x.dtype)
        packed, scales, biases = mx.quantize(x @ rot, group_size=self.kv_group, bits=self.kv_bits)
        parts = [packed, scales.astype(mx.float16), biases.astype(mx.float16)]
        return parts, self._readable(parts, x.dtype)

    def _readable(self, parts: list[mx.array], dtype: mx.Dtype) -> mx.array:
        if self.kv_bits == 16:
            return parts[0].astype(dtype)
        deq = mx.dequantize(
            parts[0],
            parts[1].astype(dtype),
            parts[2].astype(dtype),
            group_size=self.kv_group,
            bits=self.kv_bits,
        )
        return deq @ mx.array(hadamard(deq.shape[-1])).astype(dtype)

    def _write_stored(self, enc: list[list[mx.array]], start: int) -> None:
        end = start + enc[0][0].shape[2]
        if self._stored is None or end > self._stored[0][0].shape[2]:
            capacity = (end + _STEP - 1) // _STEP * _STEP
            grown = []
            for parts in enc:
                bufs = [
                    mx.zeros((*p.shape[:2], capacity, p.shape[3]), dtype=p.dtype) for p in parts
                ]
                grown.append(bufs)
            if self._stored is not None:
                for new, old in zip(grown, self._stored, strict=True):
                    for n, o in zip(new, old, strict=True):
                        n[..., :start, :] = o[..., :start, :]
            self._stored = grown
        for bufs, parts in zip(self._stored, enc, strict=True):
            for b, p in zip(bufs, parts, strict=True):
                b[..., start:end, :] = p

    # -- mlx-lm interface ---------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):  # noqa: ANN201 - mlx-lm API
        (k_parts, k_read), (v_parts, v_read) = self._encode(keys), self._encode(values)
        self._write_stored([k_parts, v_parts], self.offset)
        return super().update_and_fetch(k_read, v_read)

    # -- export / import ------------------------------------------------------------------
    def export(self, start: int, end: int) -> tuple:
        out = []
        for parts in self._stored or []:
            arrays = [np.array(p[0, :, start:end]) for p in parts]
            if self.kv_bits == 16:
                out.append(arrays[0])
            else:
                out.append(
                    QuantizedKV(
                        packed=arrays[0].view(np.uint32),
                        scales=arrays[1],
                        biases=arrays[2],
                        bits=self.kv_bits,
                        group_size=self.kv_group,
                    )
                )
        return tuple(out)

    def append(
        self, keys: QuantizedKV | np.ndarray, values: QuantizedKV | np.ndarray, dtype: mx.Dtype
    ) -> None:
        """Append stored K/V (as exported, from any backend) after the held tokens."""
        enc, reads = [], []
        for kv in (keys, values):
            if self.kv_bits == 16:
                if not isinstance(kv, np.ndarray):
                    raise ValueError("this cache holds float16 K/V; got quantized blocks")
                parts = [mx.array(np.asarray(kv, dtype=np.float16))[None]]
            else:
                layout = (self.kv_bits, self.kv_group)
                if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != layout:
                    raise ValueError(f"blocks are not {self.kv_bits}-bit group {self.kv_group} K/V")
                parts = [
                    mx.array(np.ascontiguousarray(kv.packed))[None],
                    mx.array(kv.scales)[None],
                    mx.array(kv.biases)[None],
                ]
            enc.append(parts)
            reads.append(self._readable(parts, dtype))
        self._write_stored(enc, self.offset)
        super().update_and_fetch(reads[0], reads[1])


class MLXCache:
    """One sequence's KV cache: one stored-format mlx-lm cache per layer."""

    def __init__(self, num_layers: int, kv_bits: int, group_size: int, dtype: mx.Dtype) -> None:
        self.bits, self.group_size, self.dtype = kv_bits, group_size, dtype
        self.layers = [StoredKVCache(kv_bits, group_size) for _ in range(num_layers)]

    @property
    def length(self) -> int:
        """Number of tokens held."""
        return int(self.layers[0].offset) if self.layers else 0

    def trim(self, n: int) -> int:
        """Drop the last ``n`` tokens (at most ``length``); returns how many were dropped."""
        return min((c.trim(n) for c in self.layers), default=0)

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""
        if n < self.length:
            self.trim(self.length - n)

    def export(self, start: int = 0, end: int | None = None) -> list[LayerKV]:
        """The stored K/V of tokens [start, end) per layer, as numpy arrays."""
        end = self.length if end is None else min(end, self.length)
        return [LayerKV(*c.export(start, end)) for c in self.layers]

    def append(self, layers: list[LayerKV]) -> None:
        """Append stored K/V (as exported, from any backend) after the held tokens."""
        if len(layers) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} layers of KV, got {len(layers)}")
        for c, lkv in zip(self.layers, layers, strict=True):
            c.append(lkv.keys, lkv.values, self.dtype)
        mx.eval([c.state for c in self.layers])

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored form of the held tokens."""
        return sum(lkv.nbytes for lkv in self.export())
