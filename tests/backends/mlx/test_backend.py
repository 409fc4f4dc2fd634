"""Tests for the MLX backend against a float64 numpy reference forward pass.

The models here are tiny and randomly initialised (fast, no files needed); the comparison on
real weights (the default model) lives in another test.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edge_infer.backends.base import Backend
from edge_infer.backends.select import create_backend
from edge_infer.errors import ModelFormatError
from edge_infer.formats.affine import QuantizedWeight, quantize
from edge_infer.models.spec import LoadedModel, ModelConfig, Weight

try:
    from edge_infer.backends.mlx.backend import MLXBackend
except ImportError:  # mlx / mlx-lm not installed
    MLXBackend = None  # type: ignore[assignment,misc]
pytestmark = pytest.mark.skipif(MLXBackend is None, reason="mlx and mlx-lm are not installed")

HIDDEN, INTER, VOCAB = 64, 128, 96

BASE = ModelConfig(
    arch="llama",
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    context_length=256,
    tie_word_embeddings=True,
)

CONFIGS = {
    "llama-tied": BASE,
    "llama-untied-scaled-rope": replace(
        BASE,
        tie_word_embeddings=False,
        rope_freq_factors=tuple(np.linspace(1.0, 8.0, BASE.head_dim // 2).tolist()),
    ),
    "mistral-mha": replace(BASE, arch="mistral", num_kv_heads=4, rope_theta=1e6),
    "qwen2-bias": replace(BASE, arch="qwen2", attention_bias=True, rope_theta=1e6),
    "qwen2-wide-heads": replace(
        BASE, arch="qwen2", attention_bias=True, head_dim=32, tie_word_embeddings=False
    ),
}


def _make_model(config: ModelConfig, seed: int = 0) -> LoadedModel:
    """Random weights: a mix of 4-bit/g32, 8-bit/g32, 8-bit/g64 and one float32 matrix."""
    rng = np.random.default_rng(seed)
    weights: dict[str, Weight] = {}
    schemes = [(4, 32), (8, 32), (8, 64), (4, 32)]

    def matrix(name: str, rows: int, cols: int, k: int, scale: float = 0.15) -> None:
        w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if k < 0:
            weights[name] = w
        else:
            bits, group = schemes[k % len(schemes)]
            weights[name] = quantize(w, bits=bits, group_size=group)

    def norm(name: str) -> None:
        weights[name] = (1.0 + 0.1 * rng.standard_normal(config.hidden_size)).astype(np.float32)

    h, d = config.hidden_size, config.head_dim
    q_dim, kv_dim = config.num_heads * d, config.num_kv_heads * d
    matrix("model.embed_tokens.weight", config.vocab_size, h, 1, scale=1.0)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj": (q_dim, h),
            "self_attn.k_proj": (kv_dim, h),
            "self_attn.v_proj": (kv_dim, h),
            "self_attn.o_proj": (h, q_dim),
            "mlp.gate_proj": (config.intermediate_size, h),
            "mlp.up_proj": (config.intermediate_size, h),
            "mlp.down_proj": (h, config.intermediate_size),
        }
        for j, (name, (rows, cols)) in enumerate(shapes.items()):
            # One float32 matrix in layer 0; the rest cycle through the quantization schemes.
            matrix(p + name + ".weight", rows, cols, -1 if (i, j) == (0, 3) else i + j)
        if config.attention_bias:
            for name, n in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                weights[f"{p}self_attn.{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(
                    np.float32
                )
        norm(p + "input_layernorm.weight")
        norm(p + "post_attention_layernorm.weight")
    norm("model.norm.weight")
    if not config.tie_word_embeddings:
        matrix("lm_head.weight", config.vocab_size, h, 2, scale=0.3)
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=None,
        source=Path("tiny"),
        name="tiny",
        quantization="Q4",
    )


def _f64(w: Weight) -> np.ndarray:
    return (w.dequantize() if isinstance(w, QuantizedWeight) else np.asarray(w)).astype(np.float64)


def _reference_logits(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """Plain float64 forward pass over a whole sequence: ids [T] or embeddings [T, hidden]."""
    cfg, w = model.config, {k: _f64(v) for k, v in model.weights.items()}

    def rms(v: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + cfg.rms_norm_eps) * weight

    def rope(v: np.ndarray) -> np.ndarray:  # [T, heads, D], half-split rotation
        ang = np.arange(v.shape[0])[:, None] * cfg.rope_inv_freq()[None]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = np.split(v, 2, axis=-1)
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def linear(v: np.ndarray, name: str) -> np.ndarray:
        out = v @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    h = w["model.embed_tokens.weight"][x] if x.ndim == 1 else x.astype(np.float64)
    t, d = h.shape[0], cfg.head_dim
    group = cfg.num_heads // cfg.num_kv_heads
    causal = np.tril(np.ones((t, t), dtype=bool))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = rms(h, w[p + "input_layernorm.weight"])
        q = rope(linear(a, p + "self_attn.q_proj").reshape(t, cfg.num_heads, d))
        k = rope(linear(a, p + "self_attn.k_proj").reshape(t, cfg.num_kv_heads, d))
        v = linear(a, p + "self_attn.v_proj").reshape(t, cfg.num_kv_heads, d)
        # the backends under test store K/V as float16 (kv_bits=16)
        k, v = (x.astype(np.float16).astype(np.float64) for x in (k, v))
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, -1)
        h = h + linear(attn, p + "self_attn.o_proj")
        m = rms(h, w[p + "post_attention_layernorm.weight"])
        gate = linear(m, p + "mlp.gate_proj")
        act = gate / (1.0 + np.exp(-gate)) * linear(m, p + "mlp.up_proj")
        h = h + linear(act, p + "mlp.down_proj")
    h = rms(h, w["model.norm.weight"])
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return h @ head.T


# float16 K/V (the kv_bits=16 cache) rounds fp32 and fp64 keys to neighbouring halves now and
# then: ~1e-3 absolute on logits of ~10; a wrong rotation or layout is off by ~0.6 relative.
def _assert_close(got: np.ndarray, want: np.ndarray, rel: float = 3e-4) -> None:
    err = np.abs(got.astype(np.float64) - want).max()
    assert err <= rel * np.abs(want).max(), (
        f"max abs diff {err:.3g} vs scale {np.abs(want).max():.3g}"
    )


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request: pytest.FixtureRequest) -> tuple[LoadedModel, MLXBackend]:
    model = _make_model(CONFIGS[request.param])
    return model, MLXBackend(
        model, dtype="float32", kv_bits=16
    )  # float32 on any device: tight checks


def _tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n)


def test_matches_numpy_reference(case: tuple[LoadedModel, MLXBackend]) -> None:
    model, backend = case
    assert backend.name == "mlx" and backend.device in ("cpu", "gpu")
    ids = _tokens(24)
    want = _reference_logits(model, ids)
    assert np.abs(want).max() > 1.0  # logits have a meaningful scale

    cache = backend.new_cache()
    assert cache.length == 0
    got = backend.forward(ids, cache, all_logits=True)
    assert got.dtype == np.float32 and got.shape == (24, VOCAB)
    assert cache.length == 24
    _assert_close(got, want)

    last = backend.forward(ids, backend.new_cache())
    assert last.shape == (1, VOCAB)
    _assert_close(last, want[-1:])


def test_chunked_prefill_and_decode_match(case: tuple[LoadedModel, MLXBackend]) -> None:
    model, backend = case
    ids = _tokens(46, seed=2)
    prompt, rest = ids[:40], ids[40:]
    want = _reference_logits(model, ids)

    whole = backend.new_cache()
    one_call = backend.forward(prompt, whole, all_logits=True)
    chunked = backend.new_cache()
    parts = []
    for start in range(0, 40, 7):
        part = backend.forward(prompt[start : start + 7], chunked, all_logits=True)
        assert part.shape == (len(prompt[start : start + 7]), VOCAB)
        parts.append(part)
        assert chunked.length == min(start + 7, 40)
    _assert_close(np.concatenate(parts), one_call.astype(np.float64), rel=1e-5)
    _assert_close(one_call, want[:40])

    for i, tok in enumerate(rest):
        a = backend.forward(np.array([tok]), whole)
        b = backend.forward(np.array([tok]), chunked)
        assert a.shape == b.shape == (1, VOCAB)
        _assert_close(b, a.astype(np.float64), rel=1e-5)
        _assert_close(a, want[40 + i : 41 + i])
    assert whole.length == chunked.length == 46


def test_embedding_inputs_match_token_ids(case: tuple[LoadedModel, MLXBackend]) -> None:
    model, backend = case
    ids = _tokens(9, seed=3)
    emb = _f64(model.weights["model.embed_tokens.weight"])[ids].astype(np.float32)
    cache = backend.new_cache()
    backend.forward(ids[:4], cache)
    got = backend.forward(emb[4:], cache, all_logits=True)  # embeddings after cached tokens
    assert got.shape == (5, VOCAB) and cache.length == 9
    _assert_close(got, _reference_logits(model, ids)[4:])


def test_float16_activations_stay_close() -> None:
    model = _make_model(CONFIGS["qwen2-bias"])
    backend = MLXBackend(
        model, dtype="float16", kv_bits=16
    )  # the Metal default, run here on any device
    ids = _tokens(16)
    got = backend.forward(ids, backend.new_cache(), all_logits=True)
    assert got.dtype == np.float32
    _assert_close(got, _reference_logits(model, ids), rel=2e-2)


def test_default_dtype_follows_device() -> None:
    import mlx.core as mx

    backend = MLXBackend(_make_model(BASE), kv_bits=16)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    assert backend.device == ("gpu" if on_gpu else "cpu")
    assert backend.dtype == (mx.float16 if on_gpu else mx.float32)


def test_cache_truncate_then_continue() -> None:
    model = _make_model(BASE)
    backend = MLXBackend(model, dtype="float32", kv_bits=16)
    ids = _tokens(20, seed=4)
    cache = backend.new_cache()
    backend.forward(ids, cache)
    assert cache.truncate(12) == 12 and cache.length == 12
    got = backend.forward(ids[12:], cache, all_logits=True)
    _assert_close(got, _reference_logits(model, ids)[12:])


def test_create_backend_and_protocol() -> None:
    backend = create_backend(_make_model(BASE), "mlx", kv_bits=16)
    assert isinstance(backend, MLXBackend) and isinstance(backend, Backend)
    assert backend.config.vocab_size == VOCAB


def test_rejects_bad_inputs() -> None:
    backend = MLXBackend(_make_model(BASE), dtype="float32", kv_bits=16)
    cache = backend.new_cache()
    for bad in (
        np.array([], dtype=np.int64),
        np.array([VOCAB]),
        np.array([-1]),
        np.zeros((3, HIDDEN + 1), np.float32),
        np.zeros((2, 2, HIDDEN), np.float32),
    ):
        with pytest.raises(ValueError):
            backend.forward(bad, cache)
    assert cache.length == 0
    with pytest.raises(ValueError, match="dtype"):
        MLXBackend(_make_model(BASE), dtype="int8")


def test_missing_weight_is_a_format_error() -> None:
    model = _make_model(BASE)
    del model.weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ModelFormatError, match="up_proj"):
        MLXBackend(model)


# head_dim 64 holds one or two quantization groups: the shape of the stored 4-bit KV
WIDE_HEADS = replace(BASE, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def wide_model() -> LoadedModel:
    return _make_model(WIDE_HEADS, seed=7)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_kv_does_not_depend_on_how_the_context_was_split(wide_model, bits):
    backend = MLXBackend(wide_model, dtype="float32", kv_bits=bits)
    ids = _tokens(300, seed=5)
    whole = backend.new_cache()
    one_call = backend.forward(ids, whole, all_logits=True)  # split at the block boundary
    assert (whole.length, whole.sealed_length) == (300, 256)
    chunked = backend.new_cache()
    parts = [backend.forward(ids[s : s + 37], chunked, all_logits=True) for s in range(0, 290, 37)]
    parts += [backend.forward(ids[i : i + 1], chunked) for i in range(296, 300)]
    got = np.concatenate(parts)
    # the sealed block holds the same bytes whatever the chunks (but for a rare rounding tie)
    for a, b in zip(whole.blocks()[0].layers, chunked.blocks()[0].layers, strict=True):
        assert np.mean(a.keys.packed == b.keys.packed) > 0.99
    _assert_close(got[-4:], one_call[-4:].astype(np.float64), rel=1e-5)


def test_quantized_kv_stays_close_to_float16_kv(wide_model):
    ids = _tokens(300, seed=6)
    out = {
        bits: MLXBackend(wide_model, dtype="float32", kv_bits=bits).forward(
            ids, MLXBackend(wide_model, kv_bits=bits).new_cache(), all_logits=True
        )
        for bits in (16, 8, 4)
    }
    # the open block attends float16 rows as a float16 cache does: identical
    np.testing.assert_array_equal(out[4][:256], out[16][:256])
    np.testing.assert_array_equal(out[8][:256], out[16][:256])
    # after it, the sealed block's quantization shows, less with more bits
    err = {bits: np.abs(out[bits][256:] - out[16][256:]).max() for bits in (8, 4)}
    assert 0 < err[8] < err[4]


def test_batched_decode_matches_one_at_a_time_across_a_seal(wide_model):
    backend = MLXBackend(wide_model, dtype="float32", kv_bits=4)
    lengths = (255, 100, 256)  # the first seals its block with the batched token
    caches, alone = [], []
    for n, seed in zip(lengths, (1, 2, 3), strict=True):
        ids = _tokens(n, seed=seed)
        a, b = backend.new_cache(), backend.new_cache()
        backend.forward(ids, a)
        backend.forward(ids, b)
        caches.append(a)
        alone.append(b)
    rows = backend.forward_batch([5, 6, 7], caches)
    for row, tok, cache in zip(rows, [5, 6, 7], alone, strict=True):
        _assert_close(row[None], backend.forward(np.array([tok]), cache).astype(np.float64), 1e-5)
    assert [c.sealed_length for c in caches] == [256, 0, 256]


def test_quantized_cache_holds_the_stored_bytes(wide_model):
    backend = MLXBackend(wide_model, dtype="float32", kv_bits=4)
    cache = backend.new_cache()
    backend.forward(_tokens(512, seed=8), cache)
    cfg = WIDE_HEADS
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * (64 // 2 + 2 * 2)
    assert cache.nbytes == 512 * per_token  # two sealed blocks, no float copy, no tail
