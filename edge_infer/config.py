"""Settings and paths. Every setting has an ``EDGE_INFER_*`` environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

BACKEND_CHOICES = ("auto", "torch", "mlx")


def cache_root() -> Path:
    """Root of everything edge-infer stores (``EDGE_INFER_CACHE_DIR`` overrides)."""
    override = os.environ.get("EDGE_INFER_CACHE_DIR")
    return (
        Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("edge-infer"))
    )


def models_dirs() -> list[Path]:
    """Folders searched for local models (``EDGE_INFER_MODELS_DIR``, ``:``-separated, overrides)."""
    override = os.environ.get("EDGE_INFER_MODELS_DIR")
    if override:
        return [Path(p).expanduser() for p in override.split(os.pathsep) if p]
    return [cache_root() / "models"]


def default_backend() -> str:
    """Backend asked for when none is named (``EDGE_INFER_BACKEND``, default ``auto``)."""
    return os.environ.get("EDGE_INFER_BACKEND", "auto")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700; it may hold conversations."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}
_UNITS.update({"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "kib": 1 << 10, "mib": 1 << 20})
_UNITS.update({"gib": 1 << 30})


def parse_bytes(value: str | int, what: str = "size") -> int:
    """``"256MB"``, ``"1.5 GiB"``, ``"4096"`` or an int -> bytes (units of 1024);
    ValueError naming ``what`` for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :]
        try:
            n = int(float(digits) * _UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(
                f"{what} must be a number of bytes such as 256MB or 2GB, got {value!r}"
            ) from None
    if n < 0:
        raise ValueError(f"{what} must not be negative, got {value!r}")
    return n


def kv_memory_setting() -> str | None:
    """Host-memory budget for offloaded KV when none is given (``EDGE_INFER_KV_MEMORY``)."""
    return os.environ.get("EDGE_INFER_KV_MEMORY") or None
