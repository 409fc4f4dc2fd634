"""A generation's per-token log-probabilities."""

from __future__ import annotations

import numpy as np

from edge_infer.generation.sampling import SamplingParams, log_softmax
from edge_infer.generation.sequence import Generation, Usage, token_logprob


def test_token_logprob_ranks_like_greedy():
    logits = np.array([1.0, 3.0, 3.0, -np.inf, 0.5], dtype=np.float32)
    got = token_logprob(logits, 1, top=3)
    lp = log_softmax(logits)
    assert got.token == 1 and got.logprob == lp[1]
    # ties: the lower id first, the one argmax (greedy) picks
    assert [t for t, _ in got.top] == [1, 2, 0]
    assert [v for _, v in got.top] == [lp[1], lp[2], lp[0]]
    assert token_logprob(logits, 3, top=0).top == [] and token_logprob(logits, 3, 0).logprob < -1e30


def test_kept_logprobs_are_the_first_step_of_the_model(torch_engine):
    eng = torch_engine
    ids = eng.tokenize("The capital of France is")
    gen = Generation(
        eng.runner,
        ids,
        SamplingParams(temperature=0, max_tokens=4),
        eng.runner.new_cache(),
        Usage(),
    )
    gen.keep_logprobs(5)
    list(gen.run())
    assert [e.token for e in gen.logprobs] == gen.generated
    assert all(e.top[0][0] == e.token and len(e.top) == 5 for e in gen.logprobs)
    first = eng.logits(ids)[-1]
    assert abs(gen.logprobs[0].logprob - first[gen.generated[0]]) < 1e-4
    for t, v in gen.logprobs[0].top:
        assert abs(v - first[t]) < 1e-4
