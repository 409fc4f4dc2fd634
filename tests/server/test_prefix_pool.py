"""The stateless prefix pool never offers one request's KV to another, however requests end."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_infer.generation.sampling import SamplingParams
from edge_infer.server.prefix_pool import PrefixPool, Slot
from edge_infer.server.tasks import StatelessTask

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
TEXTS = [
    "The secret code is 4417. Remember it.",
    "The secret code is",
    "The weather in Lisbon is mild in",
    "Count to five: one, two,",
]
ENDINGS = ["complete", "cancel_prefill", "cancel_decode", "bad_options", "model_error"]


def broken_params() -> SamplingParams:
    """Options that pass the request's checks but fail once the generation is built (as a
    negative seed did): the slot is already taken when they fail."""
    p = SamplingParams(temperature=0.7, max_tokens=4)
    object.__setattr__(p, "seed", -1)
    return p


def run_request(runner, pool: PrefixPool, ids: list[int], ending: str) -> None:
    """One stateless request on ``pool`` that ends the way ``ending`` says."""
    if ending == "bad_options":
        with pytest.raises(ValueError):
            StatelessTask(runner, pool, ids, broken_params())
        return
    if ending == "model_error":  # a token the model does not have, after one good chunk
        ids = ids + [runner.backend.config.vocab_size + 5]
    task = StatelessTask(runner, pool, ids, GREEDY)
    gen = task.generation
    try:
        if ending == "model_error":
            gen.prefill(len(ids) - 1 - gen.cache.length)
            with pytest.raises(IndexError):
                gen.prefill()
        elif ending == "cancel_prefill":
            gen.prefill(max(1, (len(ids) - gen.cache.length) // 2))
        else:
            gen.prefill()
            steps = 2 if ending == "cancel_decode" else 100
            for _ in range(steps):
                gen.sample()
                if gen.finished:
                    break
                gen.feed(runner.step(gen.next_input, gen.cache))
    finally:
        task.finish()


def assert_holds_exactly_its_ids(runner, slot: Slot) -> None:
    """The slot's cache holds the KV of its ids, and nothing else."""
    assert not slot.in_use
    assert slot.cache.length == len(slot.token_ids)
    if not slot.token_ids:
        return
    fresh = runner.new_cache()
    runner.prefill(slot.token_ids, fresh)
    for got, want in zip(slot.cache.blocks(), fresh.blocks(), strict=True):
        assert (got.start, got.length) == (want.start, want.length)
        for a, b in zip(got.layers, want.layers, strict=True):
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                # decode steps and one prefill round differently (float16 rows, a few
                # ulps); another request's KV differs by whole units
                x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
                assert np.abs(x - y).max() < 0.25


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.lists(
        st.tuples(st.sampled_from(range(len(TEXTS))), st.sampled_from(ENDINGS)),
        min_size=1,
        max_size=6,
    )
)
def test_no_request_sees_foreign_kv(torch_engine, requests):
    runner = torch_engine.runner
    pool = PrefixPool(runner.new_cache, max_slots=2)
    for text, ending in requests:
        run_request(runner, pool, torch_engine.tokenize(TEXTS[text]), ending)
        for slot in pool.slots():
            assert_holds_exactly_its_ids(runner, slot)
    # a later request reuses only what it shares with the ids a slot records
    probe = torch_engine.tokenize(TEXTS[1])
    task = StatelessTask(runner, pool, probe, GREEDY)
    held = task.generation.cache.length
    assert held < len(probe)
    assert all(held <= len(s.token_ids) for s in pool.slots() if s.cache is task.generation.cache)
    task.finish()


def test_a_request_failing_after_taking_a_slot_leaves_no_kv_behind(torch_engine):
    """A secret read by one request, then a request with options that fail late: a later
    prompt ending like the secret's start does not continue on the secret's KV."""
    runner = torch_engine.runner
    pool = PrefixPool(runner.new_cache, max_slots=1)
    secret = torch_engine.tokenize(TEXTS[0])
    run_request(runner, pool, secret, "complete")
    run_request(runner, pool, secret, "bad_options")
    (slot,) = pool.slots()
    assert slot.cache.length == len(slot.token_ids)
    other = torch_engine.tokenize("Tell me: the secret code is")
    task = StatelessTask(runner, pool, other, GREEDY)
    shared = next(i for i, (a, b) in enumerate(zip(other, secret, strict=False)) if a != b)
    assert task.generation.cache.length <= shared
    task.finish()
    # and a one-token prompt still works (it failed until restart)
    one = StatelessTask(runner, pool, secret[:1], GREEDY)
    assert one.generation.cache.length == 0
    one.finish()
