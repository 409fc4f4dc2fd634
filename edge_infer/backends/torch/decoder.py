"""A compact decoder (Llama, Mistral, Qwen2/3, SmolLM, Gemma 3) on our quantized weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edge_infer.backends.torch.kv_attention import attend_new_tokens, attend_tokens
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.backends.torch.layers import RopeTable, norm_heads, query_factor
from edge_infer.backends.torch.linear import (
    GEGLU,
    RMS_NORM,
    SWIGLU,
    Linear,
    PackedLinear,
    concat_weights,
    make_linear,
)
from edge_infer.formats.affine import QuantizedWeight
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.models.spec import LoadedModel, Weight

# Candidates of the output head recomputed exactly in float32 per position; more behind a
# 4-bit scan of the head (see _head_scan), enough that the logits it leaves coarse carry
# too little probability to matter.
HEAD_RESCORE_TOP_K = 64
SCANNED_HEAD_RESCORE_TOP_K = 512


def _vector(w: Weight, device: torch.device) -> torch.Tensor:
    arr = w if isinstance(w, np.ndarray) else w.dequantize()
    # a copy: weights read from safetensors are read-only views of the file, which torch
    # warns about sharing (and the vectors are small)
    return torch.from_numpy(np.array(arr, dtype=np.float32)).to(device)


@dataclass
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: Linear
    qkv_bias: torch.Tensor | None
    o: Linear
    gate_up: Linear
    down: Linear
    local: bool = False  # a sliding-window layer (its own RoPE base)
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    attn_out_norm: torch.Tensor | None = None  # Gemma's norms of the attention and MLP
    mlp_out_norm: torch.Tensor | None = None  # outputs (post_norm is then pre-MLP)


class TorchDecoder:
    """Runs the decoder; activations float32 (the linear layers round them as they need)."""

    def __init__(self, model: LoadedModel, device: torch.device) -> None:
        cfg = self.config = model.config
        self.device = device
        self._kernel = cpu_kernels.load() if device.type == "cpu" else None
        w = model.weights
        self._embed_weight: Weight | None = w["model.embed_tokens.weight"]
        self.layers: list[_Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            attn = [w[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
            bias = None
            if cfg.attention_bias:
                bias = torch.cat(
                    [_vector(w[p + f"self_attn.{n}_proj.bias"], device) for n in "qkv"]
                )
            pre_mlp = (
                "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
            )
            self.layers.append(
                _Layer(
                    input_norm=_vector(w[p + "input_layernorm.weight"], device),
                    post_norm=_vector(w[p + pre_mlp + ".weight"], device),
                    qkv=make_linear(concat_weights(attn), device),
                    qkv_bias=bias,
                    o=make_linear(w[p + "self_attn.o_proj.weight"], device),
                    gate_up=make_linear(
                        concat_weights(
                            [w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]
                        ),
                        device,
                    ),
                    down=make_linear(w[p + "mlp.down_proj.weight"], device),
                    local=cfg.is_local(i),
                )
            )
            layer = self.layers[-1]
            if cfg.qk_norm:
                layer.q_norm = _vector(w[p + "self_attn.q_norm.weight"], device)
                layer.k_norm = _vector(w[p + "self_attn.k_norm.weight"], device)
            if cfg.sandwich_norms:
                layer.attn_out_norm = _vector(w[p + "post_attention_layernorm.weight"], device)
                layer.mlp_out_norm = _vector(w[p + "post_feedforward_layernorm.weight"], device)
        self.norm = _vector(w["model.norm.weight"], device)
        head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
        # one int8 pass of the activations is enough for the head: its best candidates are
        # rescored exactly; the layers' products take two (see PackedLinear)
        self.lm_head = make_linear(head, device, passes=1)
        # the loader's arrays are kept only where nothing else holds them: the packed head
        # rescores its own rows and, when tied, gives the embedding rows too (at this
        # model size the head is the largest weight; a second copy would double it)
        packed = isinstance(self.lm_head, PackedLinear)
        self._head_weight = None if packed else head
        if packed and cfg.tie_word_embeddings:
            self._embed_weight = None
        # where the head is most of the bytes a decoded token reads (a large vocabulary
        # over a small model), an 8-bit one is scanned in 4 bits: about half the bytes
        self._head_scan: PackedLinear | None = None
        head_layer = self.lm_head
        if isinstance(head_layer, PackedLinear) and head_layer.bits == 8:
            if head_layer.nbytes > self._layer_bytes():
                self._head_scan = head_layer.coarse_copy()
        self._inv_freq = torch.from_numpy(cfg.rope_inv_freq()).to(
            device=device, dtype=torch.float64
        )
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rope_local = RopeTable(cfg.rope_local_inv_freq(), cfg.context_length, device)
        self._q_factor = query_factor(cfg)
        self._gate = GEGLU if cfg.hidden_act == "gelu_tanh" else SWIGLU  # fused before down

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights one decoded token reads: every projection and the head."""
        head = self._head_scan if self._head_scan is not None else self.lm_head
        return self._layer_bytes() + head.nbytes

    def _layer_bytes(self) -> int:
        """Bytes of the layers' projections."""
        return sum(x.nbytes for la in self.layers for x in (la.qkv, la.o, la.gate_up, la.down))

    def new_cache(self, kv_bits: int = 4, group_size: int = 64) -> TorchKVCache:
        cfg = self.config
        return TorchKVCache(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.device,
            kv_bits=kv_bits,
            group_size=group_size,
            windows=cfg.layer_windows(),
        )

    def embed(self, ids: np.ndarray) -> torch.Tensor:
        """Embedding rows for token ids, float32 [T, hidden]; an id outside the vocabulary
        is an IndexError (before any kernel reads memory by it)."""
        ids = np.asarray(ids, dtype=np.int64)
        vocab = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise IndexError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        if self._embed_weight is None:  # tied to the packed head
            h = self.lm_head.rows(torch.from_numpy(ids))
        else:
            w = self._embed_weight
            rows = w.take_rows(ids).dequantize() if isinstance(w, QuantizedWeight) else w[ids]
            h = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        return h * self.config.embedding_scale if self.config.embedding_scale != 1.0 else h

    def _rope(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope_cache is None or self._rope_cache[0].shape[0] < end:
            n = max(
                end,
                self.config.context_length,
                2 * (self._rope_cache[0].shape[0] if self._rope_cache else 0),
            )
            angles = (
                torch.arange(n, device=self.device, dtype=torch.float64)[:, None] * self._inv_freq
            )
            self._rope_cache = (angles.cos().float(), angles.sin().float())
        cos, sin = self._rope_cache
        return cos[start:end], sin[start:end]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-split rotation of x [N, H, D] with cos/sin [N, 1, D/2]."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, cache: TorchKVCache, all_logits: bool) -> torch.Tensor:
        """Hidden states [T, hidden] after ``cache`` -> logits float32 ([T] or [1], vocab)."""
        h = self._layers(h, cache)
        return self._logits(h if all_logits else h[-1:])

    @torch.inference_mode()
    def extend(self, h: torch.Tensor, cache: TorchKVCache) -> None:
        """Hidden states [T, hidden] into ``cache`` with no logits (a prefill's earlier
        chunks: the output head is the largest weight)."""
        self._layers(h, cache)

    def _layers(self, h: torch.Tensor, cache: TorchKVCache) -> torch.Tensor:
        """Every layer over h [T, hidden] after ``cache`` (which then holds the T tokens):
        the final hidden states, float32 [T, hidden]."""
        cfg = self.config
        h = h.to(torch.float32, copy=True)  # the residual stream is updated in place
        T, start = h.shape[0], cache.length
        ropes = {False: self._rope(start, start + T)}
        if cfg.local_layers:
            ropes[True] = self._rope_local.get(start, start + T)
        n_q, d = cfg.num_heads, cfg.head_dim
        if T == 1:
            cache.reserve_next()
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[layer.local]
            q, k, v = self._qkv(layer, h, cos, sin)
            if T == 1:  # the same computation as one row of forward_batch
                attn = attend_new_tokens([cache], i, q, k, v).reshape(1, n_q * d)
            else:
                cache.update(i, k.transpose(0, 1), v.transpose(0, 1))
                attn = attend_tokens(cache, i, q.transpose(0, 1))
                attn = attn.transpose(0, 1).reshape(T, n_q * d)
            self._add_attention(layer, h, attn)
            self._add_mlp(layer, h)
        cache.advance(T)
        return h

    @torch.inference_mode()
    def forward_batch(self, h: torch.Tensor, caches: list[TorchKVCache]) -> torch.Tensor:
        """One new token per sequence: h [B, hidden], row b continuing ``caches[b]``.

        The projections and the MLP run once for the whole batch (the weights are read once);
        attention reads each sequence's own cache, all in one kernel call. Each row computes
        exactly what a one-token :meth:`forward` on its cache computes.
        """
        cfg = self.config
        h = h.to(torch.float32, copy=True)
        B = h.shape[0]
        starts = [c.length for c in caches]
        pos = torch.tensor(starts, device=self.device)
        tables = {False: self._rope(0, max(starts) + 1)}
        if cfg.local_layers:
            tables[True] = self._rope_local.get(0, max(starts) + 1)
        ropes = {k: (c[pos], s[pos]) for k, (c, s) in tables.items()}  # [B, D/2] per kind
        n_q, d = cfg.num_heads, cfg.head_dim
        for cache in caches:
            cache.reserve_next()
        for i, layer in enumerate(self.layers):
            cos, sin = ropes[layer.local]
            q, k, v = self._qkv(layer, h, cos, sin)
            attn = attend_new_tokens(caches, i, q, k, v)
            self._add_attention(layer, h, attn.reshape(B, n_q * d))
            self._add_mlp(layer, h)
        for cache in caches:
            cache.advance(1)
        return self._logits(h)

    def _qkv(
        self, layer: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed ``h`` [N, hidden] through the fused QKV projection, rope applied with
        cos/sin [N, D/2]: q [N, n_q, D], k and v [N, n_kv, D], float32 (views of one tensor)."""
        cfg = self.config
        n_q, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv = layer.qkv(h, RMS_NORM, layer.input_norm, cfg.rms_norm_eps)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        n = qkv.shape[0]
        qk = qkv[:, : (n_q + n_kv) * d].view(n, n_q + n_kv, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            if self._kernel is not None:
                eps = cfg.rms_norm_eps
                self._kernel.rms_norm_blocks(qkv, 0, n_q, layer.q_norm, eps, None)
                self._kernel.rms_norm_blocks(qkv, n_q * d, n_kv, layer.k_norm, eps, None)
            else:
                qk.copy_(norm_heads(qk, n_q, layer.q_norm, layer.k_norm, cfg.rms_norm_eps))
        if self._q_factor is not None:  # the kernels scale scores by 1/sqrt(head_dim)
            qk[:, :n_q].mul_(self._q_factor)
        if self._kernel is not None:
            self._kernel.rope_inplace(qkv, cos, sin, n_q + n_kv, d)
        else:
            qk = self._apply_rope(qk, cos[:, None], sin[:, None])
        return qk[:, :n_q], qk[:, n_q:], qkv[:, (n_q + n_kv) * d :].view(n, n_kv, d)

    def _add_attention(self, layer: _Layer, h: torch.Tensor, attn: torch.Tensor) -> None:
        """h += o(attn) (normed first where the model has output norms), in place."""
        if layer.attn_out_norm is None:
            layer.o(attn, out=h)
            return
        self._add_normed(h, layer.o(attn), layer.attn_out_norm)

    def _add_normed(self, h: torch.Tensor, out: torch.Tensor, norm: torch.Tensor) -> None:
        """h += rms_norm(out) * norm, in place (one kernel pass where the kernels run)."""
        eps = self.config.rms_norm_eps
        if self._kernel is not None:
            self._kernel.rms_norm_blocks(out, 0, 1, norm, eps, h)
        else:
            h.add_(F.rms_norm(out, (self.config.hidden_size,), norm, eps))

    def _add_mlp(self, layer: _Layer, h: torch.Tensor) -> None:
        """h += MLP(norm(h)), in place."""
        cfg = self.config
        gate_up = layer.gate_up(h, RMS_NORM, layer.post_norm, cfg.rms_norm_eps)
        if layer.mlp_out_norm is None:
            layer.down(gate_up, self._gate, out=h)
            return
        self._add_normed(h, layer.down(gate_up, self._gate), layer.mlp_out_norm)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head (top candidates rescored): float32 [N, vocab]."""
        cfg = self.config
        h = F.rms_norm(h, (cfg.hidden_size,), self.norm, cfg.rms_norm_eps).contiguous()
        if self._head_scan is None:
            logits, k = self.lm_head(h), HEAD_RESCORE_TOP_K
        else:
            logits, k = self._head_scan(h), SCANNED_HEAD_RESCORE_TOP_K
        k = min(k, logits.shape[-1])
        if isinstance(self.lm_head, PackedLinear):
            self.lm_head.rescore_top(logits, h, k)
            return logits
        return self._rescore_top(logits, h, k)

    def _rescore_top(self, logits: torch.Tensor, h: torch.Tensor, k: int) -> torch.Tensor:
        """Recompute the most likely candidates' logits in float32 from the exact weights.

        The packed head (rounded activations) is fast but coarse; sampling only ever reaches
        the top candidates, so those are made exact at the cost of k row products (the CPU
        kernel does the same on its packed rows).
        """
        idx = logits.topk(k, dim=-1).indices  # [T, k]
        flat = idx.reshape(-1).cpu().numpy()
        w = self._head_weight
        assert w is not None  # held whenever the head is not packed
        rows = w.take_rows(flat).dequantize() if isinstance(w, QuantizedWeight) else w[flat]
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(self.device)
        exact = torch.einsum("th,tkh->tk", h, rows_t.view(idx.shape[0], k, -1))
        return logits.scatter_(1, idx, exact)
