"""The daemon's pure parts: message merging, request parsing, the fair scheduler, prefix reuse."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from edge_infer.cli.serve import is_loopback
from edge_infer.server.conversation import split_request_messages
from edge_infer.server.protocol import ChatCompletionRequest, CompletionRequest
from edge_infer.server.scheduler import Job, Scheduler, ShuttingDown


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


SYS = {"role": "system", "content": "Be brief."}


# -- conversation ------------------------------------------------------------------------


def test_new_messages_only():
    assert split_request_messages([u("hi"), a("hello")], [u("next")]) == (None, [u("next")])


def test_full_history_is_not_repeated():
    stored = [SYS, u("hi"), a("hello")]
    assert split_request_messages(stored, [SYS, u("hi"), a("hello"), u("next")]) == (
        "Be brief.",
        [u("next")],
    )


def test_diverging_history_is_appended_whole():
    stored = [u("hi"), a("hello")]
    got = split_request_messages(stored, [u("hi"), a("HELLO"), u("next")])
    assert got == (None, [u("hi"), a("HELLO"), u("next")])


def test_system_only_request_is_refused():
    with pytest.raises(ValueError, match="no new message"):
        split_request_messages([], [SYS])


# -- protocol ------------------------------------------------------------------------------


def test_request_options_become_sampling_params():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [u("x")],
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "stop": "END",
            "seed": 3,
            "unknown_field": 1,
        }
    )
    p = req.sampling(default_max_tokens=99)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed) == (5, 0, 0.5, ("END",), 3)
    assert (
        ChatCompletionRequest.model_validate({"messages": [u("x")]}).sampling(99).max_tokens == 99
    )


def test_content_parts_and_developer_role():
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ]
        }
    )
    assert req.message_dicts() == [{"role": "system", "content": "rules"}, u("ab")]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [u("x")], "n": 3},
        {"messages": [u("x")], "top_p": 0},
        {"messages": [u("x")], "stop": [""]},
        {"messages": [{"role": "robot", "content": "x"}]},
    ],
)
def test_bad_requests_are_refused(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate(body)


def test_completion_prompt_list_of_one():
    assert CompletionRequest.model_validate({"prompt": ["hi"]}).prompt_text() == "hi"
    with pytest.raises(ValueError, match="one string"):
        CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompt_text()


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "::", "example.com"]))


# -- scheduler -----------------------------------------------------------------------------


def run_jobs(scheduler: Scheduler, specs, log):
    """Submit (key, pieces) jobs at once; return each job's events."""

    async def main():
        loop = asyncio.get_running_loop()

        def make(key, pieces):
            def gen():
                try:
                    for p in pieces:
                        log.append((key, p))
                        yield p
                finally:
                    log.append((key, "closed"))
                return f"{key}-usage"

            return gen

        jobs = [scheduler.submit(Job(key, make(key, pieces), loop)) for key, pieces in specs]
        scheduler.start()
        out = []
        for job in jobs:
            events = []
            while True:
                kind, value = await job.events.get()
                events.append((kind, value))
                if kind != "text":
                    break
            out.append(events)
        return out

    return asyncio.run(main())


def test_different_agents_take_turns_token_by_token():
    log = []
    s = Scheduler(max_active=4, start=False)
    out = run_jobs(s, [("A", "123"), ("B", "xyz")], log)
    s.stop()
    assert [p for _, p in log if p != "closed"] == list("1x2y3z")
    assert out[0] == [("text", "1"), ("text", "2"), ("text", "3"), ("done", "A-usage")]


def test_one_agent_runs_one_job_at_a_time():
    log = []
    s = Scheduler(max_active=4, start=False)
    run_jobs(s, [("A", "12"), ("A", "34"), ("B", "x")], log)
    s.stop()
    a_order = [p for k, p in log if k == "A"]
    assert a_order == ["1", "2", "closed", "3", "4", "closed"]
    assert log.index(("B", "x")) < log.index(("A", "3"))  # B did not wait for A's queue


def test_max_active_bounds_interleaving():
    log = []
    s = Scheduler(max_active=1, start=False)
    run_jobs(s, [("A", "12"), ("B", "xy")], log)
    s.stop()
    assert [p for _, p in log] == ["1", "2", "closed", "x", "y", "closed"]


def test_an_error_is_reported_and_the_worker_goes_on():
    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler()

        def bad():
            yield "a"
            raise ValueError("boom")

        def good():
            yield "ok"

        j1 = s.submit(Job("A", bad, loop))
        events = [await j1.events.get(), await j1.events.get()]
        j2 = s.submit(Job("A", good, loop))
        ok = await j2.events.get()
        s.stop()
        return events, ok

    events, ok = asyncio.run(main())
    assert events[0] == ("text", "a") and events[1][0] == "error"
    assert str(events[1][1]) == "boom" and ok == ("text", "ok")


def test_cancel_closes_the_generator_and_stop_refuses_new_work():
    log = []

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler()

        def endless():
            try:
                while True:
                    yield "."
            finally:
                log.append("closed")

        job = s.submit(Job("A", endless, loop))
        await job.events.get()
        job.cancel()
        while (await job.events.get())[0] == "text":
            pass
        s.stop()
        with pytest.raises(ShuttingDown):
            s.submit(Job("B", endless, loop))

    asyncio.run(main())
    assert log == ["closed"]


# -- prefix pool on a real cache ----------------------------------------------------------------


def test_prefix_pool_reuses_the_longest_prefix(torch_engine):
    from edge_infer.server.prefix_pool import PrefixPool

    eng = torch_engine
    pool = PrefixPool(eng.backend.new_cache, max_slots=2)
    ids = eng.tokenize("The quick brown fox jumps over the lazy dog")
    slot = pool.acquire(ids)
    assert slot.cache.length == 0
    eng._prefill(ids, slot.cache)
    pool.release(slot, ids)
    longer = ids + eng.tokenize(" and runs away", add_bos=False)
    again = pool.acquire(longer)
    assert again is slot and again.cache.length == len(ids) == len(again.token_ids)
    other = pool.acquire(eng.tokenize("Completely different"))
    assert other is not slot and other.cache.length == 0
    pool.release(other, [])
    # the same prompt again keeps all but the last token, which must be recomputed
    pool.release(again, ids)
    third = pool.acquire(ids)
    assert third is slot and third.cache.length == len(ids) - 1
