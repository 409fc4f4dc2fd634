"""The MLX backend on Qwen3 and Gemma 3 files the tests write (GGUF and Hugging Face):
against float64 numpy references of the same weights and against the torch backend, past
Gemma's sliding window in chunked prefill and in decode, and with KV blocks moved between
the two backends."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.models.hf.loader import load_hf_dir
from edge_infer.models.loader import load_model
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
try:
    from edge_infer.backends.mlx.backend import MLXBackend
except ImportError:  # mlx / mlx-lm not installed
    MLXBackend = None  # type: ignore[assignment,misc]
pytestmark = pytest.mark.skipif(MLXBackend is None, reason="mlx and mlx-lm are not installed")


def _ids(vocab: int, n: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(1).integers(3, vocab, n)]


def _assert_agree(ref: np.ndarray, logits: np.ndarray) -> None:
    top1, kl = agreement(ref, log_softmax64(logits.astype(np.float64)))
    assert top1 >= 0.97, top1
    assert kl <= 0.01, kl


def _all_logits(backend, ids: list[int]) -> np.ndarray:
    return backend.forward(np.asarray(ids), backend.new_cache(), all_logits=True)


# ---------------------------------------------------------------------- Qwen3


@pytest.mark.parametrize("source", ["gguf-F16", "gguf-Q8_0", "hf"])
def test_qwen3_matches_reference_and_torch(tmp_path, source):
    if source == "hf":
        info = write_tiny_hf_dir(tmp_path / "qwen3", "qwen3")
        vocab = info["config"]["vocab_size"]
    else:
        info = write_tiny_gguf(tmp_path / "qwen3.gguf", "qwen3", source.removeprefix("gguf-"))
        vocab = info["vocab_size"]
    model = load_model(info["path"])
    cfg = model.config
    assert cfg.qk_norm and "model.layers.1.self_attn.q_norm.weight" in model.weights
    ids = _ids(vocab, 96)
    held = held_weights(model)
    ref = log_softmax64(
        reference_logits(
            held,
            ids,
            n_heads=cfg.num_heads,
            n_kv=cfg.num_kv_heads,
            eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
        )
    )
    ours = _all_logits(MLXBackend(model, kv_bits=16), ids)
    _assert_agree(ref, ours)
    theirs = _all_logits(TorchBackend(model, device="cpu", kv_bits=16), ids)
    _assert_agree(log_softmax64(theirs.astype(np.float64)), ours)


# ---------------------------------------------------------------------- Gemma 3


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny random Gemma 3 (Q8_0, read losslessly by the reference) with a 16-token
    window and layer 5 global: 300 tokens cross a KV block and many windows."""
    info = write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "g.gguf", "Q8_0")
    return info, load_model(info["path"])


def _chunked_then_decoded(backend, ids: list[int], chunks: list[int]) -> np.ndarray:
    """Logits of every position: prefill in ``chunks`` (sizes), the rest one at a time."""
    cache, out, pos = backend.new_cache(), [], 0
    for n in chunks:
        out.append(backend.forward(np.asarray(ids[pos : pos + n]), cache, all_logits=True))
        pos += n
    out += [backend.forward(np.asarray(ids[t : t + 1]), cache) for t in range(pos, len(ids))]
    assert cache.length == len(ids)
    return np.concatenate(out)


@pytest.mark.parametrize("kv_bits", [16, 8])
def test_tiny_gemma3_matches_reference_and_torch_past_the_window(tiny_gemma3, kv_bits):
    """Prefill in chunks that end inside and across windows and a KV block, then decode:
    every position agrees with the reference and with torch on the same cache form."""
    info, model = tiny_gemma3
    assert model.config.sliding_window == 16 and model.config.is_local(0)
    ids = _ids(info["vocab_size"], 300)
    ref = log_softmax64(ReferenceGemma3(info["path"], kv_float16=True).forward(ids))
    chunks = [5, 40, 235]  # ends at 5 (inside the first window), 45, 280 (past block 0)
    ours = _chunked_then_decoded(MLXBackend(model, kv_bits=kv_bits), ids, chunks)
    _assert_agree(ref, ours)
    theirs = _chunked_then_decoded(TorchBackend(model, device="cpu", kv_bits=kv_bits), ids, chunks)
    _assert_agree(log_softmax64(theirs.astype(np.float64)), ours)


def test_tiny_gemma3_window_is_applied(tiny_gemma3):
    """With a window wider than the text (the same RoPE bases) the first 16 positions are
    the same and the later ones differ: the test above can fail."""
    from dataclasses import replace

    info, model = tiny_gemma3
    ids = _ids(info["vocab_size"], 64)
    windowed = _all_logits(MLXBackend(model, kv_bits=16), ids)
    cfg = replace(model.config, sliding_window=1 << 20)
    everything = _all_logits(MLXBackend(replace(model, config=cfg), kv_bits=16), ids)
    np.testing.assert_allclose(windowed[:16], everything[:16], rtol=1e-4, atol=1e-4)
    assert not np.allclose(windowed[-8:], everything[-8:], atol=1e-2)


def test_tiny_gemma3_batched_decode_matches_one_at_a_time(tiny_gemma3):
    info, model = tiny_gemma3
    backend = MLXBackend(model, kv_bits=4)
    ids = _ids(info["vocab_size"], 300)
    caches = [backend.new_cache(), backend.new_cache()]
    for c, n in zip(caches, (250, 299), strict=True):
        backend.forward(np.asarray(ids[:n]), c)
    batch = backend.forward_batch([ids[250], ids[299]], caches)
    for row, n in zip(batch, (250, 299), strict=True):
        alone = backend.new_cache()
        backend.forward(np.asarray(ids[:n]), alone)
        np.testing.assert_allclose(
            row, backend.forward(np.asarray(ids[n : n + 1]), alone)[0], rtol=1e-4, atol=1e-4
        )


def test_tiny_gemma3_hf_dir_matches_reference(tmp_path):
    """The same Gemma 3 as a float32 GGUF (read by the reference) and an HF directory (norms
    stored without Gemma's ``1 +``), loaded unquantized."""
    info = write_tiny_gemma3_gguf(tmp_path / "g.gguf", "F32", seed=2)
    model = load_hf_dir(write_tiny_gemma3_hf_dir(tmp_path / "hf", info), bits=16)
    ids = _ids(info["vocab_size"], 120)
    ref = log_softmax64(ReferenceGemma3(info["path"], kv_float16=True).forward(ids))
    _assert_agree(ref, _all_logits(MLXBackend(model, kv_bits=16), ids))


def test_tiny_gemma3_kv_blocks_move_between_backends(tiny_gemma3):
    """4-bit blocks written by one backend (sealed ones included, local layers too) continue
    on the other as its own prefill does."""
    info, model = tiny_gemma3
    backends = [TorchBackend(model, device="cpu", kv_bits=4), MLXBackend(model, kv_bits=4)]
    ids = np.asarray(_ids(info["vocab_size"], 300))
    for src, dst in (backends, backends[::-1]):
        cache = src.new_cache()
        src.forward(ids[:280], cache)
        moved = dst.new_cache()
        moved.append_blocks(cache.blocks())
        assert moved.length == 280 and moved.sealed_length == 256
        own = dst.new_cache()
        dst.forward(ids[:280], own)
        a = dst.forward(ids[280:], moved, all_logits=True)
        b = dst.forward(ids[280:], own, all_logits=True)
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"{src.name} -> {dst.name}"
        _assert_agree(log_softmax64(b.astype(np.float64)), a)
