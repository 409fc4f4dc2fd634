"""KV cache of one sequence for the torch decoder: stored quantized, attended as stored.

New keys/values are rotated (Hadamard, see :mod:`edge_infer.cache_store.rotation`) and
quantized on write (4 or 8 bits, MLX affine layout), or rounded to float16; attention reads
the exact stored values, rotated back, from a float32 working buffer. So what a token attends
to does not depend on how the context was split into chunks, turns, saves and restores: it is
always a fixed function of the stored bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from edge_infer.backends.torch.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV
from edge_infer.cache_store.rotation import hadamard


class _Layer:
    """Stored (quantized or f16) and working (float32) buffers of one layer's K and V."""

    def __init__(self) -> None:
        self.stored: list[list[torch.Tensor]] = []  # [keys parts, values parts]
        self.work: list[torch.Tensor] = []  # [keys, values] float32 [n_kv, cap, D]


class TorchKVCache:
    """Per-layer buffers [n_kv_heads, capacity, ...], grown by doubling."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        kv_bits: int = 4,
        group_size: int = 64,
        initial_capacity: int = 256,
    ) -> None:
        if kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16 (got {kv_bits})")
        if kv_bits < 16 and head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of group size {group_size}")
        self.num_layers, self.n_kv, self.head_dim = num_layers, num_kv_heads, head_dim
        self.bits, self.group_size = kv_bits, group_size
        self.device = device
        self._rotation = torch.from_numpy(hadamard(head_dim).copy()).to(device)
        self._capacity = 0
        self._initial = initial_capacity
        self._layers = [_Layer() for _ in range(num_layers)]
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens held."""
        return self._length

    # -- buffers ---------------------------------------------------------------------------
    def _part_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        d = self.head_dim
        if self.bits == 16:
            return [((d,), torch.float16)]
        return [
            ((d * self.bits // 32,), torch.int32),
            ((d // self.group_size,), torch.float16),
            ((d // self.group_size,), torch.float16),
        ]

    def _reserve(self, end: int) -> None:
        if end <= self._capacity:
            return
        capacity = max(self._initial, self._capacity)
        while capacity < end:
            capacity *= 2
        keep = self._length
        for layer in self._layers:
            old_stored, old_work = layer.stored, layer.work
            layer.stored = [
                [
                    torch.empty((self.n_kv, capacity, *shape), dtype=dtype, device=self.device)
                    for shape, dtype in self._part_shapes()
                ]
                for _ in range(2)
            ]
            layer.work = [
                torch.empty((self.n_kv, capacity, self.head_dim), device=self.device)
                for _ in range(2)
            ]
            if old_work:
                for new, old in zip(layer.stored, old_stored, strict=True):
                    for n, o in zip(new, old, strict=True):
                        n[:, :keep] = o[:, :keep]
                for n, o in zip(layer.work, old_work, strict=True):
                    n[:, :keep] = o[:, :keep]
        self._capacity = capacity

    def _store(self, layer: _Layer, which: int, x: torch.Tensor, start: int, end: int) -> None:
        """Quantize x [n_kv, T, D] into the stored buffers and its dequantization into work."""
        parts = layer.stored[which]
        if self.bits == 16:
            half = x.to(torch.float16)
            parts[0][:, start:end] = half
            layer.work[which][:, start:end] = half.float()
            return
        packed, scales, biases = quantize_kv(x.float() @ self._rotation, self.bits, self.group_size)
        parts[0][:, start:end], parts[1][:, start:end], parts[2][:, start:end] = (
            packed,
            scales,
            biases,
        )
        layer.work[which][:, start:end] = self._readable(packed, scales, biases)

    def _readable(
        self, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor
    ) -> torch.Tensor:
        """What attention reads for stored quantized K or V: dequantized, rotated back."""
        deq = dequantize_kv(packed, scales, biases, self.bits, self.group_size)
        return deq @ self._rotation

    # -- decoder interface ----------------------------------------------------------------
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [n_kv, T, D] after the held tokens; return the layer's K/V as stored."""
        start, end = self._length, self._length + k.shape[1]
        self._reserve(end)
        entry = self._layers[layer]
        self._store(entry, 0, k, start, end)
        self._store(entry, 1, v, start, end)
        return entry.work[0][:, :end], entry.work[1][:, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens written by :meth:`update` for every layer."""
        self._length += n

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""
        self._length = max(0, min(self._length, n))

    # -- export / import ------------------------------------------------------------------
    def _to_kv(self, parts: list[torch.Tensor], start: int, end: int) -> QuantizedKV | np.ndarray:
        arrays = [p[:, start:end].cpu().numpy() for p in parts]
        if self.bits == 16:
            return arrays[0]
        return QuantizedKV(
            packed=arrays[0].view(np.uint32),
            scales=arrays[1],
            biases=arrays[2],
            bits=self.bits,
            group_size=self.group_size,
        )

    def export(self, start: int = 0, end: int | None = None) -> list[LayerKV]:
        """The stored K/V of tokens [start, end) per layer, as numpy arrays (copies)."""
        end = self._length if end is None else min(end, self._length)
        return [
            LayerKV(
                keys=self._to_kv(layer.stored[0], start, end),
                values=self._to_kv(layer.stored[1], start, end),
            )
            for layer in self._layers
        ]

    def append(self, layers: list[LayerKV]) -> None:
        """Append stored K/V (as exported, from any backend) after the held tokens."""
        if len(layers) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of KV, got {len(layers)}")
        n = _kv_length(layers[0].keys)
        start, end = self._length, self._length + n
        self._reserve(end)
        for entry, lkv in zip(self._layers, layers, strict=True):
            for which, kv in enumerate((lkv.keys, lkv.values)):
                self._load_parts(entry, which, kv, start, end)
        self._length = end

    def _load_parts(
        self, entry: _Layer, which: int, kv: QuantizedKV | np.ndarray, start: int, end: int
    ) -> None:
        parts = entry.stored[which]
        if self.bits == 16:
            if not isinstance(kv, np.ndarray):
                raise ValueError("this cache holds float16 K/V; got quantized blocks")
            half = torch.from_numpy(np.ascontiguousarray(kv, dtype=np.float16)).to(self.device)
            parts[0][:, start:end] = half
            entry.work[which][:, start:end] = half.float()
            return
        if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != (
            self.bits,
            self.group_size,
        ):
            raise ValueError(
                f"blocks are not {self.bits}-bit group {self.group_size} K/V "
                f"(got {getattr(kv, 'bits', 16)}-bit)"
            )
        packed = torch.from_numpy(np.ascontiguousarray(kv.packed).view(np.int32)).to(self.device)
        scales = torch.from_numpy(np.ascontiguousarray(kv.scales)).to(self.device)
        biases = torch.from_numpy(np.ascontiguousarray(kv.biases)).to(self.device)
        parts[0][:, start:end], parts[1][:, start:end], parts[2][:, start:end] = (
            packed,
            scales,
            biases,
        )
        entry.work[which][:, start:end] = self._readable(packed, scales, biases)

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored (quantized) form of the held tokens."""
        per_token = sum(
            int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
            for shape, dt in self._part_shapes()
        )
        return 2 * self.num_layers * self.n_kv * per_token * self._length


def _kv_length(kv: QuantizedKV | np.ndarray) -> int:
    return int((kv if isinstance(kv, np.ndarray) else kv.packed).shape[1])
