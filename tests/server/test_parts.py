"""The daemon's pure parts: message merging, request parsing, the fair scheduler, prefix reuse."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError
from starlette.datastructures import Headers

from edge_infer.cli.serve import KEY_ENV, resolve_api_key
from edge_infer.errors import EdgeInferError
from edge_infer.generation.sampling import SamplingParams
from edge_infer.server.conversation import plan_turn, split_system
from edge_infer.server.guard import RequestGuard, host_name, is_loopback
from edge_infer.server.prefix_pool import PrefixPool
from edge_infer.server.protocol import ChatCompletionRequest, CompletionRequest
from edge_infer.server.scheduler import Cancelled, Job, Scheduler, ShuttingDown
from edge_infer.server.tasks import StatelessTask


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


SYS = {"role": "system", "content": "Be brief."}


# -- conversation ------------------------------------------------------------------------


def apply(stored, incoming):
    """The conversation after a request (before the reply), as the agent keeps it."""
    system, rest = split_system(incoming)
    keep, new = plan_turn(stored, rest)
    return system, stored[:keep] + new


def test_new_messages_are_appended():
    assert apply([u("hi"), a("hello")], [u("next")]) == (None, [u("hi"), a("hello"), u("next")])
    assert apply([], [u("first")]) == (None, [u("first")])


def test_full_history_is_not_repeated():
    stored = [SYS, u("hi"), a("hello")]
    assert apply(stored, [SYS, u("hi"), a("hello"), u("next")]) == (
        "Be brief.",
        [SYS, u("hi"), a("hello"), u("next")],
    )
    assert plan_turn(stored, [u("hi"), a("hello"), u("next")]) == (3, [u("next")])


def test_regenerate_replaces_the_last_answer():
    stored = [SYS, u("hi"), a("hello"), u("more"), a("sure")]
    assert apply(stored, [u("hi"), a("hello"), u("more")]) == (None, stored[:4])
    # the same history resent in full (a retry): answered again, nothing added twice
    assert apply(stored, [u("hi"), a("hello"), u("more"), a("sure")]) == (None, stored)


def test_edited_turn_replaces_what_followed():
    stored = [u("hi"), a("hello"), u("more"), a("sure")]
    assert apply(stored, [u("hi"), a("HELLO"), u("next")]) == (
        None,
        [u("hi"), a("HELLO"), u("next")],
    )
    assert apply(stored, [u("hi")]) == (None, [u("hi")])


def test_tool_call_fields_tell_messages_apart():
    call = {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function"}]}
    other = {**call, "tool_calls": [{"id": "c2", "type": "function"}]}
    result = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    stored = [u("hi"), call, result, a("it is 42")]
    assert apply(stored, [u("hi"), call, result, a("it is 42"), u("thanks")])[1] == [
        *stored,
        u("thanks"),
    ]
    assert apply(stored, [u("hi"), other])[1] == [u("hi"), other]


def test_system_only_request_is_refused():
    with pytest.raises(ValueError, match="no message"):
        apply([], [SYS])


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


@pytest.mark.parametrize("field", ["logit_bias", "frequency_penalty", "user", "temprature"])
def test_fields_not_honoured_are_refused(field):
    with pytest.raises(ValidationError, match="Extra inputs") as e:
        ChatCompletionRequest.model_validate({"messages": [u("x")], field: None})
    assert e.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError, match="Extra inputs"):
        CompletionRequest.model_validate({"prompt": "x", field: 1})


def test_logprobs_options():
    chat = {"messages": [u("x")]}
    assert ChatCompletionRequest.model_validate(chat).logprobs_top() is None
    assert ChatCompletionRequest.model_validate({**chat, "logprobs": True}).logprobs_top() == 0
    req = ChatCompletionRequest.model_validate({**chat, "logprobs": True, "top_logprobs": 20})
    assert req.logprobs_top() == 20
    for bad in ({"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({**chat, **bad})
    assert CompletionRequest.model_validate({"prompt": "x", "logprobs": 3}).logprobs_top() == 3


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


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": [u("a\ud800b")]}, "content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "content",
        ),
        ({"messages": [u("x")], "stop": ["ok", "\ud800"]}, "stop"),
    ],
)
def test_text_that_is_not_unicode_is_refused(body, field):
    with pytest.raises(ValidationError, match="surrogate") as e:
        ChatCompletionRequest.model_validate(body)
    (error,) = e.value.errors()
    assert error["loc"][-1] == field
    with pytest.raises(ValidationError, match="surrogate"):
        CompletionRequest.model_validate({"prompt": ["\ud800"]})


def test_max_completion_tokens_zero_is_a_bound():
    req = {"messages": [u("x")]}
    assert (
        ChatCompletionRequest.model_validate({**req, "max_completion_tokens": 0, "max_tokens": 9})
        .sampling(99)
        .max_tokens
        == 0
    )
    zero = ChatCompletionRequest.model_validate({**req, "max_tokens": 0})
    assert zero.sampling(99).max_tokens == 0


def test_completion_prompt_list_of_one():
    assert CompletionRequest.model_validate({"prompt": ["hi"]}).prompt_text() == "hi"
    with pytest.raises(ValueError, match="one string"):
        CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompt_text()


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "::", "example.com"]))
    assert not is_loopback("localhost.example.com") and not is_loopback("evil.localhost")


def test_host_header_names():
    assert host_name("localhost:8741") == "localhost"
    assert host_name("[::1]:8741") == "::1" and host_name("[::1]") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"


def refusal(guard: RequestGuard, path: str = "/v1/models", **headers: str):
    got = guard.refusal(path, Headers(headers={k.replace("_", "-"): v for k, v in headers.items()}))
    return got and got[0]


def test_without_a_key_only_requests_addressed_to_this_machine_are_served():
    guard = RequestGuard(None, api_key=None)
    for host in ("localhost", "localhost:8741", "127.0.0.1:8741", "[::1]:8741", "LOCALHOST."):
        assert refusal(guard, host=host) is None, host
    for host in ("evil.example", "evil.example:8741", "127.0.0.1.nip.io", "[::]:1", "10.0.0.1"):
        assert refusal(guard, host=host) == 403, host
    assert refusal(guard, "/health", host="attacker.example") == 403
    ok = {"host": "127.0.0.1:8741"}
    for origin in ("http://localhost:3000", "http://127.0.0.1:8741", "https://[::1]"):
        assert refusal(guard, origin=origin, **ok) is None, origin
    for origin in ("http://evil.example", "null", "file://", "http://localhost.evil.example"):
        assert refusal(guard, origin=origin, **ok) == 403, origin


def test_with_a_key_every_host_is_served_but_the_key_is_needed():
    guard = RequestGuard(None, api_key="k3y")
    far = {"host": "server.example:8741", "origin": "http://app.example"}
    assert refusal(guard, **far) == 401
    assert refusal(guard, authorization="Bearer nope", **far) == 401
    assert refusal(guard, authorization="Bearer k3y", **far) is None
    assert refusal(guard, "/health", **far) is None


def test_api_key_sources(tmp_path):
    assert resolve_api_key(None, None, {}) == (None, [])
    assert resolve_api_key(None, None, {KEY_ENV: "from-env\n"}) == ("from-env", [])
    key, warnings = resolve_api_key("on-the-line", None, {KEY_ENV: "ignored"})
    assert key == "on-the-line" and "ps" in warnings[0] and KEY_ENV in warnings[0]
    f = tmp_path / "key"
    f.write_text("from-file\n")
    f.chmod(0o600)
    assert resolve_api_key(None, f, {KEY_ENV: "ignored"}) == ("from-file", [])
    f.chmod(0o644)
    assert "readable by other users" in resolve_api_key(None, f, {})[1][0]
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("a", f, {})
    f.write_text("\n")
    with pytest.raises(EdgeInferError, match="empty"):
        resolve_api_key(None, f, {})
    with pytest.raises(EdgeInferError, match="missing"):
        resolve_api_key(None, tmp_path / "missing", {})


# -- scheduler (real generations on the default model) ---------------------------------------

GREEDY = SamplingParams(temperature=0, max_tokens=6)


class Logged:
    """A stateless task that also notes (key, text) in a shared log as it goes."""

    def __init__(self, key, eng, prompt, log, params=GREEDY):
        self.key, self.log = key, log
        self.inner = StatelessTask(
            eng.runner, PrefixPool(eng.runner.new_cache, 0), eng.tokenize(prompt), params
        )
        self.generation = self.inner.generation

    def record(self, pieces):
        texts = self.inner.record(pieces)
        self.log += [(self.key, t) for t in texts]
        return texts

    def finish(self):
        self.log.append((self.key, "<done>"))
        return self.inner.finish()


def run_jobs(scheduler, specs, start=True):
    """Submit (key, make) jobs together; return each job's events."""

    async def main():
        loop = asyncio.get_running_loop()
        jobs = [scheduler.submit(Job(key, make, loop)) for key, make in specs]
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

    try:
        return asyncio.run(main())
    finally:
        scheduler.stop()


def texts(events):
    return "".join(v for k, v in events if k == "text")


def test_different_agents_decode_together_and_match_running_alone(torch_engine):
    eng, log = torch_engine, []
    prompts = {"A": "The capital of France is", "B": "One, two, three,"}
    s = Scheduler(eng.runner, max_active=4, start=False)
    out = run_jobs(s, [(k, lambda k=k, p=p: Logged(k, eng, p, log)) for k, p in prompts.items()])
    for prompt, events in zip(prompts.values(), out, strict=True):
        assert texts(events) == eng.generate(prompt, GREEDY)
        assert events[-1][0] == "done" and events[-1][1].completion_tokens == 6
    keys = [k for k, _ in log]
    assert keys.index("B") < keys.index("A", keys.index("A") + 1)  # interleaved, not one by one


def test_one_agent_runs_one_job_at_a_time(torch_engine):
    eng, log = torch_engine, []
    s = Scheduler(eng.runner, max_active=4, start=False)
    specs = [
        ("A", lambda: Logged("A1", eng, "Hello", log)),
        ("A", lambda: Logged("A2", eng, "Goodbye", log)),
        ("B", lambda: Logged("B", eng, "Cats are", log)),
    ]
    run_jobs(s, specs)
    names = [k for k, _ in log]
    assert names.index("A2") > names.index("A1") and log.index(("A1", "<done>")) < names.index("A2")
    assert names.index("B") < log.index(("A1", "<done>"))  # B did not wait behind A's queue


def test_max_active_one_runs_jobs_one_after_another(torch_engine):
    eng, log = torch_engine, []
    s = Scheduler(eng.runner, max_active=1, start=False)
    run_jobs(
        s, [("A", lambda: Logged("A", eng, "Hi", log)), ("B", lambda: Logged("B", eng, "Yo", log))]
    )
    names = [k for k, _ in log]
    assert names == sorted(names) and names[-1] == "B"


def test_a_failing_request_is_reported_and_the_others_go_on(torch_engine):
    eng, log = torch_engine, []

    def bad():
        raise ValueError("boom")

    s = Scheduler(eng.runner, start=False)
    out = run_jobs(s, [("A", bad), ("B", lambda: Logged("B", eng, "Hello", log))])
    assert out[0] == [("error", out[0][0][1])] and str(out[0][0][1]) == "boom"
    assert out[1][-1][0] == "done"


def test_cancel_finishes_the_task_and_stop_refuses_new_work(torch_engine):
    eng, log = torch_engine, []
    tasks = []

    def make():
        t = Logged(
            "A", eng, "Tell me a story", log, SamplingParams(max_tokens=500, ignore_eos=True)
        )
        tasks.append(t)
        return t

    async def main():
        loop = asyncio.get_running_loop()
        s = Scheduler(eng.runner)
        job = s.submit(Job("A", make, loop))
        await job.events.get()
        job.cancel()
        last = None
        while (last := await job.events.get())[0] == "text":
            pass
        s.stop()
        with pytest.raises(ShuttingDown):
            s.submit(Job("B", make, loop))
        return last

    last = asyncio.run(main())
    assert last[0] == "error" and isinstance(last[1], Cancelled)
    usage = tasks[0].generation.usage
    assert usage.finish_reason == "cancelled" and usage.completion_tokens < 500


# -- prefix pool on a real cache ----------------------------------------------------------------


def test_prefix_pool_reuses_the_longest_prefix(torch_engine):
    eng = torch_engine
    pool = PrefixPool(eng.runner.new_cache, max_slots=2)
    ids = eng.tokenize("The quick brown fox jumps over the lazy dog")
    slot = pool.acquire(ids)
    assert slot.cache.length == 0
    eng.runner.prefill(ids, slot.cache)
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
