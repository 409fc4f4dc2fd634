"""`edge-infer cache ...` as a user runs it: real caches written by the real store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge_infer.cache_store import AgentStore
from tests.support.cache_store_helpers import F16, make_store, save_agent
from tests.support.cli import assert_one_line_error, run_cli

LS_KEYS = {
    "agent",
    "model",
    "digest",
    "kv_format",
    "tokens",
    "cached_tokens",
    "messages",
    "blocks",
    "bytes",
    "created",
    "updated",
    "path",
    "problem",
}


@dataclass
class Cache:
    root: Path
    q4: AgentStore  # alice (40 tokens: 3 blocks) and bob (20 tokens: 2 blocks)
    f16: AgentStore  # alice (24 tokens: 2 blocks)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cache:
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(root))
    q4, f16 = make_store(root), make_store(root, F16, "OtherModel")
    save_agent(q4, "alice", 40)
    save_agent(q4, "bob", 20, seed=1)
    save_agent(f16, "alice", 24, seed=2)
    return Cache(root, q4, f16)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))


def test_ls_table_and_json(cache: Cache) -> None:
    proc = run_cli("cache", "ls")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    alice_q4 = next(ln for ln in lines if "alice" in ln and "q4g64" in ln)
    assert "TestModel" in alice_q4 and cache.q4.fingerprint.digest[:8] in alice_q4
    assert " 41 " in alice_q4 and " 40 " in alice_q4  # tokens, cached tokens
    alice_f16 = next(ln for ln in lines if "alice" in ln and "f16" in ln)
    assert "OtherModel" in alice_f16 and cache.f16.fingerprint.digest[:8] in alice_f16
    assert any("bob" in ln and "TestModel" in ln for ln in lines)
    assert str(cache.root) in proc.stderr and "3 agents" in proc.stderr

    proc = run_cli("cache", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert all(set(r) == LS_KEYS for r in rows)
    got = {(r["agent"], r["model"]): r for r in rows}
    assert set(got) == {("alice", "TestModel"), ("alice", "OtherModel"), ("bob", "TestModel")}
    a = got["alice", "TestModel"]
    assert a["digest"] == cache.q4.fingerprint.digest and a["kv_format"] == "q4g64"
    assert (a["tokens"], a["cached_tokens"], a["blocks"], a["messages"]) == (41, 40, 3, 2)
    assert a["bytes"] > 0 and a["updated"] and a["problem"] is None
    b = got["alice", "OtherModel"]
    assert (b["kv_format"], b["cached_tokens"], b["blocks"]) == ("f16", 24, 2)


def test_show_every_model_of_an_agent(cache: Cache) -> None:
    proc = run_cli("cache", "show", "alice")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in (
        "TestModel",
        "OtherModel",
        "/models/TestModel",
        cache.q4.fingerprint.digest,
        cache.f16.fingerprint.digest,
        "fingerprint.weights",
        "w-TestModel",
        "q4g64",
        "f16",
        "b00000032-",
        "system: Be brief.",
        "user: Tell me about the weather in Lisbon",
    ):
        assert fragment in out, fragment
    assert "Lisbon " * 5 not in out  # previews are cut short

    proc = run_cli("cache", "show", "alice", "--json")
    assert proc.returncode == 0, proc.stderr
    docs = {d["model"]: d for d in json.loads(proc.stdout)}
    q4 = docs["TestModel"]
    assert q4["fingerprint"] == dict(cache.q4.fingerprint.parts)
    assert q4["model_source"] == "/models/TestModel"
    assert [(b["start"], b["length"], b["sealed"]) for b in q4["blocks"]] == [
        (0, 16, True),
        (16, 16, True),
        (32, 8, False),
    ]
    assert all(b["bytes"] > 0 for b in q4["blocks"])
    assert q4["quarantined"] == [] and q4["recent_messages"][0]["role"] == "system"


def test_show_unknown_and_invalid_names(cache: Cache) -> None:
    assert_one_line_error(run_cli("cache", "show", "carol"), "carol")
    assert_one_line_error(run_cli("cache", "show", "../x"), "invalid agent name", "../x")


def test_rm_one_model_then_all(cache: Cache) -> None:
    q4_dir, f16_dir = cache.q4.agent_dir("alice"), cache.f16.agent_dir("alice")
    f16_bytes = sum(p.stat().st_size for p in f16_dir.rglob("*") if p.is_file())
    prefix = cache.f16.fingerprint.digest[:6]
    proc = run_cli("cache", "rm", "alice", "--model", prefix, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["bytes_freed"] == f16_bytes
    assert [(r["agent"], r["digest"]) for r in doc["removed"]] == [
        ("alice", cache.f16.fingerprint.digest)
    ]
    assert not f16_dir.exists() and q4_dir.exists()
    assert not list(f16_dir.parent.glob(".deleting-*"))

    proc = run_cli("cache", "rm", "alice")
    assert proc.returncode == 0, proc.stderr
    assert "removed alice" in proc.stdout and "freed" in proc.stdout
    assert not q4_dir.exists() and cache.q4.load("bob") is not None

    assert_one_line_error(run_cli("cache", "rm", "alice"), "alice")


def test_verify_reports_a_flipped_byte_without_touching_it(cache: Cache) -> None:
    proc = run_cli("cache", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK") == 3

    files = save_agent(cache.q4, "alice", 40)  # same KV: same files
    bad = cache.q4.agent_dir("alice") / files[1]
    flip_byte(bad)
    before = files_under(cache.root)
    proc = run_cli("cache", "verify")
    assert proc.returncode == 1
    line = next(ln for ln in proc.stdout.splitlines() if files[1] in ln)
    assert "alice" in line and "sha256" in line
    assert "alice: 16/40" in proc.stdout  # the first block is still usable
    assert "quarantine" in proc.stderr  # hint: loading sets bad blocks aside
    after = files_under(cache.root)
    assert {k: v for k, v in after.items() if ".locks" not in k} == {
        k: v for k, v in before.items() if ".locks" not in k
    }


def test_verify_one_agent_with_a_missing_block(cache: Cache) -> None:
    files = save_agent(cache.q4, "bob", 20, seed=1)
    (cache.q4.agent_dir("bob") / files[1]).unlink()
    proc = run_cli("cache", "verify", "bob", "--json")
    assert proc.returncode == 1
    (res,) = json.loads(proc.stdout)
    assert (res["agent"], res["ok"], res["usable_tokens"]) == ("bob", False, 16)
    assert res["problems"] == [{"file": files[1], "reason": "missing"}]


def test_corrupt_manifest_is_listed_and_fails_verify(cache: Cache) -> None:
    (cache.q4.agent_dir("bob") / "manifest.json").write_text('{"format_version": 1, "tok')
    proc = run_cli("cache", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    bob = next(r for r in json.loads(proc.stdout) if r["agent"] == "bob")
    assert "not valid JSON" in bob["problem"] and bob["model"] == "TestModel"

    proc = run_cli("cache", "verify")
    assert proc.returncode == 1
    assert any("bob" in ln and "manifest.json" in ln for ln in proc.stdout.splitlines())


def test_gc_removes_leftovers_and_keeps_what_agents_need(cache: Cache) -> None:
    d = cache.q4.agent_dir("alice")
    (d / ".tmp-stray").write_bytes(b"x" * 100)
    stray_block = d / "b00000000-0123456789abcdef.safetensors"
    stray_block.write_bytes(b"y" * 200)
    (d / "quarantine").mkdir()
    (d / "quarantine" / "b00000016-fedcba9876543210.safetensors").write_bytes(b"z" * 300)
    deleting = cache.q4.base_dir / ".deleting-x-0badcafe"
    deleting.mkdir()
    (deleting / "manifest.json").write_bytes(b"w" * 400)

    before = files_under(cache.root)
    proc = run_cli("cache", "gc", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "would free 1000 B" in proc.stdout
    assert files_under(cache.root).keys() == before.keys()

    proc = run_cli("cache", "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["bytes_freed"] == 1000 and not report["dry_run"]
    kinds = {Path(i["path"]).name: i["kind"] for i in report["removed"]}
    assert kinds == {
        ".tmp-stray": "temp file",
        stray_block.name: "unreferenced block",
        "quarantine": "quarantine",
        deleting.name: "interrupted delete",
    }
    assert not stray_block.exists() and not deleting.exists() and not (d / "quarantine").exists()
    for store, agent, tokens in ((cache.q4, "alice", 40), (cache.q4, "bob", 20)):
        snap = store.load(agent)
        assert snap is not None and snap.valid_tokens == tokens and not snap.quarantined
    assert cache.f16.load("alice").valid_tokens == 24


@pytest.mark.slow
def test_a_real_engine_cache_is_listed_and_verifies(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "cache"))
    from edge_infer import Engine

    eng = Engine.load(backend="torch")
    eng.agent("alice").chat("Hi", max_tokens=4, temperature=0)
    eng.flush()

    proc = run_cli("cache", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert row["agent"] == "alice" and "SmolLM2" in row["model"]
    assert row["cached_tokens"] > 0 and row["problem"] is None
    proc = run_cli("cache", "verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_linked_entries_are_reported_by_ls_verify_and_rm(cache: Cache, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("keep")
    lock = cache.q4.base_dir / ".locks" / "bob.lock"
    lock.unlink()
    lock.symlink_to(victim)  # a linked lock file no longer stops verify for every agent
    bob = cache.f16.agent_dir("alice")
    bob.rename(outside / "alice")
    bob.symlink_to(outside / "alice")
    proc = run_cli("cache", "verify")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert any("bob" in ln and "bob.lock is a symbolic link" in ln for ln in lines)
    assert any("alice" in ln and "is a symbolic link" in ln for ln in lines)
    proc = run_cli("cache", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    problems = [r["problem"] or "" for r in json.loads(proc.stdout)]
    assert sum("symbolic link" in p for p in problems) == 1
    assert_one_line_error(run_cli("cache", "rm", "bob"), "bob.lock is a symbolic link")
    proc = run_cli("cache", "rm", "alice", "--model", cache.f16.fingerprint.digest)
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "keep" and (outside / "alice" / "manifest.json").is_file()
