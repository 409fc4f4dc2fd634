"""The safetensors layout shared by model files and KV block files: dtype names, header
entry checks, zero-copy tensor views."""

from __future__ import annotations

import math

import numpy as np

DTYPES = {
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


_ITEMSIZES = {name: np.dtype(t).itemsize for name, t in DTYPES.items()}


def _is_count(x: object) -> bool:
    return type(x) is int and x >= 0


def entry_problem(entry: object, data_size: int) -> str | None:
    """Why a header entry cannot describe a tensor inside ``data_size`` bytes, or None."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        return "corrupt header entry (needs dtype, shape, data_offsets)"
    if entry["dtype"] not in DTYPES:
        return f"unsupported dtype {entry['dtype']}"
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (
        type(shape) is list
        and type(offsets) is list
        and len(offsets) == 2
        and _is_count(offsets[0])
        and _is_count(offsets[1])
        and offsets[0] <= offsets[1]
    ):
        return "corrupt shape or data_offsets in the header"
    for d in shape:
        if not _is_count(d):
            return "corrupt shape or data_offsets in the header"
    if offsets[1] > data_size:
        return "truncated file: its data runs past the end"
    nbytes = offsets[1] - offsets[0]
    if math.prod(shape) * _ITEMSIZES[entry["dtype"]] != nbytes:
        return f"shape {shape} of {entry['dtype']} does not match its {nbytes} bytes"
    return None


def tensor_view(buffer, base: int, entry: dict) -> np.ndarray:
    """The tensor an entry (already checked) describes, as a view of ``buffer``."""
    start, end = entry["data_offsets"]
    dtype = np.dtype(DTYPES[entry["dtype"]])
    count = (end - start) // dtype.itemsize
    return np.frombuffer(buffer, dtype=dtype, count=count, offset=base + start).reshape(
        entry["shape"]
    )
