"""Which optional frameworks this machine has."""

from __future__ import annotations

import importlib.util

HAS_MLX = (
    importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
)
HAS_TORCH = importlib.util.find_spec("torch") is not None
