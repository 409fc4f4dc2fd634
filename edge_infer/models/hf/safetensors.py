"""Memory-mapped reader for .safetensors files (bf16 included, which numpy cannot name)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from edge_infer.errors import ModelFormatError
from edge_infer.formats.safetensors import entry_problem, tensor_view


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
        problem = entry_problem(entry, data_size)
        if problem is not None:
            raise ModelFormatError(f"{self.path}: tensor {name!r}: {problem}")

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        """The tensor; BF16/F16 become float32, integer tensors keep their type."""
        entry = self.header[name]
        arr = tensor_view(self._data, self._base, entry)
        if entry["dtype"] == "BF16":
            return bf16_to_f32(arr)
        if entry["dtype"] in ("F16", "F64"):
            return arr.astype(np.float32)
        return arr
