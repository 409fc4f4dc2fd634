"""The torch decoder on Qwen3 and Gemma 3 files the tests write (GGUF and Hugging Face),
against float64 numpy references of the same weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.models.hf.loader import load_hf_dir
from edge_infer.models.loader import load_model
from edge_infer.models.spec import attention_tag
from tests.support.agreement import agreement
from tests.support.model_files import (
    write_tiny_gemma3_gguf,
    write_tiny_gemma3_hf_dir,
    write_tiny_gguf,
    write_tiny_hf_dir,
)
from tests.support.reference_gemma3 import ReferenceGemma3
from tests.support.reference_llama import log_softmax64
from tests.support.reference_numpy import held_weights, reference_logits

pytest.importorskip("gguf")


def _check(model, ids) -> None:
    cfg = model.config
    weights = held_weights(model)
    assert cfg.qk_norm
    ref = log_softmax64(
        reference_logits(
            weights,
            ids,
            n_heads=cfg.num_heads,
            n_kv=cfg.num_kv_heads,
            eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
        )
    )
    backend = TorchBackend(model, device="cpu", kv_bits=16)
    ours = log_softmax64(
        backend.forward(np.asarray(ids), backend.new_cache(), all_logits=True).astype(np.float64)
    )
    top1, kl = agreement(ref, ours)
    assert top1 >= 0.97, top1
    assert kl <= 0.01, kl


def _ids(vocab: int, n: int = 96) -> list[int]:
    return [int(i) for i in np.random.default_rng(1).integers(3, vocab, n)]


@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0"])
def test_qwen3_gguf_matches_reference(tmp_path, tensor_type):
    info = write_tiny_gguf(tmp_path / "qwen3.gguf", "qwen3", tensor_type)
    model = load_model(info["path"])
    assert "model.layers.1.self_attn.k_norm.weight" in model.weights
    _check(model, _ids(info["vocab_size"]))


def test_qwen3_gguf_of_mixed_types_matches_reference(tmp_path):
    """llama.cpp's Q4_K_M mix: 4-bit Q4_K beside 8-bit Q6_K / Q5_K / Q8_0 in one fused
    projection (the QKV of layer 0, gate/up of layer 1)."""
    types = {
        "token_embd.weight": "Q8_0",
        "output.weight": "Q6_K",
        "blk.0.attn_v.weight": "Q6_K",
        "blk.1.ffn_up.weight": "Q5_K",
        "blk.1.ffn_down.weight": "Q8_0",
    }
    info = write_tiny_gguf(tmp_path / "mix.gguf", "qwen3", "Q4_K", tensor_types=types)
    _check(load_model(info["path"]), _ids(info["vocab_size"]))


def test_qwen3_hf_dir_matches_reference(tmp_path):
    info = write_tiny_hf_dir(tmp_path / "qwen3", "qwen3")
    model = load_model(info["path"])
    _check(model, _ids(info["config"]["vocab_size"]))


def test_query_key_norms_change_the_output(tmp_path):
    """The norms are applied: without them the logits differ (so the test above can fail)."""
    info = write_tiny_gguf(tmp_path / "qwen3.gguf", "qwen3", "F16")
    plain = {k: v for k, v in info["stored"].items() if "_norm." not in k or "layernorm" in k}
    ids = _ids(info["vocab_size"], 16)
    kw = {"n_heads": 4, "n_kv": 2, "eps": 1e-5, "rope_theta": 10000.0}
    with_norms = reference_logits(info["stored"], ids, **kw)
    assert not np.allclose(with_norms, reference_logits(plain, ids, **kw), atol=1e-2)


# ---------------------------------------------------------------------- Gemma 3


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny random Gemma 3 (Q8_0: converted losslessly, so the reference reads the same
    weights) with a 16-token window: 300 tokens cross a KV block and many windows."""
    info = write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "g.gguf", "Q8_0")
    return info, load_model(info["path"])


def test_tiny_gemma3_config(tiny_gemma3):
    info, model = tiny_gemma3
    cfg = model.config
    assert (cfg.sliding_window, cfg.local_layers) == (16, (0, 1, 2, 3, 4))
    assert cfg.qk_norm and cfg.sandwich_norms and cfg.hidden_act == "gelu_tanh"
    assert cfg.embedding_scale == pytest.approx(8.0)
    assert model.tokenizer.chat_template.startswith("{{ bos_token }}")
    assert "attention" in model.fingerprint_parts  # window, layers and bases are derived


def test_attention_settings_change_the_fingerprint(tiny_gemma3):
    cfg = tiny_gemma3[1].config
    tags = {
        attention_tag(c)
        for c in (
            cfg,
            replace(cfg, sliding_window=32),
            replace(cfg, local_layers=(0, 1)),
            replace(cfg, rope_local_theta=5e4),
            replace(cfg, rope_theta=2e6),
        )
    }
    assert len(tags) == 5
    assert attention_tag(replace(cfg, local_layers=(), rope_local_theta=None)) == ""


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_tiny_gemma3_matches_reference_past_the_window(tiny_gemma3, kv_bits):
    """Chunked prefill over 300 tokens, then one token at a time: every position agrees."""
    info, model = tiny_gemma3
    ids = _ids(info["vocab_size"], 300)
    ref = log_softmax64(ReferenceGemma3(info["path"], kv_float16=True).forward(ids))
    backend = TorchBackend(model, device="cpu", kv_bits=kv_bits)
    cache = backend.new_cache()
    ours = [backend.forward(np.asarray(ids[:280]), cache, all_logits=True)]
    ours += [backend.forward(np.asarray(ids[t : t + 1]), cache) for t in range(280, 300)]
    got = log_softmax64(np.concatenate(ours).astype(np.float64))
    top1, kl = agreement(ref, got)
    assert top1 >= 0.97, top1
    assert kl <= 0.01, kl
    # a batch of two sequences decodes what each does alone
    caches = [backend.new_cache(), backend.new_cache()]
    for c, n in zip(caches, (290, 299), strict=True):
        backend.forward(np.asarray(ids[:n]), c)
    batch = backend.forward_batch([ids[290], ids[299]], caches)
    alone = backend.forward(np.asarray(ids[290:291]), backend_cache(backend, ids[:290]))
    np.testing.assert_allclose(batch[0], alone[-1], rtol=1e-4, atol=1e-4)


def backend_cache(backend, ids):
    cache = backend.new_cache()
    backend.forward(np.asarray(ids), cache)
    return cache


def test_tiny_gemma3_hf_dir_matches_reference(tmp_path):
    """The same Gemma 3 as a float32 GGUF (read by the reference) and an HF directory (norms
    without Gemma's ``1 +``, settings from config.json), loaded unquantized."""
    info = write_tiny_gemma3_gguf(tmp_path / "g.gguf", "F32", seed=2)
    model = load_hf_dir(write_tiny_gemma3_hf_dir(tmp_path / "hf", info), bits=16)
    cfg = model.config
    assert (cfg.arch, cfg.sliding_window, cfg.local_layers) == ("gemma3", 16, (0, 1, 2, 3, 4))
    assert "attention" in model.fingerprint_parts
    ids = _ids(info["vocab_size"], 120)
    ref = log_softmax64(ReferenceGemma3(info["path"], kv_float16=True).forward(ids))
    backend = TorchBackend(model, device="cpu", kv_bits=16)
    ours = backend.forward(np.asarray(ids), backend.new_cache(), all_logits=True)
    top1, kl = agreement(ref, log_softmax64(ours.astype(np.float64)))
    assert top1 >= 0.97, top1
    assert kl <= 0.01, kl
