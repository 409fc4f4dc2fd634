"""KV cache of one sequence for the torch decoder, in the shared stored format.

Tokens live in blocks of ``block_size``. The growing tail block is stored in float16 (in a
one-block buffer reused for each new block); when a block fills it is *sealed*: rotated
(Hadamard, see :mod:`edge_infer.cache_store.rotation`) and quantized to 4 or 8 bits once
(per layer: :func:`edge_infer.cache_store.kv_format.layer_bits`).
Only the stored form is held: attention (:mod:`edge_infer.backends.torch.kv_attention`) reads
the quantized blocks and the float16 tail directly. What a query attends to is thus a
function of positions only (blocks that ended before it are quantized, its own block is
float16), never of how the context was split into chunks, turns, saves and restores, as long
as one forward call stays inside one block (the backend splits calls to ensure it).

A sliding-window layer (``windows[i] > 0``) keeps in its quantized buffers only the sealed
blocks a later query can still see (a few blocks past its window; row ``r`` holds token
``first + r``). The parts of older blocks leave those buffers as compact host arrays
("hidden" parts, shared with the blocks :meth:`TorchKVCache.blocks` exports), so that
export, truncation to any earlier token and persistence stay complete; an owner that holds
the blocks elsewhere (or does not need them) frees them with
:meth:`TorchKVCache.release_hidden`.

An *offloaded* layer (see :meth:`TorchKVCache.offload`) keeps no sealed rows in its buffers:
its sealed blocks live in the sequence's tiers (host memory under a budget, or disk). Sparse
decoding gathers the selected pages from there; a dense read (a prefill chunk, or decoding
without a page selection) streams the layer's rows into a staging buffer first.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from edge_infer.backends.torch.buffer_pool import POOL
from edge_infer.backends.torch.host_memory import carve, carved_nbytes
from edge_infer.backends.torch.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.blocks import (
    KVBlock,
    key_bounds,
    maps_a_file,
    tokens_to_block_end,
    truncation,
)
from edge_infer.cache_store.kv_format import LayerKV, QuantizedKV, layer_bits
from edge_infer.cache_store.rotation import hadamard
from edge_infer.cache_store.window import HiddenParts, cut_needs_released, unseen_before
from edge_infer.offload.index import SparseState
from edge_infer.offload.tiers import SequenceTiers

DEFAULT_BLOCK_SIZE = 256


def _numpy_copy(t: torch.Tensor) -> np.ndarray:
    """A numpy array that owns its data (``.numpy()`` of a CPU tensor shares the tensor's)."""
    return t.detach().to("cpu", copy=True).numpy()


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor over ``arr`` (a copy if it is read-only: torch wants writable memory)."""
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _parts(kv: QuantizedKV) -> list[np.ndarray]:
    """packed (as int32, what the kernels read), scales and biases of quantized K or V."""
    return [kv.packed.view(np.int32), kv.scales, kv.biases]


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
        bounded: bool = True,
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
        self.layer_bits = layer_bits(kv_bits, self.windows)
        self._rotation = torch.from_numpy(hadamard(head_dim).copy()).to(device)
        self._rotation_t = self._rotation.T.contiguous()
        self._capacity = 0
        self._initial = initial_capacity
        # per layer: [keys, values] of float16 values, and of quantized parts
        self._half: list[list] = [[None, None] for _ in range(num_layers)]
        self._quant: list[list[list]] = [[[None] * 3, [None] * 3] for _ in range(num_layers)]
        self._pointers: list[list[int]] | None = None  # per layer, for the attention kernel
        # sliding-window layers hold sealed tokens first[i].. in their quantized buffers
        # (a bounded number of rows); the parts of older sealed blocks are "hidden": kept
        # as host arrays by block start, unless released
        # (``bounded=False`` keeps every block in the buffers: the reference of tests)
        self._bounded = [bool(w) and kv_bits < 16 and bounded for w in self.windows]
        self._first = [0] * num_layers
        self._hidden = HiddenParts(block_size)
        self._length = 0
        self._sealed = 0
        # set to decode attending only selected pages of the sealed tokens (one new token
        # at a time; prefill chunks stay dense)
        self.sparse: SparseState | None = None
        # layers whose sealed blocks live in ``tiers`` instead of the buffers (offload())
        self.tiers: SequenceTiers | None = None
        self._offloaded = [False] * num_layers
        self._stage: list[torch.Tensor] = []  # an offloaded layer's rows for a dense read
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
        specs = []
        for i in range(self.num_layers):
            rows = min(capacity, self._local_rows(i)) if self._bounded[i] else capacity
            if self._offloaded[i]:
                rows = 0
            if self.quantized:
                words, groups = d * self.layer_bits[i] // 32, d // self.group_size
                layer = [
                    ((n, rows, words), torch.int32),
                    ((n, rows, groups), torch.float16),
                    ((n, rows, groups), torch.float16),
                ]
            else:  # float16 is the stored form of every token
                layer = [((n, rows, d), torch.float16)]
            specs += layer * 2
        per = 3 if self.quantized else 1
        new = self._carve(1, specs)  # the outgrown buffer is freed
        for i in range(self.num_layers):
            held = min(keep - self._first[i], new[2 * i * per].shape[1])
            if self._offloaded[i]:
                held = 0
            for w in range(2):
                k = (2 * i + w) * per
                fresh = new[k : k + per]
                old = self._quant[i][w] if self.quantized else [self._half[i][w]]
                for f, o in zip(fresh, old, strict=True):
                    if o is not None and held > 0:
                        rows = min(held, o.shape[1])
                        f[:, :rows] = o[:, :rows]
                if self.quantized:
                    self._quant[i][w] = fresh
                else:
                    self._half[i][w] = fresh[0]
        self._capacity = capacity
        self._pointers = None

    def _local_rows(self, i: int) -> int:
        """Quantized rows a sliding-window layer needs: its window and two blocks (the
        block being sealed, and the one its oldest visible token may start inside)."""
        bs = self.block_size
        return (-(-self.windows[i] // bs) + 2) * bs

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
        if self._offloaded[layer]:
            return self._staged_layout(layer, length)
        if self._pointers is None:
            rows = []
            for i in range(self.num_layers):
                quant = [0] * 6
                if self.quantized and not self._offloaded[i]:
                    quant = [self._row_zero(t, i) for w in range(2) for t in self._quant[i][w]]
                rows.append(quant + [self._half[i][0].data_ptr(), self._half[i][1].data_ptr()])
            self._pointers = rows
        if self.quantized:
            cap = self._quant[layer][0][0].shape[1]
            meta = [cap, self.block_size, self._sealed, length, self._sealed]
        else:
            meta = [self._capacity, self._capacity, 0, length, 0]
        return self._pointers[layer], [*meta, self.windows[layer]]

    def _staged_layout(self, layer: int, length: int) -> tuple[list[int], list[int]]:
        """:meth:`kernel_layout` of an offloaded layer: its sealed rows streamed from the
        tiers into the staging buffer (row ``r`` holding token ``r``)."""
        stage = self.staged_rows(layer)
        tails = [self._half[layer][0].data_ptr(), self._half[layer][1].data_ptr()]
        meta = [stage[0].shape[1], self.block_size, self._sealed, length, self._sealed]
        return [t.data_ptr() for t in stage] + tails, [*meta, self.windows[layer]]

    def staged_rows(self, layer: int) -> list[torch.Tensor]:
        """An offloaded layer's sealed K and V parts (packed, scales, biases; [n_kv, sealed,
        ...]) read from the tiers into this cache's staging buffer, valid until the next
        call (one layer at a time: a dense read of everything the layer holds)."""
        if self.tiers is None or not self._offloaded[layer]:
            raise ValueError(f"layer {layer} is not offloaded")
        n, sealed = self.n_kv, max(self._sealed, 1)
        bits = self.layer_bits[layer]
        words, groups = self.head_dim * bits // 32, self.head_dim // self.group_size
        shapes = [(words, torch.int32), (groups, torch.float16), (groups, torch.float16)] * 2
        if not self._stage or self._stage[0].shape[1] < sealed:
            rows = max(sealed, 2 * (self._stage[0].shape[1] if self._stage else 0))
            self._stage = [torch.empty(n, rows, width, dtype=dt) for width, dt in shapes]
        if self._sealed:
            keys, values = self.tiers.read(layer, 0, self._sealed)
            for dst, src in zip(self._stage, _parts(keys) + _parts(values), strict=True):
                dst.numpy()[:, : self._sealed] = src
        return self._stage

    def _row_zero(self, t: torch.Tensor, i: int, head: int = 0) -> int:
        """The address token 0 of ``head`` would have in quantized buffer ``t`` of layer ``i``
        (its row ``r`` holds token ``first + r``): kernels index rows by token, and read
        only tokens a query can see, which a sliding-window layer holds."""
        # by strides, not through a view of the head: decoding asks this per head and layer
        return t.data_ptr() + (head * t.stride(0) - self._first[i] * t.stride(1)) * t.element_size()

    def head_pointers(self, layer: int, head: int) -> list[int]:
        """For the attention kernel, one KV head as a sequence: the addresses token 0 of
        ``head`` would have in the layer's quantized K and V parts (packed, scales,
        biases; see :meth:`stored_parts` for the head stride)."""
        if self._offloaded[layer]:
            raise ValueError(f"layer {layer} is offloaded: gather its pages from the tiers")
        return [self._row_zero(t, layer, head) for w in range(2) for t in self._quant[layer][w]]

    def stored_parts(self, layer: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The layer's buffers as the attention kernel reads them: quantized K and V parts
        (packed, scales, biases; [n_kv, capacity, ...], row ``r`` holding token
        ``r + first``: address them with :meth:`head_pointers`) and the float16 tail K and V
        ([n_kv, block_size, D], row 0 holding the first unsealed token)."""
        if not self.quantized:
            raise ValueError("only a quantized cache has sealed parts")
        if self._offloaded[layer]:
            raise ValueError(f"layer {layer} is offloaded: its sealed parts are in the tiers")
        return [*self._quant[layer][0], *self._quant[layer][1]], list(self._half[layer])

    def tails(self, layer: int) -> list[torch.Tensor]:
        """The layer's float16 tail K and V ([n_kv, block_size, D], row 0 holding the first
        unsealed token, unless KV is float16: then every token)."""
        return list(self._half[layer])

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
        else as attention reads them, sealed rows rotated back. A sliding-window layer
        writes only the tokens it holds (the rows before are left as they were)."""
        sealed = min(self._sealed, end) if self.quantized else 0
        first = min(self._first[layer], sealed)  # rows before it are not written
        if self._offloaded[layer]:
            first = 0
        for w, out in enumerate((keys, values)):
            if sealed > first:
                parts = self._rows(layer, w, first, sealed)
                bits = self.layer_bits[layer]
                out[:, first:sealed] = dequantize_kv(*parts, bits, self.group_size)
                if not rotated:
                    out[:, first:sealed] = out[:, first:sealed] @ self._rotation
            tail = self._tail(layer, w, sealed, end)
            if self.quantized and rotated:
                out[:, sealed:end] = tail.float() @ self._rotation_t
            else:
                out[:, sealed:end] = tail

    def readable(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens ``0..end`` exactly as attention reads them, float32
        [n_kv, end, D] (plain torch, the reference of the fast paths): sealed rows
        dequantized and rotated back, tail rows as stored; tokens a sliding-window layer
        no longer holds (no query from ``length`` on sees them) read as zeros."""
        sealed = min(self._sealed, end) if self.quantized else 0
        first = 0 if self._offloaded[layer] else min(self._first[layer], sealed)
        gone = torch.zeros(self.n_kv, first, self.head_dim, device=self.device)
        keys, values = (
            torch.cat(
                [
                    gone,
                    self._readable_rows(layer, w, first, sealed),
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

    def _readable(self, i: int, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """What attention reads for layer ``i``'s quantized K or V (packed, scales,
        biases): dequantized, rotated back."""
        packed, scales, biases = parts
        bits = self.layer_bits[i]
        return dequantize_kv(packed, scales, biases, bits, self.group_size) @ self._rotation

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
        self._drop_unseen()

    def _seal(self, a: int, b: int) -> None:
        if self.bits == 16:  # float16 blocks are stored as they are
            self._sealed = b
            return
        for i in range(self.num_layers):
            if self._bounded[i]:  # room for the block: older rows no query sees go
                self._rebase(i, min(a, self._unseen_before(i, self._length)), a)
            parts = [self._quantized_tail(i, w, a, b) for w in range(2)]
            if self._offloaded[i]:
                assert self.tiers is not None
                k, v = (self._stored(i, kv) for kv in parts)
                self.tiers.add_block(a, i, k, v, on_disk=False)
                continue
            for w, (packed, scales, biases) in enumerate(parts):
                q = self._quant[i][w]
                r, s = a - self._first[i], b - self._first[i]
                q[0][:, r:s], q[1][:, r:s], q[2][:, r:s] = packed, scales, biases
        self._sealed = b

    def _quantized_tail(self, i: int, w: int, a: int, b: int) -> tuple[torch.Tensor, ...]:
        """Tail tokens a..b of layer ``i``'s keys (w=0) or values, rotated and quantized:
        (packed, scales, biases)."""
        x = self._tail(i, w, a, b).float() @ self._rotation
        return quantize_kv(x, self.layer_bits[i], self.group_size)

    def _stored(self, i: int, parts: Sequence[torch.Tensor]) -> QuantizedKV:
        """Layer ``i``'s quantized parts (packed, scales, biases) as a QuantizedKV of numpy
        copies."""
        p, s, z = (_numpy_copy(t) for t in parts)
        return QuantizedKV(p.view(np.uint32), s, z, self.layer_bits[i], self.group_size)

    # -- offloaded layers -----------------------------------------------------------------
    def offload(self, tiers: SequenceTiers, sparse: SparseState | None = None) -> None:
        """Move the sealed blocks of ``tiers.layers`` out of the buffers into ``tiers``
        (host memory within its pool's budget, the rest spilled to disk); from then on those
        layers seal into the tiers, and decoding attends the pages ``sparse`` selects (all
        of them, streamed, without it). Only global layers of a quantized cache can go."""
        if not self.quantized:
            raise ValueError("only a quantized cache (kv_bits 4 or 8) can be offloaded")
        if self.device.type != "cpu":  # the tiers are host memory the CPU kernel reads
            raise ValueError(f"offloading KV runs on the CPU, not on {self.device.type}")
        if self.tiers is not None:
            raise ValueError("this cache is already offloaded")
        for i in tiers.layers:
            if not 0 <= i < self.num_layers or self.windows[i]:
                raise ValueError(f"layer {i} cannot be offloaded (not a global layer)")
        if tiers.length:
            raise ValueError("the tiers must start empty")
        bs = self.block_size
        for i in tiers.layers:
            for a in range(0, self._sealed, bs):
                kv = [self._export(i, w, a, a + bs, True) for w in range(2)]
                tiers.add_block(a, i, kv[0], kv[1], on_disk=False)  # type: ignore[arg-type]
        self.tiers = tiers
        if sparse is not None:
            self.sparse = sparse
        # the buffers are carved again with no sealed rows for those layers
        self._offloaded = [i in tiers.layers for i in range(self.num_layers)]
        capacity, self._capacity = self._capacity, 0
        if capacity:
            self._reserve(capacity)
        self._pointers = None

    def is_offloaded(self, layer: int) -> bool:
        """Whether ``layer``'s sealed blocks live in :attr:`tiers`."""
        return self._offloaded[layer]

    def offloaded_layers(self) -> list[int]:
        """Layers whose sealed blocks live in :attr:`tiers`."""
        return [i for i in range(self.num_layers) if self._offloaded[i]]

    # -- sliding-window layers ------------------------------------------------------------
    def _unseen_before(self, i: int, length: int) -> int:
        return unseen_before(length, self.windows[i], self.block_size)

    def _drop_unseen(self) -> None:
        for i in range(self.num_layers):
            if self._bounded[i]:
                first = min(self._sealed, self._unseen_before(i, self._length))
                self._rebase(i, max(first, self._first[i]), self._sealed)

    def _rows(self, i: int, w: int, a: int, b: int) -> list[torch.Tensor]:
        """Quantized parts (packed, scales, biases) of sealed tokens a..b of layer ``i``,
        from its buffers, the tiers of an offloaded layer, or a hidden block's host arrays."""
        if self._offloaded[i]:
            assert self.tiers is not None
            kv = self.tiers.read(i, a, b)[w]
            return [_tensor(x).to(self.device) for x in _parts(kv)]
        if a >= self._first[i]:
            return [t[:, a - self._first[i] : b - self._first[i]] for t in self._quant[i][w]]
        if b - a != self.block_size or a % self.block_size:
            raise ValueError(f"tokens {a}..{b} of layer {i} are not one hidden block")
        return [_tensor(x).to(self.device) for x in _parts(self._hidden.get(a, i, w))]

    def _rebase(self, i: int, first: int, held_end: int) -> None:
        """Make sliding-window layer ``i``'s buffers hold sealed tokens ``first..sealed``,
        given that they hold ``first[i]..held_end`` and every other block is hidden:
        blocks before ``first`` become hidden, later ones move in from the hidden ones."""
        old, bs = self._first[i], self.block_size
        held_end = max(held_end, old)
        if first == old and held_end == self._sealed:
            return
        if self._sealed - first > self._quant[i][0][0].shape[1]:
            raise ValueError(f"layer {i} cannot hold tokens {first}..{self._sealed}")
        for a in range(old, min(first, held_end), bs):  # leaving the buffers
            self._hidden.put(
                a, i, (self._export(i, 0, a, a + bs, True), self._export(i, 1, a, a + bs, True))
            )
        keep = max(old, first)
        if keep < held_end and first != old:  # the rows kept move (clone: they may overlap)
            n, src, dst = held_end - keep, keep - old, keep - first
            # the buffers were carved during a forward pass (inference tensors): only an
            # inference-mode update may write them in place
            with torch.inference_mode():
                for w in range(2):
                    for t in self._quant[i][w]:
                        t[:, dst : dst + n] = t[:, src : src + n].clone()
        self._first[i] = first
        for a in range(first, self._sealed, bs):  # coming back from the hidden parts
            if keep <= a < held_end:
                continue
            for w in range(2):
                self._write_rows(i, w, self._hidden.get(a, i, w), a, a + bs)
            self._hidden.drop(a, i)
        self._pointers = None

    def release_hidden(self, before: int | None = None) -> int:
        """Free the hidden parts of blocks before token ``before`` (all when None): the
        caller holds those blocks elsewhere or does not need them. Afterwards
        :meth:`blocks` cannot export them, and a truncation that would need them keeps
        nothing. Returns the bytes freed."""
        end = self._sealed if before is None else before // self.block_size * self.block_size
        return self._hidden.release(end)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds: its buffers, its hidden parts, its staging buffer and what
        its tiers hold in host memory (not what they leave on disk)."""
        staged = sum(t.numel() * t.element_size() for t in self._stage)
        tiers = self.tiers.nbytes_ram() if self.tiers is not None else 0
        return self.buffer_nbytes() + self.hidden_nbytes() + staged + tiers

    def buffer_nbytes(self, layers: list[int] | None = None) -> int:
        """Bytes of the buffers of ``layers`` (all when None): quantized rows and tails."""
        total = 0
        for i in range(self.num_layers) if layers is None else layers:
            for w in range(2):
                parts = [*(self._quant[i][w] if self.quantized else []), self._half[i][w]]
                total += sum(t.numel() * t.element_size() for t in parts if t is not None)
        return total

    def hidden_nbytes(self) -> int:
        """Bytes of the hidden parts (sliding-window layers' blocks out of their window)."""
        return self._hidden.nbytes

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
                    self._pointers = None
                self._rebase(i, min(sealed, self._unseen_before(i, length)), held_end)
        if self.sparse is not None:
            self.sparse.index.truncate(self._sealed)
        if self.tiers is not None:
            self.tiers.truncate(self._sealed)
        return self._length

    # -- export / import ------------------------------------------------------------------
    def blocks(self, start: int = 0) -> list[KVBlock]:
        """Stored blocks from the block holding ``start`` on: sealed (quantized, with key
        abstracts) and the float16 tail, as numpy arrays (copies, or the hidden parts
        themselves: those never change)."""
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
        if a >= self._first[i] or self._offloaded[i]:
            return self._readable(i, self._rows(i, w, a, b))
        bs = self.block_size  # hidden blocks one at a time
        parts = [self._readable(i, self._rows(i, w, x, min(x + bs, b))) for x in range(a, b, bs)]
        return torch.cat(parts, dim=1)

    def _export(self, i: int, w: int, a: int, b: int, sealed: bool) -> QuantizedKV | np.ndarray:
        # copies: the buffers are reused (the open block's for every block, all of them
        # after a truncation), while exported blocks live on in agents, forks and saves
        if not sealed or self.bits == 16:
            return _numpy_copy(self._tail(i, w, a, b))
        if self._offloaded[i]:
            assert self.tiers is not None
            return self.tiers.read(i, a, b)[w]
        if a < self._first[i]:
            return self._hidden.get(a, i, w)
        return self._stored(i, self._rows(i, w, a, b))

    def append_blocks(self, blocks: list[KVBlock]) -> None:
        """Append stored blocks (as exported, from any backend) after the held tokens.
        A sliding-window layer takes the sealed parts it will not attend to as hidden
        parts (the block's own arrays, no copy). An offloaded layer hands its sealed parts
        to the tiers: as the disk tier when they map their block file (nothing is read
        until attention asks for a page), else copied into host memory."""
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
        held_end = self._sealed
        for block in blocks:
            quantized = self.quantized and block.sealed
            for i, lkv in enumerate(block.layers):
                if quantized and self._offloaded[i]:
                    assert self.tiers is not None
                    for kv in (lkv.keys, lkv.values):
                        self._check_quantized(i, kv)
                    on_disk = maps_a_file(lkv.keys.packed) and maps_a_file(lkv.values.packed)
                    self.tiers.add_block(block.start, i, lkv.keys, lkv.values, on_disk)
                    continue
                if quantized and self._bounded[i]:
                    pair = (lkv.keys, lkv.values)
                    for kv in pair:
                        self._check_quantized(i, kv)
                    self._hidden.put(block.start, i, pair)
                    continue
                for w, kv in enumerate((lkv.keys, lkv.values)):
                    self._load(i, w, kv, block.start, block.end, quantized)
            self._length = block.end
            if block.sealed:
                self._sealed = block.end
        for i in range(self.num_layers):
            if self._bounded[i]:
                first = min(self._sealed, self._unseen_before(i, self._length))
                self._rebase(i, max(first, self._first[i]), held_end)

    def _check_quantized(self, i: int, kv: QuantizedKV | np.ndarray) -> None:
        bits = self.layer_bits[i]
        if not isinstance(kv, QuantizedKV) or (kv.bits, kv.group_size) != (bits, self.group_size):
            got = (
                f"{kv.bits}-bit group {kv.group_size}" if isinstance(kv, QuantizedKV) else "float16"
            )
            raise ValueError(
                f"blocks are not {bits}-bit group {self.group_size} K/V in layer {i} (got {got})"
            )

    def _load(
        self, i: int, w: int, kv: QuantizedKV | np.ndarray, a: int, b: int, quantized: bool
    ) -> None:
        if not quantized:
            if not isinstance(kv, np.ndarray):
                raise ValueError("expected float16 K/V for an unsealed or float16 block")
            half = _tensor(np.ascontiguousarray(kv, dtype=np.float16)).to(self.device)
            self._tail(i, w, a, b).copy_(half)
            return
        self._check_quantized(i, kv)
        assert isinstance(kv, QuantizedKV)
        self._write_rows(i, w, kv, a, b)

    def _write_rows(self, i: int, w: int, kv: QuantizedKV, a: int, b: int) -> None:
        """Quantized K or V of sealed tokens a..b into layer ``i``'s buffers."""
        parts = _parts(kv)
        q = self._quant[i][w]
        r, s = a - self._first[i], b - self._first[i]
        if self.device.type == "cpu":  # numpy copies: a restore makes thousands of them
            for dst, src in zip(q, parts, strict=True):
                dst.numpy()[:, r:s] = src
            return
        for dst, src in zip(q, parts, strict=True):
            dst[:, r:s] = _tensor(np.ascontiguousarray(src)).to(self.device)
