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
