"""A KV block as safetensors bytes, and back.

Tensors per layer ``l``: ``layers.{l}.keys.packed|scales|biases`` and ``layers.{l}.values.*``
(quantized) or ``layers.{l}.keys`` / ``layers.{l}.values`` (float16), plus
``layers.{l}.key_min|key_max`` for sealed blocks. String metadata: ``format``,
``format_version``, ``start``, ``length``, ``bits``, ``group_size``, ``n_layers``, ``sealed``,
``layer_bits`` (comma-separated, only where layers are stored in different bits) and
``token_chain`` (the token ids the KV was computed from, chained over the blocks before:
see :func:`.blocks.token_chain`), so a block file's sha256 covers its ids. The header is
written in a canonical order so equal blocks give equal bytes (and file names).
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import deque

import numpy as np
from safetensors.numpy import save as st_save

from edge_infer.cache_store.blocks import KVBlock
from edge_infer.cache_store.errors import CacheCorruptError
from edge_infer.cache_store.kv_format import KVArray, KVFormat, LayerKV, QuantizedKV
from edge_infer.formats.safetensors import DTYPES, entry_problem

Buffer = bytes | bytearray | memoryview | mmap.mmap

FORMAT_NAME = "edge-infer-kv-block"
FORMAT_VERSION = 1
_PARTS = ("packed", "scales", "biases")


def _put_kv(out: dict[str, np.ndarray], prefix: str, x: KVArray) -> None:
    if isinstance(x, QuantizedKV):
        for part in _PARTS:
            out[f"{prefix}.{part}"] = np.ascontiguousarray(getattr(x, part))
    else:
        out[prefix] = np.ascontiguousarray(x)


def _canonical(data: bytes) -> bytes:
    """Rewrite the JSON header with sorted metadata (safetensors orders it at random)."""
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    tensors = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    text = json.dumps(
        {"__metadata__": dict(sorted(meta.items())), **dict(tensors)}, separators=(",", ":")
    ).encode()
    if len(text) > n:  # cannot happen with ASCII metadata; keep the valid original
        return data
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


def _is_f16(block: KVBlock) -> bool:
    return bool(block.layers) and isinstance(block.layers[0].keys, np.ndarray)


def block_to_bytes(block: KVBlock, fmt: KVFormat, token_chain: str | None = None) -> bytes:
    """Serialize ``block`` (whose layers must be in format ``fmt``) to safetensors bytes,
    recording ``token_chain`` when given."""
    if fmt.layer_bits and len(fmt.layer_bits) != block.n_layers:
        raise ValueError(
            f"block at {block.start} has {block.n_layers} layers; the KV format has "
            f"{len(fmt.layer_bits)}"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(block.layers):
        if not fmt.accepts_layer(layer, block.sealed, i):
            raise ValueError(
                f"layer {i} of block at {block.start} is not in format {fmt.describe()}"
            )
        _put_kv(tensors, f"layers.{i}.keys", layer.keys)
        _put_kv(tensors, f"layers.{i}.values", layer.values)
        if block.abstract is not None:
            lo, hi = block.abstract[i]
            tensors[f"layers.{i}.key_min"] = np.ascontiguousarray(lo, dtype=np.float16)
            tensors[f"layers.{i}.key_max"] = np.ascontiguousarray(hi, dtype=np.float16)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "start": str(block.start),
        "length": str(block.length),
        "bits": str(16 if _is_f16(block) else fmt.bits),
        "group_size": str(fmt.group_size),
        "n_layers": str(block.n_layers),
        "sealed": "1" if block.sealed else "0",
    }
    if fmt.layer_bits and not _is_f16(block):
        metadata["layer_bits"] = ",".join(str(b) for b in fmt.layer_bits)
    if token_chain is not None:
        metadata["token_chain"] = token_chain
    return _canonical(st_save(tensors, metadata=metadata))


def _read_header(data: Buffer) -> tuple[dict, dict[str, str], int]:
    """(tensor entries, metadata, offset of the tensor data) of a block's bytes."""
    if len(data) < 8:
        raise CacheCorruptError(f"block data truncated ({len(data)} bytes)")
    (n,) = struct.unpack_from("<Q", data)
    if n > len(data) - 8:
        raise CacheCorruptError(f"block header of {n} bytes overruns the data ({len(data)} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as e:
        raise CacheCorruptError(f"block header is not valid JSON: {e}") from None
    meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CacheCorruptError("data is not an edge-infer KV block")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CacheCorruptError(f"unsupported KV block format version {meta.get('format_version')}")
    return header, meta, 8 + n


# Recently checked header entries, with the data size they were checked against and the
# tensors they describe (name, dtype, offset, count, shape). The blocks of a cache share one
# layout, so a restore checks it entry by entry once and compares whole headers after that.
_LAYOUTS: deque[tuple[dict, int, list[tuple[str, np.dtype, int, int, tuple]]]] = deque(maxlen=4)


def _layout(entries: dict, data_size: int) -> list[tuple[str, np.dtype, int, int, tuple]]:
    """The tensors header ``entries`` describe in ``data_size`` bytes of tensor data;
    CacheCorruptError naming the first bad entry."""
    for known, size, layout in list(_LAYOUTS):
        if size == data_size and known == entries:
            return layout
    layout = []
    for name, entry in entries.items():
        problem = entry_problem(entry, data_size)
        if problem:
            raise CacheCorruptError(f"block data is corrupt: tensor {name!r}: {problem}")
        start, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        layout.append((name, dtype, start, (end - start) // dtype.itemsize, tuple(entry["shape"])))
    _LAYOUTS.append((entries, data_size, layout))
    return layout


def _tensor_views(data: Buffer) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The block's tensors as views of ``data`` (no copy), and its metadata."""
    header, meta, base = _read_header(data)
    tensors = {
        name: np.frombuffer(data, dtype, count, base + start).reshape(shape)
        for name, dtype, start, count, shape in _layout(header, len(data) - base)
    }
    return tensors, meta


def _get_kv(tensors: dict[str, np.ndarray], prefix: str, bits: int, group_size: int) -> KVArray:
    if bits == 16:
        return tensors[prefix]
    return QuantizedKV(*(tensors[f"{prefix}.{p}"] for p in _PARTS), bits, group_size)


def block_from_bytes(data: Buffer) -> KVBlock:
    """Parse bytes made by :func:`block_to_bytes` (or a buffer over them: the arrays are
    views of it, read-only unless the buffer is writable); anything malformed ->
    CacheCorruptError."""
    return block_and_chain_from_bytes(data)[0]


def block_and_chain_from_bytes(data: Buffer) -> tuple[KVBlock, str | None]:
    """:func:`block_from_bytes`, and the token chain the block records (None if it has none)."""
    tensors, meta = _tensor_views(data)
    chain = meta.get("token_chain")
    try:
        start, length = int(meta["start"]), int(meta["length"])
        bits, group_size = int(meta["bits"]), int(meta["group_size"])
        n_layers, sealed = int(meta["n_layers"]), meta["sealed"] == "1"
        per_layer = [bits] * n_layers
        if "layer_bits" in meta:
            per_layer = [int(b) for b in meta["layer_bits"].split(",")]
            if len(per_layer) != n_layers or any(b not in (4, 8) for b in per_layer):
                raise ValueError(f"layer_bits {meta['layer_bits']!r} for {n_layers} layers")
        layers = [
            LayerKV(
                _get_kv(tensors, f"layers.{i}.keys", b, group_size),
                _get_kv(tensors, f"layers.{i}.values", b, group_size),
            )
            for i, b in enumerate(per_layer)
        ]
        abstract = None
        if sealed:
            abstract = [
                (tensors[f"layers.{i}.key_min"], tensors[f"layers.{i}.key_max"])
                for i in range(n_layers)
            ]
            for lo, hi in abstract:
                if lo.dtype != np.float16 or hi.dtype != np.float16 or lo.shape != hi.shape:
                    raise ValueError("bad abstract tensors")
        block = KVBlock(start, length, layers, sealed=sealed, abstract=abstract)
        return block, chain if isinstance(chain, str) else None
    except (KeyError, ValueError, TypeError) as e:
        raise CacheCorruptError(f"block data is inconsistent: {e}") from None
