"""Reader for the GGUF container: metadata, tensor directory, memory-mapped tensor bytes.

Every count and length in the header is checked against the bytes the file has left before
anything is sized by it, so a corrupt or hostile header gives a one-line ModelFormatError
naming the file and the field, never an allocation it asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.errors import ModelFormatError
from edge_infer.models.gguf.quants import GGML_TYPES, UnsupportedTensorType, tensor_nbytes

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 8
# Arrays of arrays exist in the format; deeper nesting than this is corruption.
MAX_ARRAY_DEPTH = 3
MAX_KEY_BYTES = 1 << 16
# Fewest bytes a metadata entry (key length, key, type, one-byte value) and a tensor entry
# (name length, name, n_dims, type, offset) can take: bounds the counts in the header.
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8

# GGUF metadata value types: id -> struct format (scalars) or a marker.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY_DTYPES = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}, 8: 8, 9: 12}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor directory; ``shape`` is in numpy order (rows last-contiguous)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    nbytes: int


class _Cursor:
    """Bounds-checked sequential reader over a bytes-like buffer."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path
        self.field = "header"  # what is being read, for error messages

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def corrupt(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: corrupt GGUF header: {self.field}: {what}")

    def take(self, n: int) -> memoryview:
        if n < 0 or n > self.left:
            raise self.corrupt(
                f"needs {n} bytes at offset {self.pos}, the file has {len(self.buf)} "
                "(truncated or corrupt)"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self, limit: int | None = None) -> str:
        n = self.scalar("<Q")
        if limit is not None and n > limit:
            raise self.corrupt(f"a string of {n} bytes (at most {limit} expected)")
        raw = bytes(self.take(n))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.corrupt(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype not in _MIN_VALUE_BYTES:
                raise self.corrupt(f"unknown array element type {etype}")
            if count > self.left // _MIN_VALUE_BYTES[etype]:
                raise self.corrupt(f"an array of {count} elements, more than the file holds")
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(etype, depth + 1) for _ in range(count)]
        raise self.corrupt(f"unknown value type {vtype}")


class GGUFFile:
    """An opened GGUF file. ``metadata`` holds plain Python values; tensors are memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        if size < 24:
            raise ModelFormatError(f"{self.path}: not a GGUF file (only {size} bytes)")
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        cur = _Cursor(memoryview(self._data), self.path)
        magic = bytes(cur.take(4))
        if magic != GGUF_MAGIC:
            raise ModelFormatError(
                f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')"
            )
        self.version = cur.scalar("<I")
        if self.version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(
                f"{self.path}: GGUF version {self.version} is not supported (supported: 2, 3)"
            )
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        if n_kv > cur.left // _MIN_KV_BYTES:
            cur.field = "metadata count"
            raise cur.corrupt(f"{n_kv} entries, more than the file can hold")
        if n_tensors > (cur.left - n_kv * _MIN_KV_BYTES) // _MIN_TENSOR_BYTES:
            cur.field = "tensor count"
            raise cur.corrupt(f"{n_tensors} tensors, more than the file can hold")
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            cur.field = f"metadata entry {i}"
            key = cur.string(MAX_KEY_BYTES)
            cur.field = f"metadata {_short(key)}"
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for i in range(n_tensors):
            cur.field = f"tensor entry {i}"
            name = cur.string(MAX_KEY_BYTES)
            cur.field = f"tensor {_short(name)}"
            n_dims = cur.scalar("<I")
            if n_dims > MAX_DIMS:
                raise cur.corrupt(f"{n_dims} dimensions (at most {MAX_DIMS})")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            if any(d == 0 for d in dims):
                raise cur.corrupt(f"a dimension of 0 in {dims}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = self._alignment()
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            if name in self.tensors:
                raise ModelFormatError(
                    f"{self.path}: corrupt GGUF header: tensor {_short(name)} twice"
                )
            try:
                nbytes = tensor_nbytes(ggml_type, shape)
            except UnsupportedTensorType:
                nbytes = -1  # reported when the tensor is read, so metadata stays inspectable
            except (ValueError, OverflowError) as exc:
                raise ModelFormatError(f"{self.path}: tensor {_short(name)}: {exc}") from None
            end = self.data_offset + offset + max(nbytes, 0)
            if end > size:
                raise ModelFormatError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end}, "
                    f"file has {size} bytes"
                )
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, offset, nbytes)

    def _alignment(self) -> int:
        """``general.alignment``: a positive power of two no larger than MAX_ALIGNMENT."""
        value = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if not (ok and 0 < value <= MAX_ALIGNMENT and value & (value - 1) == 0):
            raise ModelFormatError(
                f"{self.path}: general.alignment = {_short(value)} is not a power of two "
                f"from 1 to {MAX_ALIGNMENT}"
            )
        return value

    def tensor_type_name(self, name: str) -> str:
        """The ggml type name of a tensor, e.g. ``Q4_1``."""
        t = GGML_TYPES.get(self.tensors[name].ggml_type)
        return t.name if t else f"type {self.tensors[name].ggml_type}"

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file (UnsupportedTensorType
        for a type whose size is not known)."""
        info = self.tensors[name]
        if info.nbytes < 0:
            raise UnsupportedTensorType(info.ggml_type)
        start = self.data_offset + info.offset
        return self._data[start : start + info.nbytes]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _short(value: Any, chars: int = 40) -> str:
    """A metadata value for an error message: one line, at most ``chars`` characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= chars else text[: chars - 1] + "…"
