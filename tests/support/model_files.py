"""Writers of tiny random models in real on-disk formats: GGUF files and HF / MLX directories.

Every writer returns a dict describing what it wrote, including the exact float values each
tensor decodes to, in Hugging Face naming and row order, so tests can compare a loader's output
with them. Sizes are tiny (a few hundred KiB) so whole test files stay fast.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2
MERGES = ("h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GGUF_MATRIX_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# byte offsets of the float16 d / dmin fields of super-block types the gguf package cannot
# quantize, and the dmin/d ratio that centres the decoded values around zero
_RANDOM_BLOCK_FIELDS = {
    "Q2_K": (80, 82, 1.5),
    "Q4_K": (0, 2, 7.5),
    "Q5_K": (0, 2, 15.5),
    "Q6_K": (208, None, 0.0),
}
_FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "BF16": 32,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q2_K": 10,
    "Q4_K": 15,
    "Q5_K": 17,
    "Q6_K": 18,
}

# (GGUF name suffix, Hugging Face name suffix) of each per-layer tensor
_LAYER_TENSORS = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
)
_BIASES = (
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
)
_QK_NORMS = (
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
)


# ---------------------------------------------------------------------- vocabulary


@cache
def byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's ``bytes_to_unicode`` symbols, in GPT-2's vocabulary order (printables first)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return tuple(chr(c) for c in cs)


def tiny_vocab() -> list[str]:
    """Special tokens, the 256 byte symbols, then one token per merge (268 tokens)."""
    merged = [m.replace(" ", "") for m in MERGES]
    return [*SPECIAL_TOKENS, *byte_level_alphabet(), *merged]


def build_hf_tokenizer() -> Any:
    """A `tokenizers.Tokenizer` (byte-level BPE) over :func:`tiny_vocab`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    merges = [tuple(m.split(" ")) for m in MERGES]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


# ---------------------------------------------------------------------- shapes and weights


def tiny_dims(super_blocks: bool = False) -> dict[str, int]:
    """Model sizes; with ``super_blocks`` every row length is a multiple of 256 (K-quants)."""
    if super_blocks:
        return {
            "hidden": 256,
            "intermediate": 512,
            "heads": 4,
            "kv_heads": 2,
            "head_dim": 64,
            "layers": 2,
            "vocab": len(tiny_vocab()),
        }
    return {
        "hidden": 64,
        "intermediate": 128,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "layers": 2,
        "vocab": len(tiny_vocab()),
    }


def random_hf_weights(
    dims: Mapping[str, int],
    rng: np.random.Generator,
    *,
    tied: bool,
    bias: bool,
    qk_norm: bool = False,
) -> dict[str, np.ndarray]:
    """Float32 weights of a Llama-family decoder in Hugging Face naming and row order
    (``qk_norm``: Qwen3's per-head query and key norms)."""
    h, inter, d = dims["hidden"], dims["intermediate"], dims["head_dim"]
    q_dim, kv_dim = dims["heads"] * d, dims["kv_heads"] * d

    def mat(rows: int, cols: int, std: float = 0.1) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def vec(n: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": mat(dims["vocab"], h, 1.0)}
    for i in range(dims["layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(h, 1.0, 0.1)
        w[p + "self_attn.q_proj.weight"] = mat(q_dim, h)
        w[p + "self_attn.k_proj.weight"] = mat(kv_dim, h)
        w[p + "self_attn.v_proj.weight"] = mat(kv_dim, h)
        w[p + "self_attn.o_proj.weight"] = mat(h, q_dim)
        w[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.1)
        w[p + "mlp.gate_proj.weight"] = mat(inter, h)
        w[p + "mlp.up_proj.weight"] = mat(inter, h)
        w[p + "mlp.down_proj.weight"] = mat(h, inter)
        if bias:
            for n, size in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                w[p + f"self_attn.{n}_proj.bias"] = vec(size, 0.0, 0.1)
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = vec(d, 1.0, 0.3)
            w[p + "self_attn.k_norm.weight"] = vec(d, 1.0, 0.3)
    w["model.norm.weight"] = vec(h, 1.0, 0.1)
    if not tied:
        w["lm_head.weight"] = mat(dims["vocab"], h)
    return w


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (half-split RoPE -> interleaved pairs)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------- GGUF


def _qtype(name: str) -> Any:
    import gguf

    return gguf.GGMLQuantizationType[name]


def random_superblock_bytes(
    type_name: str, shape: tuple[int, int], rng: np.random.Generator, std: float = 0.1
) -> np.ndarray:
    """Random raw blocks of a K-quant type (byte shape), d/dmin chosen for values of ~``std``."""
    import gguf

    qt = _qtype(type_name)
    block, size = gguf.GGML_QUANT_SIZES[qt]
    rows, cols = shape
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    d_off, m_off, ratio = _RANDOM_BLOCK_FIELDS[type_name]

    def set_fields(d: np.ndarray) -> None:
        raw[:, d_off : d_off + 2] = d.astype("<f2").view(np.uint8).reshape(n, 2)
        if m_off is not None:
            dmin = d * ratio * rng.uniform(0.8, 1.2, n)
            raw[:, m_off : m_off + 2] = dmin.astype("<f2").view(np.uint8).reshape(n, 2)

    d = rng.uniform(0.5, 1.0, n)
    set_fields(d)
    values = gguf.quants.dequantize(raw, qt)
    set_fields(d * std / float(values.std()))  # decoded values scale linearly with d and dmin
    return raw.reshape(rows, cols // block * size)


def encode_gguf_tensor(
    values: np.ndarray, type_name: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(array to hand to ``GGUFWriter.add_tensor``, float32 values it decodes to).

    Types the gguf package can quantize encode ``values``; super-block types get random blocks
    of the same shape (``values`` only gives the shape).
    """
    import gguf

    if type_name == "F32":
        data = values.astype(np.float32)
        return data, data.copy()
    if type_name == "F16":
        data = values.astype(np.float16)
        return data, data.astype(np.float32)
    qt = _qtype(type_name)
    if type_name in _RANDOM_BLOCK_FIELDS:
        data = random_superblock_bytes(type_name, values.shape, rng)
    else:
        data = gguf.quants.quantize(values.astype(np.float32), qt)
    decoded = gguf.quants.dequantize(data, qt).reshape(values.shape).astype(np.float32)
    return data, decoded


def _gguf_value_type(value: Any) -> Any:
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


def write_tiny_gguf(
    path: str | Path,
    arch: str = "llama",
    tensor_type: str = "Q8_0",
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    declared_arch: str | None = None,
    tensor_types: Mapping[str, str] | None = None,
    skip: Iterable[str] = (),
    drop_keys: Iterable[str] = (),
    overrides: Mapping[str, Any] | None = None,
    rope_freqs: np.ndarray | None = None,
    rope_theta: float = 10000.0,
    context_length: int = 512,
    rms_eps: float = 1e-5,
    pre: str = "smollm",
    attention_bias: bool | None = None,
    alignment: int | None = None,
) -> dict[str, Any]:
    """Write a tiny random llama / qwen2 / qwen3 decoder as llama.cpp's converter would.

    ``tensor_type`` is the ggml type of every matrix (``tensor_types`` overrides it per GGUF
    tensor name); 1-D tensors are F32. Llama Q/K matrices (and Q/K biases, present by default
    for qwen2 only, see ``attention_bias``) are stored permuted. ``declared_arch`` replaces the
    architecture name written (and its key prefix), ``skip`` leaves GGUF tensors out,
    ``drop_keys`` / ``overrides`` remove / set metadata keys, ``alignment`` sets
    general.alignment.

    Returns a dict with the config values, ``tokens``, ``path`` and three weight maps:
    ``original`` (HF name -> HF-order float32 values before encoding; for K-quants the decoded
    values), ``stored`` (HF name -> HF-order decoded values of the file) and ``file`` (GGUF
    name -> file-order decoded values).
    """
    import gguf

    path = Path(path)
    tensor_types = dict(tensor_types or {})
    all_types = {tensor_type, *tensor_types.values()}
    dims = tiny_dims(any(gguf.GGML_QUANT_SIZES[_qtype(t)][0] == 256 for t in all_types))
    rng = np.random.default_rng(seed)
    bias = arch == "qwen2" if attention_bias is None else attention_bias
    hf = random_hf_weights(
        dims, rng, tied=tie_word_embeddings, bias=bias, qk_norm=arch == "qwen3"
    )
    permuted = arch == "llama"

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    for i in range(dims["layers"]):
        for g_suffix, h_suffix in _LAYER_TENSORS + _BIASES + _QK_NORMS:
            names[f"model.layers.{i}.{h_suffix}"] = f"blk.{i}.{g_suffix}"

    writer = gguf.GGUFWriter(str(path), declared_arch or arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_name(f"tiny-{arch}-{tensor_type}")
    writer.add_file_type(_FILE_TYPES.get(tensor_type, 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(dims["vocab"])
    writer.add_context_length(context_length)
    writer.add_embedding_length(dims["hidden"])
    writer.add_feed_forward_length(dims["intermediate"])
    writer.add_block_count(dims["layers"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_dimension_count(dims["head_dim"])
    tokens = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    types = [
        gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens
    ]
    writer.add_token_types(types)
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for key in drop_keys:
        writer.kv_data[0].pop(key)
    for key, value in (overrides or {}).items():
        writer.kv_data[0].pop(key, None)
        sub = _gguf_value_type(value[0]) if isinstance(value, list | tuple) else None
        writer.add_key_value(key, value, _gguf_value_type(value), sub_type=sub)

    skip = set(skip)
    original: dict[str, np.ndarray] = {}
    stored: dict[str, np.ndarray] = {}
    file_values: dict[str, np.ndarray] = {}
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for hf_name, values in hf.items():
        g_name = names[hf_name]
        if g_name in skip:
            continue
        heads = None
        if permuted and g_name.endswith(("attn_q.weight", "attn_q.bias")):
            heads = dims["heads"]
        elif permuted and g_name.endswith(("attn_k.weight", "attn_k.bias")):
            heads = dims["kv_heads"]
        file_order = permute_qk(values, heads) if heads else values
        t = tensor_types.get(g_name, tensor_type) if values.ndim == 2 else "F32"
        data, decoded = encode_gguf_tensor(file_order, t, rng)
        if t in ("F32", "F16"):
            writer.add_tensor(g_name, data)
        else:
            writer.add_tensor(g_name, data, raw_dtype=_qtype(t))
        file_values[g_name] = decoded
        stored[hf_name] = unpermute_qk(decoded, heads) if heads else decoded
        original[hf_name] = stored[hf_name] if t in _RANDOM_BLOCK_FIELDS else values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "path": path,
        "arch": arch,
        "tensor_type": tensor_type,
        "vocab_size": dims["vocab"],
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_layers": dims["layers"],
        "num_heads": dims["heads"],
        "num_kv_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "rope_theta": rope_theta,
        "context_length": context_length,
        "rms_norm_eps": rms_eps,
        "tie_word_embeddings": tie_word_embeddings or "output.weight" in skip,
        "tokens": tokens,
        "original": original,
        "stored": stored,
        "file": file_values,
    }


def write_tiny_gemma3_gguf(
    path: str | Path,
    tensor_type: str = "F16",
    *,
    layers: int = 6,
    window: int = 16,
    rope_theta: float = 1e6,
    context_length: int = 2048,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a tiny random Gemma 3 as llama.cpp's converter would: norm weights with Gemma's
    ``1 +`` folded in, query/key norms, the two output norms, no output head (tied), the
    sliding window in the metadata. Every 6th layer is global (layers 5, 11...).

    Returns ``path``, ``window``, ``vocab_size`` and ``file`` (GGUF name -> decoded values).
    """
    import gguf

    path = Path(path)
    dims = {**tiny_dims(), "layers": layers, "kv_heads": 1, "head_dim": 64}
    h, inter, d = dims["hidden"], dims["intermediate"], dims["head_dim"]
    q_dim, kv_dim = dims["heads"] * d, dims["kv_heads"] * d
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.15).astype(np.float32)

    def norm(n: int) -> np.ndarray:  # 1 + Gemma's stored weight
        return (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32)

    tensors = {"token_embd.weight": mat(dims["vocab"], h) * 4, "output_norm.weight": norm(h)}
    for i in range(layers):
        p = f"blk.{i}."
        tensors.update(
            {
                p + "attn_norm.weight": norm(h),
                p + "attn_q.weight": mat(q_dim, h),
                p + "attn_k.weight": mat(kv_dim, h),
                p + "attn_v.weight": mat(kv_dim, h),
                p + "attn_q_norm.weight": norm(d),
                p + "attn_k_norm.weight": norm(d),
                p + "attn_output.weight": mat(h, q_dim),
                p + "post_attention_norm.weight": norm(h),
                p + "ffn_norm.weight": norm(h),
                p + "ffn_gate.weight": mat(inter, h),
                p + "ffn_up.weight": mat(inter, h),
                p + "ffn_down.weight": mat(h, inter),
                p + "post_ffw_norm.weight": norm(h),
            }
        )
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name(f"tiny-gemma3-{tensor_type}")
    writer.add_file_type(_FILE_TYPES.get(tensor_type, 0))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(context_length)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(inter)
    writer.add_block_count(layers)
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_sliding_window(window)
    tokens = tiny_vocab()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(False)
    decoded: dict[str, np.ndarray] = {}
    for name, values in tensors.items():
        t = tensor_type if values.ndim == 2 else "F32"
        data, decoded[name] = encode_gguf_tensor(values, t, rng)
        if t in ("F32", "F16"):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=_qtype(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"path": path, "window": window, "vocab_size": dims["vocab"], "file": decoded}


_GEMMA3_HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}


def write_tiny_gemma3_hf_dir(path: str | Path, gguf_info: Mapping[str, Any]) -> Path:
    """The Gemma 3 of :func:`write_tiny_gemma3_gguf` as a Hugging Face directory (float32,
    ``model_type`` gemma3_text): the same values, norm weights stored without the ``1 +``."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for name, values in gguf_info["file"].items():
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            hf = f"model.layers.{i}.{_GEMMA3_HF_NAMES[rest]}"
        stored = values - 1.0 if values.ndim == 1 else values
        tensors[hf] = np.ascontiguousarray(stored, dtype=np.float32)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    d = tensors["model.layers.0.self_attn.q_norm.weight"].shape[0]
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": q.shape[1],
        "intermediate_size": tensors["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": 1 + max(int(n.split(".")[2]) for n in tensors if ".layers." in n),
        "num_attention_heads": q.shape[0] // d,
        "num_key_value_heads": k.shape[0] // d,
        "head_dim": d,
        "vocab_size": tensors["model.embed_tokens.weight"].shape[0],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "rope_local_base_freq": 10000.0,
        "sliding_window": gguf_info["window"],
        "query_pre_attn_scalar": d,
        "max_position_embeddings": 2048,
        "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_hf_tokenizer().save(str(path / "tokenizer.json"))
    tok_cfg = {"bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID]}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return path


# ---------------------------------------------------------------------- Hugging Face / MLX


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: str | Path, tensors: Mapping[str, tuple[str, np.ndarray]]) -> None:
    """A .safetensors file from ``name -> (dtype label, array)``, header written by hand."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for name, (dtype, arr) in tensors.items():
        blob = np.ascontiguousarray(arr).tobytes()
        header[name] = {
            "dtype": dtype,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def write_tiny_hf_dir(
    path: str | Path,
    arch: str = "llama",
    dtype: str = "float16",
    *,
    tie_word_embeddings: bool = False,
    rope_scaling: Mapping[str, Any] | None = None,
    rope_theta: float = 10000.0,
    context_length: int = 512,
    seed: int = 0,
    skip: Iterable[str] = (),
    shards: int = 1,
) -> dict[str, Any]:
    """Write a tiny random model directory: config.json, safetensors, tokenizer files.

    ``arch`` is the config's model_type (llama, mistral, qwen2, qwen3; qwen2 gets q/k/v
    biases, qwen3 query/key norms).
    ``dtype`` is "float16", "bfloat16" or "mlx4" (MLX 4-bit, group 64: ``X.weight`` packed
    uint32, ``X.scales`` / ``X.biases`` float16; norms and biases float16). ``skip`` leaves HF
    tensors out; ``shards`` splits the weights over that many files.

    Returns ``path``, ``config`` (the config.json dict), ``weights`` (HF name -> float32 values
    the file holds; for mlx4 the dequantized values) and, for mlx4, ``quantized`` (HF weight
    name -> QuantizedWeight written).
    """
    from safetensors.numpy import save_file

    from edge_infer.formats.affine import quantize

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dims = tiny_dims()
    rng = np.random.default_rng(seed)
    hf = random_hf_weights(
        dims, rng, tied=tie_word_embeddings, bias=arch == "qwen2", qk_norm=arch == "qwen3"
    )
    for name in skip:
        hf.pop(name)
    config: dict[str, Any] = {
        "architectures": [
            {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }.get(arch, "X")
        ],
        "model_type": arch,
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["heads"],
        "num_key_value_heads": dims["kv_heads"],
        "vocab_size": dims["vocab"],
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": context_length,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "bfloat16" if dtype == "bfloat16" else "float16",
    }
    if rope_scaling is not None:
        config["rope_scaling"] = dict(rope_scaling)

    weights: dict[str, np.ndarray] = {}
    quantized: dict[str, Any] = {}
    files: list[dict[str, Any]] = [{} for _ in range(shards)]
    for i, (name, values) in enumerate(hf.items()):
        out = files[i % shards]
        if dtype == "bfloat16":
            bits = f32_to_bf16_bits(values)
            out[name] = ("BF16", bits)
            weights[name] = bf16_bits_to_f32(bits)
        elif dtype == "float16" or values.ndim == 1:
            out[name] = values.astype(np.float16)
            weights[name] = out[name].astype(np.float32)
        elif dtype == "mlx4":
            qw = quantize(values, bits=4, group_size=64)
            base = name.removesuffix(".weight")
            out[name], out[f"{base}.scales"], out[f"{base}.biases"] = (
                qw.packed,
                qw.scales,
                qw.biases,
            )
            quantized[name] = qw
            weights[name] = qw.dequantize()
        else:
            raise ValueError(f"unknown dtype {dtype!r}")
    if dtype == "mlx4":
        config["quantization"] = {"group_size": 64, "bits": 4}
    for k, tensors in enumerate(files):
        fname = (
            "model.safetensors" if shards == 1 else f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        )
        if dtype == "bfloat16":
            write_safetensors(path / fname, tensors)
        else:
            save_file(
                tensors, str(path / fname), metadata={"format": "mlx" if dtype == "mlx4" else "pt"}
            )

    (path / "config.json").write_text(json.dumps(config, indent=2))
    build_hf_tokenizer().save(str(path / "tokenizer.json"))
    tok_cfg = {
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID],
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": context_length,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    return {
        "path": path,
        "config": config,
        "weights": weights,
        "quantized": quantized,
        "tokens": tiny_vocab(),
    }


# ---------------------------------------------------------------------- shared checks


def backend_logits(model: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Logits [T, vocab] of ``ids`` from the torch (CPU) and MLX backends."""
    import pytest

    pytest.importorskip("torch")
    pytest.importorskip("mlx_lm")
    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.backends.torch.backend import TorchBackend

    out = {}
    for name, backend in (
        ("torch", TorchBackend(model, device="cpu", kv_bits=16)),
        ("mlx", MLXBackend(model, kv_bits=16)),
    ):
        out[name] = backend.forward(np.asarray(ids), backend.new_cache(), all_logits=True)
    return out


def assert_backends_agree(model: Any, ids: np.ndarray, kl_bound: float = 2e-3) -> None:
    """Torch (bfloat16 activations, int4 kernels) and MLX (float32 on CPU) give close logits.

    Tolerances leave 2-7x margin over what tiny random models measure: torch rounds activations
    and scales to bfloat16, which costs up to ~0.14 std of the logits at the worst position.
    ``kl_bound`` bounds the mean KL of MLX's distribution from torch's.
    """
    logits = backend_logits(model, ids)
    a, b = logits["torch"].astype(np.float64), logits["mlx"].astype(np.float64)
    shape = (len(ids), model.config.vocab_size)
    assert a.shape == shape and b.shape == shape
    assert np.isfinite(a).all() and np.isfinite(b).all()
    scale = b.std()
    assert scale > 0.1  # a real signal, not a dead network
    diff = np.abs(a - b)
    assert diff.mean() <= 0.03 * scale, f"mean |diff| {diff.mean():.4g} vs std {scale:.4g}"
    assert diff.max() <= 0.3 * scale, f"max |diff| {diff.max():.4g} vs std {scale:.4g}"

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    kl = float(np.mean(np.sum(np.exp(lb) * (lb - la), axis=-1)))
    assert kl <= kl_bound, f"mean KL(mlx || torch) {kl:.3g}"
