"""Memory-mapped reader for .safetensors files (bf16 included, which numpy cannot name)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edge_infer.errors import ModelFormatError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """Tensors of one .safetensors file as numpy arrays (float tensors as float32)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ModelFormatError(f"{path}: truncated or corrupt safetensors header")
            try:
                header = json.loads(f.read(n))
            except ValueError:
                raise ModelFormatError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self._base = 8 + n
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        for name, entry in header.items():
            self._check_entry(name, entry, size - self._base)

    def _check_entry(self, name: str, entry: object, data_size: int) -> None:
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise ModelFormatError(
                f"{where}: corrupt header entry (needs dtype, shape, data_offsets)"
            )
        if entry["dtype"] not in _DTYPES:
            raise ModelFormatError(f"{where} has unsupported dtype {entry['dtype']}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise ModelFormatError(f"{where}: corrupt shape or data_offsets in the header")
        if offsets[1] > data_size:
            raise ModelFormatError(
                f"{self.path}: truncated file: tensor {name!r} runs past its end"
            )
        itemsize = np.dtype(_DTYPES[entry["dtype"]]).itemsize
        nbytes = offsets[1] - offsets[0]
        if int(np.prod(shape)) * itemsize != nbytes:
            raise ModelFormatError(
                f"{where}: shape {shape} of {entry['dtype']} does not match its {nbytes} bytes"
            )

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor; BF16/F16 become float32, integer tensors keep their type."""
        entry = self.header[name]
        start, end = entry["data_offsets"]
        raw = self._data[self._base + start : self._base + end]
        arr = raw.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            return bf16_to_f32(arr)
        if entry["dtype"] in ("F16", "F64"):
            return arr.astype(np.float32)
        return arr
