"""Load a Llama-family GGUF file into a :class:`LoadedModel`."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.formats.affine import quantize
from edge_infer.models.fingerprint import file_digest, text_digest
from edge_infer.models.gguf.quants import UnsupportedTensorType, dequantize, to_affine
from edge_infer.models.gguf.reader import GGUFFile
from edge_infer.models.spec import LoadedModel, ModelConfig, Weight, required_weights
from edge_infer.models.tokenizer import Tokenizer

GGUF_ARCHITECTURES = ("llama", "qwen2")
# Re-quantization of types we cannot convert losslessly: (bits, group size).
REQUANT_FLOAT = (4, 64)
REQUANT_BLOCKS = (4, 32)  # K-quants, Q5_0, Q5_1: 4-bit, groups of 32 like their sub-blocks
_FLOAT_TYPES = {0, 1, 30}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = {"rope_freqs.weight"}
# llama.cpp's converter permutes these rows (weights and biases) for interleaved RoPE.
_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor, or None when we do not know it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved -> half-split RoPE)."""
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def config_from_metadata(meta: dict[str, Any], path: Path, gguf: GGUFFile) -> ModelConfig:
    """Model hyper-parameters from GGUF metadata."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {arch or '(none)'!r} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    if get("expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts models are not supported")
    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        if len(set(n_kv)) != 1:
            raise UnsupportedModelError(f"{path}: per-layer KV head counts are not supported")
        n_kv = n_kv[0]
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    vocab = meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    factors = _rope_factors(meta, arch, head_dim, gguf)
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        context_length=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        rope_freq_factors=factors,
    )


def _rope_factors(meta: dict, arch: str, head_dim: int, gguf: GGUFFile) -> tuple[float, ...] | None:
    if "rope_freqs.weight" in gguf.tensors:
        info = gguf.tensors["rope_freqs.weight"]
        factors = dequantize(gguf.raw(info.name), info.ggml_type, info.shape)
        return tuple(float(x) for x in factors.reshape(-1))
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return (float(factor),) * (head_dim // 2)
    if kind not in (None, "none", "linear"):
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported (linear, llama3)")
    return None


def _convert(gguf: GGUFFile, name: str, is_matrix: bool) -> Weight:
    info = gguf.tensors[name]
    raw = gguf.raw(name)
    try:
        if not is_matrix:
            return dequantize(raw, info.ggml_type, info.shape).astype(np.float32)
        direct = to_affine(raw, info.ggml_type, info.shape)
        if direct is not None:
            return direct
        dense = dequantize(raw, info.ggml_type, info.shape)
    except UnsupportedTensorType as exc:
        raise UnsupportedModelError(f"{gguf.path}: tensor {name!r}: {exc}") from None
    bits, group = REQUANT_FLOAT if info.ggml_type in _FLOAT_TYPES else REQUANT_BLOCKS
    if dense.shape[1] % group:
        group = 32
    return quantize(dense, bits=bits, group_size=group)


def load_gguf(path: Path, progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Read ``path`` and convert every tensor to our formats (lossless where the type allows)."""
    gguf = GGUFFile(path)
    meta = gguf.metadata
    config = config_from_metadata(meta, path, gguf)
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except ValueError as exc:
        raise ModelFormatError(f"{path}: tokenizer: {exc}") from None
    weights: dict[str, Weight] = {}
    names = [n for n in gguf.tensors if n not in _IGNORED]
    for i, name in enumerate(names):
        target = hf_name(name)
        if target is None:
            raise UnsupportedModelError(f"{path}: unexpected tensor {name!r} for {config.arch}")
        is_matrix = len(gguf.tensors[name].shape) == 2
        w = _convert(gguf, name, is_matrix)
        if config.arch == "llama" and name.endswith(_PERMUTED):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            order = unpermute_rows(heads, w.shape[0])
            w = w.take_rows(order) if not isinstance(w, np.ndarray) else w[order]
        weights[target] = w
        if progress:
            progress(i + 1, len(names))
    _check_complete(weights, config, path)
    types = Counter(gguf.tensor_type_name(n) for n in names if len(gguf.tensors[n].shape) == 2)
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        source=path,
        name=str(meta.get("general.name") or path.stem),
        quantization=types.most_common(1)[0][0] if types else "F32",
        fingerprint_parts={
            "weights": file_digest(path),
            "tokenizer": _tokenizer_digest(meta),
            "chat_template": text_digest(tokenizer.chat_template or ""),
        },
    )


def _check_complete(weights: dict[str, Weight], config: ModelConfig, path: Path) -> None:
    missing = [n for n in required_weights(config) if n not in weights]
    if missing:
        raise ModelFormatError(f"{path}: missing tensors: {', '.join(missing[:5])}")


def _tokenizer_digest(meta: dict[str, Any]) -> str:
    keys = sorted(k for k in meta if k.startswith("tokenizer.") and k != "tokenizer.chat_template")
    return text_digest(*(f"{k}={meta[k]!r}" for k in keys))
