"""In-memory KV tensors: MLX-affine quantized (4/8-bit) or plain float16, numpy only.

One layer's keys (or values) are ``[n_kv_heads, T, head_dim]``, quantized along ``head_dim``
in groups (see :mod:`edge_infer.formats.affine` for the bit layout). ``KVBlock`` and the
block helpers live in :mod:`.blocks`, byte encoding in :mod:`.block_codec`; both are also
reachable from this module for convenience.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from edge_infer.formats.affine import SUPPORTED_GROUP_SIZES, quantize, unpack

KV_BITS = (4, 8, 16)


@dataclass(frozen=True, eq=False)
class QuantizedKV:
    """Keys or values of one layer in MLX's affine layout, quantized along ``head_dim``."""

    packed: np.ndarray  # uint32 [n_kv_heads, T, head_dim*bits//32]
    scales: np.ndarray  # float16 [n_kv_heads, T, head_dim//group_size]
    biases: np.ndarray  # float16 [n_kv_heads, T, head_dim//group_size]
    bits: int = 4
    group_size: int = 64

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"QuantizedKV bits must be 4 or 8, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group_size={self.group_size!r}")
        if self.packed.dtype != np.uint32 or self.packed.ndim != 3:
            raise ValueError(
                f"packed must be uint32 [n_kv, T, w], got {self.packed.dtype} {self.packed.shape}"
            )
        n, t, _ = self.packed.shape
        if self.head_dim % self.group_size:
            raise ValueError(f"head_dim={self.head_dim} is not a multiple of {self.group_size}")
        expected = (n, t, self.head_dim // self.group_size)
        for name in ("scales", "biases"):
            arr = getattr(self, name)
            if arr.dtype != np.float16 or arr.shape != expected:
                raise ValueError(f"{name} must be float16 {expected}, got {arr.dtype} {arr.shape}")

    @classmethod
    def quantize(cls, x: np.ndarray, bits: int = 4, group_size: int = 64) -> QuantizedKV:
        """Quantize a float array ``[n_kv_heads, T, head_dim]`` along ``head_dim``."""
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"expected [n_kv_heads, T, head_dim], got shape {x.shape}")
        n, t, d = x.shape
        if d % group_size or (d * bits) % 32:
            raise ValueError(f"head_dim={d} does not fit group_size={group_size}, bits={bits}")
        if t == 0:
            return cls(
                np.zeros((n, 0, d * bits // 32), np.uint32),
                np.zeros((n, 0, d // group_size), np.float16),
                np.zeros((n, 0, d // group_size), np.float16),
                bits,
                group_size,
            )
        qw = quantize(x.reshape(n * t, d), bits=bits, group_size=group_size)
        return cls(
            qw.packed.reshape(n, t, -1),
            qw.scales.reshape(n, t, -1),
            qw.biases.reshape(n, t, -1),
            bits,
            group_size,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Logical ``(n_kv_heads, T, head_dim)``."""
        n, t, w = self.packed.shape
        return int(n), int(t), int(w) * 32 // self.bits

    @property
    def head_dim(self) -> int:
        return int(self.packed.shape[2]) * 32 // self.bits

    @property
    def length(self) -> int:
        """Number of tokens T."""
        return int(self.packed.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scales.nbytes + self.biases.nbytes)

    def dequantize(self) -> np.ndarray:
        """``q * scale + bias`` as float32 ``[n_kv_heads, T, head_dim]``."""
        n, t, d = self.shape
        q = unpack(self.packed, self.bits).reshape(n, t, d // self.group_size, self.group_size)
        out = (
            q.astype(np.float32) * self.scales.astype(np.float32)[..., None]
            + self.biases.astype(np.float32)[..., None]
        )
        return out.reshape(n, t, d)

    def slice(self, start: int, end: int) -> QuantizedKV:
        """Tokens ``[start, end)`` as a new (copied) array set."""
        return QuantizedKV(
            self.packed[:, start:end].copy(),
            self.scales[:, start:end].copy(),
            self.biases[:, start:end].copy(),
            self.bits,
            self.group_size,
        )

    @classmethod
    def concat(cls, parts: Sequence[QuantizedKV]) -> QuantizedKV:
        """Join along T; every part must share bits, group size, heads and head_dim."""
        if not parts:
            raise ValueError("cannot concatenate an empty list")
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size) != (first.bits, first.group_size) or (
                p.shape[0],
                p.shape[2],
            ) != (first.shape[0], first.shape[2]):
                raise ValueError("cannot concatenate QuantizedKV of different layouts")
        return cls(
            np.concatenate([p.packed for p in parts], axis=1),
            np.concatenate([p.scales for p in parts], axis=1),
            np.concatenate([p.biases for p in parts], axis=1),
            first.bits,
            first.group_size,
        )


KVArray: TypeAlias = QuantizedKV | np.ndarray
"""Keys or values of one layer: :class:`QuantizedKV`, or float16 ``[n_kv, T, D]`` (kv_bits=16)."""


def _check_f16(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.float16 or x.ndim != 3:
        raise ValueError(
            f"expected QuantizedKV or float16 [n_kv, T, D], got {type(x).__name__}"
            f" {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}"
        )
    return x


def kv_length(x: KVArray) -> int:
    """Number of tokens in keys/values ``x``."""
    return x.length if isinstance(x, QuantizedKV) else int(_check_f16(x).shape[1])


def kv_nbytes(x: KVArray) -> int:
    return x.nbytes if isinstance(x, QuantizedKV) else int(_check_f16(x).nbytes)


def kv_slice(x: KVArray, start: int, end: int) -> KVArray:
    """Tokens ``[start, end)`` of ``x`` (a copy)."""
    return x.slice(start, end) if isinstance(x, QuantizedKV) else _check_f16(x)[:, start:end].copy()


def kv_concat(parts: Sequence[KVArray]) -> KVArray:
    """Join keys/values along T (all quantized alike, or all float16)."""
    if parts and all(isinstance(p, QuantizedKV) for p in parts):
        return QuantizedKV.concat(parts)  # type: ignore[arg-type]
    if parts and all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate([_check_f16(p) for p in parts], axis=1)
    raise ValueError("cannot concatenate an empty or mixed list of KV arrays")


def kv_dequantize(x: KVArray) -> np.ndarray:
    """float32 ``[n_kv, T, D]``."""
    return x.dequantize() if isinstance(x, QuantizedKV) else _check_f16(x).astype(np.float32)


def kv_layout(x: KVArray) -> tuple[int, int]:
    """``(bits, group_size)`` of ``x``; float16 arrays report ``(16, 0)``."""
    return (x.bits, x.group_size) if isinstance(x, QuantizedKV) else (16, 0)


GLOBAL_LAYER_MIN_BITS = 8


def layer_bits(bits: int, windows: Sequence[int]) -> tuple[int, ...]:
    """Per layer, the bits its sealed K/V are stored in: ``bits``, except that in a model
    that mixes sliding-window layers (``windows[i] > 0``) with global ones (0), the global
    layers keep at least 8. Those few layers alone carry retrieval over a long context, and
    4-bit keys there lose it: on Gemma 3 they cost a 16K passkey and most of the KV error,
    while they are a small share of the KV a long context stores."""
    mixed = any(windows) and not all(windows)
    return tuple(
        max(bits, GLOBAL_LAYER_MIN_BITS) if mixed and not w and bits < 16 else bits for w in windows
    )


def row_nbytes(bits: int, head_dim: int, group_size: int) -> int:
    """Bytes one token of one KV head's keys (or values) takes stored in ``bits``: the
    packed values and a float16 scale and bias per group, or float16 values."""
    return head_dim * 2 if bits == 16 else head_dim * bits // 8 + 4 * (head_dim // group_size)


@dataclass(frozen=True)
class KVFormat:
    """How a store keeps KV: 4/8-bit affine (``group_size``) or float16, in blocks of tokens.

    ``layer_bits``: per layer, where layers differ (see :func:`layer_bits`); empty when every
    layer is stored in ``bits``."""

    bits: int = 4
    group_size: int = 64
    block_size: int = 256
    layer_bits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ValueError(f"kv bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"unsupported group_size={self.group_size!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size!r}")
        per_layer = tuple(self.layer_bits)  # a manifest's JSON gives a list
        if all(b == self.bits for b in per_layer):
            per_layer = ()  # uniform: one spelling of each format
        if any(b not in (4, 8) for b in per_layer) or (per_layer and self.bits == 16):
            raise ValueError(f"layer_bits must be 4 or 8 per layer, got {list(per_layer)}")
        object.__setattr__(self, "layer_bits", per_layer)

    def bits_of(self, layer: int) -> int:
        """The bits layer ``layer``'s sealed K/V are stored in (ValueError for a layer the
        format does not have)."""
        if not self.layer_bits:
            return self.bits
        if not 0 <= layer < len(self.layer_bits):
            raise ValueError(f"the KV format has {len(self.layer_bits)} layers, not {layer + 1}")
        return self.layer_bits[layer]

    def describe(self) -> str:
        """Short tag for fingerprints: ``"q4g64"``, ``"q8g32"``, ``"f16"``, or with layers
        in other bits ``"q4g64+8"``."""
        if self.bits == 16:
            return "f16"
        others = sorted(set(self.layer_bits) - {self.bits})
        extra = "".join(f"+{b}" for b in others)
        return f"q{self.bits}g{self.group_size}{extra}"

    def encode(self, x: np.ndarray, layer: int = 0) -> KVArray:
        """Float keys/values ``[n_kv, T, D]`` of layer ``layer`` in this format."""
        bits = self.bits_of(layer)
        if bits == 16:
            return np.asarray(x, dtype=np.float16)
        return QuantizedKV.quantize(x, bits, self.group_size)

    def accepts(self, x: KVArray, sealed: bool = True, layer: int = 0) -> bool:
        """Whether ``x`` is stored in this format (as layer ``layer``).

        The backends quantize only sealed blocks: the growing tail block is kept in float16
        and quantized once, when it seals (recent tokens stay exact, and decoding does not
        quantize per token). An unsealed block may therefore be float16 in any format.
        """
        is_f16 = isinstance(x, np.ndarray) and x.dtype == np.float16
        if self.layer_bits and not 0 <= layer < len(self.layer_bits):
            return False  # a layer this format does not have
        bits = self.bits_of(layer)
        if bits == 16:
            return is_f16
        return kv_layout(x) == (bits, self.group_size) or (not sealed and is_f16)

    def accepts_layer(self, kv: LayerKV, sealed: bool = True, layer: int = 0) -> bool:
        """Whether both the keys and the values of ``kv`` are stored in this format (as
        layer ``layer``): see :meth:`accepts`."""
        return self.accepts(kv.keys, sealed, layer) and self.accepts(kv.values, sealed, layer)

    def fingerprint_tag(self) -> str:
        """What the model fingerprint records of this format (bits, groups, rotation, tail)."""
        if self.bits == 16:
            return "f16"
        tag = f"{self.describe()}-hadamard-f16tail-b{self.block_size}"
        if self.layer_bits:
            tag += "-layers" + "".join(str(b) for b in self.layer_bits)
        return tag

    def to_json(self) -> dict:
        """The fields a manifest records (``layer_bits`` only where layers differ)."""
        out: dict = {
            "bits": self.bits,
            "group_size": self.group_size,
            "block_size": self.block_size,
        }
        if self.layer_bits:
            out["layer_bits"] = list(self.layer_bits)
        return out


@dataclass(frozen=True, eq=False)
class LayerKV:
    """Keys and values of one layer for the same run of tokens."""

    keys: KVArray
    values: KVArray

    def __post_init__(self) -> None:
        if kv_length(self.keys) != kv_length(self.values):
            raise ValueError("keys and values hold different numbers of tokens")
        if kv_layout(self.keys) != kv_layout(self.values):
            raise ValueError("keys and values are stored in different formats")

    @property
    def length(self) -> int:
        return kv_length(self.keys)

    @property
    def nbytes(self) -> int:
        return kv_nbytes(self.keys) + kv_nbytes(self.values)

    def slice(self, start: int, end: int) -> LayerKV:
        return LayerKV(kv_slice(self.keys, start, end), kv_slice(self.values, start, end))

    @classmethod
    def concat(cls, parts: Sequence[LayerKV]) -> LayerKV:
        return cls(kv_concat([p.keys for p in parts]), kv_concat([p.values for p in parts]))
