"""Backend-neutral description of a loaded model: its shape and its weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")

# Sane bounds for hyper-parameters read from a model file: larger values are corruption,
# and none of them may size an allocation unchecked.
MAX_CONTEXT = 1 << 24
MAX_DIM = 1 << 16
MAX_HEADS = 1 << 12
MAX_LAYERS = 1 << 12
MAX_VOCAB = 1 << 22

Weight = np.ndarray | QuantizedWeight


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama- or Gemma-family decoder (names follow Hugging Face's
    config.json).

    Norm weights are stored as they multiply (GGUF's convention: Gemma's ``1 + weight`` is
    folded in by whoever loads the weights).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # Per-frequency divisors (len head_dim/2) for scaled RoPE (linear, llama3); None = plain RoPE.
    rope_freq_factors: tuple[float, ...] | None = None
    # Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Gemma's extra norms on the attention and MLP outputs before they join the residual.
    sandwich_norms: bool = False
    # The MLP's gate activation: "silu" (Llama) or "gelu_tanh" (Gemma).
    hidden_act: str = "silu"
    # Token embeddings are multiplied by this (Gemma: sqrt(hidden_size)).
    embedding_scale: float = 1.0
    # Scores are q.k * attention_scale; None = 1/sqrt(head_dim).
    attention_scale: float | None = None
    # Sliding-window attention: a local layer sees only the last ``sliding_window`` tokens
    # (itself included). ``local_layers`` lists them; the others attend globally.
    sliding_window: int | None = None
    local_layers: tuple[int, ...] = ()
    # RoPE base of local layers (None = rope_theta); their RoPE is never scaled.
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        """ValueError naming the first field out of its sane range (nothing sized by it yet)."""
        bounds = {
            "vocab_size": MAX_VOCAB,
            "hidden_size": MAX_DIM,
            "intermediate_size": MAX_DIM * 16,
            "num_layers": MAX_LAYERS,
            "num_heads": MAX_HEADS,
            "num_kv_heads": self.num_heads,
            "head_dim": MAX_DIM,
            "context_length": MAX_CONTEXT,
        }
        for name, hi in bounds.items():
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= hi):
                raise ValueError(f"{name} = {value!r} is outside 1..{hi}")
        if self.num_heads % self.num_kv_heads or self.head_dim % 2:
            raise ValueError(
                f"num_heads {self.num_heads} / num_kv_heads {self.num_kv_heads} / head_dim "
                f"{self.head_dim}: heads must group evenly and head_dim must be even"
            )
        for name in ("rms_norm_eps", "rope_theta", "embedding_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r} is not a finite positive number")
        for name in ("attention_scale", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r} is not a finite positive number")
        if self.hidden_act not in ("silu", "gelu_tanh"):
            raise ValueError(f"hidden_act = {self.hidden_act!r} is not silu or gelu_tanh")
        if self.local_layers:
            if not (isinstance(self.sliding_window, int) and 1 <= self.sliding_window):
                raise ValueError(f"sliding_window = {self.sliding_window!r} is not a positive int")
            if any(not 0 <= i < self.num_layers for i in self.local_layers):
                raise ValueError(f"local_layers {self.local_layers} name layers beyond the model")

    def is_local(self, layer: int) -> bool:
        """True when ``layer`` attends only its sliding window."""
        return layer in self.local_layers

    def layer_windows(self) -> list[int]:
        """Per layer, how many latest tokens it attends to (0 = all)."""
        return [
            self.sliding_window if self.is_local(i) and self.sliding_window else 0
            for i in range(self.num_layers)
        ]

    def rope_local_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies of local layers (their own base, no scaling)."""
        theta = self.rope_local_theta if self.rope_local_theta is not None else self.rope_theta
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        return 1.0 / (theta**exponents)

    def score_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        if self.attention_scale is not None:
            return self.attention_scale
        return 1.0 / math.sqrt(self.head_dim)

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim/2] as float64, scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta**exponents)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, dtype=np.float64)
        return inv


def attention_tag(config: ModelConfig) -> str:
    """The attention settings a loader derives rather than reads from the weights (window,
    local layers, RoPE bases, score scale) as text for the fingerprint; "" for plain Llama."""
    if not (config.local_layers or config.rope_local_theta or config.attention_scale):
        return ""
    return (
        f"window={config.sliding_window};local={','.join(map(str, config.local_layers))};"
        f"rope={config.rope_theta!r};rope_local={config.rope_local_theta!r};"
        f"scale={config.score_scale()!r}"
    )


@dataclass
class LoadedModel:
    """A model ready to hand to a backend.

    ``weights`` uses Hugging Face tensor names (``model.layers.0.self_attn.q_proj.weight``...);
    matrices are :class:`QuantizedWeight` (MLX affine layout) or float32 arrays, norms and
    biases float32 arrays.
    """

    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: Tokenizer
    source: Path
    name: str
    quantization: str
    fingerprint_parts: dict[str, str] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights take in memory."""
        return sum(w.nbytes for w in self.weights.values())


# Per-layer tensors every decoder needs (Hugging Face names under ``model.layers.{i}.``).
LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


# Per-layer tensors of the optional parts (Hugging Face names, Gemma 3's for the norms).
QK_NORM_WEIGHTS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
# With sandwich norms, post_attention_layernorm normalises the attention output (Gemma's
# meaning) and pre_feedforward_layernorm is the norm before the MLP.
SANDWICH_WEIGHTS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")


def required_weights(config: ModelConfig) -> list[str]:
    """Tensor names a decoder of this config cannot run without."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{n}" for n in LAYER_WEIGHTS]
        if config.qk_norm:
            names += [f"model.layers.{i}.{n}" for n in QK_NORM_WEIGHTS]
        if config.sandwich_norms:
            names += [f"model.layers.{i}.{n}" for n in SANDWICH_WEIGHTS]
        if config.attention_bias:
            names += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    return names


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each tensor of a decoder of this config (Hugging Face names, [out, in])."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "self_attn.q_norm.weight": (config.head_dim,),
        "self_attn.k_norm.weight": (config.head_dim,),
        "pre_feedforward_layernorm.weight": (h,),
        "post_feedforward_layernorm.weight": (h,),
    }
    for i in range(config.num_layers):
        shapes.update({f"model.layers.{i}.{n}": s for n, s in per_layer.items()})
    return shapes
