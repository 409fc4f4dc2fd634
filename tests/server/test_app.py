"""`edge-infer serve` as clients use it: a real process on loopback, the official openai client
and raw HTTP."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import time

import httpx
import openai
import pytest

from tests.support.server_process import EXE, running_server

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0, "max_tokens": 12}
MAX_BODY_MB = 1  # the module's server refuses bodies over 1 MiB


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "cache"


@pytest.fixture(scope="module")
def server(cache_dir):
    with running_server(cache_dir, "--max-body-mb", str(MAX_BODY_MB)) as srv:
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
    for bound in ("40", 40.0, True):  # never coerced into a (possibly huge) token bound
        for field in ("max_tokens", "max_completion_tokens"):
            assert_error(httpx.post(url, json={"messages": user, field: bound}), 400, field)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    err = assert_error(httpx.post(url, json={"messages": image}), 400, "reads text only")
    assert err["param"] == "messages[0].content[0].image_url"  # a text-only model
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
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
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


def test_restart_restores_agents_and_prompt_caches_from_disk(tmp_path):
    cache = tmp_path / "cache"
    ask = {"model": "m", "extra_body": {"agent": "nora"}, **GREEDY}
    first_turn = [{"role": "user", "content": "I live in Lisbon."}]
    with running_server(cache) as srv:
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        first = c.chat.completions.create(messages=first_turn, **ask)
        check_regenerate_and_edit(srv, c, "rose")
        # a stock client naming a cache with OpenAI's own field, and nothing else
        keyed = c.chat.completions.create(
            model="m", messages=first_turn, prompt_cache_key="s1", **GREEDY
        )
        assert keyed.usage.prompt_tokens_details.cached_tokens == 0
        assert srv.stop() == 0  # SIGTERM: graceful, caches flushed
        assert "Traceback" not in srv.output()
    with running_server(cache) as srv:
        # the port answered while the model was loading
        assert srv.starting[0] == 503 and 200 in srv.starting
        c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
        again = c.chat.completions.create(
            messages=[{"role": "user", "content": "Where do I live?"}], **ask
        )
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert cached >= first.usage.prompt_tokens
        conv = httpx.get(f"{srv.url}/v1/agents/nora").json()["conversation"]
        assert conv[0]["content"] == "I live in Lisbon." and len(conv) == 4
        check_regenerate_and_edit(srv, c, "rose")
        # the prompt cache came back from disk; another key shares nothing with it
        answer = {"role": "assistant", "content": keyed.choices[0].message.content}
        nxt = [*first_turn, answer, {"role": "user", "content": "And the weather there?"}]
        second = c.chat.completions.create(model="m", messages=nxt, prompt_cache_key="s1", **GREEDY)
        assert second.usage.prompt_tokens_details.cached_tokens >= keyed.usage.prompt_tokens
        other = c.chat.completions.create(model="m", messages=nxt, prompt_cache_key="s2", **GREEDY)
        assert other.usage.prompt_tokens_details.cached_tokens == 0
        # no conversation is kept for a prompt cache, only its KV
        names = {a["id"]: a for a in httpx.get(f"{srv.url}/v1/agents").json()["data"]}
        assert names["prompt-cache.s1"]["messages"] == 0 and names["prompt-cache.s1"]["tokens"]


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
        with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, timeout=120) as r:
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
        # with a key any name may address the server (it may listen beyond this machine)
        key = {"Authorization": "Bearer s3cret"}
        far = {**key, "Host": "box.example:8741", "Origin": "http://app.example"}
        assert httpx.get(url, headers=far).status_code == 200
        spec = httpx.get(f"{srv.url}/openapi.json", headers=key).json()
        assert "401" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert "401" not in spec["paths"]["/health"]["get"]["responses"]
        # the key was given on the command line, where `ps` shows it
        assert "warning:" in srv.output() and "EDGE_INFER_API_KEY" in srv.output()


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


# -- hardening: bad text, big bodies, foreign hosts, the schema ------------------------------


def post_ascii_json(url: str, body: dict) -> httpx.Response:
    """POST ``body`` as ASCII JSON: a lone surrogate travels as its ``\\ud800`` escape."""
    return httpx.post(
        url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=120
    )


def test_text_no_tokenizer_accepts_is_a_400_naming_the_field(server):
    lone = "a\ud800b"
    chat, completions = f"{server.url}/v1/chat/completions", f"{server.url}/v1/completions"
    cases = [
        (chat, {"messages": [{"role": "user", "content": lone}]}, "messages.0.content"),
        (
            chat,
            {"messages": [{"role": "user", "content": lone}], "agent": "una"},
            "messages.0.content",
        ),
        (
            chat,
            {"messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]},
            "messages.0.content",
        ),
        (chat, {"messages": [{"role": "user", "content": "hi"}], "stop": [lone]}, "stop"),
        (completions, {"prompt": lone}, "prompt"),
        (completions, {"prompt": [lone]}, "prompt"),
    ]
    for url, body, field in cases:
        err = assert_error(post_ascii_json(url, body), 400, "surrogate", field)
        assert err["param"] == field


def test_max_completion_tokens_zero_generates_nothing(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_completion_tokens=0,
    )
    assert r.choices[0].message.content == "" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens > 0


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(ln.split(":")[1]) for ln in lines if ln.lower().startswith("content-length"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, body
        body += chunk
    return int(lines[0].split()[1]), body


def send_request(server, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A POST written straight to the socket, ``length`` declared (the body's by default)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length or len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_a_body_over_the_limit_is_refused_before_it_is_read(server):
    limit = MAX_BODY_MB * 2**20
    # declared larger than the limit: answered at once, though almost none of it was sent
    with send_request(server, "/v1/completions", b'{"prompt": "', length=50 * limit) as sock:
        status, body = read_response(sock)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"

    # sent without a length (chunked): refused once what was read passes the limit
    def chunks():
        yield b'{"prompt": "'
        for _ in range(3 * limit // 65536):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(
        f"{server.url}/v1/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=120,
    )
    assert_error(r, 413, "limit", code="request_too_large")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_health_answers_while_a_long_prompt_is_tokenized(server):
    # just under the body limit; far over the context once tokenized (a token per digit)
    body = json.dumps({"prompt": "1" * (MAX_BODY_MB * 2**20 - 100), "max_tokens": 1}).encode()
    answered_meanwhile = 0
    with send_request(server, "/v1/completions", body) as sock:
        while not select.select([sock], [], [], 0)[0]:  # until the long request is answered
            health = httpx.get(f"{server.url}/health", timeout=60).json()
            answered_meanwhile += health.get("preparing", 0) > 0
        status, answer = read_response(sock)
    # /health kept answering while the prompt was tokenized (a tokenizer holding the
    # interpreter lock lets one answer through at most, at its start or end)
    assert answered_meanwhile >= 5
    assert status == 400 and json.loads(answer)["error"]["code"] == "context_length_exceeded"


def test_foreign_host_or_origin_is_refused_without_a_key(server, client):
    client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "My PIN is 2580."}],
        extra_body={"agent": "pat"},
        **GREEDY,
    )
    # a page whose domain now resolves to 127.0.0.1 (DNS rebinding) reads nothing
    r = httpx.get(f"{server.url}/v1/agents/pat", headers={"Host": "attacker.example:8741"})
    err = assert_error(r, 403, "attacker.example", "API key", code="host_not_allowed")
    assert "2580" not in r.text
    chat = {"messages": [{"role": "user", "content": "hi"}], "agent": "pat", **GREEDY}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=chat,
        headers={"Origin": "http://attacker.example"},
    )
    assert_error(r, 403, "attacker.example", code="origin_not_allowed")
    assert err["type"] == "permission_error"
    # the names of this machine are served, and so are its pages
    port = server.port
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}).status_code == 200
    origin = {"Origin": f"http://localhost:{port}"}
    assert httpx.get(f"{server.url}/v1/models", headers=origin).status_code == 200
    assert httpx.get(f"{server.url}/v1/agents/pat").json()["messages"] == 2


def test_openapi_documents_the_statuses_the_server_answers(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    ops = {(p, m): op["responses"] for p, item in spec["paths"].items() for m, op in item.items()}
    for key, responses in ops.items():
        assert "422" not in responses, key
        assert "403" in responses, key  # Host/Origin refused (no API key on this server)
        if key[1] == "post":
            assert {"400", "413"} <= set(responses), key
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = ops[(path, "post")]
        assert "text/event-stream" in responses["200"]["content"]
        error = responses["400"]["content"]["application/json"]["schema"]
        assert error["$ref"].endswith("/ErrorResponse")
    assert "409" in ops[("/v1/agents/{agent_id}/fork", "post")]
    for method in ("get", "delete"):
        assert {"400", "404"} <= set(ops[("/v1/agents/{agent_id}", method)])
    assert "HTTPValidationError" not in spec["components"]["schemas"]


# -- every field honoured or refused; history for agents; introspection ---------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("logit_bias", {"42": 5}),
        ("frequency_penalty", 0.5),
        ("presence_penalty", 0.5),
        ("user", "u-1"),
        ("temprature", 0.2),  # a typo is refused, not ignored
    ],
)
def test_fields_not_honoured_are_refused_by_name(server, client, field, value):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, field: value}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
    err = assert_error(r, 400, field, "messages", code="unsupported_parameter")
    assert err["param"] == field
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", field: value}, timeout=60)
    assert assert_error(r, 400, field, code="unsupported_parameter")["param"] == field
    with pytest.raises(openai.BadRequestError, match=field):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_body={field: value}
        )


def test_readme_lists_the_honoured_fields():
    from edge_infer.server.app import HONOURED
    from tests.support import REPO

    serve = (REPO / "README.md").read_text().split("### Serve", 1)[1].split("### Cache", 1)[0]
    for route, fields in HONOURED.items():
        row = next(line for line in serve.splitlines() if line.startswith(f"| `POST {route}`"))
        for field in fields:
            assert f"`{field}`" in row, (route, field)


def conversation(server, agent: str) -> list[dict]:
    """The agent's stored conversation (none for an unknown agent)."""
    r = httpx.get(f"{server.url}/v1/agents/{agent}")
    return [] if r.status_code == 404 else r.json()["conversation"]


def chat_tokens(server, messages: list[dict], add_generation_prompt: bool = True) -> int:
    """How many tokens ``messages`` render to, asked over HTTP."""
    prompt = httpx.post(
        f"{server.url}/apply-template",
        json={"messages": messages, "add_generation_prompt": add_generation_prompt},
    ).json()["prompt"]
    return len(httpx.post(f"{server.url}/tokenize", json={"content": prompt}).json()["tokens"])


def say(client, agent: str, messages: list[dict]):
    r = client.chat.completions.create(
        model="m", messages=messages, extra_body={"agent": agent}, **GREEDY
    )
    return {"role": "assistant", "content": r.choices[0].message.content}, r.usage


def check_regenerate_and_edit(server, client, agent: str) -> None:
    """Regenerate, then edit an earlier turn, resending the whole history each time."""
    u1 = {"role": "user", "content": "Pick a fruit."}
    u2 = {"role": "user", "content": "And a colour?"}
    history = [*conversation(server, agent)]
    if not history:
        a1, _ = say(client, agent, [u1])
        a2, _ = say(client, agent, [u1, a1, u2])
        history = [u1, a1, u2, a2]
        assert conversation(server, agent) == history
    u1, a1, u2 = history[:3]
    # regenerate the last answer: history without it, resent
    sent = [u1, a1, u2]
    again, usage = say(client, agent, sent)
    assert conversation(server, agent) == [*sent, again]
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    # edit the second question: what followed it is replaced, nothing duplicated
    sent = [u1, a1, {"role": "user", "content": "And a number?"}]
    edited, usage = say(client, agent, sent)
    assert conversation(server, agent) == [*sent, edited]
    assert usage.prompt_tokens_details.cached_tokens >= chat_tokens(server, [u1, a1], False)


def test_regenerate_and_edit_on_an_agent_never_duplicate(server, client):
    check_regenerate_and_edit(server, client, "rita")


def test_tool_call_fields_are_kept_in_the_conversation(server, client):
    call = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
        ],
    }
    result = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    sent = [{"role": "user", "content": "Add 40 and 2."}, call, result]
    reply, _ = say(client, "tia", sent)
    assert conversation(server, "tia") == [*sent, reply]


def test_tokenize_detokenize_apply_template(server, client, torch_engine):
    text = "Tokens, please: naïve café ☕"
    r = httpx.post(f"{server.url}/tokenize", json={"content": text}).json()
    assert r["tokens"] == torch_engine.tokenize(text)
    pieces = httpx.post(f"{server.url}/tokenize", json={"content": text, "with_pieces": True})
    assert [p["id"] for p in pieces.json()["tokens"]] == r["tokens"]
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["content"] == text
    assert_error(httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]}), 400, "tokens.0")
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": text}]
    used = client.chat.completions.create(model="m", messages=messages, max_tokens=1)
    assert chat_tokens(server, messages) == used.usage.prompt_tokens


def test_logprobs_chat_and_completions_streamed_and_not(server, client, torch_engine):
    # a prompt no earlier request began with: read whole, as Engine.logits reads it
    prompt = "Zebras in the savanna"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and lp.text_offset[0] == 0
    for token, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert max(top, key=top.get) == token  # greedy: the chosen token is the most likely
    expected = torch_engine.logits(torch_engine.tokenize(prompt))[-1]
    first = torch_engine.tokenize(prompt + lp.tokens[0], add_bos=False)[-1]
    assert abs(lp.token_logprobs[0] - expected[first]) < 1e-4
    streamed = client.completions.create(
        model="m", prompt=prompt, max_tokens=4, temperature=0, logprobs=5, stream=True
    )
    tokens = [
        t for c in streamed for t in (c.choices[0].logprobs.tokens if c.choices[0].logprobs else [])
    ]
    assert tokens == lp.tokens

    messages = [{"role": "user", "content": "Name a planet."}]
    whole = client.chat.completions.create(
        model="m", messages=messages, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = whole.choices[0].logprobs.content
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 3
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token and t.logprob <= 0
    stream = client.chat.completions.create(
        model="m", messages=messages, logprobs=True, top_logprobs=3, stream=True, **GREEDY
    )
    got = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in got] == [t.token for t in content]
    # the second request read its prompt from the prefix cache (decode-step numerics): close
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, content, strict=True)) < 0.1
    plain = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_metrics_parse_and_move(server, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{server.url}/metrics", timeout=60).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = scrape()
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Count to three."}], **GREEDY
    )
    after = scrape()
    ok = ("edge_infer_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    assert after[ok] == before.get(ok, 0) + 1
    for counter in ("edge_infer_prompt_tokens_total", "edge_infer_generated_tokens_total"):
        assert after[(counter, ())] > before.get((counter, ()), 0)
    ttft = ("edge_infer_time_to_first_token_seconds_count", ())
    assert after[ttft] == before.get(ttft, 0) + 1
    assert after[("edge_infer_batch_size_count", ())] > 0
    assert after[("edge_infer_agents_on_disk", ())] >= 0


def test_serve_with_a_kv_memory_budget_offloads_an_agent_and_lists_it(tmp_path):
    # a budget below one block of KV: the agent's KV goes to the pool and disk at once
    with running_server(tmp_path / "cache", "--kv-memory", "64KB") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        long = " ".join(f"word{i}" for i in range(300))
        messages = [{"role": "user", "content": f"Repeat after me: {long}"}]
        first = client.chat.completions.create(
            model="default", messages=messages, extra_body={"agent": "big"}, **GREEDY
        )
        assert first.choices[0].message.content
        wait_idle(srv)
        (info,) = [a for a in httpx.get(f"{srv.url}/v1/agents").json()["data"] if a["id"] == "big"]
        assert info["offloaded"] is True and info["kv_disk_bytes"] > 0
        assert 0.0 <= info["hit_rate"] <= 1.0
        messages += [first.choices[0].message.model_dump(include={"role", "content"})]
        messages += [{"role": "user", "content": "Again."}]
        again = client.chat.completions.create(
            model="default", messages=messages, extra_body={"agent": "big"}, **GREEDY
        )
        assert again.choices[0].message.content
        assert again.usage.prompt_tokens_details.cached_tokens > 256
