"""Reader for the GGUF container: metadata, tensor directory, memory-mapped tensor bytes."""

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

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ModelFormatError(
                f"{self.path}: truncated or corrupt GGUF header (needs {n} bytes at offset "
                f"{self.pos}, file has {len(self.buf)})"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.take(self.scalar("<Q"))
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(raw).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(etype) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: corrupt GGUF metadata (unknown value type {vtype})")


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
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFormatError(f"{self.path}: corrupt GGUF header (counts {n_tensors}/{n_kv})")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("<I")
            if n_dims > 8:
                raise ModelFormatError(
                    f"{self.path}: corrupt tensor entry {name!r} ({n_dims} dims)"
                )
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or 1
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            try:
                nbytes = tensor_nbytes(ggml_type, shape)
            except UnsupportedTensorType:
                nbytes = -1  # reported when the tensor is read, so metadata stays inspectable
            except ValueError as exc:
                raise ModelFormatError(f"{self.path}: tensor {name!r}: {exc}") from None
            end = self.data_offset + offset + max(nbytes, 0)
            if end > size:
                raise ModelFormatError(
                    f"{self.path}: truncated file: tensor {name!r} ends at byte {end}, "
                    f"file has {size} bytes"
                )
            self.tensors[name] = GGUFTensorInfo(name, shape, ggml_type, offset, nbytes)

    def tensor_type_name(self, name: str) -> str:
        """The ggml type name of a tensor, e.g. ``Q4_1``."""
        t = GGML_TYPES.get(self.tensors[name].ggml_type)
        return t.name if t else f"type {self.tensors[name].ggml_type}"

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        info = self.tensors[name]
        start = self.data_offset + info.offset
        return self._data[start : start + info.nbytes]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))
