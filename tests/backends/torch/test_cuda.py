"""The torch backend on a CUDA device: the default model against the float64 reference with
16- and 4-bit KV, caches moving between the GPU and the CPU through the disk, batched decoding,
and the Triton attention kernel inside the model. Skipped where torch sees no CUDA device."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest
import torch

from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.backends.torch.kv_attention import attend_new_tokens, attend_reference
from edge_infer.engine import Engine, agent_store
from edge_infer.generation.batch import decode_together
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage
from edge_infer.kernels import triton as triton_kernels
from tests.support.kv_caches import filled_cache, one_token
from tests.support.reference_llama import ReferenceLlama, log_softmax64

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.slow,
]

# teacher-forced positions: past 256 the first KV block is sealed (4/8-bit) for the rest
N_TOKENS = 512
# a greedy step counts as a near-tie (allowed to flip) below this log-prob margin
CLEAR_MARGIN = 0.25
SHORT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is.",
    "List three prime numbers.",
]
QUESTION = "Summarise the text above in one sentence."


def corpus_text() -> str:
    return "\n\n".join(topics[k] for k in ("assert", "assignment", "async", "atom-identifiers"))


def agreement(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over positions of log-probs."""
    top1 = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - ours.astype(np.float64)), axis=-1)))
    return top1, kl


@pytest.fixture(scope="module")
def engines(default_model):
    """CUDA engines by KV bits, made when first asked for."""
    made: dict[int, Engine] = {}

    def get(bits: int) -> Engine:
        if bits not in made:
            made[bits] = Engine(default_model, TorchBackend(default_model, "cuda", kv_bits=bits))
        return made[bits]

    return get


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


def long_prompt(eng: Engine, question: str) -> list[int]:
    """A chat prompt of about 340 tokens: a document, then the question (the first KV block is
    sealed before the reply starts)."""
    doc = eng.detokenize(eng.tokenize(topics["assignment"])[:300])
    return eng.chat_ids([{"role": "user", "content": doc + "\n\n" + question}])


def test_the_triton_kernel_serves_cuda_caches():
    """torch's CUDA wheels bring Triton, so decoding on CUDA reads the stored form in it."""
    assert triton_kernels.load() is not None


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_one_token_attention_on_cuda_matches_reference(bits, kernels, monkeypatch):
    """Through the backend's entry point: the Triton kernel, and the plain-torch fallback."""
    monkeypatch.setenv("EDGE_INFER_KERNELS", kernels)
    lengths = [1, 300, 1500]
    caches = [filled_cache(bits, n, 3, 64, 64, seed=n, device="cuda") for n in lengths]
    tokens = [one_token(c, 9, seed=i) for i, c in enumerate(caches)]
    for c in caches:
        c.reserve_next()
    q, k, v = (torch.stack([t[i] for t in tokens]) for i in range(3))
    out = attend_new_tokens(caches, 1, q, k, v)
    for b, n in enumerate(lengths):
        twin = filled_cache(bits, n, 3, 64, 64, seed=n, device="cuda")
        twin.update(1, k[b, :, None], v[b, :, None])
        ref = attend_reference(twin, 1, q[b, :, None])[:, 0]
        torch.testing.assert_close(out[b], ref, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("bits", [16, 4])
def test_teacher_forced_matches_reference(engines, bits, text_ids, reference_logprobs):
    ours = engines(bits).logits(text_ids)
    assert ours.shape == reference_logprobs.shape
    top1, kl = agreement(reference_logprobs, ours)
    late = agreement(reference_logprobs[256:], ours[256:])
    print(f"cuda, {bits}-bit KV: top-1 {top1:.4f}, mean KL {kl:.5f} (past 256: {late})")
    assert top1 >= 0.97
    assert kl <= 0.01


@pytest.fixture(scope="module")
def reference_greedy(reference):
    """The reference's greedy continuation and margins of a prompt, computed once."""
    done: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}

    def get(ids: list[int]) -> tuple[list[int], list[float]]:
        if tuple(ids) not in done:
            done[tuple(ids)] = reference.greedy(ids, 32)
        return done[tuple(ids)]

    return get


@pytest.mark.parametrize("bits", [16, 4])
def test_greedy_generation_matches_reference(engines, bits, reference_greedy):
    """Short chat prompts (their KV stays in the float16 tail: the 4-bit blocks' effect on
    long contexts is what the teacher-forced test measures past 256 tokens)."""
    eng = engines(bits)
    for prompt in SHORT_PROMPTS:
        ids = eng.chat_ids([{"role": "user", "content": prompt}])
        ref_tokens, margins = reference_greedy(ids)
        ours = [
            t
            for t, _ in eng.generate_tokens(ids, temperature=0, max_tokens=32, ignore_eos=True)
            if t is not None
        ]
        assert len(ours) == 32
        for step, (a, b) in enumerate(zip(ref_tokens, ours, strict=True)):
            if a != b:  # only a near-tie in the reference may flip; then the texts diverge
                assert margins[step] < CLEAR_MARGIN, (
                    f"{prompt!r}: step {step} differs ({a} vs {b}) with a clear reference "
                    f"margin {margins[step]:.3f}"
                )
                break


def greedy(backend: TorchBackend, cache, token: int, steps: int) -> tuple[list[int], list[float]]:
    """Feed ``token``, then decode greedily: the tokens and each step's top-2 logit margin."""
    out, margins = [], []
    for _ in range(steps):
        logits = backend.forward(np.array([token]), cache)[-1]
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        token = int(logits.argmax())
        out.append(token)
    return out, margins


def assert_same_continuation(a: tuple, b: tuple) -> None:
    """Identical tokens, unless a near-tie (on either device) flips first."""
    (tokens_a, margins_a), (tokens_b, margins_b) = a, b
    for step, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=True)):
        if x != y:
            margin = min(margins_a[step], margins_b[step])
            assert margin < CLEAR_MARGIN, f"step {step}: {x} vs {y}, margin {margin:.3f}"
            return


def test_a_cache_written_on_cuda_continues_on_the_cpu_and_back(default_model):
    """Through the store on disk: CUDA -> CPU, then the CPU's longer cache -> CUDA. Each
    restore holds the writer's stored bytes, and continues as the writer continues."""
    devices = {d: TorchBackend(default_model, d, kv_bits=4) for d in ("cuda", "cpu")}
    stores = {d: agent_store(default_model, b) for d, b in devices.items()}
    eng = Engine(default_model, devices["cpu"])
    ids = long_prompt(eng, QUESTION)
    writer = devices["cuda"].new_cache()
    devices["cuda"].forward(np.array(ids[:-1]), writer)
    held, token = list(ids[:-1]), ids[-1]
    for src, dst in (("cuda", "cpu"), ("cpu", "cuda")):
        assert writer.sealed_length == 256  # a 4-bit block and a float16 tail travel
        stores[src].save("traveller", held, writer.blocks())
        snapshot = stores[dst].load("traveller")
        assert snapshot is not None and snapshot.valid_tokens == len(held)
        restored = devices[dst].new_cache()
        restored.append_blocks(snapshot.blocks)
        for a, b in zip(writer.blocks(), restored.blocks(), strict=True):
            for la, lb in zip(a.layers, b.layers, strict=True):
                for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
                    if isinstance(x, np.ndarray):
                        assert np.array_equal(x, y)
                    else:
                        assert np.array_equal(x.packed, y.packed)
                        assert np.array_equal(x.scales, y.scales)
                        assert np.array_equal(x.biases, y.biases)
        live = greedy(devices[src], writer, token, 16)
        moved = greedy(devices[dst], restored, token, 16)
        assert_same_continuation(live, moved)
        # the restored cache is the writer of the way back
        held += [token] + moved[0][:-1]
        writer, token = restored, moved[0][-1]


def test_batched_decoding_matches_decoding_alone(engines):
    """Four sequences (one crossing a KV block boundary while decoding) decoded together
    sample what each samples alone, greedy and seeded."""
    eng = engines(4)
    texts = [
        "Hi!",
        "What is the capital of France?",
        "Write a short poem about the sea and the wind.",
        "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 22,
    ]
    ids = [eng.chat_ids([{"role": "user", "content": t}]) for t in texts]
    assert 240 <= len(ids[3]) < 256
    params = [SamplingParams(temperature=0, max_tokens=24)] * 2 + [
        SamplingParams(temperature=0.9, max_tokens=24, seed=s) for s in (1, 2)
    ]
    alone = [
        [t for t, _ in eng.generate_tokens(x, p) if t is not None]
        for x, p in zip(ids, params, strict=True)
    ]
    gens = [
        Generation(eng.runner, x, p, eng.runner.new_cache(), Usage())
        for x, p in zip(ids, params, strict=True)
    ]
    together: list[list[int]] = [[] for _ in ids]
    for i, pieces in decode_together(eng.runner, gens, max_batch=4):
        together[i] += [t for t, _ in pieces if t is not None]
    assert together == alone
    assert gens[3].cache.sealed_length == 256
