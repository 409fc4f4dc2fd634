"""The Triton attention kernel for CUDA: one new token per sequence over KV caches held in the
stored form (4/8-bit rotated blocks and a float16 tail), the contract of the CPU kernel.

:func:`load` gives the kernel module, or ``None`` when Triton is not installed or kernels are
turned off (``EDGE_INFER_KERNELS=off``); callers then use the plain-torch path. Under
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (how the tests check it without a
GPU).
"""

from __future__ import annotations

import importlib.util
import threading
from types import ModuleType

from edge_infer.kernels.cpu import enabled

_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}


def accepts(head_dim: int, bits: int, group_size: int) -> bool:
    """Whether the kernel takes this KV layout (a power-of-two head size of 16 to 256)."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return False
    return bits == 16 or (bits in (4, 8) and head_dim % group_size == 0)


def load() -> ModuleType | None:
    """The kernel module (importing Triton on first use); ``None`` if unavailable."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _state:
            module = None
            if importlib.util.find_spec("triton") is not None:
                from edge_infer.kernels.triton import kv_attention as module
            _state["module"] = module
        return _state["module"]
