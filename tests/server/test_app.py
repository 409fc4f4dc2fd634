"""`edge-infer serve` as clients use it: a real process on loopback, the official openai client
and raw HTTP."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import openai
import pytest

from tests.support.server_process import EXE, running_server

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "cache"


@pytest.fixture(scope="module")
def server(cache_dir):
    with running_server(cache_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def wait_idle(server, timeout: float = 60) -> None:
    """Until the server has no generation running or queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(f"{server.url}/health").json()
        if h["active"] == 0 and h["waiting"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("server stayed busy")


def assert_error(resp: httpx.Response, status: int, *fragments: str, code: str | None = None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for fragment in fragments:
        assert fragment in err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- OpenAI client ----------------------------------------------------------------------


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1 and "SmolLM2" in ids[0]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["backend"] == "torch/cpu"


def test_chat_completion_with_the_openai_client(client):
    r = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        **GREEDY,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming_and_reports_usage(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model="m", messages=messages, seed=7, **GREEDY)
    stream = client.chat.completions.create(
        model="m",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        **GREEDY,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the second identical stateless request reused the shared prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_text_completions_stream_and_not(client):
    r = client.completions.create(
        model="m", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert "Paris" in r.choices[0].text
    pieces = client.completions.create(
        model="m", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text


def test_stop_and_seed(client):
    messages = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    r = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=40, stop=["5"]
    )
    assert "5" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    a, b = (
        client.chat.completions.create(
            model="m", messages=messages, temperature=1.0, max_tokens=16, seed=1234
        )
        .choices[0]
        .message.content
        for _ in range(2)
    )
    assert a == b


def test_agent_via_extra_body_keeps_the_conversation(client):
    first = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "My favourite colour is green."}],
        extra_body={"agent": "ivy"},
        **GREEDY,
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What did I just tell you?"}],
        extra_body={"agent": "ivy"},
        **GREEDY,
    )
    # the first turn's tokens came from the agent's cache, not a new prefill
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    info = httpx.get(f"{client.base_url}agents/ivy").json()
    assert [m["role"] for m in info["conversation"]] == ["user", "assistant"] * 2
    assert info["conversation"][0]["content"] == "My favourite colour is green."


def test_agent_by_header_and_full_history_is_recognised(client):
    h = {"X-Agent-ID": "jay"}
    system = {"role": "system", "content": "You are terse."}
    q1 = {"role": "user", "content": "Say hello."}
    r1 = client.chat.completions.create(model="m", messages=[system, q1], extra_headers=h, **GREEDY)
    a1 = {"role": "assistant", "content": r1.choices[0].message.content}
    q2 = {"role": "user", "content": "Say goodbye."}
    # an OpenAI-style client resends the whole conversation: it is not duplicated
    client.chat.completions.create(
        model="m", messages=[system, q1, a1, q2], extra_headers=h, **GREEDY
    )
    conv = httpx.get(f"{client.base_url}agents/jay").json()["conversation"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant", "user", "assistant"]
    assert conv[0]["content"] == "You are terse." and conv[3]["content"] == "Say goodbye."


def test_agent_routes_list_fork_delete(server, client):
    client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Remember the number 42."}],
        extra_body={"agent": "kim"},
        **GREEDY,
    )
    base = f"{server.url}/v1/agents"
    names = [a["id"] for a in httpx.get(base).json()["data"]]
    assert "kim" in names
    kim = httpx.get(f"{base}/kim").json()
    assert kim["tokens"] > 0 and kim["bytes_on_disk"] > 0 and kim["messages"] == 2
    forked = httpx.post(f"{base}/kim/fork", json={"name": "kim2"})
    assert forked.status_code == 201 and forked.json()["tokens"] == kim["tokens"]
    assert httpx.get(f"{base}/kim2").json()["conversation"] == kim["conversation"]
    assert_error(httpx.post(f"{base}/kim/fork", json={"name": "kim2"}), 409, "exists")
    r = httpx.delete(f"{base}/kim2")
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert_error(httpx.get(f"{base}/kim2"), 404, "kim2", code="agent_not_found")
    assert_error(httpx.delete(f"{base}/kim2"), 404, "kim2")


# -- errors over raw HTTP -----------------------------------------------------------------


def test_bad_requests_get_openai_style_errors(server):
    url = f"{server.url}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad_json, 400, "JSON")
    assert_error(httpx.post(url, json={}), 400, "messages")
    assert_error(httpx.post(url, json={"messages": []}), 400, "messages")
    assert_error(httpx.post(url, json={"messages": [{"role": "wizard", "content": "x"}]}), 400)
    assert_error(httpx.post(url, json={"messages": user, "temperature": -1}), 400, "temperature")
    assert_error(httpx.post(url, json={"messages": user, "n": 2}), 400, "n=1")
    assert_error(httpx.post(url, json={"messages": user, "max_tokens": "many"}), 400, "max_tokens")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(httpx.post(url, json={"messages": image}), 400, "image_url")
    bad_agent = httpx.post(url, json={"messages": user}, headers={"X-Agent-ID": "../etc"})
    assert_error(bad_agent, 400, "invalid agent name", code="invalid_agent_id")
    assert_error(httpx.post(url, json={"messages": user, "agent": "a/b"}), 400, "invalid agent")
    assert_error(httpx.get(f"{server.url}/v1/agents/.hidden"), 400, "invalid agent name")
    assert_error(httpx.get(f"{server.url}/v1/nowhere"), 404)
    completions = f"{server.url}/v1/completions"
    assert_error(httpx.post(completions, json={"prompt": "x", "agent": "a"}), 400, "chat")
    assert_error(httpx.post(completions, json={"prompt": ["a", "b"]}), 400, "one string")


def test_oversize_prompt_is_a_clear_400(server):
    huge = "word " * 9000
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": huge}]},
        timeout=120,
    )
    err = assert_error(r, 400, "context", code="context_length_exceeded")
    assert "tokens" in err["message"]
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": huge}], "agent": "big"},
        timeout=120,
    )
    assert_error(r, 400, "context", code="context_length_exceeded")


def test_client_disconnect_mid_stream_stops_and_keeps_the_cache_consistent(server, client):
    body = {
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "agent": "leo",
    }
    seen = 0
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 5:
                break  # leaving the block closes the connection
    wait_idle(server)
    leo = httpx.get(f"{server.url}/v1/agents/leo").json()
    reply = leo["conversation"][-1]
    assert reply["role"] == "assistant" and reply["content"]
    assert leo["messages"] == 2
    # generation stopped well before max_tokens, and the next turn builds on the kept cache
    nxt = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Give it a title."}],
        extra_body={"agent": "leo"},
        **GREEDY,
    )
    assert nxt.usage.prompt_tokens_details.cached_tokens > 0
    assert nxt.usage.prompt_tokens - nxt.usage.prompt_tokens_details.cached_tokens < 60


def test_requests_to_one_agent_are_serialized(server):
    import concurrent.futures as cf

    def ask(i: int) -> dict:
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"Say {i}."}], "agent": "max", **GREEDY},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r.json()

    with cf.ThreadPoolExecutor(3) as pool:
        list(pool.map(ask, range(3)))
    conv = httpx.get(f"{server.url}/v1/agents/max").json()["conversation"]
    assert [m["role"] for m in conv] == ["user", "assistant"] * 3
    assert sorted(m["content"] for m in conv[::2]) == ["Say 0.", "Say 1.", "Say 2."]


# -- lifecycle: restart, shutdown, keys ------------------------------------------------------


def test_restart_restores_the_agent_from_disk(tmp_path):
    cache = tmp_path / "cache"
    ask = {"model": "m", "extra_body": {"agent": "nora"}, **GREEDY}
    with running_server(cache) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        first = c.chat.completions.create(
            messages=[{"role": "user", "content": "I live in Lisbon."}], **ask
        )
        assert srv.stop() == 0  # SIGTERM: graceful, caches flushed
        assert "Traceback" not in srv.output()
    with running_server(cache) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        again = c.chat.completions.create(
            messages=[{"role": "user", "content": "Where do I live?"}], **ask
        )
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens
        conv = httpx.get(f"{srv.url}/v1/agents/nora").json()["conversation"]
        assert conv[0]["content"] == "I live in Lisbon." and len(conv) == 4


def test_sigterm_mid_generation_saves_a_consistent_cache(tmp_path):
    cache = tmp_path / "cache"
    body = {
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "agent": "olga",
    }
    with running_server(cache) as srv:
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 10:
                    srv.proc.send_signal(15)
                    break
        assert srv.stop() == 0
    verify = subprocess.run(
        [*EXE, "cache", "verify", "--json"],
        capture_output=True,
        text=True,
        env={"EDGE_INFER_CACHE_DIR": str(cache), **_path_env()},
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    with running_server(cache) as srv:
        olga = httpx.get(f"{srv.url}/v1/agents/olga").json()
        assert olga["messages"] == 2 and olga["tokens"] > 0
        r = httpx.post(
            f"{srv.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "The end?"}], "agent": "olga", **GREEDY},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def _path_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "EDGE_INFER_CACHE_DIR"}


def test_api_key_is_checked(tmp_path):
    with running_server(tmp_path / "cache", "--api-key", "s3cret") as srv:
        url = f"{srv.url}/v1/models"
        assert_error(httpx.get(url), 401, "API key", code="invalid_api_key")
        assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(f"{srv.url}/health").status_code == 200
        ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0).models.list()


def test_refuses_a_public_host_without_a_key():
    proc = subprocess.run(
        [*EXE, "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_path_env(),
    )
    assert proc.returncode == 1
    assert "without an API key" in proc.stderr and "Traceback" not in proc.stderr


def test_sse_lines_are_json(server):
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        assert json.loads(ln.removeprefix("data: "))["object"] == "text_completion"
