"""Float64 numpy forward pass of a small Llama-family decoder (optionally with Qwen3's
query/key norms) from Hugging Face-named float weights, for models the tests write."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.spec import LoadedModel


def held_weights(model: LoadedModel) -> dict[str, np.ndarray]:
    """A loaded model's weights as the backends hold them, dequantized: a reference built
    from them checks the backends' arithmetic, not the re-quantization of float files."""
    return {
        k: w.dequantize() if isinstance(w, QuantizedWeight) else np.asarray(w)
        for k, w in model.weights.items()
    }


def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """Half-split RoPE of x [T, H, D] at positions 0..T-1."""
    T, _, D = x.shape
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def reference_logits(
    weights: Mapping[str, np.ndarray],
    ids: list[int],
    *,
    n_heads: int,
    n_kv: int,
    eps: float,
    rope_theta: float,
) -> np.ndarray:
    """Logits [T, vocab] (float64) of ``ids`` from position 0."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    h = w["model.embed_tokens.weight"][np.asarray(ids)]
    T = len(ids)
    n_layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("model.layers."))
    d = w["model.layers.0.self_attn.q_proj.weight"].shape[0] // n_heads
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        x = _norm(h, w[p + "input_layernorm.weight"], eps)
        q, k, v = (
            x @ w[p + f"self_attn.{n}_proj.weight"].T + w.get(p + f"self_attn.{n}_proj.bias", 0)
            for n in "qkv"
        )
        q, k, v = q.reshape(T, n_heads, d), k.reshape(T, n_kv, d), v.reshape(T, n_kv, d)
        if p + "self_attn.q_norm.weight" in w:
            q = _norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q, rope_theta), _rope(k, rope_theta)
        rep = n_heads // n_kv
        kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(d) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        probs = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, vv).reshape(T, n_heads * d)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T
        x = _norm(h, w[p + "post_attention_layernorm.weight"], eps)
        g, u = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (g / (1 + np.exp(-g)) * u) @ w[p + "mlp.down_proj.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return _norm(h, w["model.norm.weight"], eps) @ head.T
