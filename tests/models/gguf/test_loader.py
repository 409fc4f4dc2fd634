"""Loading GGUF files written like llama.cpp's converter: config, weights, tokenizer, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_infer.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from edge_infer.formats.affine import QuantizedWeight
from edge_infer.models.gguf.loader import unpermute_rows
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel
from tests.support.model_files import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    GGUF_MATRIX_TYPES,
    SPECIAL_TOKENS,
    assert_backends_agree,
    build_hf_tokenizer,
    permute_qk,
    unpermute_qk,
    write_tiny_gguf,
)

pytest.importorskip("gguf")

# types converted losslessly (bits of the affine result, group 32), Q4_K's up to float16
# rounding of its scales, and re-quantized ones (bits, group)
LOSSLESS_BITS = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4}
NEAR_LOSSLESS_BITS = {"Q4_K": 4}
REQUANT = {"F32": (4, 64), "F16": (4, 64), "BF16": (4, 64), "Q5_K": (8, 32), "Q6_K": (8, 32)}
IDS = np.array([BOS_ID, 40, 75, 259, 262, 100, 200, EOS_ID])


def dense(w: object) -> np.ndarray:
    """A loaded weight as float32."""
    return w.dequantize() if isinstance(w, QuantizedWeight) else np.asarray(w)


def requant_bound(ref: np.ndarray, group: int, bits: int = 4) -> np.ndarray:
    """Per-element error allowed by affine quantization of ``ref`` in groups.

    One step (range / levels): snapping zero onto a level can clip a group's far edge by
    nearly a step; plus float16 rounding of scale and bias.
    """
    g = ref.reshape(ref.shape[0], -1, group)
    step = (g.max(-1) - g.min(-1)) / (2**bits - 1) + 2.0**-9 * np.abs(g).max(-1)
    return np.repeat(step, group, axis=1)


def assert_weight_matches(w: object, ref: np.ndarray, tensor_type: str, name: str) -> None:
    """``w`` holds ``ref``: exactly for lossless types, within the re-quantization error else."""
    if ref.ndim == 1:
        assert isinstance(w, np.ndarray) and w.dtype == np.float32, name
        np.testing.assert_array_equal(w, ref, err_msg=name)
        return
    assert isinstance(w, QuantizedWeight), name
    assert w.shape == ref.shape, name
    if tensor_type in LOSSLESS_BITS:
        assert (w.bits, w.group_size) == (LOSSLESS_BITS[tensor_type], 32), name
        np.testing.assert_array_equal(w.dequantize(), ref, err_msg=name)
        return
    if tensor_type in NEAR_LOSSLESS_BITS:
        assert (w.bits, w.group_size) == (NEAR_LOSSLESS_BITS[tensor_type], 32), name
        scale = np.abs(ref).reshape(ref.shape[0], -1, 32).max(-1, keepdims=True)
        err = np.abs(w.dequantize() - ref).reshape(scale.shape[0], -1, 32)
        assert np.all(err <= 2.0**-9 * scale), name  # float16 rounding of scale and bias
        return
    bits, group = REQUANT[tensor_type]
    assert (w.bits, w.group_size) == (bits, group), name
    err = np.abs(w.dequantize() - ref)
    bound = requant_bound(ref, group, bits)
    assert np.all(err <= bound), f"{name}: max excess {(err - bound).max():.3g}"
    assert err.mean() <= 0.4 * bound.mean(), name  # typical error well inside the bound


# ---------------------------------------------------------------------- llama, every type


@pytest.fixture(scope="module", params=GGUF_MATRIX_TYPES)
def llama_case(request, tmp_path_factory) -> tuple[dict, LoadedModel]:
    path = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    info = write_tiny_gguf(path, "llama", request.param, rope_theta=50000.0, context_length=384)
    return info, load_model(path)


def test_config(llama_case) -> None:
    info, model = llama_case
    cfg = model.config
    assert cfg.arch == "llama"
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "context_length",
    ):
        assert getattr(cfg, key) == info[key], key
    assert cfg.rope_theta == 50000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False
    assert cfg.rope_freq_factors is None
    assert model.quantization == info["tensor_type"]
    assert model.name == f"tiny-llama-{info['tensor_type']}"
    assert model.source == info["path"]


def test_weights_match_file(llama_case) -> None:
    info, model = llama_case
    t = info["tensor_type"]
    assert set(model.weights) == set(info["stored"])
    for name, ref in info["stored"].items():
        assert_weight_matches(model.weights[name], ref, t, name)
    if t in ("Q8_0", "Q4_0", "Q4_1"):  # ... and, like the file, near the float originals
        levels = 255 if t == "Q8_0" else 15
        for name, orig in info["original"].items():
            if orig.ndim == 2:
                g = orig.reshape(orig.shape[0], -1, 32)
                step = np.repeat(2 * np.abs(g).max(-1) / levels, 32, axis=1)
                assert np.all(np.abs(dense(model.weights[name]) - orig) <= step), name


def test_qk_rows_in_hf_order(llama_case) -> None:
    """Q/K are un-permuted: they match the HF-order matrices and not the file's row order."""
    info, model = llama_case
    t = info["tensor_type"]
    for i in range(info["num_layers"]):
        for proj, gguf_name in (("q", "attn_q"), ("k", "attn_k")):
            name = f"model.layers.{i}.self_attn.{proj}_proj.weight"
            w, file_order = model.weights[name], info["file"][f"blk.{i}.{gguf_name}.weight"]
            assert_weight_matches(w, info["stored"][name], t, name)
            assert not np.array_equal(file_order, info["stored"][name])
            bits, group = REQUANT.get(t, (4, 32))
            within = np.abs(dense(w) - file_order) <= requant_bound(file_order, group, bits)
            assert within.mean() < 0.5, f"{name} also matches the permuted rows"


def test_unpermute_rows_inverts_converter_permutation() -> None:
    rng = np.random.default_rng(0)
    for heads, rows in ((4, 64), (2, 32), (8, 512)):
        w = rng.standard_normal((rows, 3))
        permuted = permute_qk(w, heads)
        assert not np.array_equal(permuted, w)
        np.testing.assert_array_equal(permuted[unpermute_rows(heads, rows)], w)
        np.testing.assert_array_equal(unpermute_qk(permuted, heads), w)


def test_backends_agree(llama_case) -> None:
    # torch re-expresses 8-bit group-wise weights per output channel (its int8 kernel), MLX
    # reads them exactly: the 8-bit re-quantized types differ a little more
    wide = REQUANT.get(llama_case[0]["tensor_type"], (4, 0))[0] == 8
    assert_backends_agree(llama_case[1], IDS, kl_bound=5e-3 if wide else 2e-3)


@pytest.mark.parametrize("tensor_type", sorted(LOSSLESS_BITS))
def test_matches_llama_cpp_reference(tensor_type: str, tmp_path: Path) -> None:
    """MLX on the loaded model equals a float64 llama.cpp-convention forward on the raw file.

    The reference uses the file's permuted Q/K with interleaved RoPE; leaving Q/K permuted
    (with our half-split RoPE) is off by orders of magnitude more than the tolerance.
    """
    pytest.importorskip("mlx_lm")
    from edge_infer.backends.mlx.backend import MLXBackend
    from tests.support.reference_llama import ReferenceLlama

    info = write_tiny_gguf(tmp_path / "m.gguf", "llama", tensor_type, seed=3)
    model = load_model(info["path"])
    ref = ReferenceLlama(info["path"], kv_float16=True).forward(IDS.tolist())
    tol = 1e-5 * np.abs(ref).max()

    def mlx_logits(m: LoadedModel) -> np.ndarray:
        backend = MLXBackend(m, dtype="float32", kv_bits=16)
        return backend.forward(IDS, backend.new_cache(), all_logits=True)

    assert np.abs(mlx_logits(model) - ref).max() <= tol
    weights = dict(model.weights)
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = info["num_heads"] if "q_proj" in name else info["num_kv_heads"]
            weights[name] = weights[name].take_rows(
                permute_qk(np.arange(weights[name].shape[0]), heads)
            )
    still_permuted = dataclasses.replace(model, weights=weights)
    assert np.abs(mlx_logits(still_permuted) - ref).max() > 100 * tol


# ---------------------------------------------------------------------- qwen2, tied, rope


def test_qwen2_biases_no_permutation(tmp_path: Path) -> None:
    info = write_tiny_gguf(
        tmp_path / "q.gguf", "qwen2", "Q8_0", tie_word_embeddings=True, rope_theta=1e6, pre="qwen2"
    )
    model = load_model(info["path"])
    cfg = model.config
    assert (cfg.arch, cfg.attention_bias, cfg.tie_word_embeddings) == ("qwen2", True, True)
    assert cfg.rope_theta == 1e6
    assert "lm_head.weight" not in model.weights
    assert set(model.weights) == set(info["stored"])
    for name, ref in info["stored"].items():
        assert_weight_matches(model.weights[name], ref, "Q8_0", name)
    for i in range(info["num_layers"]):
        for proj, gguf_name in (("q", "attn_q"), ("k", "attn_k")):
            name = f"model.layers.{i}.self_attn.{proj}_proj"
            np.testing.assert_array_equal(  # qwen2 is stored unpermuted
                dense(model.weights[name + ".weight"]), info["file"][f"blk.{i}.{gguf_name}.weight"]
            )
        for proj in "qkv":
            bias = model.weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"]
            assert bias.dtype == np.float32 and bias.shape == (
                info["num_heads" if proj == "q" else "num_kv_heads"] * info["head_dim"],
            )
            np.testing.assert_array_equal(
                bias, info["stored"][f"model.layers.{i}.self_attn.{proj}_proj.bias"]
            )
    assert_backends_agree(model, IDS)


def test_llama_qk_biases_unpermuted(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "b.gguf", "llama", "Q8_0", attention_bias=True)
    model = load_model(info["path"])
    assert model.config.attention_bias is True
    for i in range(info["num_layers"]):
        for proj in "qkv":
            name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
            np.testing.assert_array_equal(model.weights[name], info["stored"][name], err_msg=name)


def test_mixed_types_like_q4_k_m(tmp_path: Path) -> None:
    """Per-tensor types as llama.cpp's Q4_K_M mixes them; each converts by its own type."""
    types = {
        "token_embd.weight": "Q6_K",
        "output.weight": "Q8_0",
        "blk.0.attn_v.weight": "Q5_K",
        "blk.1.ffn_down.weight": "F16",
    }
    info = write_tiny_gguf(tmp_path / "mix.gguf", "llama", "Q4_K", tensor_types=types)
    model = load_model(info["path"])
    assert model.quantization == "Q4_K"
    by_hf_name = {
        "model.embed_tokens.weight": "Q6_K",
        "lm_head.weight": "Q8_0",
        "model.layers.0.self_attn.v_proj.weight": "Q5_K",
        "model.layers.1.mlp.down_proj.weight": "F16",
    }
    for name, ref in info["stored"].items():
        assert_weight_matches(model.weights[name], ref, by_hf_name.get(name, "Q4_K"), name)
    assert_backends_agree(model, IDS)


def test_custom_alignment(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "a.gguf", "llama", "Q4_1", alignment=64)
    model = load_model(info["path"])
    for name, ref in info["stored"].items():
        assert_weight_matches(model.weights[name], ref, "Q4_1", name)


def test_missing_output_means_tied(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "t.gguf", "llama", "Q4_0", skip=["output.weight"])
    model = load_model(info["path"])
    assert model.config.tie_word_embeddings is True
    assert "lm_head.weight" not in model.weights
    assert_backends_agree(model, IDS)


def test_rope_freqs_tensor(tmp_path: Path) -> None:
    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)  # head_dim 16 -> 8 frequencies
    info = write_tiny_gguf(tmp_path / "r.gguf", "llama", "Q4_1", rope_freqs=factors)
    model = load_model(info["path"])
    assert model.config.rope_freq_factors == tuple(float(f) for f in factors)
    assert not any("rope_freqs" in n for n in model.weights)
    inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16) / factors
    np.testing.assert_allclose(model.config.rope_inv_freq(), inv, rtol=1e-12)


def test_linear_rope_scaling_metadata(tmp_path: Path) -> None:
    overrides = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    info = write_tiny_gguf(tmp_path / "l.gguf", "llama", "Q4_0", overrides=overrides)
    assert load_model(info["path"]).config.rope_freq_factors == (4.0,) * 8


def test_vocab_size_defaults_to_token_count(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "v.gguf", "llama", "Q8_0", drop_keys=["llama.vocab_size"])
    assert load_model(info["path"]).config.vocab_size == len(info["tokens"])


def test_progress_callback(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "p.gguf", "llama", "Q4_0")
    calls: list[tuple[int, int]] = []
    load_model(info["path"], progress=lambda done, total: calls.append((done, total)))
    n = len(info["stored"])
    assert calls == [(i, n) for i in range(1, n + 1)]


# ---------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def gguf_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.gguf"
    write_tiny_gguf(path, "llama", "Q4_0")
    return load_model(path).tokenizer


def test_tokenizer_special_tokens(gguf_tokenizer) -> None:
    tok = gguf_tokenizer
    for i, text in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(text) == i
        assert tok.encode(text) == [i]
        assert tok.id_to_token(i) == text
    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID)
    assert {0, EOS_ID} <= tok.eos_ids  # <|endoftext|> also ends generation
    assert tok.special_ids == {0, 1, 2}
    assert tok.add_bos is False
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.vocab_size == 268


def test_tokenizer_round_trip(gguf_tokenizer) -> None:
    tok = gguf_tokenizer
    assert tok.encode("hello world") == [tok.token_to_id("hello"), tok.token_to_id("Ġworld")]
    assert len(tok.encode("123")) == 3  # smollm pre-tokenizer splits digits
    for text in ("hello world", "Héllo, wörld! 123 ✓\n\ttabs  and  spaces", "日本語 🙂"):
        ids = tok.encode(text)
        assert all(3 <= i < 268 for i in ids)
        assert tok.decode(ids) == text
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    chat = "<|im_start|>user\nhello<|im_end|>\n"
    ids = tok.encode(chat)
    assert ids[0] == BOS_ID and EOS_ID in ids
    assert tok.decode(ids) == chat
    assert tok.decode(ids, skip_special=True) == "user\nhello\n"


def test_tokenizer_matches_hf_tokenizers(tmp_path: Path) -> None:
    """With the "default" (GPT-2) pre-tokenizer, ids equal a tokenizers-library BPE's."""
    write_tiny_gguf(tmp_path / "d.gguf", "llama", "Q4_0", pre="default")
    tok = load_model(tmp_path / "d.gguf").tokenizer
    hf = build_hf_tokenizer()
    for text in ("hello world", " hello  world 12345", "x<|im_end|>y", "Grüße, world!\n"):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text


# ---------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "g.gguf"
    write_tiny_gguf(path, "llama", "Q4_0")
    return path.read_bytes()


@pytest.mark.parametrize(
    "keep,message",
    [
        (0.5, "truncated file: tensor 'blk"),  # cut inside the tensor data
        (0.999, "truncated file: tensor 'output.weight'"),  # only the last tensor is short
        (0.02, "corrupt GGUF header"),  # cut inside the metadata
    ],
)
def test_truncated_file(good_file: bytes, keep: float, message: str, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_file[: int(len(good_file) * keep)])
    with pytest.raises(ModelFormatError, match=message) as exc:
        load_model(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_wrong_magic(good_file: bytes, tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + good_file[4:])
    with pytest.raises(ModelFormatError, match="not a GGUF file") as exc:
        load_model(path)
    assert str(path) in str(exc.value)
    other = tmp_path / "model.bin"
    other.write_bytes(b"GGML" + good_file[4:])
    with pytest.raises(ModelFormatError, match="unsupported model file"):
        load_model(other)


def test_tiny_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        load_model(tmp_path / "empty.gguf")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model(tmp_path / "absent.gguf")


def test_unsupported_version(good_file: bytes, tmp_path: Path) -> None:
    path = tmp_path / "v9.gguf"
    path.write_bytes(good_file[:4] + (9).to_bytes(4, "little") + good_file[8:])
    with pytest.raises(ModelFormatError, match="version 9"):
        load_model(path)


def test_unsupported_architecture(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "f.gguf", "llama", "Q4_0", declared_arch="falcon")
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(info["path"])
    msg = str(exc.value)
    assert "'falcon'" in msg and "llama" in msg and "qwen2" in msg and str(info["path"]) in msg


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    info = write_tiny_gguf(
        tmp_path / "q2.gguf", "llama", "Q4_K", tensor_types={"blk.1.ffn_down.weight": "Q2_K"}
    )
    with pytest.raises(UnsupportedModelError) as exc:
        load_model(info["path"])
    msg = str(exc.value)
    assert "'blk.1.ffn_down.weight'" in msg and "10 (Q2_K)" in msg
    assert str(info["path"]) in msg


def test_missing_tensor(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "m.gguf", "llama", "Q4_0", skip=["blk.1.ffn_up.weight"])
    with pytest.raises(ModelFormatError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj"):
        load_model(info["path"])


def test_unexpected_tensor(tmp_path: Path) -> None:
    info = write_tiny_gguf(tmp_path / "x.gguf", "llama", "Q4_0")
    data = Path(info["path"]).read_bytes()
    # rename one tensor in the directory (same length, so offsets stay valid)
    path = tmp_path / "y.gguf"
    path.write_bytes(data.replace(b"blk.0.ffn_up.weight", b"blk.0.ffn_xx.weight", 1))
    with pytest.raises(UnsupportedModelError, match="unexpected tensor 'blk.0.ffn_xx.weight'"):
        load_model(path)


def test_missing_metadata_key(tmp_path: Path) -> None:
    info = write_tiny_gguf(
        tmp_path / "k.gguf", "llama", "Q4_0", drop_keys=["llama.embedding_length"]
    )
    with pytest.raises(ModelFormatError, match="llama.embedding_length is missing"):
        load_model(info["path"])


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    info = write_tiny_gguf(
        tmp_path / "y.gguf", "llama", "Q4_0", overrides={"llama.rope.scaling.type": "yarn"}
    )
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        load_model(info["path"])


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    info = write_tiny_gguf(
        tmp_path / "b.gguf", "llama", "Q4_0", overrides={"tokenizer.ggml.model": "bert"}
    )
    with pytest.raises(ModelFormatError, match="tokenizer.*'bert'") as exc:
        load_model(info["path"])
    assert str(info["path"]) in str(exc.value)
