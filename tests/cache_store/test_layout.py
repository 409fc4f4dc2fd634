"""The cache layout: whole-string name checks and no path through a symbolic link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_infer.cache_store.errors import InvalidAgentName, UnsafeCachePath
from edge_infer.cache_store.layout import (
    agent_lock,
    deleting_agent,
    is_agent_name,
    private_subdir,
    read_nofollow,
    refuse_links,
    validate_agent_name,
)
from edge_infer.cache_store.manifest import is_block_file, is_sha256

BLOCK = "b00000016-0123456789abcdef.safetensors"


@pytest.mark.parametrize("name", ["fk\n", "a\n", "ok\r", "a b", "\nab", "é", "a/b", ".a", ""])
def test_agent_names_are_checked_whole(name: str) -> None:
    assert not is_agent_name(name)
    with pytest.raises(InvalidAgentName):
        validate_agent_name(name)


def test_every_layout_pattern_is_whole_string_and_ascii() -> None:
    assert is_agent_name("a.b_c-1") and is_block_file(BLOCK) and is_sha256("0" * 64)
    assert not is_block_file(BLOCK + "\n")
    assert not is_block_file("b\u0660" * 1 + "0000016-0123456789abcdef.safetensors")  # Arabic 0
    assert not is_sha256("0" * 64 + "\n")
    assert deleting_agent(".deleting-alice-0123abcd") == "alice"
    assert deleting_agent(".deleting-alice-0123abcd\n") is None
    assert deleting_agent(".deleting-fk\n-0123abcd") is None


def test_refuse_links_checks_every_level_below_the_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "agents" / "fp").mkdir(parents=True)
    target = root / "agents" / "fp" / "alice" / "manifest.json"
    assert refuse_links(root, target) == target  # missing parts are fine
    (root / "agents" / "fp" / "alice").symlink_to(outside)
    with pytest.raises(UnsafeCachePath, match="alice is a symbolic link"):
        refuse_links(root, target)
    with pytest.raises(UnsafeCachePath, match="outside the cache root"):
        refuse_links(root, outside / "x")
    with pytest.raises(UnsafeCachePath):
        private_subdir(root, target.parent / "quarantine")
    assert list(outside.iterdir()) == []


def test_a_linked_root_is_the_users_choice(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "root").symlink_to(real)
    d = private_subdir(tmp_path / "root", tmp_path / "root" / "agents" / "fp")
    assert (real / "agents" / "fp").is_dir() and d.is_dir()


def test_read_nofollow_refuses_a_link(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    (tmp_path / "link").symlink_to(secret)
    with pytest.raises(UnsafeCachePath, match="symbolic link"):
        read_nofollow(tmp_path / "link")
    with pytest.raises(FileNotFoundError):
        read_nofollow(tmp_path / "missing")
    assert read_nofollow(secret) == b"x"


def test_a_linked_lock_file_or_lock_folder_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("keep me")
    fp_dir = tmp_path / "root" / "agents" / "fp"
    (fp_dir / ".locks").mkdir(parents=True)
    (fp_dir / ".locks" / "alice.lock").symlink_to(victim)
    with (
        pytest.raises(UnsafeCachePath, match="alice.lock is a symbolic link"),
        agent_lock(fp_dir, "alice", timeout=1),
    ):
        pass
    assert victim.read_text() == "keep me"
    os.unlink(fp_dir / ".locks" / "alice.lock")
    os.rmdir(fp_dir / ".locks")
    (fp_dir / ".locks").symlink_to(outside)
    with (
        pytest.raises(UnsafeCachePath, match=".locks is a symbolic link"),
        agent_lock(fp_dir, "bob", timeout=1),
    ):
        pass
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
