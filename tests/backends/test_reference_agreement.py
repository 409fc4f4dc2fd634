"""Both backends against a float64 numpy reference of the real default model."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest

from tests.support.reference_llama import ReferenceLlama, log_softmax64

pytestmark = pytest.mark.slow

N_TOKENS = 256
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
def text_ids(default_model):
    ids = default_model.tokenizer.encode(corpus_text())
    assert len(ids) >= N_TOKENS
    return ids[:N_TOKENS]


@pytest.fixture(scope="module")
def reference_logprobs(reference, text_ids):
    return log_softmax64(reference.forward(text_ids))


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
