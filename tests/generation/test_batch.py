"""Batched decoding: sequences decoded together sample exactly what they sample alone."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.engine import Engine
from edge_infer.generation.batch import decode_together, forward_step
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage

GREEDY = SamplingParams(temperature=0, max_tokens=24)


@pytest.fixture(scope="module")
def q4_engine(default_model):
    from edge_infer.backends.torch.backend import TorchBackend

    return Engine(default_model, TorchBackend(default_model, device="cpu", kv_bits=4))


def prompts(eng) -> list[list[int]]:
    """Four prompts of different lengths; one ends just before a KV block boundary."""
    texts = [
        "Hi!",
        "What is the capital of France?",
        "Write a short poem about the sea and the wind.",
        "Summarise: " + "The quick brown fox jumps over the lazy dog. " * 22,
    ]
    ids = [eng.chat_ids([{"role": "user", "content": t}]) for t in texts]
    assert 240 <= len(ids[3]) < 256  # its decode crosses the first block boundary
    return ids


def alone(eng, ids, params=GREEDY) -> list[int]:
    return [t for t, _ in eng.generate_tokens(ids, params) if t is not None]


def test_four_sequences_joining_at_different_steps_match_running_alone(q4_engine):
    eng = q4_engine
    ids = prompts(eng)
    expected = [alone(eng, x) for x in ids]
    joins = [0, 3, 5, 11]  # step at which each sequence joins the running batch
    gens: list[Generation | None] = [None] * 4
    got: list[list[int]] = [[] for _ in ids]
    step = 0
    while step < 200:
        for i, at in enumerate(joins):
            if at == step:
                gens[i] = Generation(eng.runner, ids[i], GREEDY, eng.runner.new_cache(), Usage())
                gens[i].prefill()
        running = [g for g in gens if g is not None and not g.finished]
        if not running and all(g is not None for g in gens):
            break
        for i, g in enumerate(gens):
            if g is not None and not g.finished:
                got[i] += [t for t, _ in g.sample() if t is not None]
        forward_step(eng.runner, [g for g in gens if g is not None and not g.finished])
        step += 1
    assert got == expected
    assert gens[3].cache.sealed_length == 256  # sealed (quantized) mid-batch


def test_sampled_decoding_with_seeds_matches_too(q4_engine):
    eng = q4_engine
    ids = prompts(eng)[:3]
    params = [SamplingParams(temperature=0.9, max_tokens=16, seed=s) for s in (1, 2, 3)]
    expected = [alone(eng, x, p) for x, p in zip(ids, params, strict=True)]
    gens = [
        Generation(eng.runner, x, p, eng.runner.new_cache(), Usage())
        for x, p in zip(ids, params, strict=True)
    ]
    got: list[list[int]] = [[] for _ in ids]
    for i, pieces in decode_together(eng.runner, gens, max_batch=2):  # two passes per step
        got[i] += [t for t, _ in pieces if t is not None]
    assert got == expected
    assert all(g.usage.finish_reason in ("stop", "length") for g in gens)


def test_chat_many_equals_one_agent_after_another(q4_engine, tmp_path, monkeypatch):
    eng = q4_engine
    questions = {
        "ann": "What is the capital of France?",
        "ben": "Name a colour.",
        "cat": "Write one sentence about cats and dogs.",
    }
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "one"))
    one = Engine(eng.model, eng.backend)
    expected = {n: one.agent(n).chat(q, temperature=0, max_tokens=20) for n, q in questions.items()}
    one.flush()
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "many"))
    many = Engine(eng.model, eng.backend)
    got = many.chat_many(questions, temperature=0, max_tokens=20)
    assert got == expected
    for name in questions:
        agent = many.agent(name)
        assert agent.messages[-1] == {"role": "assistant", "content": expected[name]}
        assert agent.tokens == one.agent(name).tokens
    # a second round continues from the caches
    again = many.chat_many({n: "Thanks!" for n in questions}, temperature=0, max_tokens=8)
    assert set(again) == set(questions)
    for name in questions:
        u = many.agent(name).usage
        assert u.cached_tokens > 0 and u.prompt_tokens - u.cached_tokens < 20
    many.flush()


def test_chat_many_reports_bad_input_and_releases_agents(q4_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path))
    eng = Engine(q4_engine.model, q4_engine.backend)
    with pytest.raises(ValueError, match="invalid agent name"):
        eng.chat_many({"ok": "hi", "../bad": "hi"}, max_tokens=2)
    with pytest.raises(ValueError, match="no messages"):
        eng.chat_many({"ok": []}, max_tokens=2)
    assert eng.agent("ok").chat("Hello", max_tokens=2, temperature=0) is not None  # not locked


def test_forward_batch_needs_distinct_caches(q4_engine):
    be = q4_engine.backend
    c = be.new_cache()
    with pytest.raises(ValueError, match="distinct"):
        be.forward_batch([1, 2], [c, c])
    with pytest.raises(ValueError, match="one token per cache"):
        be.forward_batch([1], [c, be.new_cache()])


def test_forward_batch_rows_match_single_forward(q4_engine):
    be = q4_engine.backend
    caches = [be.new_cache() for _ in range(3)]
    singles = [be.new_cache() for _ in range(3)]
    for n, (c, s) in enumerate(zip(caches, singles, strict=True)):
        seq = np.arange(10 + 7 * n) + 100
        be.forward(seq, c)
        be.forward(seq, s)
    rows = be.forward_batch([5, 6, 7], caches)
    for row, tok, s in zip(rows, [5, 6, 7], singles, strict=True):
        assert np.array_equal(row, be.forward(np.asarray([tok]), s)[-1])


@pytest.fixture(scope="module")
def mlx_q4_engine(default_model):
    from tests.support.installed import HAS_MLX

    if not HAS_MLX:
        pytest.skip("mlx not installed")
    from edge_infer.backends.mlx.backend import MLXBackend

    return Engine(default_model, MLXBackend(default_model, kv_bits=4))


@pytest.mark.slow
def test_mlx_batch_matches_running_alone(mlx_q4_engine):
    eng = mlx_q4_engine
    ids = prompts(eng)
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [alone(eng, x, params) for x in ids]
    gens = [Generation(eng.runner, x, params, eng.runner.new_cache(), Usage()) for x in ids]
    got: list[list[int]] = [[] for _ in ids]
    for i, pieces in decode_together(eng.runner, gens):
        got[i] += [t for t, _ in pieces if t is not None]
    assert got == expected
    assert gens[3].cache.sealed_length == 256
