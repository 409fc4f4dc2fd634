"""A bounded load test: 8 concurrent clients x 5 requests, over different and shared agents."""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
from collections import Counter

import httpx
import openai
import pytest

from tests.support.server_process import EXE, running_server

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS = 8, 5
# clients 0-3: an agent each; 4-5: one shared agent; 6-7: stateless
AGENT_OF = {0: "a0", 1: "a1", 2: "a2", 3: "a3", 4: "shared", 5: "shared", 6: None, 7: None}


def run_client(url: str, i: int) -> list[tuple[str | None, str, str]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    agent = AGENT_OF[i]
    done = []
    for j in range(REQUESTS):
        question = f"Client {i} question {j}: name a fruit."
        kwargs = {
            "model": "m",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 6,
            "temperature": 0.8,
            "seed": i * 100 + j,
            "extra_body": {"agent": agent} if agent else None,
        }
        if j % 2:  # every other request streams
            chunks = list(
                client.chat.completions.create(
                    stream=True, stream_options={"include_usage": True}, **kwargs
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
            assert chunks[-1].choices == [] and chunks[-2].choices[0].finish_reason
        else:
            r = client.chat.completions.create(**kwargs)
            text, usage = r.choices[0].message.content, r.usage
            assert r.choices[0].finish_reason in ("stop", "length")
        assert isinstance(text, str)
        assert 0 <= usage.completion_tokens <= 6
        assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
        done.append((agent, question, text))
    return done


def test_eight_clients_five_requests_each(tmp_path):
    cache = tmp_path / "cache"
    with running_server(cache, "--parallel", "4") as srv:
        with cf.ThreadPoolExecutor(CLIENTS) as pool:
            results = [
                r for rs in pool.map(lambda i: run_client(srv.url, i), range(CLIENTS)) for r in rs
            ]
        assert len(results) == CLIENTS * REQUESTS
        per_agent = Counter(a for a, _, _ in results if a)
        for name, n in per_agent.items():
            info = httpx.get(f"{srv.url}/v1/agents/{name}").json()
            conv = info["conversation"]
            assert len(conv) == 2 * n, (name, conv)
            assert [m["role"] for m in conv] == ["user", "assistant"] * n
            asked = sorted(q for a, q, _ in results if a == name)
            assert sorted(m["content"] for m in conv[::2]) == asked
            answers = {t for a, _, t in results if a == name}
            assert {m["content"] for m in conv[1::2]} <= answers
        health = httpx.get(f"{srv.url}/health").json()
        assert health["active"] == 0 and health["waiting"] == 0
        assert srv.stop() == 0
    env = {**os.environ, "EDGE_INFER_CACHE_DIR": str(cache)}
    verify = subprocess.run(
        [*EXE, "cache", "verify"], capture_output=True, text=True, env=env, timeout=120
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
