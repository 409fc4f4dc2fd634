"""Load a Hugging Face (fp16/bf16) or MLX-quantized model directory into a LoadedModel."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.formats.affine import QuantizedWeight, quantize
from edge_infer.models.fingerprint import file_digest, files_digest, text_digest
from edge_infer.models.hf.safetensors import SafetensorsFile
from edge_infer.models.spec import (
    LoadedModel,
    ModelConfig,
    Weight,
    attention_tag,
    required_weights,
)
from edge_infer.models.tokenizer import Tokenizer

HF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Gemma stores its RMSNorm weights as w in x * (1 + w); ModelConfig's norms multiply directly.
_GEMMA_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
)
DEFAULT_BITS, DEFAULT_GROUP = 4, 64
# Hub VLM configs often list only what differs from transformers' config defaults
_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ),
    "mistral": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
}
# where a VLM keeps its language model's weights: transformers 4.x LLaVA, 5.x, Idefics3/SmolVLM
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("model.text_model.", "model."),
    ("lm_head.", "lm_head."),
)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model directory, with a clear error when absent or broken."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: not a model directory (no config.json)")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({exc})") from None


def text_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The language model's settings: a VLM's ``text_config`` over its architecture's
    defaults (and the top level's tie setting), or a text model's config itself."""
    inner = raw.get("text_config")
    if not isinstance(inner, dict):
        return raw
    out = {**_TEXT_DEFAULTS.get(str(inner.get("model_type", "llama")), {}), **inner}
    out.setdefault("model_type", "llama")
    if "tie_word_embeddings" not in inner and "tie_word_embeddings" in raw:
        out["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return out


def text_weight_name(name: str) -> str | None:
    """A VLM weight's name as its language model alone would call it; None for the image
    side's weights."""
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def llama3_factors(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling."""
    factor = float(scaling["factor"])
    low, high = (
        float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)),
    )
    old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    new_inv = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq / new_inv


def config_from_hf(raw: dict[str, Any], path: Path) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json."""
    rope = raw.get("rope_parameters")
    if isinstance(rope, dict):  # transformers 5 keeps theta and scaling here
        raw = {**raw, "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0))}
        if rope.get("rope_type", "default") != "default":
            raw["rope_scaling"] = rope
    arch = raw.get("model_type", "")
    if arch not in HF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: model_type {arch or '(none)'!r} is not supported "
            f"(supported: {', '.join(HF_ARCHITECTURES)})"
        )
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        cfg = ModelConfig(
            arch="llama" if arch == "mistral" else arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            context_length=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", arch == "qwen2" and False)),
            attention_bias=bool(raw.get("attention_bias", arch == "qwen2")),
            qk_norm=arch == "qwen3",
        )
    except KeyError as exc:
        raise ModelFormatError(f"{path}/config.json: missing key {exc}") from None
    if arch == "gemma3_text":
        cfg = _gemma3(cfg, raw, path)
    scaling = raw.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        half = cfg.head_dim // 2
        if kind == "linear":
            factors = np.full(half, float(scaling["factor"]))
        elif kind == "llama3":
            factors = llama3_factors(cfg.rope_inv_freq(), scaling)
        elif kind == "default":
            factors = None
        else:
            raise UnsupportedModelError(
                f"{path}: rope scaling {kind!r} is not supported (linear, llama3)"
            )
        if factors is not None:
            from dataclasses import replace

            cfg = replace(cfg, rope_freq_factors=tuple(float(f) for f in factors))
    return cfg


def _gemma3(cfg: ModelConfig, raw: dict[str, Any], path: Path) -> ModelConfig:
    """Gemma 3's settings on top of the shared ones (transformers' Gemma3TextConfig)."""
    n = cfg.num_layers
    types = raw.get("layer_types")
    if types is None:
        every = int(raw.get("sliding_window_pattern", 6))
        types = [
            "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)
        ]
    if len(types) != n:
        raise ModelFormatError(f"{path}/config.json: layer_types lists {len(types)} of {n} layers")
    if raw.get("final_logit_softcapping") or raw.get("attn_logit_softcapping"):
        raise UnsupportedModelError(f"{path}: logit soft-capping (Gemma 2) is not supported")
    return replace(
        cfg,
        arch="gemma3",
        qk_norm=True,
        sandwich_norms=True,
        hidden_act="gelu_tanh",
        embedding_scale=math.sqrt(cfg.hidden_size),
        attention_scale=float(raw.get("query_pre_attn_scalar", cfg.head_dim)) ** -0.5,
        sliding_window=int(raw.get("sliding_window", 4096)),
        local_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
        rope_local_theta=float(raw.get("rope_local_base_freq", 10000.0)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
    )


def _quant_settings(raw: dict[str, Any], module: str) -> tuple[int, int] | None:
    q = raw.get("quantization") or raw.get("quantization_config")
    if not q:
        return None
    layer = q.get(module)
    if layer is False:
        return None
    if isinstance(layer, dict):
        return int(layer["bits"]), int(layer["group_size"])
    return int(q.get("bits", DEFAULT_BITS)), int(q.get("group_size", DEFAULT_GROUP))


def load_hf_dir(
    path: Path,
    progress: Callable[[int, int], None] | None = None,
    bits: int = DEFAULT_BITS,
    group_size: int = DEFAULT_GROUP,
) -> LoadedModel:
    """Load a directory of config.json + *.safetensors + tokenizer files."""
    outer = read_config(path)
    raw = text_config(outer)
    vlm = raw is not outer
    config = config_from_hf(raw, path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no .safetensors weight files")
    try:
        tokenizer = Tokenizer.from_hf_dir(path)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: tokenizer: {exc}") from None
    tensors: dict[str, tuple[SafetensorsFile, str]] = {}
    for f in files:
        st = SafetensorsFile(f)
        for name in st.names():
            key = text_weight_name(name) if vlm else name
            if key is not None:
                tensors[key] = (st, name)
    weights: dict[str, Weight] = {}
    matrices = [n for n in tensors if n.endswith(".weight")]
    for i, name in enumerate(matrices):
        st, stored = tensors[name]
        module = name[: -len(".weight")]
        arr = st.get(stored)
        if arr.dtype == np.uint32:  # MLX-quantized: weight (packed) + scales + biases
            settings = _quant_settings(outer, stored[: -len(".weight")])
            if settings is None or f"{module}.scales" not in tensors:
                raise ModelFormatError(f"{path}: {name} is packed but has no quantization settings")
            q_bits, q_group = settings
            scales = _tensor(tensors, f"{module}.scales")
            biases = _tensor(tensors, f"{module}.biases")
            weights[name] = QuantizedWeight(
                np.ascontiguousarray(arr),
                scales.astype(np.float16),
                biases.astype(np.float16),
                q_bits,
                q_group,
            )
        elif arr.ndim == 2 and bits < 16:
            group = group_size if arr.shape[1] % group_size == 0 else 32
            weights[name] = quantize(np.asarray(arr, dtype=np.float32), bits=bits, group_size=group)
        else:
            weights[name] = np.asarray(arr, dtype=np.float32)
        if progress:
            progress(i + 1, len(matrices))
    for name in tensors:
        if name.endswith(".bias"):
            weights[name] = np.asarray(_tensor(tensors, name), dtype=np.float32)
    if config.arch == "gemma3":
        for name in list(weights):
            if name.endswith(_GEMMA_NORMS) or name == "model.norm.weight":
                weights[name] = np.asarray(weights[name], dtype=np.float32) + 1.0
    if "lm_head.weight" not in weights and not config.tie_word_embeddings:
        from dataclasses import replace

        config = replace(config, tie_word_embeddings=True)
    missing = [n for n in required_weights(config) if n not in weights]
    if missing:
        raise ModelFormatError(f"{path}: missing tensors: {', '.join(missing[:5])}")
    tok_file = path / "tokenizer.json"
    q = outer.get("quantization")
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        source=path,
        name=str(outer.get("_name_or_path") or path.name),
        quantization=f"MLX {q.get('bits')}-bit" if q else f"{bits}-bit (quantized on load)",
        fingerprint_parts=_fingerprint_parts(files, tok_file, tokenizer, config),
    )


def _tensor(tensors: dict[str, tuple[SafetensorsFile, str]], key: str) -> np.ndarray:
    st, stored = tensors[key]
    return st.get(stored)


def _fingerprint_parts(
    files: list[Path], tok_file: Path, tokenizer: Tokenizer, config: ModelConfig
) -> dict[str, str]:
    parts = {
        "weights": files_digest(files),
        "tokenizer": file_digest(tok_file) if tok_file.is_file() else "",
        "chat_template": text_digest(tokenizer.chat_template or ""),
    }
    tag = attention_tag(config)
    if tag:  # window, pattern and bases come from config.json, which the weights miss
        parts["attention"] = text_digest(tag)
    return parts
