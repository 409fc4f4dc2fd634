"""Load a Llama-, Qwen- or Gemma-3-family GGUF file into a :class:`LoadedModel`."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.formats.affine import quantize
from edge_infer.models.chat_template import GEMMA_CHAT_TEMPLATE
from edge_infer.models.fingerprint import file_digest, text_digest
from edge_infer.models.gguf.quants import UnsupportedTensorType, dequantize, to_affine
from edge_infer.models.gguf.reader import GGUFFile
from edge_infer.models.spec import (
    MAX_CONTEXT,
    MAX_DIM,
    MAX_HEADS,
    MAX_LAYERS,
    MAX_VOCAB,
    LoadedModel,
    ModelConfig,
    Weight,
    attention_tag,
    expected_shapes,
    required_weights,
)
from edge_infer.models.tokenizer import Tokenizer

GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# Re-quantization of types we cannot convert losslessly: (bits, group size).
REQUANT_FLOAT = (4, 64)
REQUANT_BLOCKS = (4, 32)  # Q2_K, Q3_K: 4-bit, groups of 32 like their sub-blocks
# 5- and 6-bit types (Q5_0, Q5_1, Q5_K, Q6_K) keep their precision in 8 bits: at 4 bits
# they lose most of it (Gemma 3 files hold their attention and MLP matrices in them).
REQUANT_WIDE = (8, 32)
_WIDE_TYPES = {6, 7, 13, 14}
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
# Gemma 3 names its norms differently: ffn_norm is the norm before the MLP, and the
# attention and MLP outputs have norms of their own (Hugging Face's Gemma 3 names).
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_QWEN3_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_NAMES_BY_ARCH = {"gemma3": _GEMMA3_NAMES, "qwen3": _QWEN3_NAMES}
# Gemma 3: every 6th layer attends globally, the others in a sliding window with RoPE base
# 10000 (llama.cpp's and transformers' fixed values; GGUF files do not carry them).
GEMMA3_GLOBAL_EVERY = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
GEMMA3_27B_LAYERS = 62
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_IGNORED = {"rope_freqs.weight"}
# llama.cpp's converter permutes these rows (weights and biases) for interleaved RoPE.
_PERMUTED = ("attn_q.weight", "attn_k.weight", "attn_q.bias", "attn_k.bias")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Hugging Face name of a GGUF tensor of ``arch``, or None when we do not know it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in names:
        return f"model.layers.{m.group(1)}.{names[m.group(2)]}"
    return None


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation (interleaved -> half-split RoPE)."""
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def _short(value: Any, chars: int = 40) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= chars else text[: chars - 1] + "…"


class _Metadata:
    """Typed, bounded access to GGUF metadata: a missing key or a value of the wrong type or
    out of range is a one-line ModelFormatError naming the file and the key."""

    def __init__(self, meta: dict[str, Any], path: Path, arch: str) -> None:
        self.meta, self.path, self.arch = meta, path, arch

    def _raw(self, key: str, default: Any) -> tuple[str, Any]:
        full = f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if value is None:
            raise ModelFormatError(f"{self.path}: metadata key {full} is missing")
        return full, value

    def bad(self, key: str, value: Any, want: str) -> ModelFormatError:
        return ModelFormatError(f"{self.path}: metadata {key} = {_short(value)}: expected {want}")

    def count(self, key: str, hi: int, default: Any = None, lo: int = 1) -> int:
        full, value = self._raw(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]  # a per-layer list with one value for every layer
        if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
            raise self.bad(full, value, f"an integer from {lo} to {hi}")
        return value

    def positive(self, key: str, default: float, hi: float = math.inf) -> float:
        full, value = self._raw(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and 0 < value < hi):
            raise self.bad(
                full, value, "a finite positive number" + ("" if hi == math.inf else f" below {hi}")
            )
        return float(value)


def config_from_metadata(meta: dict[str, Any], path: Path, gguf: GGUFFile) -> ModelConfig:
    """Model hyper-parameters from GGUF metadata, each checked against sane bounds and the
    tensors the file holds."""
    arch = str(meta.get("general.architecture", ""))
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {_short(arch) if arch else '(none)'} is not supported "
            f"(supported: {', '.join(GGUF_ARCHITECTURES)})"
        )
    m = _Metadata(meta, path, arch)
    if meta.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"{path}: mixture-of-experts models are not supported")
    hidden = m.count("embedding_length", MAX_DIM)
    n_heads = m.count("attention.head_count", MAX_HEADS)
    n_kv = m.count("attention.head_count_kv", n_heads, default=n_heads)
    if n_heads % n_kv:
        raise m.bad(f"{arch}.attention.head_count_kv", n_kv, f"a divisor of head_count {n_heads}")
    head_dim = m.count("attention.key_length", MAX_DIM, default=hidden // n_heads or None)
    if head_dim % 2:
        raise m.bad(f"{arch}.attention.key_length", head_dim, "an even head size (RoPE)")
    rope_dims = m.count("rope.dimension_count", MAX_DIM, default=head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    n_tokens = meta.get("tokenizer.ggml.tokens")
    vocab = m.count(
        "vocab_size", MAX_VOCAB, default=len(n_tokens) if isinstance(n_tokens, list) else None
    )
    # every layer has at least its norms and projections: no more layers than tensors
    n_layers = m.count("block_count", min(MAX_LAYERS, max(1, len(gguf.tensors))))
    factors = _rope_factors(m, head_dim, gguf)
    family = _family_settings(m, arch, n_layers, gguf)
    try:  # ModelConfig checks its own bounds too
        return ModelConfig(
            arch=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=m.count("feed_forward_length", MAX_DIM * 16),
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=m.positive("attention.layer_norm_rms_epsilon", 1e-5, hi=1.0),
            rope_theta=m.positive("rope.freq_base", 10000.0),
            context_length=m.count("context_length", MAX_CONTEXT, default=4096),
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            rope_freq_factors=factors,
            **family,
        )
    except ValueError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None


def _family_settings(m: _Metadata, arch: str, n_layers: int, gguf: GGUFFile) -> dict[str, Any]:
    """The ModelConfig fields that set Qwen3 and Gemma 3 apart from Llama."""
    if arch == "qwen3":
        return {"qk_norm": True}
    if arch != "gemma3":
        return {}
    hidden = m.count("embedding_length", MAX_DIM)
    window = m.count("attention.sliding_window", MAX_CONTEXT)
    settings: dict[str, Any] = {
        "qk_norm": True,
        "sandwich_norms": True,
        "hidden_act": "gelu_tanh",
        "embedding_scale": math.sqrt(hidden),
        "sliding_window": window,
        "local_layers": tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_GLOBAL_EVERY),
        "rope_local_theta": GEMMA3_LOCAL_ROPE_BASE,
    }
    # Scores are scaled by 1/sqrt(query_pre_attn_scalar): head_dim, except on the 27B model
    # (62 layers), where it is hidden/heads; the converter does not write it, so llama.cpp
    # tells the 27B by its layer count, and so do we.
    if f"{arch}.attention.query_pre_attn_scalar" in m.meta:
        scalar = m.positive("attention.query_pre_attn_scalar", 1.0)
        settings["attention_scale"] = 1.0 / math.sqrt(scalar)
    elif n_layers == GEMMA3_27B_LAYERS:
        heads = m.count("attention.head_count", MAX_HEADS)
        settings["attention_scale"] = 1.0 / math.sqrt(hidden // heads)
    return settings


def _rope_factors(m: _Metadata, head_dim: int, gguf: GGUFFile) -> tuple[float, ...] | None:
    if "rope_freqs.weight" in gguf.tensors:
        info = gguf.tensors["rope_freqs.weight"]
        if info.shape != (head_dim // 2,):
            raise ModelFormatError(
                f"{gguf.path}: tensor 'rope_freqs.weight' has shape {info.shape}, "
                f"expected ({head_dim // 2},)"
            )
        try:
            factors = dequantize(gguf.raw(info.name), info.ggml_type, info.shape)
        except UnsupportedTensorType as exc:
            raise UnsupportedModelError(f"{gguf.path}: tensor 'rope_freqs.weight': {exc}") from None
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise ModelFormatError(
                f"{gguf.path}: tensor 'rope_freqs.weight' is not finite and positive"
            )
        return tuple(float(x) for x in factors.reshape(-1))
    kind = m.meta.get(f"{m.arch}.rope.scaling.type")
    if kind == "linear" and m.meta.get(f"{m.arch}.rope.scaling.factor"):
        return (m.positive("rope.scaling.factor", 1.0),) * (head_dim // 2)
    if kind not in (None, "none", "linear"):
        raise UnsupportedModelError(
            f"{m.path}: rope scaling {_short(kind)} is not supported (linear, llama3)"
        )
    return None


def _finite(w: Weight) -> bool:
    if isinstance(w, np.ndarray):
        return bool(np.isfinite(w).all())
    return bool(np.isfinite(w.scales).all() and np.isfinite(w.biases).all())


def _convert(gguf: GGUFFile, name: str, is_matrix: bool) -> Weight:
    w = _convert_unchecked(gguf, name, is_matrix)
    if not _finite(w):  # NaN or inf would reach the logits and the sampler
        raise ModelFormatError(f"{gguf.path}: tensor {name!r} holds NaN or infinite values")
    return w


def _convert_unchecked(gguf: GGUFFile, name: str, is_matrix: bool) -> Weight:
    info = gguf.tensors[name]
    try:
        raw = gguf.raw(name)
        if not is_matrix:
            return dequantize(raw, info.ggml_type, info.shape).astype(np.float32)
        direct = to_affine(raw, info.ggml_type, info.shape)
        if direct is not None:
            return direct
        dense = dequantize(raw, info.ggml_type, info.shape)
        if info.ggml_type in _FLOAT_TYPES:
            bits, group = REQUANT_FLOAT
        else:
            bits, group = REQUANT_WIDE if info.ggml_type in _WIDE_TYPES else REQUANT_BLOCKS
        if dense.shape[1] % group:
            group = 32
        if dense.shape[1] % group:
            raise UnsupportedModelError(
                f"{gguf.path}: tensor {name!r}: rows of {dense.shape[1]} values cannot be "
                f"quantized in groups of {group}"
            )
        return quantize(dense, bits=bits, group_size=group)
    except UnsupportedTensorType as exc:
        raise UnsupportedModelError(f"{gguf.path}: tensor {name!r}: {exc}") from None
    except ValueError as exc:  # values the format cannot hold (NaN, inf)
        raise ModelFormatError(f"{gguf.path}: tensor {name!r}: {exc}") from None


def checked_config(gguf: GGUFFile) -> ModelConfig:
    """The config of an opened GGUF file, checked against the tensors it holds (names and
    shapes), without reading any tensor data but RoPE factors."""
    path = gguf.path
    config = config_from_metadata(gguf.metadata, path, gguf)
    targets = {n: hf_name(n, config.arch) for n in gguf.tensors if n not in _IGNORED}
    unexpected = [n for n, t in targets.items() if t is None]
    if unexpected:
        raise UnsupportedModelError(
            f"{path}: unexpected tensor {_short(unexpected[0])} for {config.arch}"
        )
    _check_shapes(gguf, {t: n for n, t in targets.items() if t is not None}, config, path)
    return config


def load_gguf(path: Path, progress: Callable[[int, int], None] | None = None) -> LoadedModel:
    """Read ``path`` and convert every tensor to our formats (lossless where the type allows)."""
    gguf = GGUFFile(path)
    meta = gguf.metadata
    config = checked_config(gguf)
    names = [n for n in gguf.tensors if n not in _IGNORED]
    tokenizer = _tokenizer(meta, config, path)
    weights: dict[str, Weight] = {}
    for i, name in enumerate(names):
        target = hf_name(name, config.arch)
        assert target is not None  # checked_config refused unknown names
        is_matrix = len(gguf.tensors[name].shape) == 2
        w = _convert(gguf, name, is_matrix)
        if config.arch == "llama" and name.endswith(_PERMUTED):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            order = unpermute_rows(heads, w.shape[0])
            w = w.take_rows(order) if not isinstance(w, np.ndarray) else w[order]
        weights[target] = w
        if progress:
            progress(i + 1, len(names))
    types = Counter(gguf.tensor_type_name(n) for n in names if len(gguf.tensors[n].shape) == 2)
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        source=path,
        name=str(meta.get("general.name") or path.stem),
        quantization=types.most_common(1)[0][0] if types else "F32",
        fingerprint_parts=_fingerprint_parts(path, meta, tokenizer, config),
    )


def _fingerprint_parts(
    path: Path, meta: dict[str, Any], tokenizer: Tokenizer, config: ModelConfig
) -> dict[str, str]:
    parts = {
        "weights": file_digest(path),
        "tokenizer": _tokenizer_digest(meta),
        "chat_template": text_digest(tokenizer.chat_template or ""),
    }
    tag = attention_tag(config)
    if tag:  # settings we derive rather than read from the file (window, pattern, bases)
        parts["attention"] = text_digest(tag)
    return parts


def _tokenizer(meta: dict[str, Any], config: ModelConfig, path: Path) -> Tokenizer:
    """The tokenizer the metadata describes; whatever it cannot build from is one line."""
    try:
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    except Exception as exc:  # untrusted input meets a native library: any failure is the file's
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelFormatError(f"{path}: tokenizer: {first[:200]}") from None
    if tokenizer.chat_template is None and config.arch == "gemma3":
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE  # files converted without one
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens but the model "
            f"only {config.vocab_size} embeddings"
        )
    return tokenizer


def _check_shapes(gguf: GGUFFile, present: dict[str, str], config: ModelConfig, path: Path) -> None:
    """Every tensor the config needs is there, with the shape the config implies."""
    missing = [n for n in required_weights(config) if n not in present]
    if missing:
        raise ModelFormatError(f"{path}: missing tensors: {', '.join(missing[:5])}")
    for hf, shape in expected_shapes(config).items():
        if hf in present and gguf.tensors[present[hf]].shape != shape:
            raise ModelFormatError(
                f"{path}: tensor {present[hf]!r} has shape {gguf.tensors[present[hf]].shape}, "
                f"the metadata implies {shape}"
            )


def _tokenizer_digest(meta: dict[str, Any]) -> str:
    keys = sorted(k for k in meta if k.startswith("tokenizer.") and k != "tokenizer.chat_template")
    return text_digest(*(f"{k}={meta[k]!r}" for k in keys))
