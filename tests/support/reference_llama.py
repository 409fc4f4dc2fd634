"""Float64 numpy reference of a Llama-family GGUF model, built only from the ``gguf`` package.

Weights come from ``gguf``'s own dequantizer, in the file's row order, with llama.cpp's
interleaved ("normal") RoPE, so none of edge_infer's conversion code is involved.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np


class ReferenceLlama:
    """``kv_float16``: round keys/values to float16 as a float16 KV cache stores them."""

    def __init__(self, path: Path, kv_float16: bool = False) -> None:
        self.kv_float16 = kv_float16
        reader = gguf.GGUFReader(str(path))
        meta = {
            k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
        }
        arch = meta["general.architecture"]
        assert arch == "llama", "the reference implements the llama architecture"
        self.n_layers = meta[f"{arch}.block_count"]
        self.n_heads = meta[f"{arch}.attention.head_count"]
        self.n_kv = meta[f"{arch}.attention.head_count_kv"]
        self.eps = meta[f"{arch}.attention.layer_norm_rms_epsilon"]
        theta = meta[f"{arch}.rope.freq_base"]
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.asarray(arr, dtype=np.float64).reshape(
                tuple(int(x) for x in reversed(t.shape))
            )
        hidden = self.w["token_embd.weight"].shape[1]
        self.head_dim = hidden // self.n_heads
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.head_dim, 2) / self.head_dim)
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # x [T, H, D]; llama.cpp "normal" mode rotates adjacent pairs (2i, 2i+1).
        ang = pos[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def new_cache(self) -> list[list[np.ndarray]]:
        d = self.head_dim
        return [
            [np.zeros((0, self.n_kv, d)), np.zeros((0, self.n_kv, d))] for _ in range(self.n_layers)
        ]

    def forward(self, ids: list[int], cache: list[list[np.ndarray]] | None = None) -> np.ndarray:
        """Logits [T, vocab] (float64) for ``ids`` after what ``cache`` holds."""
        cache = cache if cache is not None else self.new_cache()
        start = cache[0][0].shape[0]
        T, d, H, Hkv = len(ids), self.head_dim, self.n_heads, self.n_kv
        pos = np.arange(start, start + T, dtype=np.float64)
        h = self.w["token_embd.weight"][np.asarray(ids)]
        mask = np.triu(np.full((T, start + T), -np.inf), k=start + 1)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            x = self._norm(h, self.w[p + "attn_norm.weight"])
            q = self._rope((x @ self.w[p + "attn_q.weight"].T).reshape(T, H, d), pos)
            k = self._rope((x @ self.w[p + "attn_k.weight"].T).reshape(T, Hkv, d), pos)
            v = (x @ self.w[p + "attn_v.weight"].T).reshape(T, Hkv, d)
            if self.kv_float16:
                k = k.astype(np.float16).astype(np.float64)
                v = v.astype(np.float16).astype(np.float64)
            cache[i][0] = np.concatenate([cache[i][0], k])
            cache[i][1] = np.concatenate([cache[i][1], v])
            keys, values = cache[i]
            rep = H // Hkv
            kk, vv = np.repeat(keys, rep, axis=1), np.repeat(values, rep, axis=1)
            scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(d) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = np.einsum("hts,shd->thd", probs, vv).reshape(T, H * d)
            h = h + attn @ self.w[p + "attn_output.weight"].T
            x = self._norm(h, self.w[p + "ffn_norm.weight"])
            g, u = x @ self.w[p + "ffn_gate.weight"].T, x @ self.w[p + "ffn_up.weight"].T
            h = h + (g / (1 + np.exp(-g)) * u) @ self.w[p + "ffn_down.weight"].T
        return self._norm(h, self.w["output_norm.weight"]) @ self.out.T

    def greedy(self, ids: list[int], steps: int) -> tuple[list[int], list[float]]:
        """Greedy continuation and, per step, the top-1 minus top-2 log-prob margin."""
        cache = self.new_cache()
        logits = self.forward(ids, cache)[-1]
        out, margins = [], []
        for _ in range(steps):
            top2 = np.sort(logits)[-2:]
            margins.append(float(top2[1] - top2[0]))
            out.append(int(np.argmax(logits)))
            logits = self.forward([out[-1]], cache)[-1]
        return out, margins


def log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
