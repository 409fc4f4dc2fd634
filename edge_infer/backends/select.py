"""Choosing a backend for this machine and building it."""

from __future__ import annotations

import importlib.util
import platform

from edge_infer.backends.base import Backend
from edge_infer.errors import BackendUnavailableError, UnsupportedModelError
from edge_infer.models.spec import LoadedModel

BACKENDS = ("torch", "mlx")


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve_backend_name(requested: str = "auto") -> str:
    """Auto: MLX on Apple Silicon, torch (CUDA if present, else CPU) elsewhere."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        if is_apple_silicon() and importlib.util.find_spec("mlx") is not None:
            return "mlx"
        if importlib.util.find_spec("torch") is not None:
            return "torch"
        if importlib.util.find_spec("mlx") is not None:
            return "mlx"
        raise BackendUnavailableError(
            "no backend installed: pip install 'edge-infer[torch]' (or [mlx] on Apple Silicon)"
        )
    if requested not in BACKENDS:
        raise BackendUnavailableError(
            f"unknown backend {requested!r} (supported: auto, {', '.join(BACKENDS)})"
        )
    module = "mlx" if requested == "mlx" else "torch"
    if importlib.util.find_spec(module) is None:
        raise BackendUnavailableError(
            f"backend {requested!r} needs the {module} package: pip install 'edge-infer[{module}]'"
        )
    return requested


def create_backend(
    model: LoadedModel,
    requested: str = "auto",
    device: str | None = None,
    kv_bits: int = 4,
    kv_group_size: int = 64,
) -> Backend:
    """Build the backend named ``requested`` (or the automatic choice) for ``model``.

    Its KV caches store keys and values with ``kv_bits`` (4, 8, or 16 = float16).
    """
    name = resolve_backend_name(requested)
    if kv_bits not in (4, 8, 16):
        raise ValueError(f"kv_bits must be 4, 8 or 16 (got {kv_bits})")
    head_dim = model.config.head_dim
    if kv_bits < 16 and (head_dim % kv_group_size or head_dim & (head_dim - 1)):
        raise UnsupportedModelError(
            f"{kv_bits}-bit KV needs a power-of-two head_dim that groups of {kv_group_size} "
            f"divide; this model has head_dim {head_dim} (use kv_bits=16 or another group size)"
        )
    if name == "mlx":
        from edge_infer.backends.mlx.backend import MLXBackend

        return MLXBackend(model, kv_bits=kv_bits, kv_group_size=kv_group_size)
    from edge_infer.backends.torch.backend import TorchBackend

    return TorchBackend(model, device=device, kv_bits=kv_bits, kv_group_size=kv_group_size)
