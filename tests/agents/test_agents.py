"""Agents on the real default model: persistence across processes, prefix reuse, safety."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_infer import Engine
from tests.support import REPO

SCRIPT = "tests.support.agent_script"
TURN1, TURN2 = "Name three colours.", "Now name three animals."


def run_turns(cache_dir: Path, backend: str, name: str, *messages: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", SCRIPT, str(cache_dir), backend, name, *messages],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.slow
def test_restore_in_a_new_process_continues_token_identically(cache_dir):
    first = run_turns(cache_dir, "torch", "alice", TURN1)
    restored = run_turns(cache_dir, "torch", "alice", TURN2)
    continued = run_turns(cache_dir / "other", "torch", "alice", TURN1, TURN2)
    assert first[0]["reply"] == continued[0]["reply"]
    # warm: the new process prefilled only the new turn
    assert restored[0]["cached"] > first[0]["prompt"]
    assert restored[0]["prompt"] - restored[0]["cached"] < 30
    assert restored[0]["reply"] == continued[1]["reply"]
    assert restored[0]["cached"] == continued[1]["cached"]


def test_turns_reuse_the_cache_and_match_stateless_chat(cache_dir):
    eng = Engine.load()
    a = eng.agent("bob", system="You are a concise assistant.")
    r1 = a.chat(TURN1, temperature=0, max_tokens=32)
    assert a.usage.cached_tokens == 0 and a.usage.completion_tokens > 0
    r2 = a.chat(TURN2, temperature=0, max_tokens=32)
    u = a.usage
    assert u.cached_tokens > 0 and u.prompt_tokens - u.cached_tokens < 30
    assert [m["role"] for m in a.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert a.messages[2]["content"] == r1 and a.messages[4]["content"] == r2
    # the stateless chat over the same messages gives the same greedy reply
    stateless = eng.chat(a.messages[:4], temperature=0, max_tokens=32)
    assert stateless == r2


def test_exact_repeat_and_divergence(cache_dir):
    eng = Engine.load()
    a = eng.agent("carol")
    a.chat(TURN1, temperature=0, max_tokens=16)
    held = a.tokens
    b = a.fork("carol-b")
    assert b.tokens == held and b.messages == a.messages
    # diverge: the fork continues differently; the original is untouched
    b.chat("Something else entirely: count to five.", temperature=0, max_tokens=16)
    assert b.usage.cached_tokens >= held - 1
    assert a.tokens == held and len(a.messages) == 2
    # a new question on the original reuses everything it held
    a.chat(TURN2, temperature=0, max_tokens=8)
    assert a.usage.cached_tokens >= held - 1
    assert {i.name for i in eng.agents()} >= {"carol", "carol-b"}
    assert eng.delete_agent("carol-b")
    assert "carol-b" not in {i.name for i in eng.agents()}


def test_cross_phase_injection_extends_the_cache(cache_dir):
    eng = Engine.load()
    a = eng.agent("dave", system="You summarise.")
    a.chat("Say hello.", temperature=0, max_tokens=8)
    held = a.tokens
    a.add_messages(
        [
            {"role": "user", "content": "Tool result: 42 files changed."},
            {"role": "assistant", "content": "Noted."},
        ]
    )
    assert a.tokens > held
    extended = a.tokens
    a.chat("How many files changed?", temperature=0, max_tokens=8)
    assert a.usage.cached_tokens >= extended - 1


def test_messages_added_without_prefill_are_persisted(cache_dir):
    eng = Engine.load()
    a = eng.agent("jill")
    a.chat("Say hi.", temperature=0, max_tokens=4)
    a.add_messages([{"role": "user", "content": "Note: the meeting moved to 3 pm."}], prefill=False)
    eng.flush()
    restored = Engine.load().agent("jill")
    assert restored.messages[-1]["content"] == "Note: the meeting moved to 3 pm."
    assert len(restored.messages) == 3


def test_flipped_byte_falls_back_to_prefill_and_answers_the_same(cache_dir, caplog):
    eng = Engine.load()
    a = eng.agent("erin")
    a.chat("Write two sentences about the sea. " * 30, temperature=0, max_tokens=8)
    eng.flush()
    agent_dir = eng.agent_manager.store.agent_dir("erin")
    sealed = sorted(agent_dir.glob("b00000000-*.safetensors"))
    assert sealed, "a sealed first block"
    data = bytearray(sealed[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    sealed[0].write_bytes(bytes(data))
    expected = eng.chat(
        a.messages + [{"role": "user", "content": TURN2}], temperature=0, max_tokens=16
    )
    fresh = Engine.load()
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        b = fresh.agent("erin")
        reply = b.chat(TURN2, temperature=0, max_tokens=16)
    assert any(
        "quarantin" in r.message.lower() or "sha256" in r.message.lower() for r in caplog.records
    )
    assert b.usage.cached_tokens == 0
    assert reply == expected


def test_cache_from_another_model_is_not_used(cache_dir, caplog):
    eng = Engine.load()
    eng.agent("frank").chat(TURN1, temperature=0, max_tokens=8)
    eng.flush()
    other = Engine.load(kv_bits=8)  # another KV format: another fingerprint
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        f = other.agent("frank")
    assert f.tokens == 0 and f.messages == []
    assert any("kv_format" in r.message for r in caplog.records)


def test_caches_load_on_the_other_backend(cache_dir):
    pytest.importorskip("mlx_lm")
    torch_eng = Engine.load(backend="torch")
    torch_eng.agent("gina").chat(TURN1, temperature=0, max_tokens=16)
    torch_eng.flush()
    mlx_eng = Engine.load(backend="mlx")
    g = mlx_eng.agent("gina")
    assert g.tokens > 0
    g.chat(TURN2, temperature=0, max_tokens=8)
    assert g.usage.cached_tokens > 0


def test_context_overflow_errors_or_drops_oldest(cache_dir):
    from dataclasses import replace

    from edge_infer import ContextLengthError
    from edge_infer.backends.select import create_backend
    from edge_infer.models.loader import load_model

    m = load_model(None)
    small = replace(m, config=replace(m.config, context_length=120))
    eng = Engine(small, create_backend(small, "torch"))
    strict = eng.agent("hank", system="Be brief.")
    roomy = eng.agent("ivy", system="Be brief.", overflow="drop_oldest")
    long_msg = "Tell me about the weather in a few words please. " * 3
    with pytest.raises(ContextLengthError, match="120"):
        for _ in range(6):
            strict.chat(long_msg, temperature=0, max_tokens=8)
    for _ in range(6):
        roomy.chat(long_msg, temperature=0, max_tokens=8)
    assert roomy.messages[0]["role"] == "system"
    assert len(roomy.messages) < 13


def test_invalid_agent_names_are_refused(cache_dir):
    from edge_infer.cache_store import InvalidAgentName

    eng = Engine.load()
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(InvalidAgentName):
            eng.agent(bad)


def test_an_agent_saved_by_another_process_is_continued_not_overwritten(
    torch_engine, tmp_path, monkeypatch
):
    # two engines on one cache folder stand for two processes (a chat and a server)
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path))
    one = Engine(torch_engine.model, torch_engine.backend)
    two = Engine(torch_engine.model, torch_engine.backend)
    opts = {"temperature": 0, "max_tokens": 4}
    one.agent("shared").chat("First.", **opts)
    one.flush()
    two.agent("shared").chat("Second.", **opts)
    two.flush()
    one.agent("shared").chat("Third.", **opts)
    one.flush()
    users = [m["content"] for m in one.agent("shared").messages if m["role"] == "user"]
    assert users == ["First.", "Second.", "Third."]
    assert one.agent("shared").usage.cached_tokens > 0  # continued from the other's cache
    fresh = Engine(torch_engine.model, torch_engine.backend)
    assert [m["content"] for m in fresh.agent("shared").messages if m["role"] == "user"] == users
