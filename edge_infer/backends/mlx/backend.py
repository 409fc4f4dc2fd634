"""MLX backend: mlx-lm's Llama/Qwen2 modules fed with edge_infer weights, run layer by layer
over our own KV cache (Qwen3 and Gemma 3 included: their extra norms are held beside them).

The weights arrive in Hugging Face naming and MLX's affine quantization layout, so they load
into mlx-lm modules as they are: a :class:`QuantizedWeight` becomes an ``nn.QuantizedLinear``
(or ``nn.QuantizedEmbedding``) with that tensor's own bits and group size. The layer loop is
ours so that attention reads the stored KV form (:mod:`.kv_cache`, :mod:`.kv_attention`)
instead of an mlx-lm cache. The norms mlx-lm's Llama lacks (query/key norms, Gemma's norms
around the attention and the MLP) are plain RMSNorm weights held per layer: our loaders store
every norm weight as it multiplies (Gemma's ``1 +`` folded in), which mlx-lm's own Gemma
classes would add a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx_lm.models import llama, qwen2

from edge_infer.backends.base import check_batch
from edge_infer.backends.mlx.kv_attention import attend
from edge_infer.backends.mlx.kv_cache import MLXCache
from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.spec import (
    QK_NORM_WEIGHTS,
    SANDWICH_WEIGHTS,
    LoadedModel,
    ModelConfig,
    Weight,
)

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class FreqsRoPE(nn.Module):
    """Half-split RoPE with explicit per-frequency periods (scaled RoPE: linear, llama3)."""

    def __init__(self, inv_freq: np.ndarray) -> None:
        super().__init__()
        self.dims = 2 * int(inv_freq.shape[0])
        # Periods, as mx.fast.rope expects: angle = position / period.
        self._freqs = mx.array((1.0 / np.asarray(inv_freq, np.float64)).astype(np.float32))

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


@dataclass
class _ExtraNorms:
    """One layer's norm weights beyond Llama's two (None where the model has no such norm)."""

    q: mx.array | None = None
    k: mx.array | None = None
    # With sandwich norms: the norms before and after the MLP (post_attention_layernorm then
    # normalises the attention output).
    pre_mlp: mx.array | None = None
    mlp_out: mx.array | None = None


def _build_model(config: ModelConfig) -> nn.Module:
    """An mlx-lm model (random, unevaluated parameters) shaped like ``config``, without the
    norms :class:`_ExtraNorms` holds."""
    common = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.context_length,
        "rope_theta": config.rope_theta,
        "rope_traditional": False,
        "tie_word_embeddings": config.tie_word_embeddings,
    }
    arch = config.arch.lower()
    if arch == "qwen2" and config.head_dim * config.num_heads == config.hidden_size:
        return qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common))
    if arch in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        # Qwen2 with a head_dim mlx-lm's qwen2 class cannot express runs as llama with biases
        # (the o_proj bias it would add is dropped when loading); Qwen3 and Gemma 3 share
        # Llama's projections and differ in what _layers adds around them.
        return llama.Model(
            llama.ModelArgs(
                model_type="llama",
                head_dim=config.head_dim,
                attention_bias=config.attention_bias or arch == "qwen2",
                **common,
            )
        )
    raise UnsupportedModelError(f"MLX backend: unsupported architecture {config.arch!r}")


class MLXBackend:
    """Runs a Llama-family, Qwen3 or Gemma 3 decoder with MLX (Metal GPU on Apple Silicon,
    CPU elsewhere).

    Activations are float32 on CPU (norms included) and float16 on the GPU unless ``dtype``
    ("float32", "float16", "bfloat16") says otherwise.
    """

    name = "mlx"

    def __init__(
        self,
        model: LoadedModel,
        *,
        dtype: str | None = None,
        kv_bits: int = 4,
        kv_group_size: int = 64,
    ) -> None:
        self.config = config = model.config
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        on_gpu = mx.default_device().type == mx.DeviceType.gpu
        self.device = "gpu" if on_gpu else "cpu"
        if dtype is None:
            dtype = "float16" if on_gpu else "float32"
        if dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(_DTYPES)})")
        self.dtype = _DTYPES[dtype]

        weights = dict(model.weights)
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        elif "lm_head.weight" not in weights:  # no output matrix: the embedding serves as one
            self.config = config = replace(config, tie_word_embeddings=True)

        self._model = _build_model(config)
        self._norms = [self._take_extra_norms(weights, i) for i in range(config.num_layers)]
        self._drop_absent_biases(weights)

        def quant_params(path: str, module: nn.Module) -> dict[str, Any] | bool:
            w = weights.get(f"{path}.weight")
            if not isinstance(w, QuantizedWeight) or not hasattr(module, "to_quantized"):
                return False
            return {"group_size": w.group_size, "bits": w.bits, "mode": "affine"}

        nn.quantize(self._model, class_predicate=quant_params)
        try:
            self._model.load_weights(self._to_mlx(weights), strict=True)
        except ValueError as exc:  # missing/unexpected tensor or wrong shape
            msg = f"{model.source}: weights do not fit {config.arch}: {exc}"
            raise ModelFormatError(msg) from exc

        if config.rope_freq_factors is not None:
            inv_freq = config.rope_inv_freq()
            for layer in self._model.layers:
                layer.self_attn.rope = FreqsRoPE(inv_freq)
        if config.local_layers:  # their own base, never scaled
            local_freq = config.rope_local_inv_freq()
            for i, layer in enumerate(self._model.layers):
                if config.is_local(i):
                    layer.self_attn.rope = FreqsRoPE(local_freq)
        self._windows = config.layer_windows()
        self._scale = config.score_scale()
        self._gate = nn.gelu_approx if config.hidden_act == "gelu_tanh" else nn.silu
        self._model.eval()
        mx.eval(self._model.parameters(), self._norms_arrays())

    def _take_extra_norms(self, weights: dict[str, Weight], layer: int) -> _ExtraNorms:
        """Remove layer ``layer``'s norms beyond Llama's from ``weights``, as arrays."""
        cfg, p = self.config, f"model.layers.{layer}."
        names = (QK_NORM_WEIGHTS if cfg.qk_norm else ()) + (
            SANDWICH_WEIGHTS if cfg.sandwich_norms else ()
        )
        held: dict[str, mx.array] = {}
        for name in names:
            w = weights.pop(p + name, None)
            if w is None:
                raise ModelFormatError(f"{cfg.arch} weights lack {p + name}")
            if isinstance(w, QuantizedWeight):
                w = w.dequantize()
            held[name] = mx.array(np.asarray(w, dtype=np.float32)).astype(self.dtype)
        q, k = (held.get(n) for n in QK_NORM_WEIGHTS)
        pre_mlp, mlp_out = (held.get(n) for n in SANDWICH_WEIGHTS)
        return _ExtraNorms(q=q, k=k, pre_mlp=pre_mlp, mlp_out=mlp_out)

    def _norms_arrays(self) -> list[mx.array]:
        return [a for n in self._norms for a in (n.q, n.k, n.pre_mlp, n.mlp_out) if a is not None]

    def _drop_absent_biases(self, weights: dict[str, Weight]) -> None:
        """Remove bias parameters mlx-lm's class has but the checkpoint does not."""
        for path, module in self._model.named_modules():
            linear_with_bias = isinstance(module, nn.Linear) and "bias" in module
            if linear_with_bias and f"{path}.bias" not in weights:
                module.pop("bias")

    def _to_mlx(self, weights: dict[str, Weight]) -> list[tuple[str, mx.array]]:
        """Our weights as (name, mx.array) pairs in mlx-lm's parameter naming."""
        out: list[tuple[str, mx.array]] = []
        for name, w in weights.items():
            if isinstance(w, QuantizedWeight):
                base = name.removesuffix(".weight")
                out.append((name, mx.array(w.packed)))
                # float16 -> float32 is exact; matching the activations keeps outputs float32.
                out.append((f"{base}.scales", mx.array(w.scales).astype(self.dtype)))
                out.append((f"{base}.biases", mx.array(w.biases).astype(self.dtype)))
            else:
                out.append((name, mx.array(np.asarray(w)).astype(self.dtype)))
        return out

    @property
    def mlx_model(self) -> nn.Module:
        """The mlx-lm model holding the weights (to run it with mlx-lm's own caches)."""
        return self._model

    def new_cache(self) -> MLXCache:
        """An empty KV cache for one sequence."""
        cfg = self.config
        return MLXCache(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.kv_bits,
            self.kv_group_size,
            windows=self._windows,
        )

    def forward(
        self, inputs: np.ndarray, cache: MLXCache, *, all_logits: bool = False
    ) -> np.ndarray:
        """Run ``inputs`` (token ids [T] or embeddings [T, hidden]) after what ``cache`` holds.

        Appends the inputs' keys/values to ``cache``; returns float32 logits [T, vocab] when
        ``all_logits`` else [1, vocab] for the last position.
        """
        inputs = np.asarray(inputs)
        cfg = self.config
        if inputs.ndim == 1 and np.issubdtype(inputs.dtype, np.integer):
            if inputs.shape[0] == 0:
                raise ValueError("forward needs at least one token")
            if inputs.min() < 0 or inputs.max() >= cfg.vocab_size:
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size})")
            h = self._embed(mx.array(inputs.astype(np.int32))[None])
        elif inputs.ndim == 2 and np.issubdtype(inputs.dtype, np.floating):
            if inputs.shape[0] == 0 or inputs.shape[1] != cfg.hidden_size:
                raise ValueError(
                    f"embeddings must be [T>0, {cfg.hidden_size}], got {list(inputs.shape)}"
                )
            h = mx.array(inputs.astype(np.float32)).astype(self.dtype)[None]
        else:
            raise ValueError(
                "inputs must be token ids [T] (int) or embeddings [T, hidden] (float), got "
                f"{inputs.dtype} {list(inputs.shape)}"
            )

        outs, pos, total = [], 0, h.shape[1]
        while pos < total:  # one call per KV block touched
            n = min(total - pos, cache.max_tokens_in_one_call())
            hidden = self._layers(h[:, pos : pos + n], [cache])
            pos += n
            if all_logits or pos == total:
                outs.append(self._head(hidden if all_logits else hidden[:, -1:, :]))
            mx.eval(outs[-1:], cache.arrays())
            cache.advance(n)
        return np.array(mx.concatenate(outs, axis=0) if len(outs) > 1 else outs[0])

    def forward_batch(self, tokens: Sequence[int], caches: Sequence[MLXCache]) -> np.ndarray:
        """Logits [B, vocab] after feeding ``tokens[b]`` to ``caches[b]`` (one step each).

        The projections and the MLP run once for the batch; attention runs per sequence over
        its own cache.
        """
        check_batch(tokens, caches)
        ids = mx.array(np.asarray(tokens, dtype=np.int32))[:, None]
        hidden = self._layers(self._embed(ids), list(caches))  # [B, 1, D]
        logits = self._head(hidden.reshape(1, len(caches), -1))
        mx.eval(logits, [a for cache in caches for a in cache.arrays()])
        for cache in caches:
            cache.advance(1)
        return np.array(logits)

    def _embed(self, ids: mx.array) -> mx.array:
        """Embedding rows of token ids, times the model's embedding scale (Gemma)."""
        h = self._model.model.embed_tokens(ids)
        scale = self.config.embedding_scale
        return h * scale if scale != 1.0 else h

    def _layers(self, h: mx.array, caches: list[MLXCache]) -> mx.array:
        """The decoder over h [B, T, hidden], row b after ``caches[b]`` (one cache: B = 1):
        stores each layer's keys and values in the caches (uncommitted) and returns the
        final-normed hidden states [B, T, hidden]."""
        m, eps = self._model.model, self.config.rms_norm_eps
        n, t = h.shape[:2]
        for i, layer in enumerate(m.layers):
            attn, norms = layer.self_attn, self._norms[i]
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).reshape(n, t, attn.n_heads, -1)
            k = attn.k_proj(x).reshape(n, t, attn.n_kv_heads, -1)
            v = attn.v_proj(x).reshape(n, t, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
            if norms.q is not None and norms.k is not None:  # per head, before RoPE
                q = mx.fast.rms_norm(q, norms.q, eps)
                k = mx.fast.rms_norm(k, norms.k, eps)
            q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
            outs = []
            for b, cache in enumerate(caches):
                at = cache.length
                cache.update(i, attn.rope(k[b : b + 1], offset=at), v[b : b + 1])
                q_b = attn.rope(q[b : b + 1], offset=at)
                outs.append(attend(cache, i, q_b, self._scale, window=self._windows[i]))
            o = outs[0] if n == 1 else mx.concatenate(outs, axis=0)
            o = attn.o_proj(o.transpose(0, 2, 1, 3).reshape(n, t, -1))
            if norms.pre_mlp is not None and norms.mlp_out is not None:  # Gemma's sandwich
                h = h + layer.post_attention_layernorm(o)
                x = mx.fast.rms_norm(h, norms.pre_mlp, eps)
                h = h + mx.fast.rms_norm(self._mlp(layer.mlp, x), norms.mlp_out, eps)
            else:
                h = h + o
                h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))
        return m.norm(h)

    def _mlp(self, mlp: nn.Module, x: mx.array) -> mx.array:
        """The gated MLP with the model's gate activation (SiLU or GELU-tanh)."""
        return mlp.down_proj(self._gate(mlp.gate_proj(x)) * mlp.up_proj(x))

    def _head(self, hidden: mx.array) -> mx.array:
        if self.config.tie_word_embeddings:
            logits = self._model.model.embed_tokens.as_linear(hidden)
        else:
            logits = self._model.lm_head(hidden)
        return logits[0].astype(mx.float32)
