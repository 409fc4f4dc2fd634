"""KV cache of one sequence for the torch decoder, in the shared stored format.

Tokens live in blocks of ``block_size``. The growing tail block is stored in float16 (in a
one-block buffer reused for each new block); when a block fills it is *sealed*: rotated
(Hadamard, see :mod:`edge_infer.cache_store.rotation`) and quantized to 4 or 8 bits once.
Only the stored form is held: attention (:mod:`edge_infer.backends.torch.kv_attention`) reads
the quantized blocks and the float16 tail directly. What a query attends to is thus a
function of positions only (blocks that ended before it are quantized, its own block is
float16), never of how the context was split into chunks, turns, saves and restores, as long
as one forward call stays inside one block (the backend splits calls to ensure it).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from edge_infer.backends.torch.buffer_pool import POOL
from edge_infer.backends.torch.host_memory import carve, carved_nbytes
from edge_infer.backends.torch.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.blocks import KVBlock, key_bounds, tokens_to_block_end, truncation
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV
from edge_infer.cache_store.rotation import hadamard
from edge_infer.offload.index import SparseState

DEFAULT_BLOCK_SIZE = 256


def _numpy_copy(t: torch.Tensor) -> np.ndarray:
    """A numpy array that owns its data (``.numpy()`` of a CPU tensor shares the tensor's)."""
    return t.detach().to("cpu", copy=True).numpy()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr`` (a copy if it is read-only: torch wants writable memory)."""
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _give_back(buffers: list) -> None:
    POOL.give(buffers)


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
        block_size: int = DEFAULT_BLOCK_SIZE,
        initial_capacity: int = 256,
        windows: list[int] | None = None,
    ) -> None:
        if kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16 (got {kv_bits})")
        if kv_bits < 16 and head_dim % group_size:
            raise ValueError(f"head_dim {head_dim} is not a multiple of group size {group_size}")
        self.num_layers, self.n_kv, self.head_dim = num_layers, num_kv_heads, head_dim
        self.bits, self.group_size, self.block_size = kv_bits, group_size, block_size
        self.device = device
        # per layer, how many latest tokens a query sees (0 = all: a global layer)
        self.windows = list(windows) if windows is not None else [0] * num_layers
        if len(self.windows) != num_layers or min(self.windows, default=0) < 0:
            raise ValueError(f"windows must list {num_layers} sizes >= 0 (got {windows})")
        self._rotation = torch.from_numpy(hadamard(head_dim).copy()).to(device)
        self._rotation_t = self._rotation.T.contiguous()
        self._capacity = 0
        self._initial = initial_capacity
        # per layer: [keys, values] of float16 values, and of quantized parts
        self._half: list[list] = [[None, None] for _ in range(num_layers)]
        self._quant: list[list[list]] = [[[None] * 3, [None] * 3] for _ in range(num_layers)]
        self._pointers: list[list[int]] | None = None  # per layer, for the attention kernel
        self._length = 0
        self._sealed = 0
        # set to decode attending only selected pages of the sealed tokens (one new token
        # at a time; prefill chunks stay dense)
        self.sparse: SparseState | None = None
        # the byte buffers the tensors above are carved from: [open block's, the rest];
        # when this cache is dropped they go back to the pool for the next one
        self._buffers: list[torch.Tensor | None] = [None, None]
        weakref.finalize(self, _give_back, self._buffers)

    @property
    def length(self) -> int:
        """Tokens held."""
        return self._length

    @property
    def sealed_length(self) -> int:
        """Tokens in sealed (quantized) blocks; the rest is the float16 tail."""
        return self._sealed

    # -- buffers ---------------------------------------------------------------------------
    def _reserve(self, end: int) -> None:
        if end <= self._capacity:
            return
        capacity = max(self._initial, self._capacity)
        while capacity < end:
            capacity *= 2
        n, d, keep = self.n_kv, self.head_dim, self._length
        if self.quantized and self._buffers[0] is None:  # only the open block is float16
            spec = ((n, self.block_size, d), torch.float16)
            for i, tail in enumerate(self._carve(0, [spec] * 2 * self.num_layers)):
                self._half[i // 2][i % 2] = tail
        if self.quantized:
            words, groups = d * self.bits // 32, d // self.group_size
            specs = [
                ((n, capacity, words), torch.int32),
                ((n, capacity, groups), torch.float16),
                ((n, capacity, groups), torch.float16),
            ]
        else:  # float16 is the stored form of every token
            specs = [((n, capacity, d), torch.float16)]
        new = self._carve(1, specs * 2 * self.num_layers)  # the outgrown buffer is freed
        for i in range(self.num_layers):
            for w in range(2):
                k = (2 * i + w) * len(specs)
                fresh = new[k : k + len(specs)]
                old = self._quant[i][w] if self.quantized else [self._half[i][w]]
                for f, o in zip(fresh, old, strict=True):
                    if o is not None and keep:
                        f[:, :keep] = o[:, :keep]
                if self.quantized:
                    self._quant[i][w] = fresh
                else:
                    self._half[i][w] = fresh[0]
        self._capacity = capacity
        self._pointers = None

    def _carve(self, slot: int, specs: list) -> list[torch.Tensor]:
        """Tensors of ``specs`` carved from one new buffer, held in ``_buffers[slot]``."""
        buffer = POOL.take((carved_nbytes(specs),), torch.uint8, self.device)
        self._buffers[slot] = buffer
        return carve(buffer, specs)

    @property
    def rotation(self) -> torch.Tensor:
        """R of the stored form: what attention reads for a sealed row is
        ``dequantize(stored) @ R``."""
        return self._rotation

    @property
    def rotation_t(self) -> torch.Tensor:
        """The transpose of :attr:`rotation`, contiguous."""
        return self._rotation_t

    @property
    def quantized(self) -> bool:
        """True when sealed blocks are stored quantized (4 or 8 bits)."""
        return self.bits < 16

    def reserve_next(self) -> None:
        """Make room for one more token (before a kernel writes it)."""
        if self.max_tokens_in_one_call() < 1:
            raise ValueError("a forward call must not cross a KV block boundary")
        self._reserve(self._length + 1)

    def kernel_layout(self, layer: int, length: int) -> tuple[list[int], list[int]]:
        """For the attention kernel: the layer's buffer addresses (packed K, scales K,
        biases K, the same for V, float16 tail K and V) and its layout (capacity, tail
        capacity, sealed tokens, ``length`` tokens to attend over, tail's first token,
        window: how many latest tokens a query sees, 0 for all)."""
        if self._pointers is None:
            rows = []
            for i in range(self.num_layers):
                quant = [0] * 6
                if self.quantized:
                    quant = [t.data_ptr() for w in range(2) for t in self._quant[i][w]]
                rows.append(quant + [self._half[i][0].data_ptr(), self._half[i][1].data_ptr()])
            self._pointers = rows
        if self.quantized:
            meta = [self._capacity, self.block_size, self._sealed, length, self._sealed]
        else:
            meta = [self._capacity, self._capacity, 0, length, 0]
        return self._pointers[layer], [*meta, self.windows[layer]]

    def stored_parts(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The layer's buffers as the attention kernel reads them: quantized K and V parts
        (packed, scales, biases; [n_kv, capacity, ...]) and the float16 tail K and V
        ([n_kv, block_size, D], row 0 holding the first unsealed token)."""
        if not self.quantized:
            raise ValueError("only a quantized cache has sealed parts")
        return [*self._quant[layer][0], *self._quant[layer][1]], list(self._half[layer])

    def sealed_keys(self, layer: int, a: int, b: int) -> torch.Tensor:
        """Keys of sealed tokens a..b as attention reads them, float32 [n_kv, b-a, D]."""
        return self._readable_rows(layer, 0, a, b)

    def stored_rows(
        self,
        layer: int,
        end: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        rotated: bool = True,
    ) -> None:
        """Write tokens ``0..end`` of the layer's K and V as float32 into ``keys``/``values``
        [n_kv, >= end, D]. ``rotated``: in the stored (rotated) domain, tail rows rotated;
        else as attention reads them, sealed rows rotated back."""
        sealed = min(self._sealed, end) if self.quantized else 0
        for w, out in enumerate((keys, values)):
            if sealed:
                parts = (t[:, :sealed] for t in self._quant[layer][w])
                out[:, :sealed] = dequantize_kv(*parts, self.bits, self.group_size)
                if not rotated:
                    out[:, :sealed] = out[:, :sealed] @ self._rotation
            tail = self._tail(layer, w, sealed, end)
            if self.quantized and rotated:
                out[:, sealed:end] = tail.float() @ self._rotation_t
            else:
                out[:, sealed:end] = tail

    def readable(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``0..end`` exactly as attention reads them, float32
        [n_kv, end, D] (plain torch, the reference of the fast paths): sealed rows
        dequantized and rotated back, tail rows as stored."""
        sealed = min(self._sealed, end) if self.quantized else 0
        keys, values = (
            torch.cat(
                [
                    self._readable_rows(layer, w, 0, sealed),
                    self._tail(layer, w, sealed, end).float(),
                ],
                dim=1,
            )
            for w in range(2)
        )
        return keys, values

    def _tail(self, i: int, w: int, a: int, b: int) -> torch.Tensor:
        """The float16 values of tokens a..b (of the open block unless KV is float16)."""
        off = 0 if self.bits == 16 else self._sealed
        return self._half[i][w][:, a - off : b - off]

    def _readable(
        self, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor
    ) -> torch.Tensor:
        """What attention reads for quantized K or V: dequantized, rotated back."""
        return dequantize_kv(packed, scales, biases, self.bits, self.group_size) @ self._rotation

    # -- decoder interface ----------------------------------------------------------------
    def max_tokens_in_one_call(self) -> int:
        """How many tokens the next forward may take without crossing a block boundary."""
        return tokens_to_block_end(self._length, self.block_size, self.bits < 16)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [n_kv, T, D] (rounded to float16) after the held tokens; attention
        then reads them with the held ones."""
        start, end = self._length, self._length + k.shape[1]
        if end - start > self.max_tokens_in_one_call():
            raise ValueError("a forward call must not cross a KV block boundary")
        self._reserve(end)
        for w, x in enumerate((k, v)):
            self._tail(layer, w, start, end).copy_(x)

    def advance(self, n: int) -> None:
        """Commit ``n`` tokens written by :meth:`update`; seal the block they completed."""
        self._length += n
        while self._sealed + self.block_size <= self._length:
            self._seal(self._sealed, self._sealed + self.block_size)

    def _seal(self, a: int, b: int) -> None:
        if self.bits == 16:  # float16 blocks are stored as they are
            self._sealed = b
            return
        for i in range(self.num_layers):
            for w in range(2):
                x = self._tail(i, w, a, b).float() @ self._rotation
                packed, scales, biases = quantize_kv(x, self.bits, self.group_size)
                q = self._quant[i][w]
                q[0][:, a:b], q[1][:, a:b], q[2][:, a:b] = packed, scales, biases
        self._sealed = b

    def truncate(self, n: int) -> int:
        """Keep at most the first ``n`` tokens; returns how many are kept.

        Cutting inside a sealed block keeps only the whole sealed blocks before it: the cut
        block's tokens would have been float16, not quantized, so they must be recomputed.
        """
        self._length, self._sealed = truncation(
            n, self._length, self._sealed, self.block_size, self.bits < 16
        )
        if self.sparse is not None:
            self.sparse.index.truncate(self._sealed)
        return self._length

    # -- export / import ------------------------------------------------------------------
    def blocks(self, start: int = 0) -> list[KVBlock]:
        """Stored blocks from the block holding ``start`` on: sealed (quantized, with key
        abstracts) and the float16 tail, as numpy arrays (copies)."""
        out = []
        pos = start // self.block_size * self.block_size
        while pos < self._length:
            end = min(pos + self.block_size, self._length)
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
                    key_bounds(self._readable_rows(i, 0, pos, end).cpu().numpy())
                    for i in range(self.num_layers)
                ]
            out.append(KVBlock(pos, end - pos, layers, sealed=sealed, abstract=abstract))
            pos = end
        return out

    def _readable_rows(self, i: int, w: int, a: int, b: int) -> torch.Tensor:
        """Sealed tokens a..b of layer ``i``'s keys (w=0) or values as attention reads them."""
        if not self.quantized:
            return self._tail(i, w, a, b).float()
        return self._readable(*(t[:, a:b] for t in self._quant[i][w]))

    def _export(self, i: int, w: int, a: int, b: int, sealed: bool) -> QuantizedKV | np.ndarray:
        # copies: the buffers are reused (the open block's for every block, all of them
        # after a truncation), while exported blocks live on in agents, forks and saves
        if not sealed or self.bits == 16:
            return _numpy_copy(self._tail(i, w, a, b))
        p, s, z = (_numpy_copy(t[:, a:b]) for t in self._quant[i][w])
        return QuantizedKV(
            packed=p.view(np.uint32), scales=s, biases=z, bits=self.bits, group_size=self.group_size
        )

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append stored blocks (as exported, from any backend) after the held tokens."""
        pos = self._length
        for block in blocks:
            if block.start != pos:
                raise ValueError(f"block at {block.start} does not follow {pos} tokens")
            if len(block.layers) != self.num_layers:
                raise ValueError(
                    f"expected {self.num_layers} layers of KV, got {len(block.layers)}"
                )
            pos = block.end
        self._reserve(pos)
        for block in blocks:
            quantized = self.quantized and block.sealed
            for i, lkv in enumerate(block.layers):
                for w, kv in enumerate((lkv.keys, lkv.values)):
                    self._load(i, w, kv, block.start, block.end, quantized)
            self._length = block.end
            if block.sealed:
                self._sealed = block.end

    def _load(
        self, i: int, w: int, kv: QuantizedKV | np.ndarray, a: int, b: int, quantized: bool
    ) -> None:
        if not quantized:
            if not isinstance(kv, np.ndarray):
                raise ValueError("expected float16 K/V for an unsealed or float16 block")
            half = _tensor(np.ascontiguousarray(kv, dtype=np.float16)).to(self.device)
            self._tail(i, w, a, b).copy_(half)
            return
        if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != (
            self.bits,
            self.group_size,
        ):
            raise ValueError(
                f"blocks are not {self.bits}-bit group {self.group_size} K/V "
                f"(got {getattr(kv, 'bits', 16)}-bit)"
            )
        parts = [kv.packed.view(np.int32), kv.scales, kv.biases]
        q = self._quant[i][w]
        if self.device.type == "cpu":  # numpy copies: a restore makes thousands of them
            for dst, src in zip(q, parts, strict=True):
                dst.numpy()[:, a:b] = src
            return
        for dst, src in zip(q, parts, strict=True):
            dst[:, a:b] = _tensor(np.ascontiguousarray(src)).to(self.device)
