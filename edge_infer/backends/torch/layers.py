"""The parts of a decoder layer that differ between model families (Gemma 3, Qwen3, Llama)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from edge_infer.models.spec import ModelConfig


class RopeTable:
    """cos/sin of RoPE angles per position for one set of inverse frequencies, grown on
    demand (computed in float64, held in float32)."""

    def __init__(self, inv_freq: np.ndarray, min_length: int, device: torch.device) -> None:
        self._inv_freq = torch.from_numpy(inv_freq).to(device=device, dtype=torch.float64)
        self._min_length, self._device = min_length, device
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def get(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [end - start, head_dim/2] of positions start..end."""
        if self._cos is None or self._cos.shape[0] < end:
            held = self._cos.shape[0] if self._cos is not None else 0
            n = max(end, self._min_length, 2 * held)
            pos = torch.arange(n, device=self._device, dtype=torch.float64)
            angles = pos[:, None] * self._inv_freq
            self._cos, self._sin = angles.cos().float(), angles.sin().float()
        assert self._sin is not None
        return self._cos[start:end], self._sin[start:end]


def query_factor(config: ModelConfig) -> float | None:
    """What queries are multiplied by so that attention's 1/sqrt(head_dim) gives the model's
    own score scale; None when they agree."""
    factor = config.score_scale() * math.sqrt(config.head_dim)
    return None if abs(factor - 1.0) < 1e-12 else factor


def norm_heads(
    qk: torch.Tensor,
    n_q: int,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Per-head RMSNorm of queries and keys: qk [N, n_q + n_kv, D] -> the same, normed."""
    d = qk.shape[-1]
    q = F.rms_norm(qk[:, :n_q], (d,), q_weight, eps)
    k = F.rms_norm(qk[:, n_q:], (d,), k_weight, eps)
    return torch.cat([q, k], dim=1)
