"""Both backends against a float64 numpy reference of the real default model, with float16
KV (the model's arithmetic) and with the default 4-bit KV (what generation runs)."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest

from tests.support.installed import HAS_MLX
from tests.support.reference_llama import ReferenceLlama, log_softmax64

pytestmark = pytest.mark.slow

N_TOKENS = 256
# two KV blocks: the second half attends a sealed (quantized) block
KV4_TOKENS = 512
# A step's greedy choice counts as a near-tie (allowed to flip) below this log-prob margin.
CLEAR_MARGIN = 0.25
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is.",
    "List three prime numbers.",
]


def corpus_text() -> str:
    return "\n\n".join(topics[k] for k in ("assert", "assignment", "async", "atom-identifiers"))


@pytest.fixture(scope="module")
def reference(default_model_path):
    return ReferenceLlama(default_model_path)


@pytest.fixture(scope="module")
def long_ids(default_model):
    ids = default_model.tokenizer.encode(corpus_text())
    assert len(ids) >= KV4_TOKENS
    return ids[:KV4_TOKENS]


@pytest.fixture(scope="module")
def text_ids(long_ids):
    return long_ids[:N_TOKENS]


@pytest.fixture(scope="module")
def long_reference_logprobs(reference, long_ids):
    return log_softmax64(reference.forward(long_ids))


@pytest.fixture(scope="module")
def reference_logprobs(long_reference_logprobs):
    return long_reference_logprobs[:N_TOKENS]  # causal: the same as scoring the prefix alone


@pytest.fixture(scope="module")
def kv4_logprobs(default_model, long_ids):
    """Teacher-forced log-probs of each backend with 4-bit KV (computed once, on demand)."""
    from edge_infer.backends.select import create_backend
    from edge_infer.engine import Engine

    done: dict[str, np.ndarray] = {}

    def get(backend: str) -> np.ndarray:
        if backend not in done:
            if backend == "mlx" and not HAS_MLX:
                pytest.skip("mlx not installed")
            eng = Engine(default_model, create_backend(default_model, backend, kv_bits=4))
            done[backend] = eng.logits(long_ids).astype(np.float64)
        return done[backend]

    return get


def agreement(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over positions."""
    top1 = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - ours.astype(np.float64)), axis=-1)))
    return top1, kl


def _engine(request, name):
    return request.getfixturevalue(f"{name}_engine")


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_teacher_forced_matches_reference(request, backend, text_ids, reference_logprobs):
    eng = _engine(request, backend)
    ours = eng.logits(text_ids)
    assert ours.shape == reference_logprobs.shape
    top1, kl = agreement(reference_logprobs, ours)
    print(f"{backend}: top-1 agreement {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl <= 0.01


def test_torch_and_mlx_agree(torch_engine, mlx_engine, text_ids):
    a = torch_engine.logits(text_ids).astype(np.float64)
    b = mlx_engine.logits(text_ids).astype(np.float64)
    top1, kl = agreement(b, a)
    print(f"torch vs mlx: top-1 agreement {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl <= 0.01


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_4bit_kv_teacher_forced_matches_reference(backend, kv4_logprobs, long_reference_logprobs):
    ours = kv4_logprobs(backend)
    assert ours.shape == long_reference_logprobs.shape
    top1, kl = agreement(long_reference_logprobs, ours)
    late = agreement(long_reference_logprobs[256:], ours[256:])  # over the sealed block
    print(f"{backend} 4-bit KV: top-1 {top1:.4f}, mean KL {kl:.5f}; after 256: {late}")
    assert top1 >= 0.95 and kl <= 0.01
    assert late[0] >= 0.95 and late[1] <= 0.01


def test_4bit_kv_backends_agree(kv4_logprobs):
    """Both read the same stored format the same way: they compute the same thing."""
    top1, kl = agreement(kv4_logprobs("torch"), kv4_logprobs("mlx"))
    print(f"torch vs mlx, 4-bit KV: top-1 agreement {top1:.4f}, mean KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl <= 0.01


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_greedy_generation_matches_reference(request, backend, reference):
    eng = _engine(request, backend)
    for prompt in PROMPTS:
        ids = eng.chat_ids([{"role": "user", "content": prompt}])
        ref_tokens, margins = reference.greedy(ids, 32)
        ours = [
            t
            for t, _ in eng.generate_tokens(ids, temperature=0, max_tokens=32, ignore_eos=True)
            if t is not None
        ]
        assert len(ours) == 32
        for step, (a, b) in enumerate(zip(ref_tokens, ours, strict=True)):
            if a != b:
                # Only a near-tie in the reference may flip; after that the texts diverge.
                assert margins[step] < CLEAR_MARGIN, (
                    f"{prompt!r}: step {step} differs ({a} vs {b}) with a clear reference "
                    f"margin {margins[step]:.3f}"
                )
                break
