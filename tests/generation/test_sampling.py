"""Pure sampling functions on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.generation.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    filter_min_p,
    filter_top_k,
    filter_top_p,
    log_softmax,
    softmax,
)


def kept(logits: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(logits)).tolist())


def test_top_k_keeps_k_largest():
    logits = np.array([0.1, 3.0, 2.0, -1.0, 2.5], dtype=np.float32)
    assert kept(filter_top_k(logits, 2)) == {1, 4}
    assert kept(filter_top_k(logits, 0)) == set(range(5))
    assert kept(filter_top_k(logits, 10)) == set(range(5))


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    assert kept(filter_top_p(logits, 0.5)) == {0}
    assert kept(filter_top_p(logits, 0.6)) == {0, 1}
    assert kept(filter_top_p(logits, 0.81)) == {0, 1, 2}
    assert kept(filter_top_p(logits, 1.0)) == {0, 1, 2, 3}
    assert kept(filter_top_p(logits, 1e-6)) == {0}


def test_min_p_relative_to_top():
    logits = np.log(np.array([0.6, 0.27, 0.08, 0.05]))
    assert kept(filter_min_p(logits, 0.1)) == {0, 1, 2}
    assert kept(filter_min_p(logits, 0.6)) == {0}


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([2.0, -1.0, 1.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -2.0, 1.0])
    np.testing.assert_array_equal(logits, [2.0, -1.0, 1.0])  # input untouched


def test_greedy_is_argmax_and_ignores_seed():
    logits = np.array([0.0, 5.0, 4.9])
    for seed in (None, 1, 2):
        assert Sampler(SamplingParams(temperature=0, seed=seed))(logits, []) == 1


def test_seeded_sampling_repeats_and_follows_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    a = [Sampler(params)(logits, []) for _ in range(1)]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1(logits, []) for _ in range(2000)]
    seq2 = [s2(logits, []) for _ in range(2000)]
    assert seq1 == seq2 and a[0] == seq1[0]
    freq = np.bincount(seq1, minlength=3) / len(seq1)
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.04)


def test_filtered_tokens_are_never_sampled():
    logits = np.array([1.0, 0.9, 0.8, -5.0, -6.0])
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {sampler(logits, []) for _ in range(500)} == {0, 1}


def test_softmax_and_log_softmax():
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, 1000.0]])
    np.testing.assert_allclose(np.exp(log_softmax(x)).sum(-1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(softmax(x[1]), [1 / 3] * 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": -2}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_invalid_params_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_from_kwargs_overrides_and_rejects_unknown():
    p = SamplingParams.from_kwargs(SamplingParams(max_tokens=5), temperature=0, top_k=None)
    assert (p.max_tokens, p.temperature, p.top_k) == (5, 0, 40)
    assert SamplingParams(stop="END").stop == ("END",)
    with pytest.raises(TypeError, match="temprature"):
        SamplingParams.from_kwargs(temprature=0.5)
