"""Large CPU buffers on transparent huge pages, and carving one buffer into many tensors.

Fresh memory costs a page fault per 4 KiB page when first written (several microseconds each
on some virtual machines), and a KV cache restored from disk writes tens of megabytes at
once. Buffers of at least 2 MiB are therefore mapped 2 MiB-aligned and advised for huge pages
where the OS offers them (Linux with transparent huge pages in ``madvise`` or ``always``
mode): one fault per 2 MiB. Elsewhere they are ordinary tensors. A cache keeps all its layers
in one such buffer (:func:`carve`), so that its many small tensors share the huge pages.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # bytes between carved tensors: whole cache lines, any dtype's alignment

Spec = tuple[tuple[int, ...], torch.dtype]


def empty_host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; on huge pages when it is at least 2 MiB and the OS
    supports advising them. A normal tensor even inside inference mode (buffers are written
    in and out of it)."""
    with torch.inference_mode(False):
        return _empty_host(shape, dtype)


def _empty_host(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None:
        return torch.empty(shape, dtype=dtype)
    size = nbytes + HUGE_PAGE  # room to start on a 2 MiB boundary
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mem, dtype=torch.uint8)  # keeps the mapping alive
    skip = -whole.data_ptr() % HUGE_PAGE
    try:
        mem.madvise(advice, skip, size - skip)
    except OSError:  # huge pages not configured: ordinary pages still work
        pass
    return whole[skip : skip + nbytes].view(dtype).view(shape)


def _padded(spec: Spec) -> int:
    shape, dtype = spec
    return -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN


def carved_nbytes(specs: list[Spec]) -> int:
    """Bytes of a buffer that :func:`carve` can split into tensors of ``specs``."""
    return sum(_padded(s) for s in specs)


def carve(buffer: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    """Tensors of the (shape, dtype) ``specs`` as consecutive views of a 1-D uint8
    ``buffer`` of at least :func:`carved_nbytes` bytes, each starting 64-byte aligned."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("carve needs a 1-D uint8 buffer")
    if buffer.numel() < carved_nbytes(specs):
        raise ValueError(f"buffer of {buffer.numel()} bytes is too small")
    out, offset = [], 0
    for spec in specs:
        shape, dtype = spec
        n = math.prod(shape) * dtype.itemsize
        out.append(buffer[offset : offset + n].view(dtype).view(shape))
        offset += _padded(spec)
    return out
