"""Growable float KV cache for the torch decoder (one sequence)."""

from __future__ import annotations

import torch


class TorchKVCache:
    """Per-layer key/value buffers [n_kv_heads, capacity, head_dim], grown by doubling."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        initial_capacity: int = 256,
    ) -> None:
        self._shape = (num_kv_heads, initial_capacity, head_dim)
        self._device, self._dtype = device, dtype
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens held."""
        return self._length

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [n_kv, T, D] after the held tokens; return all keys/values of ``layer``."""
        start, end = self._length, self._length + k.shape[1]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[1] < end:
            capacity = max(self._shape[1], buf_k.shape[1] if buf_k is not None else 0)
            while capacity < end:
                capacity *= 2
            shape = (self._shape[0], capacity, self._shape[2])
            new_k = torch.empty(shape, device=self._device, dtype=self._dtype)
            new_v = torch.empty(shape, device=self._device, dtype=self._dtype)
            if buf_k is not None and buf_v is not None:
                new_k[:, :start] = buf_k[:, :start]
                new_v[:, :start] = buf_v[:, :start]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        assert buf_v is not None
        buf_k[:, start:end] = k
        buf_v[:, start:end] = v
        return buf_k[:, :end], buf_v[:, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens written by :meth:`update` for every layer."""
        self._length += n

    def truncate(self, n: int) -> None:
        """Keep only the first ``n`` tokens."""
        self._length = min(self._length, n)
