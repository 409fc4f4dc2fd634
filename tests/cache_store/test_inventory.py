"""The cache inventory functions behind `edge-infer cache`, in process, on real store files."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from edge_infer.cache_store import inventory as inv
from edge_infer.cache_store.errors import CacheError
from edge_infer.cache_store.store import IDS_MISMATCH
from tests.support.cache_store_helpers import F16, make_store, save_agent


def test_an_empty_root_holds_nothing(tmp_path: Path) -> None:
    assert inv.scan(tmp_path) == [] and inv.verify(tmp_path) == []
    assert inv.collect_garbage(tmp_path).removed == []
    with pytest.raises(CacheError, match="alice"):
        inv.describe(tmp_path, "alice")
    with pytest.raises(CacheError, match="alice"):
        inv.verify(tmp_path, "alice")
    assert not tmp_path.joinpath("agents").exists()


def test_gc_keeps_the_blocks_of_an_unreadable_manifest(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    files = save_agent(store, "alice", 40)
    d = store.agent_dir("alice")
    (d / "manifest.json").write_bytes(b"{")
    (d / "quarantine").mkdir()
    report = inv.collect_garbage(tmp_path)
    assert [i.kind for i in report.removed] == ["quarantine"]
    assert [p for p, _ in report.skipped] == [d]
    assert all((d / f).is_file() for f in files)
    (rec,) = inv.scan(tmp_path)
    assert not rec.readable and "not valid JSON" in rec.problem


def test_gc_clears_an_interrupted_first_save_and_an_emptied_model(tmp_path: Path) -> None:
    store, other = make_store(tmp_path), make_store(tmp_path, F16, "OtherModel")
    save_agent(store, "alice", 20)
    save_agent(other, "bob", 20)
    ghost = store.base_dir / "ghost"  # blocks written, the process died before the manifest
    ghost.mkdir()
    (ghost / "b00000000-0123456789abcdef.safetensors").write_bytes(b"x" * 10)
    [removed] = inv.remove_agent(tmp_path, "bob")
    assert removed.digest == other.fingerprint.digest and removed.bytes > 0

    report = inv.collect_garbage(tmp_path)
    kinds = sorted(i.kind for i in report.removed)
    assert kinds == [
        "agent folder without manifest",
        "model folder without agents",
        "unreferenced block",
    ]
    assert not ghost.exists() and not other.base_dir.exists()
    assert store.load("alice").valid_tokens == 20
    save_agent(other, "bob", 20)  # a later save recreates the model folder
    assert other.load("bob").valid_tokens == 20


def test_dry_run_reports_the_same_bytes_and_creates_no_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    save_agent(store, "alice", 20)
    ghost = store.base_dir / "ghost"
    ghost.mkdir()
    (ghost / ".tmp-abc").write_bytes(b"t" * 7)
    (ghost / "quarantine").mkdir()
    (ghost / "quarantine" / "manifest.json").write_bytes(b"m" * 11)
    (store.base_dir / ".deleting-carol-12345678").mkdir()
    before = sorted(p for p in tmp_path.rglob("*"))
    dry = inv.collect_garbage(tmp_path, dry_run=True)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    real = inv.collect_garbage(tmp_path)
    assert dry.dry_run and not real.dry_run
    assert dry.bytes_freed == real.bytes_freed == 18
    assert [(i.path, i.kind) for i in dry.removed] == [(i.path, i.kind) for i in real.removed]


def test_gc_leaves_an_agent_whose_lock_is_held(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(inv, "LOCK_TIMEOUT_S", 0.2)
    store = make_store(tmp_path)
    save_agent(store, "alice", 20)
    stray = store.agent_dir("alice") / "b00000016-0123456789abcdef.safetensors"
    stray.write_bytes(b"x")  # as a save in progress writes blocks before the manifest
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with store.lock("alice"):
            held.set()
            done.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        held.wait(10)
        report = inv.collect_garbage(tmp_path)
    finally:
        done.set()
        t.join()
    assert stray.exists() and report.removed == []
    assert [p for p, _ in report.skipped] == [store.agent_dir("alice")]


def test_gc_removes_loose_temp_files_only_once_old(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    save_agent(store, "alice", 20)
    young, old = store.base_dir / ".tmp-young", store.base_dir / ".tmp-old"
    young.write_bytes(b"y")
    old.write_bytes(b"o")
    past = time.time() - 2 * inv.TEMP_GRACE_S
    os.utime(old, (past, past))
    report = inv.collect_garbage(tmp_path)
    assert [i.path for i in report.removed] == [old]
    assert young.exists()


def test_verify_names_identity_and_version_problems(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    save_agent(store, "alice", 20)
    save_agent(store, "bob", 20)
    moved = tmp_path / "agents" / "0123456789abcdef"
    moved.mkdir()
    store.agent_dir("alice").rename(moved / "alice")
    bob = store.agent_dir("bob") / "manifest.json"
    doc = json.loads(bob.read_bytes())
    bob.write_text(json.dumps({**doc, "format_version": 99}))
    results = {r.agent: r for r in inv.verify(tmp_path)}
    (a,) = results["alice"].problems
    assert a.file == "manifest.json" and "does not match its folder" in a.reason
    assert results["alice"].usable_tokens == 20  # the blocks themselves are fine
    (b,) = results["bob"].problems
    assert "version 99" in b.reason and results["bob"].usable_tokens == 0


def test_remove_agent_by_digest_prefix(tmp_path: Path) -> None:
    a, b = make_store(tmp_path), make_store(tmp_path, F16, "OtherModel")
    save_agent(a, "alice", 20)
    save_agent(b, "alice", 20)
    with pytest.raises(CacheError, match="no cache for model 'zz'"):
        inv.remove_agent(tmp_path, "alice", "zz")
    with pytest.raises(CacheError, match="ambiguous"):
        inv.remove_agent(tmp_path, "alice", "")
    [gone] = inv.remove_agent(tmp_path, "alice", a.fingerprint.digest[:4])
    assert gone.model_name == "TestModel" and not a.exists("alice") and b.exists("alice")


def test_message_preview() -> None:
    parts = [{"type": "image"}, {"type": "text", "text": "what is\nthis?"}]
    got = inv.message_preview({"role": "user", "content": parts})
    assert got == ("user", "[image] what is this?")
    assert inv.message_preview({"content": "x" * 100}, 10) == ("?", "x" * 9 + "…")
    assert inv.message_preview(["odd"]) == ("?", '["odd"]')


def test_verify_reports_an_unreadable_block_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    files = save_agent(store, "alice", 40)
    bad = store.agent_dir("alice") / files[0]
    bad.unlink()
    bad.mkdir()  # read_bytes fails with an OSError other than "not found"
    (res,) = inv.verify(tmp_path, "alice")
    assert [p.file for p in res.problems] == [files[0]] and res.usable_tokens == 0
    assert res.problems[0].reason.startswith("unreadable")


def test_verify_detects_a_manifest_edited_to_claim_other_ids(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    save_agent(store, "alice", 40)  # blocks of 16: ids 100.. at positions 0..39
    path = store.agent_dir("alice") / "manifest.json"
    doc = json.loads(path.read_bytes())
    doc["token_ids"][20] = 7
    path.write_text(json.dumps(doc))
    (res,) = inv.verify(tmp_path, "alice")
    assert res.usable_tokens == 16
    assert [p.reason for p in res.problems] == [IDS_MISMATCH] * 2


def _plant_links(tmp_path: Path):
    """alice: folder linked out; bob: lock file linked out; carol: fine."""
    store = make_store(tmp_path)
    for name in ("alice", "bob", "carol"):
        save_agent(store, name, 20)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("keep")
    alice = store.agent_dir("alice")
    alice.rename(outside / "alice")
    alice.symlink_to(outside / "alice")
    lock = store.base_dir / ".locks" / "bob.lock"
    lock.unlink()
    lock.symlink_to(victim)
    return store, outside, victim


def test_ls_verify_and_rm_report_linked_entries_instead_of_stopping(tmp_path: Path) -> None:
    store, outside, victim = _plant_links(tmp_path)
    recs = {r.agent: r for r in inv.scan(tmp_path)}
    assert "symbolic link" in recs["alice"].problem and recs["carol"].problem is None
    results = {r.agent: r for r in inv.verify(tmp_path)}
    assert set(results) == {"alice", "bob", "carol"}
    assert "symbolic link" in results["alice"].problems[0].reason
    assert "bob.lock is a symbolic link" in results["bob"].problems[0].reason
    assert results["carol"].ok and victim.read_text() == "keep"
    assert "symbolic link" in inv.describe(tmp_path, "alice")[0].problem
    (gone,) = inv.remove_agent(tmp_path, "alice")
    assert not os.path.lexists(gone.path) and (outside / "alice" / "manifest.json").is_file()
    with pytest.raises(CacheError, match="bob.lock is a symbolic link"):
        inv.remove_agent(tmp_path, "bob")
    report = inv.collect_garbage(tmp_path)
    assert [p.name for p, _ in report.skipped] == ["bob"]
    assert victim.read_text() == "keep" and (outside / "alice" / "manifest.json").is_file()


def test_a_linked_fingerprint_folder_is_listed_not_followed(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    save_agent(store, "alice", 20)
    outside = tmp_path / "outside"
    store.base_dir.rename(outside)
    store.base_dir.symlink_to(outside)
    (rec,) = inv.scan(tmp_path)
    assert rec.agent == "*" and rec.digest == store.fingerprint.digest
    (res,) = inv.verify(tmp_path)
    assert not res.ok
    assert inv.collect_garbage(tmp_path).removed == []
    assert (outside / "alice" / "manifest.json").is_file()
