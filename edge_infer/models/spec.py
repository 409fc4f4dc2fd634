"""Backend-neutral description of a loaded model: its shape and its weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

Weight = np.ndarray | QuantizedWeight


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (names follow Hugging Face's config.json)."""

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

    def rope_inv_freq(self) -> np.ndarray:
        """Inverse RoPE frequencies [head_dim/2] as float64, scaling applied."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv = 1.0 / (self.rope_theta**exponents)
        if self.rope_freq_factors is not None:
            inv = inv / np.asarray(self.rope_freq_factors, dtype=np.float64)
        return inv


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


def required_weights(config: ModelConfig) -> list[str]:
    """Tensor names a decoder of this config cannot run without."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{n}" for n in LAYER_WEIGHTS]
        if config.attention_bias:
            names += [f"model.layers.{i}.self_attn.{p}_proj.bias" for p in "qkv"]
    return names
